"""Stage II decoding speed and memory.

    .venv/bin/python benchmarks/decoding_benchmark.py acdt [--plain-rows 80]
    .venv/bin/python benchmarks/decoding_benchmark.py best [--rows 2000] [--device cuda]
    .venv/bin/python benchmarks/decoding_benchmark.py exact [checkpoint_dir=...]

`acdt`: in one run, on the same ACDT rows and models: the floor (one encoder
pass per model over every row, timed alone); the project's decoder
(`model/regeneration.py`) for one target domain (dom4) and for all four in one
pass; the reference code's strategy (`reference_strategy`: a batched forward
pass per model with logits at every position, then a Python loop over
timesteps and source domains, the rule in float32) for dom4 and four times for
the four domains; and the per-timestep loop of `reference/decoder.py`,
which re-encodes every prefix (on the first `--plain-rows` rows, extrapolated).
First a check: with the reference shift on and the rule in float64, the
reference strategy writes the project's items.

`best`: a BEST-sized synthetic dataset (`dataset.synthetic.BEST_SIZED`: about
40,000 users, 190,000 items), prepared on first use, decoded for dom1 alone and
for every target domain in one pass, each in a fresh child process so that its
peak memory is its own. The first `--rows` rows of `full.train` are decoded and
the time is extrapolated to all rows (decoding time is linear in the rows).

`previous`: the decoder of an earlier commit (`--commit`, read from git) against this one, on ACDT
with trained Stage I checkpoints (overrides as for `exact`), one target and four: the decisions
must be identical; prints both times.

`exact`: on ACDT with the Stage I checkpoints of the default configuration (`python pretrain.py`
makes them; Hydra overrides such as `checkpoint_dir=...` may follow), every target domain decoded with the certified float32 rule and with float64
throughout: the decisions must be identical; prints how many positions float32 left to float64.

In `acdt` and `best` models are randomly initialised with the paper's shape (2 layers, hidden 128):
decoding costs the same whatever the weights, so no Stage I run is needed.
"""
from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

from benchmarks.resources import peak_rss_bytes
from data import PreparedDataset, SequenceRows, project_path
from model.contrastive import DecodingRule
from model.decoder import DecoderConfig, TaesarDecoder
from model.regeneration import longest_first, regenerate


def random_models(n_items: int, n_domains: int, device) -> tuple[TaesarDecoder, dict[int, TaesarDecoder]]:
    torch.manual_seed(0)
    config = DecoderConfig(n_items=n_items)
    base = TaesarDecoder(config).to(device).eval()
    return base, {d: TaesarDecoder(config).to(device).eval() for d in range(1, n_domains + 1)}


def first_rows(rows: SequenceRows, n: int) -> SequenceRows:
    return rows.take(range(min(n, len(rows))))


@torch.no_grad()
def reference_strategy(rows: SequenceRows, domains, target: int, base, experts, rule, precision=torch.float32,
                       batch_size: int = 32, max_len: int = 128) -> dict[int, list[int]]:
    """What the reference code does, as a loop: for each batch of rows, one forward pass per model over
    the batch padded to every position, with logits over all N + 1 ids at every position; then a
    Python loop over the timesteps and, inside it, over the source domains, applying the rule to the
    rows whose next item lies in that domain (in float32, as it does). The rule's arithmetic is the
    project's (`model.contrastive.decide`, on the columns of the real items), so that in float64 the
    decisions are the project's: returns each user's decoded sequence of target items and
    replacements (before post-processing), for the check.
    """
    from data import SequenceLoader
    from model.contrastive import decide

    models = [base, *(experts[d] for d in range(1, domains.n_domains + 1))]
    domain_table = torch.from_numpy(domains.domain_of(np.arange(domains.n_items + 1)))
    out: dict[int, list[int]] = {}
    loader = SequenceLoader(rows, batch_size, max_len)
    for batch in loader:
        items = torch.nn.functional.pad(batch.items, (0, max_len - batch.items.size(1)))  # every position
        logits = [m.encode(items) @ m.item_emb.weight.T for m in models]  # (B, L, N + 1) each, id i at i
        new = torch.where(domain_table[items] == target, items, 0)
        for t in range(max_len - 1):
            next_domain = domain_table[items[:, t + 1]]
            for s in range(1, domains.n_domains + 1):
                if s == target:
                    continue
                chosen = (next_domain == s).nonzero().squeeze(1)
                if len(chosen) == 0:
                    continue
                decision = decide(logits[target][chosen, t, 1:], logits[s][chosen, t, 1:],
                                  logits[0][chosen, t, 1:], domains.range(target), rule, precision)
                new[chosen, t + 1] = decision.items
        for r, user in enumerate(batch.users.tolist()):
            out[user] = new[r, : int(batch.lengths[r])].tolist()
    return out


