"""The rule in float32 with float64's decisions (model/contrastive.py, `_scores_float32`).

The error bound must hold wherever the rule is used, above all where it is ill-conditioned (the
base model and the source expert almost agree, peaked or flat distributions, probabilities that
underflow); the decisions must be float64's, near-ties included; and most positions must settle
in float32, or the fast path would be a slow one.
"""
from __future__ import annotations

import pytest
import torch

import model.contrastive as contrastive
from model.contrastive import DecodingRule, contrastive_scores, decode

R_T = (40, 140)  # ids 40..139 of N


def regime(name: str, P: int = 64, N: int = 600, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    randn = lambda scale=1.0: torch.randn(P, N, generator=g) * scale  # noqa: E731
    if name == "typical":
        z_source = randn(2.0)
        return randn(2.0), z_source, 0.6 * z_source + randn(1.2)
    if name == "models agree":  # beta's textbook form cancels to nothing here
        z_source = randn(2.0)
        return randn(2.0), z_source, z_source + randn(1e-3)
    if name == "models identical":  # J = 0 everywhere
        z_source = randn(2.0)
        return randn(2.0), z_source, z_source.clone()
    if name == "peaked":  # one item takes nearly all the mass; most probabilities underflow
        return randn(12.0), randn(12.0), randn(12.0)
    if name == "flat":
        return randn(1e-3), randn(1e-3), randn(1e-3)
    if name == "large logits":
        return randn(3.0) + 40, randn(3.0) - 25, randn(3.0) + 60
    raise ValueError(name)


REGIMES = ["typical", "models agree", "models identical", "peaked", "flat", "large logits"]


@pytest.mark.parametrize("source_experts", [True, False], ids=["with source experts", "w/o SDE"])
@pytest.mark.parametrize("columns", ["all items", "target items"])
@pytest.mark.parametrize("name", REGIMES)
def test_the_error_bound_holds(name, columns, source_experts):
    for seed in range(3):
        z = regime(name, seed=seed)
        if columns == "target items":
            z = tuple(x[:, R_T[0] - 1:R_T[1] - 1] for x in z)
        S32, delta = contrastive._scores_float32(*z, source_experts=source_experts)
        S64 = contrastive_scores(*z, source_experts=source_experts)  # float64 from the same float32 logits
        error = (S32.double() - S64).abs().amax(dim=-1)
        assert torch.isfinite(S32).all()
        assert (error <= delta.double()).all(), f"bound broken: error {error.max():.3g}, delta {delta.min():.3g}"


RULES = {
    "taesar": DecodingRule(),
    "w/o SDE": DecodingRule(source_experts=False),
    "w/o GCS": DecodingRule(global_test=False),
    "w/o LCS": DecodingRule(local_scores=False),
    "reference shift": DecodingRule(reference_shift=True),
}


@pytest.mark.parametrize("rule", RULES.values(), ids=RULES.keys())
@pytest.mark.parametrize("name", REGIMES)
def test_decisions_are_float64s(name, rule):
    for seed in range(3):
        z = regime(name, seed=seed)
        got = decode(*z, R_T, rule)
        want = decode(*z, R_T, rule, certified_float32=False)
        assert torch.equal(got.items, want.items) and torch.equal(got.convertible, want.convertible)


def spy_fallback(monkeypatch) -> list[int]:
    """Rows that `decode` hands to the float64 rule, per call."""
    rows: list[int] = []
    exact = contrastive._decode_in_precision

    def counted(z_target, *args):
        rows.append(len(z_target))
        return exact(z_target, *args)

    monkeypatch.setattr(contrastive, "_decode_in_precision", counted)
    return rows


def near_tie(gap: float) -> tuple[torch.Tensor, ...]:
    """One position whose best two target items (ids 50 and 51) differ by `gap` in the target logit."""
    z_target, z_source, z_mix = (x[:1].clone() for x in regime("typical"))
    z_target[0, 49] = z_target.max() + 1.0
    z_target[0, 50] = z_target[0, 49] + gap
    z_source[0, 49:51] = z_source[0, 49]  # the same source logits, so the scores differ by about (1 + alpha) gap
    z_mix[0, 49:51] = z_mix[0, 49]
    return z_target, z_source, z_mix


def test_near_ties_are_decided_in_float64(monkeypatch):
    fallback = spy_fallback(monkeypatch)
    for ulps in (0, 1, 2, 8):
        z = near_tie(ulps * torch.finfo(torch.float32).eps * 8)  # ulps of float32 at about 8
        got, want = decode(*z, R_T), decode(*z, R_T, certified_float32=False)
        assert torch.equal(got.items, want.items)
    # every one of them was too close for float32 to call (the certified calls come first in each pair)
    assert fallback[0::2] == [1, 1, 1, 1]
    fallback.clear()
    decode(*near_tie(0.5), R_T)  # a clear winner settles in float32
    assert fallback == []


def test_a_near_tie_across_the_target_range_is_decided_in_float64(monkeypatch):
    fallback = spy_fallback(monkeypatch)
    z_target, z_source, z_mix = near_tie(0.0)
    z_target[0, 200] = z_target[0, 49]  # a source item (id 201) level with the best target item
    z_source[0, 200], z_mix[0, 200] = z_source[0, 49], z_mix[0, 49]
    got, want = decode(z_target, z_source, z_mix, R_T), decode(z_target, z_source, z_mix, R_T, certified_float32=False)
    assert torch.equal(got.convertible, want.convertible) and torch.equal(got.items, want.items)
    assert fallback[0] == 1


def test_most_positions_settle_in_float32(monkeypatch):
    fallback = spy_fallback(monkeypatch)
    decode(*regime("typical", P=256, N=2000), R_T)
    assert sum(fallback) < 0.1 * 256


def test_float64_logits_and_position_weights_take_the_float64_rule(monkeypatch):
    fallback = spy_fallback(monkeypatch)
    z = regime("typical", P=8)
    decode(*(x.double() for x in z), R_T)
    decode(*z, R_T, DecodingRule(weights="position"))
    with contrastive.computed_in(torch.float32):  # the reference code's float32, for benchmarks
        decode(*z, R_T)
    assert fallback == [8, 8, 8]
