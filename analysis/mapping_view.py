"""Source -> target item mappings in the target expert's embedding space (the paper's Figure 4, section 5.3.2).

Projects the item embeddings of the TARGET domain's expert (its checkpoint is
among the inputs the manifest beside the regenerated file records) to 2-D and marks:
all source-domain items (light blue), the source items decoding transformed
(the keys of `mapping.json`, solid blue), their counterparts (for each chosen
source item the target item it became most often, ties by smallest id; solid
red), the other target items (light red), and a line from chosen source to
counterpart for the `--lines` most frequent pairs.

PCA (numpy SVD, signs fixed) is the default; `--method tsne` uses
scikit-learn's t-SNE with a fixed seed. Both see every item (1..n_items), so
one picture holds both domains. The JSON beside the figure gives a number the
picture only suggests: the cosine similarity of each chosen source item to its
counterpart, against its mean similarity to all target items.

    python -m analysis.mapping_view --target dom4 --out results/analysis dataset=ACDT seed=2025
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from analysis import save_figure
from analysis.diagnostics import add_input_arguments, resolve_inputs
from data.domains import DomainRanges
from data.files import write_text_atomic
from data.fingerprints import StaleArtifactError, file_digest
from data.paths import project_path

METHODS = {"pca": "PCA", "tsne": "t-SNE"}  # --method -> label
SOURCE_COLOR, CHOSEN_COLOR = "#a6cee3", "#1f4e9c"
TARGET_COLOR, COUNTERPART_COLOR = "#f2b8b5", "#d62728"


def normalise_mapping(mapping: dict) -> dict[int, dict[int, int]]:
    """`{"source id": {"target id": count}}` as read from JSON -> integer ids and counts."""
    return {int(s): {int(t): int(c) for t, c in targets.items()} for s, targets in mapping.items() if targets}


def counterparts(mapping: dict) -> dict[int, tuple[int, int]]:
    """Each source item's most frequent target item and how often it was chosen: `{s: (t, count)}`."""
    out = {}
    for s, targets in normalise_mapping(mapping).items():
        t = min(targets, key=lambda t: (-targets[t], t))
        out[s] = (t, targets[t])
    return out


def project_2d(points: np.ndarray, method: str = "pca", seed: int = 0) -> np.ndarray:
    """(N, H) -> (N, 2), deterministic for a given input."""
    points = np.asarray(points, dtype=np.float64)
    if method == "pca":
        centred = points - points.mean(axis=0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        axes = vt[:2]
        # SVD fixes each axis only up to sign: make its largest loading positive.
        axes = axes * np.sign(axes[np.arange(len(axes)), np.abs(axes).argmax(axis=1)])[:, None]
        projected = centred @ axes.T
        if projected.shape[1] < 2:  # one-dimensional embeddings: draw them on a line
            projected = np.pad(projected, ((0, 0), (0, 2 - projected.shape[1])))
        return projected
    if method == "tsne":
        try:
            from sklearn.manifold import TSNE
        except ImportError as error:
            raise ImportError("--method tsne needs scikit-learn (pip install scikit-learn); "
                              "--method pca needs nothing more") from error
        perplexity = min(30.0, max(2.0, (len(points) - 1) / 3))  # t-SNE needs perplexity < N
        return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(points)
    raise ValueError(f"unknown projection {method!r}: expected one of {', '.join(METHODS)}")


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-12)
    return a @ b.T


