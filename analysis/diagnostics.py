"""Regeneration diagnostics of one target domain (the paper's Figure 5, section 5.3.3).

Compares the original training data of the target domain (`NAME.dom{d}.train`)
with the regenerated training file that decoding wrote for it
(`NAME.SEED.dom{d}.train`, which holds the original rows plus one regenerated
row per user). Three panels:

(a) item-frequency curve: interactions per item of R_T, sorted descending,
    rank against count on log-log axes (items with no interaction cannot be
    drawn there; their number is in the JSON as `distinct_items`);
(b) share of the interactions that fall into the popularity segments
    Top 10% / Mid 40% / Tail 50% of R_T. The segments are defined ONCE, from the
    ORIGINAL data, and applied to both datasets: the items of R_T are sorted by
    original count descending, ties by item id ascending; Top is the first
    ceil(10% * |R_T|) items, Mid the items up to ceil(50% * |R_T|), Tail the
    rest. An item with no original interaction is always in Tail, even when
    more than half of R_T is unseen;
(c) distribution of row lengths (history + target), drawn as a step CDF.

Interactions are item occurrences in the rows' sequences (history + target), so
an interaction a user's rows share is counted once per row.

    python -m analysis.diagnostics --target dom4 --out results/analysis dataset=ACDT seed=2025
    python -m analysis.diagnostics --target dom4 --out DIR --regenerated PATH.inter dataset=ACDT
"""
from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

import numpy as np

from analysis import save_figure
from data.files import SequenceRows, read_inter, write_text_atomic
from data.paths import project_path

# Upper edges of the segments as integer percents of |R_T|: integer arithmetic
# keeps ceil() exact (30 * 0.1 is 3.0000000000000004 in floating point).
SEGMENT_EDGES_PERCENT = (10, 50, 100)
SEGMENTS = ("top10", "mid40", "tail50")
SEGMENT_LABELS = ("Top 10%", "Mid 40%", "Tail 50%")
SEGMENT_RULE = (
    "items of R_T sorted by ORIGINAL count descending, ties by id ascending; Top = first ceil(10%) of the items, "
    "Mid = up to ceil(50%), Tail = the rest; items with zero original count are always in Tail"
)
ORIGINAL_COLOR, REGENERATED_COLOR = "#4c72b0", "#dd8452"


def item_frequencies(rows: SequenceRows, item_range: tuple[int, int]) -> np.ndarray:
    """Interactions per item of `item_range` = [lo, hi): entry i counts item lo + i.

    Items outside the range are not counted (a target-domain file has none).
    """
    lo, hi = item_range
    if hi <= lo:
        raise ValueError(f"empty item range {item_range}")
    items = rows.items[(rows.items >= lo) & (rows.items < hi)]
    return np.bincount(items - lo, minlength=hi - lo).astype(np.int64)


def frequency_curve(counts: np.ndarray) -> np.ndarray:
    """Counts of the items with at least one interaction, sorted descending (rank 1 first)."""
    counts = np.asarray(counts)
    return -np.sort(-counts[counts > 0])