def timed(fn, *args, **kwargs):
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - started


@torch.no_grad()
def encoder_floor(rows: SequenceRows, models, batch_size: int = 32, max_len: int = 128,
                  by_length: bool = False) -> None:
    """One encoder pass per model over every row, in batches of `batch_size` rows trimmed to their
    longest: the rows in file order, or (`by_length`) longest first, as the decoder takes them."""
    from data import SequenceLoader

    if by_length:
        rows = rows.take(longest_first(rows, max_len))
    for batch in SequenceLoader(rows, batch_size, max_len):
        for model in models:
            model.encode(batch.items)


def acdt(plain_rows: int) -> None:
    from omegaconf import OmegaConf

    from dataset.prepare import prepare_dataset
    from reference.decoder import reference_regenerate

    prepare_dataset(OmegaConf.load(project_path("config/dataset/ACDT.yaml")), "dataset", progress=False)
    dataset = PreparedDataset(project_path("dataset"), "ACDT")
    rows = dataset.rows("full.train")
    domains = dataset.domains
    base, experts = random_models(domains.n_items, domains.n_domains, torch.device("cpu"))
    models = [base, *experts.values()]
    rule = DecodingRule()
    print(f"ACDT full.train ({len(rows)} rows, {domains.n_items} items), CPU, {torch.get_num_threads()} threads")

    # The check: with the reference shift, the loop (rule in float64) writes the project's items.
    shifted = DecodingRule(reference_shift=True)
    subset = first_rows(rows, plain_rows)
    ours = regenerate(subset, domains, 4, base, experts, shifted, max_len=128, batch_size=32).new_items
    loop = reference_strategy(subset, domains, 4, base, experts, shifted, precision=torch.float64)
    same = all(loop[int(u)] == ours[subset.offsets[r]:subset.offsets[r + 1]].tolist()
               for r, u in enumerate(subset.users))
    print(f"check on {len(subset)} rows, reference shift on: the loop writes the same items as the project: {same}")

    _, floor = timed(encoder_floor, rows, models)
    _, sorted_floor = timed(encoder_floor, rows, models, by_length=True)
    counts = next_item_domains(rows, domains)
    rate = matmul_rate(domains.n_items, "cpu")
    logits_floor, logits_floor_all = (2 * 128 * domains.n_items * logit_rows(counts, targets) / rate
                                      for targets in ([4], [1, 2, 3, 4]))
    print("| decoding | targets | seconds | against the one-pass decoder |")
    print("|---|---:|---:|---:|")
    _, one = timed(regenerate, rows, domains, 4, base, experts, rule, max_len=128, batch_size=32)
    _, one64 = timed(regenerate, rows, domains, 4, base, experts, rule, max_len=128, batch_size=32,
                     certified_float32=False)
    _, reference_one = timed(reference_strategy, rows, domains, 4, base, experts, rule)
    _, every = timed(regenerate, rows, domains, [1, 2, 3, 4], base, experts, rule, max_len=128, batch_size=32)
    reference_all = 0.0
    for target in (1, 2, 3, 4):
        reference_all += timed(reference_strategy, rows, domains, target, base, experts, rule)[1]
    _, plain = timed(reference_regenerate, subset, domains, 4, base, experts, rule)
    plain_all = plain * len(rows) / len(subset)
    print(f"| encoder passes alone (the floor: 5 models over every row, rows in file order) | - | {floor:.2f} | - |")
    print(f"| encoder passes alone, rows longest first (as the decoder batches them) | - | {sorted_floor:.2f} | "
          f"{sorted_floor / floor:.2f}x the floor |")
    print(f"| + the logits matmuls one target needs, at this machine's matmul rate | 1 | "
          f"{sorted_floor + logits_floor:.2f} | {(sorted_floor + logits_floor) / floor:.2f}x the floor |")
    print(f"| project, one target (dom4) | 1 | {one:.2f} | {one / floor:.2f}x the floor, "
          f"{one / (sorted_floor + logits_floor):.2f}x encoders longest first + logits |")
    print(f"| project, one target (dom4), the rule in float64 throughout | 1 | {one64:.2f} | {one64 / one:.2f}x the project |")
    print(f"| reference strategy, one target (dom4) | 1 | {reference_one:.2f} | {reference_one / one:.2f}x the project |")
    print(f"| project, target_dom=all (one pass) | 4 | {every:.2f} | {every / floor:.2f}x the floor, "
          f"{every / (sorted_floor + logits_floor_all):.2f}x encoders longest first + logits |")
    print(f"| reference strategy, run 4 times | 4 | {reference_all:.2f} | {reference_all / every:.2f}x the project |")
    print(f"| per-timestep loop of reference/ (re-encodes every prefix; {len(subset)} rows, extrapolated) | 1 | "
          f"{plain_all:.2f} | {plain_all / one:.1f}x the project |")


