"""Training throughput of the Taesar decoder against RecBole's own SASRec, side by side.

    .venv/bin/python benchmarks/train_throughput.py [--epochs 3] [--device cpu|cuda]

Both models get the same ACDT `full.train` batches (batch 128, sequences up to
128 items), the same hyperparameters (config/model/SASRec.yaml) and Adam at
3e-4. Epochs alternate between the two models so that machine noise hits both
alike; the figure that matters is the ratio.

What one step trains differs, and both are reported:
- rows/s: training rows (sequences) consumed per second;
- targets/s: next-item predictions trained per second. The decoder trains every
  position of a row at once (sequence to sequence); RecBole's SASRec trains
  the last position only, which is why RecBole expands each row into its
  prefixes to get the same supervision.

Beside each model: the matrix-multiply FLOPs of one epoch as it runs it (forward and backward,
counted by torch's FLOP counter) and the floor they set at the best rate a float32 GEMM of the
models' shapes reaches on this machine. Where the two models do different amounts of work per row,
the floors bound the rows/s ratio that the same efficiency can give.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from omegaconf import OmegaConf

from backbones.recbole_adapter import build_recbole_model, to_interaction
from data import PreparedDataset, SequenceLoader, project_path
from dataset.prepare import prepare_dataset
from model.decoder import DecoderConfig, TaesarDecoder
from model.objectives import next_item_objective


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per model (after one warm-up epoch)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--max-len", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    from recbole.model.sequential_recommender.sasrec import SASRec

    device = torch.device(args.device)
    dataset_cfg = OmegaConf.load(project_path("config/dataset/ACDT.yaml"))
    prepare_dataset(dataset_cfg, "dataset", progress=False)
    dataset = PreparedDataset(project_path("dataset"), "ACDT")
    rows = dataset.rows("full.train")
    params = OmegaConf.load(project_path("config/model/SASRec.yaml"))
    n_items = dataset.domains.n_items

    torch.manual_seed(0)
    decoder = TaesarDecoder(DecoderConfig.from_model_params(n_items, args.max_len, params)).to(device)
    recbole = build_recbole_model(SASRec, n_items, args.max_len, decoder.config.recbole_params(), device)
    decoder_loss = next_item_objective()
    models = {
        "Taesar decoder": (decoder, lambda batch: decoder_loss(decoder, batch), lambda b: int((b.lengths - 1).sum())),
        "RecBole SASRec": (recbole, lambda batch: recbole.calculate_loss(to_interaction(batch)), lambda b: len(b.users)),
    }
    optimizers = {name: torch.optim.Adam(m.parameters(), lr=3e-4) for name, (m, _, _) in models.items()}
    loader = SequenceLoader(rows, args.batch_size, args.max_len, shuffle=True, seed=0)

    def epoch(name: str, index: int) -> tuple[float, int, int]:
        model, loss_fn, targets_of = models[name]
        model.train()
        loader.set_epoch(index)
        batches = [b.to(device) for b in loader]
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        n_rows = n_targets = 0
        for batch in batches:
            loss = loss_fn(batch)
            optimizers[name].zero_grad(set_to_none=True)
            loss.backward()
            optimizers[name].step()
            n_rows += len(batch.users)
            n_targets += targets_of(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started, n_rows, n_targets

    def epoch_flops(name: str) -> float:
        from torch.utils.flop_counter import FlopCounterMode

        model, loss_fn, _ = models[name]
        loader.set_epoch(0)
        counter = FlopCounterMode(display=False)
        with counter:
            for batch in loader:
                loss_fn(batch.to(device)).backward()
        model.zero_grad(set_to_none=True)
        return float(counter.get_total_flops())

    flops = {name: epoch_flops(name) for name in models}
    threads = torch.get_num_threads()
    from benchmarks.baseline_throughput import gemm_rate  # the same GEMM the baselines' floor uses

    rate = gemm_rate(threads) if device.type == "cpu" else float("nan")
    for name in models:
        epoch(name, 0)  # warm-up: allocator, kernels, lazy init
    timings = {name: [] for name in models}
    for index in range(1, args.epochs + 1):
        for name in models:
            timings[name].append(epoch(name, index))

    print(f"ACDT full.train: {len(rows)} rows, {n_items} items, batch {args.batch_size}, device {device}, "
          f"torch threads {torch.get_num_threads()}, {args.epochs} timed epochs each (median)")
    print(f"float32 GEMM rate {rate / 1e9:.0f} GFLOP/s with {threads} threads")
    print(f"{'model':<16} {'s/epoch':>8} {'rows/s':>9} {'targets/s':>11} {'GFLOP/epoch':>12} {'floor s':>8} "
          f"{'/floor':>7}")
    rates = {}
    for name, runs in timings.items():
        seconds = statistics.median(t for t, _, _ in runs)
        _, n_rows, n_targets = runs[0]
        rates[name] = (n_rows / seconds, n_targets / seconds)
        floor = flops[name] / rate
        print(f"{name:<16} {seconds:8.2f} {rates[name][0]:9.1f} {rates[name][1]:11.0f} {flops[name] / 1e9:12.1f} "
              f"{floor:8.2f} {seconds / floor:6.2f}x")
    ours, theirs = rates["Taesar decoder"], rates["RecBole SASRec"]
    print(f"decoder / RecBole: {ours[0] / theirs[0]:.2f}x rows/s, {ours[1] / theirs[1]:.1f}x targets/s; "
          f"at equal distance to the floor: {flops['RecBole SASRec'] / flops['Taesar decoder']:.2f}x rows/s")


if __name__ == "__main__":
    main()