def popularity_segments(original_counts: np.ndarray) -> np.ndarray:
    """Segment index of each item (0 Top, 1 Mid, 2 Tail) from its original popularity; see the module docstring."""
    original_counts = np.asarray(original_counts)
    n = len(original_counts)
    # lexsort sorts by its last key first: count descending, then id ascending.
    order = np.lexsort((np.arange(n), -original_counts))
    edges = [(n * p + 99) // 100 for p in SEGMENT_EDGES_PERCENT]  # ceil(n * p / 100)
    rank_segment = np.searchsorted(np.asarray(edges), np.arange(n), side="right")
    segment = np.empty(n, dtype=np.int64)
    segment[order] = rank_segment
    segment[original_counts == 0] = len(SEGMENTS) - 1
    return segment


def segment_shares(original_counts: np.ndarray, counts: np.ndarray) -> dict[str, float]:
    """Share of the interactions of `counts` in each popularity segment of `original_counts` (sums to 1).

    Both arrays are aligned on the items of R_T; all shares are 0 when `counts` has no interaction.
    """
    original_counts, counts = np.asarray(original_counts), np.asarray(counts)
    if original_counts.shape != counts.shape:
        raise ValueError(f"counts of {len(counts)} items, original counts of {len(original_counts)}")
    per_segment = np.bincount(popularity_segments(original_counts), weights=counts, minlength=len(SEGMENTS))
    total = per_segment.sum()
    shares = per_segment / total if total > 0 else np.zeros(len(SEGMENTS))
    return {name: float(s) for name, s in zip(SEGMENTS, shares)}


def length_distribution(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct row lengths, ascending, and the number of rows of each."""
    values, rows = np.unique(np.asarray(lengths, dtype=np.int64), return_counts=True)
    return values, rows


def gini(counts: np.ndarray) -> float:
    """Gini coefficient of the counts over all items (0: every item equally often; -> 1: one item has all)."""
    x = np.sort(np.asarray(counts, dtype=np.float64))
    n, total = len(x), x.sum()
    if n == 0 or total == 0:
        return 0.0
    return float((2 * np.arange(1, n + 1) - n - 1) @ x / (n * total))


def _side(rows: SequenceRows, counts: np.ndarray, original_counts: np.ndarray) -> dict:
    lengths = rows.lengths
    values, n_rows = length_distribution(lengths)
    active = int((counts > 0).sum())
    return {
        "rows": len(rows),
        "interactions": int(counts.sum()),
        "distinct_items": active,
        "coverage": active / len(counts),
        "counts": {"max": int(counts.max()), "mean": float(counts.mean()), "median": float(np.median(counts)),
                   "mean_active": float(counts[counts > 0].mean()) if active else 0.0, "gini": gini(counts)},
        "shares": segment_shares(original_counts, counts),
        "length": {"mean": float(lengths.mean()), "median": float(np.median(lengths)),
                   "min": int(lengths.min()), "max": int(lengths.max())},
        "frequency_curve": frequency_curve(counts).tolist(),
        "length_histogram": {"length": values.tolist(), "rows": n_rows.tolist()},
    }


def diagnose(original_rows: SequenceRows, regenerated_rows: SequenceRows, item_range: tuple[int, int]) -> dict:
    """The numbers of the three panels, JSON-able: one entry per dataset plus the segments used."""
    lo, hi = item_range
    for what, rows in (("original", original_rows), ("regenerated", regenerated_rows)):
        if len(rows) == 0:
            raise ValueError(f"the {what} rows are empty")
    original_counts = item_frequencies(original_rows, item_range)
    regenerated_counts = item_frequencies(regenerated_rows, item_range)
    sizes = np.bincount(popularity_segments(original_counts), minlength=len(SEGMENTS))
    return {
        "item_range": [int(lo), int(hi)],
        "n_items": int(hi - lo),
        "segments": {"rule": SEGMENT_RULE, "sizes": {name: int(s) for name, s in zip(SEGMENTS, sizes)}},
        "original": _side(original_rows, original_counts, original_counts),
        "regenerated": _side(regenerated_rows, regenerated_counts, original_counts),
        # Should be 0: a regenerated target-domain file holds target items only.
        "outside_range": {"original": int(original_rows.items.size - original_counts.sum()),
                          "regenerated": int(regenerated_rows.items.size - regenerated_counts.sum())},
    }


def plot_diagnostics(numbers: dict, out_png: Path, title: str | None = None) -> Path:
    """Draw the three panels of `diagnose`'s numbers into one small PNG, written atomically."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    sides = (("original", "Original", ORIGINAL_COLOR), ("regenerated", "Regenerated", REGENERATED_COLOR))
    fig, (ax_freq, ax_seg, ax_len) = plt.subplots(1, 3, figsize=(11, 3.2), dpi=100)
    try:
        for key, label, color in sides:
            curve = np.asarray(numbers[key]["frequency_curve"])
            if len(curve):
                ax_freq.plot(np.arange(1, len(curve) + 1), curve, color=color, lw=1.5,
                             label=f"{label} ({len(curve)} items)")
        ax_freq.set(xscale="log", yscale="log", xlabel="item rank", ylabel="interactions",
                    title="(a) item frequency")
        ax_freq.legend(fontsize=8)

        x = np.arange(len(SEGMENTS))
        width = 0.38
        for shift, (key, label, color) in zip((-width / 2, width / 2), sides):
            shares = [numbers[key]["shares"][s] for s in SEGMENTS]
            bars = ax_seg.bar(x + shift, shares, width, color=color, label=label)
            ax_seg.bar_label(bars, labels=[f"{s:.0%}" for s in shares], fontsize=7, padding=1)
        ax_seg.set_xticks(x, SEGMENT_LABELS)
        ax_seg.set(ylabel="share of interactions", ylim=(0, 1.1), title="(b) popularity segments")
        ax_seg.legend(fontsize=8)

        for key, label, color in sides:
            hist = numbers[key]["length_histogram"]
            lengths, rows = np.asarray(hist["length"]), np.asarray(hist["rows"])
            cdf = np.cumsum(rows) / rows.sum()
            mean = numbers[key]["length"]["mean"]
            # Start the step at 0 just before the shortest row, so the curve rises from the axis.
            ax_len.step(np.concatenate([[lengths[0] - 1], lengths]), np.concatenate([[0.0], cdf]), where="post",
                        color=color, lw=1.5, label=f"{label} (mean {mean:.1f})")
        ax_len.set(xlabel="sequence length (history + target)", ylabel="fraction of rows (CDF)", ylim=(0, 1.02),
                   title="(c) sequence length")
        ax_len.legend(fontsize=8, loc="lower right")
        if title:
            fig.suptitle(title, fontsize=10)
        fig.tight_layout()
    except BaseException:
        plt.close(fig)
        raise
    return save_figure(fig, out_png)


# --------------------------------------------------------------------------- command


def add_input_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments that name a target domain and a regenerated file (shared with mapping_view)."""
    parser.add_argument("--target", required=True, help="target domain, e.g. dom4")
    parser.add_argument("--regenerated", type=Path,
                        help="a regenerated training file; default: the one decoding.py wrote for the overrides")
    parser.add_argument("--out", type=Path, required=True, help="folder for the outputs")
    parser.add_argument("overrides", nargs="*",
                        help="decoding.py's Hydra overrides that name the run (dataset=ACDT seed=2025 "
                             "trainer.base.epochs=50 experiment=wo_sde ...)")


def resolve_inputs(args: argparse.Namespace):
    """The dataset, the regenerated file (a `pipeline.artifacts.Regenerated`) and its manifest (None
    when there is none): `--regenerated`, or the file decoding.py wrote for these overrides; stops
    when the manifest names another dataset or domain."""
    from pipeline.artifacts import Regenerated, missing_regenerated, open_dataset, regenerated
    from pipeline.settings import stage_config

    cfg = stage_config("decoding", [f"target_dom={args.target}", *args.overrides])
    dataset = open_dataset(cfg)
    if args.regenerated:
        output = Regenerated.of_file(project_path(args.regenerated))
        if not output.inter.is_file():
            raise FileNotFoundError(f"{output.inter}: --regenerated names no file")
    else:
        output = regenerated(cfg)
        if not output.inter.is_file():
            raise missing_regenerated(cfg, output, shlex.join(["python", "decoding.py", f"target_dom={args.target}",
                                                               *args.overrides]))
    manifest = output.read_manifest() if output.manifest.is_file() else None
    if manifest is not None:
        for key, expected in (("dataset", dataset.name), ("target_dom", args.target)):
            if manifest.get(key) != expected:
                raise ValueError(f"{output.inter}: its manifest says {key}={manifest.get(key)!r}, not {expected!r}")
    return dataset, output, manifest


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m analysis.diagnostics", description=__doc__.split("\n")[0])
    add_input_arguments(parser)
    args = parser.parse_args(argv)
    dataset, output, manifest = resolve_inputs(args)
    item_range = dataset.domains.range(args.target)
    original = dataset.rows(f"{args.target}.train")
    regenerated = read_inter(output.inter, n_items=dataset.domains.n_items, one_row_per_user=False)
    numbers = {"dataset": dataset.name, "target": args.target, "regenerated_file": str(output.inter),
               "seed": manifest.get("seed") if manifest else None, **diagnose(original, regenerated, item_range)}
    out = project_path(args.out)
    write_text_atomic(out / f"diagnostics_{args.target}.json", json.dumps(numbers, indent=2) + "\n")
    png = plot_diagnostics(numbers, out / f"diagnostics_{args.target}.png",
                           title=f"{dataset.name} {args.target}: original vs regenerated training data")
    o, r = numbers["original"], numbers["regenerated"]
    shares = lambda side: "/".join(f"{side['shares'][s]:.2f}" for s in SEGMENTS)  # noqa: E731
    print(f"{args.target}: items active {o['distinct_items']} -> {r['distinct_items']} of {numbers['n_items']}; "
          f"shares top/mid/tail {shares(o)} -> {shares(r)}; mean length {o['length']['mean']:.1f} -> "
          f"{r['length']['mean']:.1f}; wrote {png}")
    return numbers


if __name__ == "__main__":
    main()