def mapping_view(embedding, domains: DomainRanges, target: str, mapping: dict, method: str = "pca",
                 out_png: Path | str = "mapping.png", lines: int = 20, seed: int = 0, title: str | None = None) -> dict:
    """Draw the projection into `out_png` (atomically); returns JSON-able numbers about the pairs.

    `embedding`: (n_items + 1, H) item embeddings, row i = item id i (row 0 padding), a tensor or an array.
    `mapping`: `{source id: {target id: count}}` (string or integer ids).
    """
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    if hasattr(embedding, "detach"):
        embedding = embedding.detach().cpu().numpy()
    embedding = np.asarray(embedding, dtype=np.float64)
    n = domains.n_items
    if embedding.ndim != 2 or embedding.shape[0] != n + 1:
        raise ValueError(f"embedding of shape {embedding.shape}: expected ({n + 1}, H), a row per item id and padding")
    lo, hi = domains.range(target)
    pairs = counterparts(mapping)
    for s, (t, _) in pairs.items():
        if not 1 <= s <= n or lo <= s < hi or not lo <= t < hi:
            raise ValueError(f"mapping pair {s} -> {t}: expected a source item outside {target}'s ids [{lo}, {hi}) "
                             f"mapped to one inside")

    xy = np.zeros((n + 1, 2))
    xy[1:] = project_2d(embedding[1:], method, seed)  # row i = item id i again
    ids = np.arange(n + 1)
    is_target = (ids >= lo) & (ids < hi)
    is_source = (ids >= 1) & ~is_target
    chosen = np.array(sorted(pairs), dtype=np.int64)
    matched = np.array(sorted({t for t, _ in pairs.values()}), dtype=np.int64)
    other_target = is_target.copy()
    other_target[matched] = False

    fig, ax = plt.subplots(figsize=(5.2, 4.6), dpi=100)
    try:
        ax.scatter(*xy[is_source].T, s=8, c=SOURCE_COLOR, lw=0, label=f"all source items ({is_source.sum()})")
        ax.scatter(*xy[other_target].T, s=8, c=TARGET_COLOR, lw=0, label=f"other target items ({other_target.sum()})")
        # Most frequent pairs get a connecting line; sorted by count, then source id, for a fixed choice.
        top = sorted(pairs.items(), key=lambda p: (-p[1][1], p[0]))[:max(lines, 0)]
        for s, (t, _) in top:
            ax.plot(*xy[[s, t]].T, color="0.45", lw=0.6, alpha=0.8, zorder=1)
        ax.scatter(*xy[chosen].reshape(-1, 2).T, s=18, c=CHOSEN_COLOR, lw=0, zorder=2,
                   label=f"transformed source items ({len(chosen)})")
        ax.scatter(*xy[matched].reshape(-1, 2).T, s=18, c=COUNTERPART_COLOR, lw=0, zorder=2,
                   label=f"their target counterparts ({len(matched)})")
        label = METHODS.get(method, method)
        ax.set(xticks=[], yticks=[], title=title or f"{target}: target expert's item embeddings ({label})")
        ax.title.set_fontsize(9)
        ax.legend(fontsize=7, loc="best", markerscale=1.5)
        fig.tight_layout()
    except BaseException:
        plt.close(fig)
        raise
    save_figure(fig, out_png)

    numbers = {"method": method, "source_items": int(is_source.sum()), "target_items": int(is_target.sum()),
               "transformed_source_items": len(chosen), "counterparts": len(matched), "lines": len(top)}
    if len(chosen):
        t_of = np.array([pairs[s][0] for s in chosen])
        similarity = _cosine(embedding[chosen], embedding[lo:hi])  # (chosen, |R_T|)
        pair_similarity = similarity[np.arange(len(chosen)), t_of - lo]
        numbers.update({
            "cosine_to_counterpart_mean": float(pair_similarity.mean()),
            "cosine_to_all_targets_mean": float(similarity.mean()),
            # How many target items are at least as close as the counterpart (1 = the closest).
            "counterpart_rank_median": float(np.median((similarity >= pair_similarity[:, None]).sum(axis=1))),
        })
    return numbers


def main(argv: list[str] | None = None) -> dict:
    from checkpoints import load_checkpoint  # torch is only needed by the command

    parser = argparse.ArgumentParser(prog="python -m analysis.mapping_view", description=__doc__.split("\n")[0])
    add_input_arguments(parser)
    parser.add_argument("--method", choices=list(METHODS), default="pca", help="2-D projection")
    parser.add_argument("--lines", type=int, default=20, help="draw lines for this many most frequent pairs")
    args = parser.parse_args(argv)
    dataset, output, manifest = resolve_inputs(args)
    path = output.inter
    expert = (manifest or {}).get("inputs", {}).get(f"checkpoint {args.target}")
    # where the expert lay when it decoded (manifests before 2026-12 kept the path in the fingerprint)
    location = (manifest or {}).get("checkpoints", {}).get(args.target) or (expert or {}).get("path")
    if expert is None or location is None:
        raise FileNotFoundError(f"{path}: no manifest beside it naming the {args.target} expert's checkpoint")
    if not output.mapping.is_file():
        raise FileNotFoundError(f"{output.mapping}: mapping not found (decoding writes it beside the training file)")
    mapping = json.loads(output.mapping.read_text(encoding="utf-8"))
    checkpoint = project_path(location)
    if not checkpoint.is_file() or file_digest(checkpoint) != expert["sha256"]:
        raise StaleArtifactError(f"{path}: decoded with {checkpoint}, which is gone or has changed since; decode "
                                 "again with overwrite=true")
    embedding = load_checkpoint(checkpoint)["state_dict"]["item_emb.weight"]
    out = project_path(args.out)
    numbers = mapping_view(embedding, dataset.domains, args.target, mapping, args.method,
                           out / f"mapping_{args.target}.png", lines=args.lines,
                           title=f"{dataset.name} {args.target}: target expert's item embeddings "
                                 f"({METHODS[args.method]})")
    numbers = {"dataset": dataset.name, "target": args.target, "regenerated_file": str(path),
               "checkpoint": str(checkpoint), **numbers}
    write_text_atomic(out / f"mapping_{args.target}.json", json.dumps(numbers, indent=2) + "\n")
    print(f"{args.target}: {numbers['transformed_source_items']} source items -> {numbers['counterparts']} target "
          f"items; wrote {out / f'mapping_{args.target}.png'}")
    return numbers


if __name__ == "__main__":
    main()
