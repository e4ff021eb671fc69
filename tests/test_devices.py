"""What must hold on whatever device the project trains and decodes on. The suite runs these on the CPU;
`bash benchmarks/gpu_check.sh` runs them on a GPU (`TAESAR_TEST_DEVICE=cuda`)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from data import SequenceBatch, SequenceRows
from data.domains import DomainRanges
from model.contrastive import DecodingRule
from model.decoder import DecoderConfig, TaesarDecoder
from model.objectives import next_item_objective
from model.regeneration import regenerate

DEVICE = torch.device(os.environ.get("TAESAR_TEST_DEVICE", "cpu"))
N_ITEMS = 30


def small_decoder(seed: int = 0) -> TaesarDecoder:
    torch.manual_seed(seed)
    return TaesarDecoder(DecoderConfig(n_items=N_ITEMS, hidden_size=16, inner_size=16)).to(DEVICE)


def batch() -> SequenceBatch:
    generator = torch.Generator().manual_seed(0)
    lengths = torch.tensor([9, 4, 12, 2])
    items = torch.randint(1, N_ITEMS + 1, (4, 12), generator=generator) * (torch.arange(12) < lengths[:, None])
    return SequenceBatch(torch.arange(4), items, lengths).to(DEVICE)


def train_step(model: TaesarDecoder, autocast: bool = False) -> torch.Tensor:
    model.train()
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=autocast):
        loss = next_item_objective()(model, batch())
    loss.backward()
    return loss.detach()


def test_training_stays_on_the_device():
    model = small_decoder()
    loss = train_step(model)
    assert loss.device.type == DEVICE.type and torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.device.type == DEVICE.type and p.grad is not None and p.grad.device.type == DEVICE.type, name


def test_bfloat16_autocast_where_offered():
    if DEVICE.type == "cuda" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU offers no bfloat16")  # said in the check's table (device row)
    full = train_step(small_decoder())
    mixed = train_step(small_decoder(), autocast=True)
    assert torch.isfinite(mixed) and abs(mixed.item() - full.item()) < 0.05 * abs(full.item())


def test_the_same_seed_gives_the_same_bytes():
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            model = small_decoder(seed=3)
            torch.manual_seed(4)
            loss = train_step(model)
            runs.append((loss, [p.grad.clone() for p in model.parameters()]))
    finally:
        torch.use_deterministic_algorithms(deterministic)
    (loss_a, grads_a), (loss_b, grads_b) = runs
    assert torch.equal(loss_a, loss_b) and all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))


def test_decoding_decides_on_the_device_as_on_the_cpu():
    domains = DomainRanges((1, 11, 21, 31))
    rng = np.random.default_rng(0)
    rows = SequenceRows.from_lists(range(8), [rng.integers(1, N_ITEMS + 1, rng.integers(3, 15)).tolist()
                                             for _ in range(8)])
    decided = {}
    for where in (torch.device("cpu"), DEVICE):
        base = small_decoder(0).to(where).eval()
        experts = {d: small_decoder(d).to(where).eval() for d in (1, 2, 3)}
        decided[where.type] = regenerate(rows, domains, [1, 2, 3], base, experts, DecodingRule(), max_len=16,
                                         device=where)
    for target in (1, 2, 3):
        assert np.array_equal(decided["cpu"][target].new_items, decided[DEVICE.type][target].new_items)
