"""Stage II decoding speed and memory.

    .venv/bin/python benchmarks/decoding_benchmark.py acdt [--plain-rows 80]
    .venv/bin/python benchmarks/decoding_benchmark.py best [--rows 2000] [--device cuda]

`acdt`: the fast decoder (`model/regeneration.py`) against the plain
per-timestep decoder of `tests/reference_decoder.py`, one after the other in
one run on the same ACDT rows and models, for target domain dom4; the plain
one runs on the first `--plain-rows` rows only (it is slow), the ratio is of
rows per second.

`best`: a BEST-sized synthetic dataset (`dataset.synthetic.BEST_SIZED`: about
40,000 users, 190,000 items), prepared on first use, decoded for every target
domain, each in a fresh child process so that its peak memory is its own. The
first `--rows` rows of `full.train` are decoded and the time is extrapolated
to all rows (decoding time is linear in the rows).

Models are randomly initialised with the paper's shape (2 layers, hidden 128):
decoding costs the same whatever the weights, so no Stage I run is needed.
"""
from __future__ import annotations

import argparse
import multiprocessing
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data import PreparedDataset, SequenceRows, project_path  # noqa: E402
from model.contrastive import DecodingRule  # noqa: E402
from model.decoder import DecoderConfig, TaesarDecoder  # noqa: E402
from model.regeneration import regenerate  # noqa: E402


def random_models(n_items: int, n_domains: int, device) -> tuple[TaesarDecoder, dict[int, TaesarDecoder]]:
    torch.manual_seed(0)
    config = DecoderConfig(n_items=n_items)
    base = TaesarDecoder(config).to(device).eval()
    return base, {d: TaesarDecoder(config).to(device).eval() for d in range(1, n_domains + 1)}


def first_rows(rows: SequenceRows, n: int) -> SequenceRows:
    return rows.take(range(min(n, len(rows))))


def acdt(plain_rows: int) -> None:
    from omegaconf import OmegaConf

    from dataset.prepare import prepare_dataset
    from tests.reference_decoder import reference_regenerate

    prepare_dataset(OmegaConf.load(project_path("config/dataset/ACDT.yaml")), "dataset", progress=False)
    dataset = PreparedDataset(project_path("dataset"), "ACDT")
    rows = dataset.rows("full.train")
    base, experts = random_models(dataset.domains.n_items, dataset.domains.n_domains, torch.device("cpu"))
    target, rule = 4, DecodingRule()

    started = time.perf_counter()
    fast = regenerate(rows, dataset.domains, target, base, experts, rule, max_len=128, batch_size=32)
    fast_s = time.perf_counter() - started
    subset = first_rows(rows, plain_rows)
    started = time.perf_counter()
    plain = reference_regenerate(subset, dataset.domains, target, base, experts, rule)
    plain_s = time.perf_counter() - started

    same = [(int(u), fast.rows.sequence(r).tolist()) for r, u in enumerate(fast.rows.users)
            if int(u) <= int(subset.users[-1])] == plain
    print(f"ACDT full.train, target dom4, CPU, {torch.get_num_threads()} threads")
    print("| decoder | rows | seconds | rows/s |")
    print("|---|---:|---:|---:|")
    print(f"| fast (model/regeneration.py) | {len(rows)} | {fast_s:.2f} | {len(rows) / fast_s:.1f} |")
    print(f"| plain (tests/reference_decoder.py) | {len(subset)} | {plain_s:.2f} | {len(subset) / plain_s:.2f} |")
    print(f"speed-up: {(len(rows) / fast_s) / (len(subset) / plain_s):.0f}x; same output on the common rows: {same}")


def _decode_one(target: int, n_rows: int, device: str, chunk: int) -> tuple[float, int, int, float]:
    dataset = PreparedDataset(project_path("dataset"), "SYN_BEST")
    rows = dataset.rows("full.train")
    subset = first_rows(rows, n_rows)
    base, experts = random_models(dataset.domains.n_items, dataset.domains.n_domains, torch.device(device))
    started = time.perf_counter()
    result = regenerate(subset, dataset.domains, target, base, experts, DecodingRule(), max_len=128,
                        batch_size=32, positions_per_chunk=chunk, device=torch.device(device))
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    positions = result.report["source_items_seen"]
    gpu_peak = torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else 0.0
    return seconds, len(rows), positions, gpu_peak


def best(n_rows: int, device: str, chunk: int) -> None:
    from dataset.prepare import prepare_files
    from dataset.synthetic import BEST_SIZED, generate_raw

    if not (project_path("dataset") / "SYN_BEST" / "manifest.json").is_file():
        raw = generate_raw(project_path("dataset/raw/SYN_BEST"), BEST_SIZED, progress=True)
        prepare_files(raw, project_path("dataset/SYN_BEST"), "SYN_BEST", progress=True)
    domains = PreparedDataset(project_path("dataset"), "SYN_BEST").domains
    print(f"SYN_BEST (BEST_SIZED): {domains.n_items} items; first {n_rows} rows of full.train decoded per target; "
          f"device {device}, {torch.get_num_threads()} CPU threads, {chunk} positions per chunk")
    print("| target | rows decoded | seconds | source positions/s | all rows (extrapolated) | peak RSS GB | peak GPU GB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for target in range(1, domains.n_domains + 1):
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
            seconds, total_rows, positions, gpu_peak = pool.submit(_decode_one, target, n_rows, device, chunk).result()
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1e9
        extrapolated = seconds * total_rows / min(n_rows, total_rows)
        print(f"| dom{target} | {min(n_rows, total_rows)} | {seconds:.1f} | {positions / seconds:.0f} | "
              f"{extrapolated / 60:.0f} min | {peak:.2f} | {gpu_peak:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("acdt", "best"))
    parser.add_argument("--plain-rows", type=int, default=80, help="acdt: rows the plain decoder decodes")
    parser.add_argument("--rows", type=int, default=2000, help="best: rows decoded per target domain")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--chunk", type=int, default=256, help="best: positions scored at once")
    args = parser.parse_args()
    if args.what == "acdt":
        acdt(args.plain_rows)
    else:
        best(args.rows, args.device, args.chunk)


if __name__ == "__main__":
    main()
