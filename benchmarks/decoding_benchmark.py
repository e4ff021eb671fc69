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
the four domains; and the per-timestep loop of `tests/reference_decoder.py`,
which re-encodes every prefix (on the first `--plain-rows` rows, extrapolated).
First a check: with the reference shift on and the rule in float64, the
reference strategy writes the project's items.

`best`: a BEST-sized synthetic dataset (`dataset.synthetic.BEST_SIZED`: about
40,000 users, 190,000 items), prepared on first use, decoded for dom1 alone and
for every target domain in one pass, each in a fresh child process so that its
peak memory is its own. The first `--rows` rows of `full.train` are decoded and
the time is extrapolated to all rows (decoding time is linear in the rows).

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
sys.path.insert(0, str(ROOT))

from data import PreparedDataset, SequenceRows, project_path  # noqa: E402
from model.contrastive import DecodingRule  # noqa: E402
from model.decoder import DecoderConfig, TaesarDecoder  # noqa: E402
from model.regeneration import regenerate  # noqa: E402
from pipeline.resources import peak_rss_bytes  # noqa: E402


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
    project's (`model.contrastive.decode`, on the columns of the real items), so that in float64 the
    decisions are the project's: returns each user's decoded sequence of target items and
    replacements (before post-processing), for the check.
    """
    from data import SequenceLoader
    from model.contrastive import computed_in, decode

    models = [base, *(experts[d] for d in range(1, domains.n_domains + 1))]
    domain_table = torch.from_numpy(domains.domain_of(np.arange(domains.n_items + 1)))
    out: dict[int, list[int]] = {}
    loader = SequenceLoader(rows, batch_size, max_len)
    with computed_in(precision):
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
                    decision = decode(logits[target][chosen, t, 1:], logits[s][chosen, t, 1:],
                                      logits[0][chosen, t, 1:], domains.range(target), rule)
                    new[chosen, t + 1] = decision.items
            for r, user in enumerate(batch.users.tolist()):
                out[user] = new[r, : int(batch.lengths[r])].tolist()
    return out


def timed(fn, *args, **kwargs):
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - started


@torch.no_grad()
def encoder_floor(rows: SequenceRows, models, batch_size: int = 32, max_len: int = 128) -> None:
    """One encoder pass per model over every row: what any decoder must spend."""
    from data import SequenceLoader

    for batch in SequenceLoader(rows, batch_size, max_len):
        for model in models:
            model.encode(batch.items)


def acdt(plain_rows: int) -> None:
    from omegaconf import OmegaConf

    from dataset.prepare import prepare_dataset
    from tests.reference_decoder import reference_regenerate

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
    print(f"| encoder passes alone (the floor: 5 models over every row) | - | {floor:.2f} | - |")
    print(f"| project, one target (dom4) | 1 | {one:.2f} | {one / floor:.2f}x the floor |")
    print(f"| project, one target (dom4), the rule in float64 throughout | 1 | {one64:.2f} | {one64 / one:.2f}x the project |")
    print(f"| reference strategy, one target (dom4) | 1 | {reference_one:.2f} | {reference_one / one:.2f}x the project |")
    print(f"| project, target_dom=all (one pass) | 4 | {every:.2f} | {every / floor:.2f}x the floor |")
    print(f"| reference strategy, run 4 times | 4 | {reference_all:.2f} | {reference_all / every:.2f}x the project |")
    print(f"| per-timestep loop of tests/ (re-encodes every prefix; {len(subset)} rows, extrapolated) | 1 | "
          f"{plain_all:.2f} | {plain_all / one:.1f}x the project |")


def _decode(targets: list[int], n_rows: int, device: str, memory_gb: float,
            certified: bool = True) -> tuple[float, int, int, float, float]:
    dataset = PreparedDataset(project_path("dataset"), "SYN_BEST")
    rows = dataset.rows("full.train")
    subset = first_rows(rows, n_rows)
    base, experts = random_models(dataset.domains.n_items, dataset.domains.n_domains, torch.device(device))
    started = time.perf_counter()
    results = regenerate(subset, dataset.domains, targets, base, experts, DecodingRule(), max_len=128,
                         batch_size=32, memory_gb=memory_gb, device=torch.device(device), certified_float32=certified)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    positions = sum(r.report["source_items_seen"] for r in results.values())
    gpu_peak = torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else 0.0
    rss = peak_rss_bytes() / 1e9
    return seconds, len(rows), positions, rss, gpu_peak


def best(n_rows: int, device: str, memory_gb: float) -> None:
    from dataset.prepare import prepare_files
    from dataset.synthetic import BEST_SIZED, generate_raw

    if not (project_path("dataset") / "SYN_BEST" / "manifest.json").is_file():
        raw = generate_raw(project_path("dataset/raw/SYN_BEST"), BEST_SIZED, progress=True)
        prepare_files(raw, project_path("dataset/SYN_BEST"), "SYN_BEST", progress=True)
    domains = PreparedDataset(project_path("dataset"), "SYN_BEST").domains
    print(f"SYN_BEST (BEST_SIZED): {domains.n_items} items; first {n_rows} rows of full.train decoded; "
          f"device {device}, {torch.get_num_threads()} CPU threads, memory budget {memory_gb} GB")
    print("| targets | rule | rows decoded | seconds | source positions/s | all rows (extrapolated) | peak RSS GB | peak GPU GB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    every = list(range(1, domains.n_domains + 1))
    for targets, certified in (([1], True), ([1], False), (every, True)):
        # each in a fresh child process, so that its peak memory is its own
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
            seconds, total_rows, positions, rss, gpu_peak = pool.submit(_decode, targets, n_rows, device,
                                                                         memory_gb, certified).result()
        extrapolated = seconds * total_rows / min(n_rows, total_rows)
        print(f"| {','.join(f'dom{t}' for t in targets)} | {'certified float32' if certified else 'float64'} | "
              f"{min(n_rows, total_rows)} | {seconds:.1f} | {positions / seconds:.0f} | {extrapolated / 3600:.1f} h | "
              f"{rss:.2f} | {gpu_peak:.2f} |", flush=True)


def exact(overrides: list[str]) -> None:
    """The certified float32 rule against float64 throughout, on ACDT with its trained Stage I checkpoints."""
    import model.contrastive as contrastive
    from decoding import load_stage1
    from model.regeneration import decode_rows
    from pipeline.settings import compose

    cfg = compose("decoding", overrides)
    dataset = PreparedDataset(project_path(cfg.data_path), cfg.dataset.name)
    models = load_stage1(cfg, dataset, torch.device("cpu"))  # stops, naming the command, if they are missing
    experts = {d: models[f"dom{d}"] for d in range(1, dataset.domains.n_domains + 1)}
    rows, targets = dataset.rows("full.train"), list(experts)
    in_float64 = [0]
    exact_rule = contrastive._decode_in_precision

    def counted(z_target, *args):
        in_float64[0] += len(z_target)
        return exact_rule(z_target, *args)

    contrastive._decode_in_precision = counted
    runs = {}
    for certified in (True, False):
        in_float64[0] = 0
        runs[certified] = timed(decode_rows, rows, dataset.domains, targets, models["full"], experts, DecodingRule(),
                                max_len=cfg.dataset.max_seq_len, certified_float32=certified), in_float64[0]
    ((fast, fast_s), left), ((slow, slow_s), positions) = runs[True], runs[False]
    same = all(np.array_equal(a, b) for t in targets for a, b in zip(fast[t], slow[t]))
    print(f"ACDT, trained checkpoints, every target domain: identical decisions: {same}; {left} of {positions} "
          f"decided positions left to float64 by the certified rule; {fast_s:.1f} s certified, {slow_s:.1f} s float64")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("acdt", "best", "exact"))
    parser.add_argument("--plain-rows", type=int, default=80, help="acdt: rows the plain decoder decodes")
    parser.add_argument("--rows", type=int, default=2000, help="best: rows decoded per target domain")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--memory-gb", type=float, default=2.0, help="best: memory budget of the scored positions")
    parser.add_argument("overrides", nargs="*", help="exact: Hydra overrides of the decoding config (checkpoint_dir=...)")
    args = parser.parse_args()
    if args.what == "acdt":
        acdt(args.plain_rows)
    elif args.what == "exact":
        exact(args.overrides)
    else:
        best(args.rows, args.device, args.memory_gb)


if __name__ == "__main__":
    main()
