"""Time and memory of the data preparation on raw files shaped like Amazon 2018.

    python benchmarks/prepare_benchmark.py --rows 10000000
    python benchmarks/prepare_benchmark.py --rows 94000000 --workdir /tmp/bench --keep

Generates `--rows` raw rows over four files shaped like the paper's Amazon 2018 categories in rows,
distinct users (from one shared pool) and items (`dataset.amazon_shape.AMAZON_2018`, scaled), or,
with `--shape planted`, the planted-structure generator's `AMAZON_SCALE_RAW` (Amazon-like row
counts, far fewer distinct users: an easier input). Then runs `dataset.prepare.prepare_files` in a
spawned child process, so that its peak RSS is the child's own (its VmHWM: `getrusage` would
count the generator's memory too, which a forked child holds until its exec). Prints one markdown table row per run, ready for `benchmarks/README.md`.
"""
from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import platform
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path


from benchmarks.resources import peak_rss_bytes
from dataset.amazon_shape import AMAZON_2018
from dataset.amazon_shape import generate as generate_amazon_shaped
from dataset.prepare import prepare_files
from dataset.synthetic import AMAZON_SCALE_RAW, SyntheticConfig, expected_rows, generate_raw

NAME = "BENCH"
COLUMNS = (
    "raw rows", "domains", "raw GB", "generate s", "generate peak GB",
    "prepare s", "prepare peak GB", "users", "items", "interactions",
)


def scaled_config(rows: int, n_domains: int, seed: int) -> SyntheticConfig:
    """AMAZON_SCALE_RAW shrunk (or grown) to `rows` expected rows over its first n_domains.

    Users, items and concepts scale together, so sparsity and the share of users in
    one domain stay Amazon-like; the total row count does not depend on n_domains.
    """
    base = AMAZON_SCALE_RAW
    if not 2 <= n_domains <= base.n_domains:
        raise SystemExit(f"--domains must be between 2 and {base.n_domains}")
    scale = rows / expected_rows(base)
    # Keep the ring size (concepts per cluster) as in the preset.
    n_concepts = max(20, round(base.n_concepts * scale))
    return dataclasses.replace(
        base,
        n_users=max(1, round(base.n_users * scale)),
        n_domains=n_domains,
        items_per_domain=tuple(max(n_concepts + 10, round(n * scale)) for n in base.items_per_domain[:n_domains]),
        n_concepts=n_concepts,
        n_clusters=max(1, round(n_concepts * base.n_clusters / base.n_concepts)),
        domain_participation=base.domain_participation[:n_domains],
        domain_weights=base.domain_weights[:n_domains],
        seed=seed,
    )


def _timed_prepare(raw_files: list[Path], out_dir: Path) -> tuple[float, dict, float]:
    started = time.perf_counter()
    summary = prepare_files(raw_files, out_dir, NAME)
    return time.perf_counter() - started, summary, peak_rss_bytes() / 1e9


def _data_rows(path: Path) -> int:
    """Lines after the header, read in 16 MiB blocks (the files can be GBs)."""
    with open(path, "rb") as f:
        return sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 24), b"")) - 1


def run(rows: int, n_domains: int, workdir: Path, seed: int = 0, shape: str = "amazon") -> dict:
    started = time.perf_counter()
    if shape == "amazon":
        raw_files = generate_amazon_shaped(workdir / "raw", AMAZON_2018.scaled(rows), seed)
    else:
        raw_files = generate_raw(workdir / "raw", scaled_config(rows, n_domains, seed), progress=True)
    generate_s = time.perf_counter() - started
    generate_peak = peak_rss_bytes() / 1e9
    # A fresh interpreter (spawn, not fork) so the child's peak RSS starts from zero
    # rather than from a copy of the generator's address space.
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        prepare_s, summary, prepare_peak = pool.submit(_timed_prepare, raw_files, workdir / NAME).result()
    rows_per_domain = [_data_rows(p) for p in raw_files]
    return {
        "raw rows": sum(rows_per_domain),
        "domains": n_domains,
        "raw GB": sum(p.stat().st_size for p in raw_files) / 1e9,
        "generate s": generate_s,
        "generate peak GB": generate_peak,
        "prepare s": prepare_s,
        "prepare peak GB": prepare_peak,
        "users": summary["users"],
        "items": summary["items"],
        "interactions": summary["interactions"],
        "raw rows per domain": rows_per_domain,
    }


def _cell(column: str, value) -> str:
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.2f}" if column.endswith("GB") else f"{value:.1f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000, help="raw rows over all domains")
    parser.add_argument("--domains", type=int, default=4)
    parser.add_argument("--workdir", type=Path, help="where raw and prepared files go (default: a new temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the raw and prepared files")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shape", choices=("amazon", "planted"), default="amazon",
                        help="amazon: dataset/amazon_shape.py, Amazon 2018's users, items and rows per file "
                             "(four domains); planted: dataset/synthetic.py's AMAZON_SCALE_RAW (few users per file)")
    args = parser.parse_args(argv)
    if args.shape == "amazon" and args.domains != len(AMAZON_2018.rows):
        parser.error(f"--shape amazon has {len(AMAZON_2018.rows)} domains; --domains is for --shape planted")

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="prepare-benchmark-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        result = run(args.rows, args.domains, workdir, args.seed, args.shape)
    finally:
        if not args.keep:
            # Only what this script wrote: --workdir may hold other things.
            shutil.rmtree(workdir / "raw", ignore_errors=True)
            shutil.rmtree(workdir / NAME, ignore_errors=True)
            if args.workdir is None:
                shutil.rmtree(workdir, ignore_errors=True)
    print(f"\n{time.strftime('%Y-%m-%d')}, {platform.machine()}, {multiprocessing.cpu_count()} cores")
    print("raw rows per domain:", ", ".join(f"{n:,}" for n in result["raw rows per domain"]))
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---:|" * len(COLUMNS))
    print("| " + " | ".join(_cell(c, result[c]) for c in COLUMNS) + " |")
    if args.keep:
        print(f"files kept in {workdir}")


if __name__ == "__main__":
    main()
