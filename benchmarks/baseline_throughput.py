"""Training throughput and peak memory of the cross-domain baselines, on ACDT and on the BEST-sized
synthetic dataset; with `--reference`, each sped-up model against its implementation before.

    python benchmarks/baseline_throughput.py --batches 5
    python benchmarks/baseline_throughput.py --models ABXI --datasets acdt --batches 20 --device cuda
    python benchmarks/baseline_throughput.py --reference --models CGRec SyNCRec GCEGNN --datasets acdt
    python benchmarks/baseline_throughput.py --threads --models CGRec GCEGNN --datasets acdt
    python benchmarks/baseline_throughput.py --gemm-widths
    python benchmarks/baseline_throughput.py --profile --models GCEGNN --datasets acdt --batches 6

Each (model, dataset) pair runs in its own spawned child process, so that the peak RSS it reports
is that training's own (the child's VmHWM, `benchmarks.resources.peak_rss_bytes`): the model at its official size
(config/model/*.yaml), Adam, batches of 128 `full.train` rows in the order of an epoch, one
warm-up batch, then `--batches` timed training steps (forward, backward, update). Prints one
markdown table row per pair.
"""
from __future__ import annotations

import argparse
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor

import torch

from benchmarks.resources import peak_rss_bytes

MODELS = ("ABXI", "CGRec", "SyNCRec")
# models with a literal copy of their implementation before the speed-ups under reference/ (`--reference`);
# the Stage III backbones are timed as fine-tuning trains them, on the rows of a mixed (`full`) or a
# target domain's (`dom1`) training file (GCE-GNN: prefix-expanded)
SPED_UP = ("ABXI", "CGRec", "SyNCRec", "GCEGNN", "CL4SRec")
# SyNCRec with its expert passes' activations recomputed in the backward pass (`recompute_activations`)
RECOMPUTE = "SyNCRec-recompute"
BACKBONES = {"GCEGNN": ("GCEGNN", "full.train"), "GCEGNN-dom1": ("GCEGNN", "dom1.train"),
             "CL4SRec": ("CL4SRec", "full.train")}
DATASETS = {"acdt": "ACDT", "best": "SYN_BEST"}


def prepared(dataset: str):
    from data import PreparedDataset, project_path
    from dataset.prepare import prepare_dataset, prepare_files
    from pipeline.settings import stage_config

    if dataset == "ACDT":
        cfg = stage_config("prepare", [])
        prepare_dataset(cfg.dataset, cfg.data_path, progress=False)
    elif not (project_path("dataset") / dataset / "manifest.json").is_file():
        from dataset.synthetic import BEST_SIZED, generate_raw

        raw = generate_raw(project_path(f"dataset/raw/{dataset}"), BEST_SIZED, progress=False)
        prepare_files(raw, project_path(f"dataset/{dataset}"), dataset)
    return PreparedDataset(project_path("dataset"), dataset)


def _train(model_name: str, dataset_name: str, batches: int, device: str, reference: bool = False,
           threads: int | None = None, profile: bool = False) -> tuple[float, int, float, float, float]:
    from omegaconf import OmegaConf

    from cdsr_baseline.inputs import user_sequences
    from cdsr_baseline.models import build_baseline
    from data import SequenceLoader
    from pipeline.settings import stage_config

    if threads:
        torch.set_num_threads(threads)
    dataset = prepared(dataset_name)
    torch.manual_seed(0)
    if model_name in BACKBONES:
        model, loss_fn, rows = _backbone(dataset, *BACKBONES[model_name], reference)
    else:
        recompute = model_name == RECOMPUTE
        model_name = "SyNCRec" if recompute else model_name
        cfg = stage_config("baseline", [f"model={model_name}"])
        sequences = user_sequences(dataset, 128)
        if reference:  # the implementation before the speed-ups, kept literally under reference/
            module = __import__(f"reference.{model_name.lower()}", fromlist=["_"])
            params = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k != "name"}
            inputs = () if model_name == "ABXI" else (sequences,)  # ABXI's negatives need no sequences
            model = getattr(module, model_name)(dataset.domains.n_items, list(dataset.domains.starts), *inputs,
                                                **params)
        else:
            model = build_baseline(model_name, dataset, cfg.model, sequences)
            if recompute:
                model.recompute_activations = True
        loss_fn, rows = model.loss, dataset.rows("full.train")
    model = model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    loader = iter(SequenceLoader(rows, 128, 128, shuffle=True, seed=0))
    rows, seconds, flops, timed = 0, 0.0, 0.0, []
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if profile else None
    for step in range(batches + 1):
        if profiler and step == 1:  # the timed steps only
            profiler.start()
        batch = next(loader).to(device)
        started = time.perf_counter()
        loss = loss_fn(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        if step:  # the first batch warms up
            seconds += time.perf_counter() - started
            rows += len(batch.users)
            timed.append(batch)
    if profiler:
        profiler.stop()
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=20), flush=True)
    peak = peak_rss_bytes() / 1e9  # of the timed steps: the FLOP-counting pass below can keep more
    if not reference and model_name in SPED_UP + tuple(BACKBONES):
        # the mean over the timed batches, as the time is (their lengths, and so their work, differ)
        flops = sum(matmul_flops(model, loss_fn, batch) for batch in timed) / len(timed)
    gpu = torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else 0.0
    return seconds, rows, peak, gpu, flops


