"""Data-parallel training computes one process's loss and gradient of the same global batch.

Two gloo processes on the CPU each take their share of a hand-made global batch through the
trainer's step (`trainer.backward_global_batch`); the losses they report add up to one process's
loss of the whole batch, the summed gradients are its gradient (to 1e-5 relative), and the running
states of CGRec (Shapley) and SyNCRec (loss re-balancing) are the same on both ranks and equal one
process's. Dropout is off and the draws that differ by process are fixed (negatives, gate noise)
or drawn alike (SyNCRec's permutation, rank 0's), so that every difference left is the reduction's.
"""
from __future__ import annotations

import os
import socket

import pytest
import torch

from data import SequenceBatch

# three domains of five items: A = 1..5, B = 6..10, C = 11..15
STARTS = [1, 6, 11, 16]
WIDTH = 8
SMALL = {"num_hidden_layers": 1, "num_attention_heads": 2, "hidden_size": 8, "hidden_dropout_prob": 0.0,
         "attention_probs_dropout_prob": 0.0, "max_seq_length": WIDTH}
MODELS = {
    "CGRec": SMALL,
    "SyNCRec": {**SMALL, "expert_num": 4},
    "SyNCRec-corrected": {**SMALL, "expert_num": 4, "shared_modules": False, "gate_noise_at_eval": False,
                          "single_view_mask": "own"},
    # every domain scored whole (n_neg above its size): no draw of negatives
    "ABXI": {"n_attn": 1, "d_embed": 8, "ffn": 8, "rd": 2, "ri": 2, "dropout": 0.0, "n_neg": 64, "len_max": WIDTH + 3},
    "SASRec": {"hidden_size": 8, "inner_size": 8, "n_layers": 1, "n_heads": 2, "hidden_dropout_prob": 0.0,
               "attn_dropout_prob": 0.0},
}


def global_batch() -> tuple[torch.Tensor, SequenceBatch]:
    """Five users of uneven lengths (2 + 3 rows on two ranks), mixed over the three domains."""
    rows = [[1, 6, 2, 7, 3], [11, 1, 12, 6, 13, 2, 4], [6, 7, 1, 8], [2, 11, 3, 12, 4, 13, 5, 9], [14, 15, 1, 6, 2]]
    width = max(map(len, rows))
    items = torch.zeros(len(rows), width, dtype=torch.long)
    for r, row in enumerate(rows):
        items[r, : len(row)] = torch.tensor(row)
    sequences = torch.zeros(len(rows) + 1, 10, dtype=torch.long)  # user u's whole sequence (row 0: no user)
    sequences[1:, :width] = items
    return sequences, SequenceBatch(torch.arange(1, len(rows) + 1), items, torch.tensor([len(r) for r in rows]))


def fixed_negatives(lo, hi, excluded, generator=None):
    """A deterministic stand-in for `sample_excluding`: a function of each row's own ids only, so a
    row gets the same negative whichever process draws it."""
    span = hi - lo
    draw = lo + (excluded.sum(1) * 7919 + 13) % span
    for _ in range(int(span.max())):
        clash = (excluded == draw[:, None]).any(1)
        if not clash.any():
            break
        draw = torch.where(clash, lo + (draw - lo + 1) % span, draw)
    return draw


def build(name: str, sequences: torch.Tensor) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "ABXI":
        from cdsr_baseline.abxi import ABXI

        return ABXI(15, STARTS, **MODELS[name])
    if name == "SASRec":
        from backbones.registry import SASRec

        return SASRec(15, WIDTH, **MODELS[name])
    module = __import__(f"cdsr_baseline.{name.split('-')[0].lower()}", fromlist=["_"])
    return getattr(module, name.split("-")[0])(15, STARTS, sequences, **MODELS[name])


def loss_fn(name: str):
    if name == "SASRec":
        return lambda model, batch: model.loss(batch, None)
    return lambda model, batch: model.loss(batch)


def fix_draws(monkeypatch) -> None:
    import cdsr_baseline.cgrec
    import cdsr_baseline.syncrec

    monkeypatch.setattr(cdsr_baseline.cgrec, "sample_excluding", fixed_negatives)
    monkeypatch.setattr(cdsr_baseline.syncrec, "sample_excluding", fixed_negatives)
    monkeypatch.setattr(torch, "randn_like", torch.zeros_like)  # SyNCRec's gate noise


def step(name: str, world):
    """Loss, gradients and running state after one step of `name` on the global batch."""
    from trainer import backward_global_batch

    sequences, batch = global_batch()
    model = build(name, sequences).train()
    torch.manual_seed(1)  # SyNCRec's permutation: rank 0's draw, as one process's
    loss = backward_global_batch(model, loss_fn(name), batch, world, torch.device("cpu"))
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    state = {n: b.clone() for n, b in model.named_buffers() if n in ("shapley_state", "lrb_state")}
    return loss, grads, state


class _Patch:
    """monkeypatch for a spawned worker (no pytest fixture there)."""

    def setattr(self, target, name, value):
        setattr(target, name, value)


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from core.distributed import all_reduce_sum, current_world

    dist.init_process_group("gloo")
    fix_draws(_Patch())
    results = {}
    for name in MODELS:
        loss, grads, state = step(name, current_world())
        results[name] = {"loss": all_reduce_sum(loss.clone()), "grads": grads, "state": state}
    torch.save(results, f"{out}.rank{rank}")
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    import torch.multiprocessing as mp

    out = str(tmp_path_factory.mktemp("dp") / "results")
    mp.start_processes(_worker, args=(free_port(), out), nprocs=2, join=True, start_method="spawn")
    return [torch.load(f"{out}.rank{r}", weights_only=True) for r in range(2)]


@pytest.mark.parametrize("name", list(MODELS))
def test_two_ranks_compute_one_processs_loss_gradient_and_state(two_ranks, name, monkeypatch):
    fix_draws(monkeypatch)
    loss, grads, state = step(name, None)
    first, second = (ranks[name] for ranks in two_ranks)
    assert first["loss"].item() == pytest.approx(loss.item(), rel=1e-5)
    assert first["grads"].keys() == grads.keys() == second["grads"].keys()
    for key, grad in grads.items():
        assert torch.equal(first["grads"][key], second["grads"][key]), key  # summed: the same on both
        torch.testing.assert_close(first["grads"][key], grad, rtol=1e-5, atol=1e-7, msg=key)
    for key, value in state.items():  # the running states never drift apart
        assert torch.equal(first["state"][key], second["state"][key]), key
        torch.testing.assert_close(first["state"][key], value, rtol=1e-5, atol=1e-7, msg=key)
    if name.startswith(("CGRec", "SyNCRec")):
        assert state, "the running state is compared"