def next_item_domains(rows: SequenceRows, domains, max_len: int = 128) -> np.ndarray:
    """(n_domains + 1,) how many positions of `rows` predict an item of each domain (those with a
    history: every item of a row's last `max_len` but the first)."""
    lengths = np.minimum(rows.lengths, max_len)
    counts = np.zeros(domains.n_domains + 1, dtype=np.int64)
    for end, length in zip(rows.offsets[1:], lengths):  # once per row of the share benchmarked, not a hot path
        counts += np.bincount(domains.domain_of(rows.items[end - length + 1:end]), minlength=len(counts))
    return counts


def source_positions(counts: np.ndarray, targets: list[int]) -> int:
    """Positions decided for `targets`, one per target: those whose next item is of another domain."""
    return sum(int(counts[d]) for t in targets for d in range(1, len(counts)) if d != t)


def logit_rows(counts: np.ndarray, targets: list[int]) -> int:
    """Rows of logits over all N items that deciding `targets` needs at the least: at each position
    whose next item lies in domain d and is a source item of some target t != d, the base model's,
    expert d's and each such target's expert's (the matmul floor counts these)."""
    wanted = {d: sum(1 for t in targets if t != d) for d in range(1, len(counts))}
    return sum(int(counts[d]) * (2 + k) for d, k in wanted.items() if k)


def matmul_rate(n_items: int, device: str, hidden: int = 128, positions: int = 512) -> float:
    """FLOP/s of the logits matmul ((positions, hidden) x (hidden, n_items), float32) on this machine now."""
    h, W = torch.randn(positions, hidden, device=device), torch.randn(n_items, hidden, device=device)
    out = torch.empty(positions, n_items, device=device)
    torch.mm(h, W.T, out=out)
    runs, started = 5, time.perf_counter()
    for _ in range(runs):
        torch.mm(h, W.T, out=out)
    if device == "cuda":
        torch.cuda.synchronize()
    return runs * 2 * positions * hidden * n_items / (time.perf_counter() - started)


def _decode(targets: list[int], n_rows: int, device: str, memory_gb: float,
            how: str = "certified") -> tuple[float, float, int, int, float, float]:
    dataset = PreparedDataset(project_path("dataset"), "SYN_BEST")
    rows = dataset.rows("full.train")
    subset = first_rows(rows, n_rows)
    base, experts = random_models(dataset.domains.n_items, dataset.domains.n_domains, torch.device(device))

    def run(part: SequenceRows) -> float:
        started = time.perf_counter()
        if how == "reference":  # one target; 4 rows a batch, or its (B, 128, N + 1) logits of five models take 16 GB
            reference_strategy(part, dataset.domains, targets[0], base, experts, DecodingRule(), batch_size=4)
        else:
            regenerate(part, dataset.domains, targets, base, experts, DecodingRule(), max_len=128, batch_size=32,
                       memory_gb=memory_gb, device=torch.device(device), certified_float32=how != "float64",
                       fused=None if how == "certified" else False)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    warm_up = run(first_rows(rows, 2))  # one-off costs (the kernels' compilation), not extrapolated
    seconds = run(subset)
    positions = source_positions(next_item_domains(subset, dataset.domains), targets)
    gpu_peak = torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else 0.0
    rss = peak_rss_bytes() / 1e9
    return warm_up, seconds, len(rows), positions, rss, gpu_peak