def _backbone(dataset, name: str, split: str, reference: bool):
    """A Stage III backbone at its configured size on the rows of `split` (prefix-expanded where the
    model reads one position a row), its loss as Stage III computes it (all items on the mixed rows,
    the target domain's on a domain's rows)."""
    from omegaconf import OmegaConf

    from backbones.registry import build_backbone
    from pipeline.settings import stage_config

    cfg = stage_config("finetune", [f"model_name={name}", "train_type=full", "target_dom=dom1"])
    params = OmegaConf.to_container(cfg.model, resolve=True)
    rows = dataset.rows(split)
    n_items = dataset.domains.n_items
    if reference:  # the implementation before the speed-ups, kept literally under reference/
        module = __import__(f"reference.{name.lower()}", fromlist=["_"])
        model = getattr(module, f"Reference{name}")(n_items, 128, **{k: v for k, v in params.items() if k != "name"})
    else:
        model = build_backbone(name, n_items, 128, params)
    model.see_training_rows(rows)
    item_range = None if split.startswith("full") else dataset.domains.range(split.split(".")[0])
    return model, lambda batch: model.loss(batch, item_range), rows.prefixes() if model.last_position_only else rows


def matmul_flops(model, loss_fn, batch) -> float:
    """Matrix-multiply FLOPs of one training step on `batch` as this implementation runs it (forward
    and backward, counted by torch's FLOP counter): the floor's numerator."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        loss_fn(batch).backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


# (rows, inner, outer) of the models' matrix multiplies: a length group, a batch's positions, a padded
# batch (128 x 128); hidden 128, inner 512. The widest is not the fastest: its output outgrows the cache.
GEMM_SHAPES = tuple((rows, inner, outer) for rows in (2048, 7680, 16384) for inner, outer in ((128, 512), (512, 128)))


def gemm_rate(threads: int, shapes=GEMM_SHAPES) -> float:
    """The best FLOP/s a float32 matrix multiply of the models' shapes reaches on this machine with
    `threads` threads: the rate the floor divides by (the best, so that the floor is a floor)."""
    torch.set_num_threads(threads)
    return max(_gemm_rate(*shape) for shape in shapes)


def _gemm_rate(rows: int, inner: int, outer: int) -> float:
    a, b = torch.randn(rows, inner), torch.randn(inner, outer)
    for _ in range(3):
        a @ b
    n = max(5, 20 * 16384 // rows)  # about the same work at every width
    started = time.perf_counter()
    for _ in range(n):
        a @ b
    return 2 * rows * inner * outer * n / (time.perf_counter() - started)


def gemm_widths() -> None:
    """The GEMM rate at the widths of the models' matrix multiplies, and of CGRec's 30 coalition passes
    stacked into one: whether batching the coalitions into wider multiplies could raise the rate."""
    torch.set_num_threads(1)
    print("one thread; float32 GEMM rate (GFLOP/s) by rows; hidden 128, inner 512")
    print("| rows | what | 128 x 512 | 512 x 128 | 128 x 128 |")
    print("|---:|---|---:|---:|---:|")
    for rows, what in ((2048, "a length group"), (7680, "the positions of a batch of 128 ACDT rows"),
                       (16384, "a batch of 128 rows padded to 128"), (30 * 7680, "CGRec's 30 coalition passes stacked")):
        rates = [_gemm_rate(rows, inner, outer) / 1e9 for inner, outer in ((128, 512), (512, 128), (128, 128))]
        print(f"| {rows} | {what} | " + " | ".join(f"{r:.0f}" for r in rates) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=None, choices=MODELS + SPED_UP + tuple(BACKBONES) + (RECOMPUTE,),
                        help=f"default: {' '.join(MODELS)}; with --reference: {' '.join(SPED_UP)} GCEGNN-dom1")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--batches", type=int, default=5, help="timed training steps per pair")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reference", action="store_true",
                        help="the implementation before the speed-ups (reference/*.py) and the current one, "
                             "side by side, one thread each, with the matmul FLOP floor")
    parser.add_argument("--threads", action="store_true",
                        help="the current implementation with one thread, with two, and as two one-thread jobs at "
                             "once: which way two cores train most rows")
    parser.add_argument("--profile", action="store_true",
                        help="where the time of the current implementation's timed steps goes (torch.profiler, "
                             "one thread; the profiler's own cost inflates the times)")
    parser.add_argument("--gemm-widths", action="store_true",
                        help="the GEMM rate at the widths of one CGRec coalition pass and of its 30 stacked")
    args = parser.parse_args()
    if args.gemm_widths:
        return gemm_widths()
    if args.profile:
        args.models = args.models or list(SPED_UP)
        for key in args.datasets:
            for model in args.models:
                print(f"{model} on {DATASETS[key]}, {args.batches} steps, one thread", flush=True)
                with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
                    pool.submit(_train, model, DATASETS[key], args.batches, args.device, False, 1, True).result()
        return
    if args.threads:
        args.models = args.models or list(SPED_UP) + ["GCEGNN-dom1"]
        return thread_study(args)
    if args.reference:
        args.models = args.models or list(SPED_UP) + ["GCEGNN-dom1"]
        return side_by_side(args)
    args.models = args.models or list(MODELS)
    print(f"device {args.device}, {torch.get_num_threads()} CPU threads, batch 128, {args.batches} timed steps")
    print("| model | dataset | s/batch | rows/s | epoch of full.train (extrapolated) | peak RSS GB | peak GPU GB |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for key in args.datasets:
        name = DATASETS[key]
        n_rows = len(prepared(name).rows("full.train"))
        for model in args.models:
            with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
                seconds, rows, peak, gpu, _ = pool.submit(_train, model, name, args.batches, args.device).result()
            per_row = seconds / rows
            print(f"| {model} | {name} | {seconds / args.batches:.2f} | {1 / per_row:.1f} | "
                  f"{per_row * n_rows / 60:.1f} min | {peak:.2f} | {gpu:.2f} |", flush=True)


def side_by_side(args) -> None:
    """Reference and current implementation of each model in turn, one thread, on the same batches."""
    rate = gemm_rate(1)
    print(f"one thread; float32 GEMM rate of this machine {rate / 1e9:.0f} GFLOP/s; batch 128, {args.batches} timed "
          "steps a run")
    print("| model | dataset | before s/step | now s/step | speed-up | now: matmul GFLOP a step | floor s/step "
          "| now / floor | peak RSS GB before / now |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for key in args.datasets:
        name = DATASETS[key]
        for model in [m for m in args.models if m in SPED_UP + tuple(BACKBONES) + (RECOMPUTE,)]:
            # SyNCRec-recompute: "before" is SyNCRec keeping its activations (the price of recomputing them)
            pair = [("SyNCRec", False), (RECOMPUTE, False)] if model == RECOMPUTE else [(model, True), (model, False)]
            results = []
            for name_, reference in pair:
                with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
                    results.append(pool.submit(_train, name_, name, args.batches, args.device, reference, 1).result())
            (before, _, rss_before, _, _), (now, _, rss_now, _, flops) = results
            floor = flops / rate
            label = f"{BACKBONES[model][0]} ({BACKBONES[model][1]})" if model in BACKBONES else model
            print(f"| {label} | {name} | {before / args.batches:.2f} | {now / args.batches:.2f} | {before / now:.2f}x | "
                  f"{flops / 1e9:.0f} | {floor:.2f} | {now / args.batches / floor:.2f}x | "
                  f"{rss_before:.2f} / {rss_now:.2f} |", flush=True)


def thread_study(args) -> None:
    """Each model alone with one thread, alone with two, and as two one-thread jobs at the same time
    (spawned processes, the same batches): steps a second of the whole machine each way."""
    context = multiprocessing.get_context("spawn")
    print(f"batch 128, {args.batches} timed steps a run; two jobs: two processes of one thread started together")
    print("| model | dataset | 1 thread s/step | 2 threads s/step | two 1-thread jobs s/step (each) "
          "| steps/s: 2 threads / 1 thread | steps/s: two jobs / 2 threads |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for key in args.datasets:
        name = DATASETS[key]
        for model in args.models:
            alone = {}
            for threads in (1, 2):
                with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
                    alone[threads] = pool.submit(_train, model, name, args.batches, args.device, False,
                                                 threads).result()[0] / args.batches
            with ProcessPoolExecutor(max_workers=2, mp_context=context) as pool:
                jobs = [pool.submit(_train, model, name, args.batches, args.device, False, 1) for _ in range(2)]
                pair = max(job.result()[0] for job in jobs) / args.batches  # both done: the pair's pace
            label = f"{BACKBONES[model][0]} ({BACKBONES[model][1]})" if model in BACKBONES else model
            print(f"| {label} | {name} | {alone[1]:.2f} | {alone[2]:.2f} | {pair:.2f} | {alone[1] / alone[2]:.2f}x | "
                  f"{2 * alone[2] / pair:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
