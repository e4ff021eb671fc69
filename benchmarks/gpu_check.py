"""One command for the first machine with a GPU: does the project run there, decide the same, and how fast?

    bash benchmarks/gpu_check.sh [--rows 2000] [--out benchmarks/results/gpu_check.md]

In order, each step timed, one table at the end (printed and written to `--out`):

1. the device tests (`tests/test_devices.py`) on the device: placement, bfloat16 autocast where the
   device offers it, the same bytes from the same seed;
2. ACDT decoded on the device and on the CPU, every target domain, with TF32 off: the decisions must
   agree at every position (randomly initialised Stage I models of the paper's shape: decoding costs
   and decides the same way whatever the weights);
3. BEST-sized decoding (`dataset.synthetic.BEST_SIZED`, prepared on first use) of one target and of
   all four in one pass, on the first `--rows` rows of `full.train`, extrapolated to all rows;
4. one epoch of ACDT `full.train` for the Taesar decoder and for RecBole's SASRec on the same batches;
5. one training step of each cross-domain baseline on ACDT.

Without CUDA it says so and runs the same steps on the CPU with tiny data (a dry run: a few rows,
small models; `tests/test_gpu_check.py` runs it), then exits 0. The figures of a GPU run belong in
benchmarks/README.md with the machine's name.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import numpy as np
import torch

from data import PreparedDataset, SequenceLoader, project_path
from model.contrastive import DecodingRule
from model.decoder import DecoderConfig, TaesarDecoder
from model.regeneration import regenerate

TINY_ROWS = 12  # rows of the dry run's decoding, training and baseline steps


def acdt() -> PreparedDataset:
    from omegaconf import OmegaConf

    from dataset.prepare import prepare_dataset

    prepare_dataset(OmegaConf.load(project_path("config/dataset/ACDT.yaml")), "dataset", progress=False)
    return PreparedDataset(project_path("dataset"), "ACDT")


def stage1_models(n_items: int, n_domains: int, device, hidden: int = 128):
    torch.manual_seed(0)
    config = DecoderConfig(n_items=n_items, hidden_size=hidden, inner_size=hidden)
    base = TaesarDecoder(config).to(device).eval()
    return base, {d: TaesarDecoder(config).to(device).eval() for d in range(1, n_domains + 1)}


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    synchronize(device)
    started = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - started


def device_tests(device: str) -> tuple[str, float]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_devices.py"],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "TAESAR_TEST_DEVICE": device})
    summary = (done.stdout.strip().splitlines() or ["no output"])[-1]
    if done.returncode != 0:
        print(done.stdout[-3000:], done.stderr[-3000:], file=sys.stderr)
    return f"{'passed' if done.returncode == 0 else 'FAILED'}: {summary}", time.perf_counter() - started


def decisions_agree(dataset: PreparedDataset, device: str, dry: bool) -> tuple[str, float]:
    rows = dataset.rows("full.train")
    if dry:
        rows = rows.take(range(TINY_ROWS))
    domains = dataset.domains
    targets = list(range(1, domains.n_domains + 1))
    decided = {}
    seconds = 0.0
    for where in ("cpu", device):
        base, experts = stage1_models(domains.n_items, domains.n_domains, torch.device(where), 16 if dry else 128)
        decided[where], spent = timed(lambda: regenerate(rows, domains, targets, base, experts, DecodingRule(),
                                                         max_len=128, batch_size=32, device=torch.device(where)),
                                      where)
        seconds += spent
    items = sum(len(r.new_items) for r in decided["cpu"].values())
    same = all(np.array_equal(decided["cpu"][t].new_items, decided[device][t].new_items) for t in targets)
    return f"{'identical' if same else 'DIFFERENT'} items written at all {items} positions ({len(rows)} rows, " \
           f"{len(targets)} targets; {device} against cpu)", seconds


def best_decoding(device: str, n_rows: int, dry: bool) -> list[tuple[str, str, float]]:
    if dry:  # the same call on ACDT's first rows and small models
        dataset = acdt()
        n_rows = TINY_ROWS
    else:
        from dataset.prepare import prepare_files
        from dataset.synthetic import BEST_SIZED, generate_raw

        if not (project_path("dataset") / "SYN_BEST" / "manifest.json").is_file():
            raw = generate_raw(project_path("dataset/raw/SYN_BEST"), BEST_SIZED, progress=False)
            prepare_files(raw, project_path("dataset/SYN_BEST"), "SYN_BEST")
        dataset = PreparedDataset(project_path("dataset"), "SYN_BEST")
    rows = dataset.rows("full.train")
    subset = rows.take(range(min(n_rows, len(rows))))
    domains = dataset.domains
    base, experts = stage1_models(domains.n_items, domains.n_domains, torch.device(device), 16 if dry else 128)
    out = []
    for targets in ([1], list(range(1, domains.n_domains + 1))):
        _, seconds = timed(lambda: regenerate(subset, domains, targets, base, experts, DecodingRule(), max_len=128,
                                              batch_size=32, device=torch.device(device)), device)
        per_target = seconds * len(rows) / len(subset) / len(targets)
        out.append((f"{dataset.name} decoding, {len(targets)} target(s) in one pass",
                    f"{per_target:.1f} s a target for all {len(rows)} rows (extrapolated from {len(subset)})",
                    seconds))
    return out


def training_epochs(dataset: PreparedDataset, device: str, dry: bool) -> list[tuple[str, str, float]]:
    from omegaconf import OmegaConf
    from recbole.model.sequential_recommender.sasrec import SASRec

    from model.objectives import next_item_objective
    from backbones.recbole_adapter import build_recbole_model, to_interaction

    rows = dataset.rows("full.train")
    if dry:
        rows = rows.take(range(TINY_ROWS))
    params = OmegaConf.load(project_path("config/model/SASRec.yaml"))
    if dry:
        params.hidden_size = params.inner_size = 16
    torch.manual_seed(0)
    decoder = TaesarDecoder(DecoderConfig.from_model_params(dataset.domains.n_items, 128, params)).to(device)
    recbole = build_recbole_model(SASRec, dataset.domains.n_items, 128, decoder.config.recbole_params(),
                                  torch.device(device))
    objective = next_item_objective()
    losses = {"Taesar decoder": (decoder, lambda b: objective(decoder, b)),
              "RecBole SASRec": (recbole, lambda b: recbole.calculate_loss(to_interaction(b)))}
    batches = [b.to(device) for b in SequenceLoader(rows, 128, 128, shuffle=True, seed=0)]
    out = []
    for name, (model, loss_fn) in losses.items():
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-4)
        model.train()

        def epoch():
            for batch in batches:
                optimizer.zero_grad(set_to_none=True)
                loss_fn(batch).backward()
                optimizer.step()

        epoch()  # warm-up
        _, seconds = timed(epoch, device)
        out.append((f"training epoch, {name}", f"{len(rows) / seconds:.0f} rows/s ({len(rows)} rows)", seconds))
    return out


def baseline_steps(dataset: PreparedDataset, device: str, dry: bool) -> list[tuple[str, str, float]]:
    from cdsr_baseline.inputs import user_sequences
    from cdsr_baseline.models import build_baseline, resolve_fidelity
    from pipeline.settings import stage_config

    rows = dataset.rows("full.train")
    batch = next(iter(SequenceLoader(rows.take(range(TINY_ROWS)) if dry else rows, 128, 128, shuffle=True,
                                     seed=0))).to(device)
    small = {"ABXI": ["model.d_embed=16", "model.ffn=16", "model.rd=4", "model.ri=4"],
             "CGRec": ["model.hidden_size=16"], "SyNCRec": ["model.hidden_size=16", "model.expert_num=4"]}
    out = []
    for name in ("ABXI", "CGRec", "SyNCRec"):
        cfg = stage_config("baseline", [f"model={name}", *(small[name] if dry else [])])
        resolve_fidelity(cfg)
        torch.manual_seed(0)
        model = build_baseline(name, dataset, cfg.model, user_sequences(dataset, 128)).to(device).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

        def step():
            optimizer.zero_grad(set_to_none=True)
            model.loss(batch).backward()
            optimizer.step()

        step()  # warm-up
        _, seconds = timed(step, device)
        out.append((f"training step, {name}", f"{len(batch.users)} rows", seconds))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2000, help="rows of BEST-sized full.train decoded (extrapolated)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_check.md")
    parser.add_argument("--dry-run", action="store_true", help="the CPU dry run even where CUDA is present")
    args = parser.parse_args(argv)
    dry = args.dry_run or not torch.cuda.is_available()
    device = "cpu" if dry else "cuda"
    if dry:
        print("no CUDA device here" if not torch.cuda.is_available() else "--dry-run",
              "- a dry run of the same steps on the CPU with tiny data", flush=True)
    # decisions compared across devices: no TF32 anywhere
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    name = torch.cuda.get_device_name() if not dry else "CPU (dry run)"
    bf16 = "CPU autocast" if dry else ("yes" if torch.cuda.is_bf16_supported() else "no (its test is skipped)")
    table = [("device", f"{name}; torch {torch.__version__}; bfloat16 {bf16}", 0.0)]
    dataset = acdt()
    steps = [("device tests", lambda: [("device tests", *device_tests(device))]),
             ("decisions", lambda: [("ACDT decisions, device against CPU", *decisions_agree(dataset, device, dry))]),
             ("BEST-sized decoding", lambda: best_decoding(device, args.rows, dry)),
             ("training epochs", lambda: training_epochs(dataset, device, dry)),
             ("baseline steps", lambda: baseline_steps(dataset, device, dry))]
    for label, step in steps:
        print(f"{label} ...", flush=True)
        table.extend(step())
    lines = ["| check | result | seconds |", "|---|---|---:|",
             *(f"| {check} | {result} | {seconds:.2f} |" for check, result, seconds in table)]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(f"written to {args.out}")
    failed = any("FAILED" in result or "DIFFERENT" in result for _, result, _ in table)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