def best(n_rows: int, device: str, memory_gb: float, reference_rows: int) -> None:
    from dataset.prepare import prepare_files
    from dataset.synthetic import BEST_SIZED, generate_raw

    if not (project_path("dataset") / "SYN_BEST" / "manifest.json").is_file():
        raw = generate_raw(project_path("dataset/raw/SYN_BEST"), BEST_SIZED, progress=True)
        prepare_files(raw, project_path("dataset/SYN_BEST"), "SYN_BEST", progress=True)
    dataset = PreparedDataset(project_path("dataset"), "SYN_BEST")
    domains, rows = dataset.domains, dataset.rows("full.train")
    rate = matmul_rate(domains.n_items, device)
    print(f"SYN_BEST (BEST_SIZED): {domains.n_items} items, {len(rows)} rows; first {n_rows} rows of full.train "
          f"decoded ({reference_rows} by the reference strategy); device {device}, {torch.get_num_threads()} CPU "
          f"threads, memory budget {memory_gb} GB; logits matmul at {rate / 1e9:.0f} GFLOP/s here")
    print("| decoding | targets | rows | warm-up s | seconds | source positions/s | all rows (extrapolated) | "
          "floor: logits matmuls, all rows | over the floor | peak RSS GB | peak GPU GB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    every = list(range(1, domains.n_domains + 1))
    runs = (("project (certified float32 rule, compiled where a CPU can)", [1], "certified", n_rows),
            ("project, the rule not compiled", [1], "eager", n_rows),
            ("project, the rule in float64 throughout", [1], "float64", n_rows),
            ("reference strategy (float32 rule, 4 rows a batch)", [1], "reference", reference_rows),
            ("project, all four in one pass", every, "certified", n_rows),
            ("project, all four in one pass, the rule not compiled", every, "eager", n_rows))
    for name, targets, how, n in runs:
        if n <= 0:
            continue
        # each in a fresh child process, so that its peak memory is its own
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
            warm_up, seconds, total_rows, positions, rss, gpu_peak = pool.submit(_decode, targets, n, device,
                                                                                  memory_gb, how).result()
        share = min(n, total_rows) / total_rows
        extrapolated = seconds / share
        floor = 2 * 128 * domains.n_items * logit_rows(next_item_domains(first_rows(rows, n), domains), targets) / rate / share
        print(f"| {name} | {','.join(f'dom{t}' for t in targets)} | {min(n, total_rows)} | {warm_up:.1f} | {seconds:.1f} | "
              f"{positions / seconds:.0f} | {extrapolated / 3600:.2f} h | {floor / 3600:.2f} h | "
              f"{extrapolated / floor:.1f}x | {rss:.2f} | {gpu_peak:.2f} |", flush=True)


def exact(overrides: list[str]) -> None:
    """The certified float32 rule against float64 throughout, on ACDT with its trained Stage I checkpoints."""
    import model.contrastive as contrastive
    from decoding import load_stage1
    from model.regeneration import decode_rows
    from pipeline.settings import stage_config

    cfg = stage_config("decoding", overrides)
    dataset = PreparedDataset(project_path(cfg.data_path), cfg.dataset.name)
    models = load_stage1(cfg, dataset, torch.device("cpu"))  # stops, naming the command, if they are missing
    experts = {d: models[f"dom{d}"] for d in range(1, dataset.domains.n_domains + 1)}
    rows, targets = dataset.rows("full.train"), list(experts)
    in_float64 = [0]
    exact_rule = contrastive.decide

    def counted(z_target, *args):
        in_float64[0] += len(z_target)
        return exact_rule(z_target, *args)

    contrastive.decide = counted
    runs = {}
    for certified in (True, False):
        in_float64[0] = 0
        runs[certified] = timed(decode_rows, rows, dataset.domains, targets, models["full"], experts, DecodingRule(),
                                max_len=cfg.dataset.max_seq_len, certified_float32=certified), in_float64[0]
    ((fast, fast_s), left), ((slow, slow_s), positions) = runs[True], runs[False]
    same = all(np.array_equal(a, b) for t in targets for a, b in zip(fast[t], slow[t]))
    print(f"ACDT, trained checkpoints, every target domain: identical decisions: {same}; {left} of {positions} "
          f"decided positions left to float64 by the certified rule; {fast_s:.1f} s certified, {slow_s:.1f} s float64")


def previous(commit: str, overrides: list[str]) -> None:
    """The decoder of an earlier commit against this one, in one run, on ACDT's trained Stage I
    checkpoints: its `model/regeneration.py` and `model/contrastive.py`, read from git into a
    temporary folder and imported beside the current ones; the decisions must be identical."""
    import importlib.util
    import subprocess
    import tempfile

    from decoding import load_stage1
    from model.regeneration import decode_rows
    from pipeline.settings import stage_config

    modules = {}
    with tempfile.TemporaryDirectory() as folder:
        for name in ("contrastive", "regeneration"):
            source = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:model/{name}.py"], check=True,
                                    capture_output=True, text=True).stdout
            source = source.replace("from model.contrastive import", "from previous_contrastive import")
            path = Path(folder) / f"previous_{name}.py"
            path.write_text(source)
            spec = importlib.util.spec_from_file_location(f"previous_{name}", path)
            modules[name] = importlib.util.module_from_spec(spec)
            sys.modules[f"previous_{name}"] = modules[name]
            spec.loader.exec_module(modules[name])
    cfg = stage_config("decoding", overrides)
    dataset = PreparedDataset(project_path(cfg.data_path), cfg.dataset.name)
    models = load_stage1(cfg, dataset, torch.device("cpu"))  # stops, naming the command, if they are missing
    experts = {d: models[f"dom{d}"] for d in range(1, dataset.domains.n_domains + 1)}
    rows = dataset.rows("full.train")
    print(f"ACDT full.train, trained Stage I of seed {cfg.seed}; commit {commit} against the working tree, "
          f"CPU, {torch.get_num_threads()} threads")
    for targets in ([4], list(experts)):
        ours, seconds = timed(decode_rows, rows, dataset.domains, targets, models["full"], experts, DecodingRule(),
                              max_len=cfg.dataset.max_seq_len)
        theirs, before = timed(modules["regeneration"].decode_rows, rows, dataset.domains, targets, models["full"],
                               experts, modules["contrastive"].DecodingRule(), max_len=cfg.dataset.max_seq_len)
        same = all(np.array_equal(a, b) for t in targets for a, b in zip(ours[t], theirs[t]))
        print(f"targets {targets}: identical decisions {same}; {commit} {before:.2f} s, now {seconds:.2f} s, "
              f"{before / seconds:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("acdt", "best", "exact", "previous"))
    parser.add_argument("--commit", default="f003558", help="previous: the commit whose decoder to compare with")
    parser.add_argument("--plain-rows", type=int, default=80, help="acdt: rows the plain decoder decodes")
    parser.add_argument("--rows", type=int, default=2000, help="best: rows decoded per target domain")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reference-rows", type=int, default=20, help="best: rows the reference strategy decodes")
    parser.add_argument("--memory-gb", type=float, default=2.0, help="best: memory budget of the scored positions")
    parser.add_argument("overrides", nargs="*", help="exact: Hydra overrides of the decoding config (checkpoint_dir=...)")
    args = parser.parse_intermixed_args()
    if args.what == "acdt":
        acdt(args.plain_rows)
    elif args.what == "exact":
        exact(args.overrides)
    elif args.what == "previous":
        previous(args.commit, args.overrides)
    else:
        best(args.rows, args.device, args.memory_gb, args.reference_rows)


if __name__ == "__main__":
    main()
