"""The rule in float32 with float64's decisions (model/certified.py, `scores_float32`).

The error bound must hold wherever the rule is used, above all where it is ill-conditioned (the
base model and the source expert almost agree, peaked or flat distributions, probabilities that
underflow); the decisions must be float64's, near-ties included; and most positions must settle
in float32, or the fast path would be a slow one.
"""
from __future__ import annotations

import pytest
import torch

import model.certified as certified
import model.contrastive as contrastive
from model.contrastive import DecodingRule, contrastive_scores, decode, decode_targets

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
    if name == "models opposed":  # |t| / 2 past 80 at many items, where log cosh takes its asymptote
        z_source = randn(40.0)
        return randn(2.0), z_source, randn(1.0) - z_source
    raise ValueError(name)


REGIMES = ["typical", "models agree", "models identical", "peaked", "flat", "large logits", "models opposed"]


@pytest.mark.parametrize("source_experts", [True, False], ids=["with source experts", "w/o SDE"])
@pytest.mark.parametrize("columns", ["all items", "target items"])
@pytest.mark.parametrize("name", REGIMES)
def test_the_error_bound_holds(name, columns, source_experts):
    for seed in range(3):
        z = regime(name, seed=seed)
        if columns == "target items":
            z = tuple(x[:, R_T[0] - 1:R_T[1] - 1] for x in z)
        S32, delta = certified.scores_float32(*z, source_experts=source_experts)
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
    exact = contrastive.decide

    def counted(z_target, *args):
        rows.append(len(z_target))
        return exact(z_target, *args)

    monkeypatch.setattr(contrastive, "decide", counted)
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
    decode(*z, R_T, certified_float32=False)
    assert fallback == [8, 8, 8]


def test_the_rule_in_float32_is_what_the_reference_computes_and_can_differ():
    """`decide(..., dtype=float32)` (what benchmarks measure the reference code by) computes in float32:
    on the ill-conditioned regime its transfer reward loses digits, so its scores are not float64's."""
    z = regime("models agree")
    S32 = contrastive_scores(*z, dtype=torch.float32)
    S64 = contrastive_scores(*z)
    assert S32.dtype == torch.float32 and S64.dtype == torch.float64
    assert (S32.double() - S64).abs().max() > 1e-6
    got = contrastive.decide(*z, R_T, DecodingRule(), dtype=torch.float32)
    assert got.items.shape == (64,)


# Several targets at once (`decode_targets`, what Stage II calls): the transfer reward is computed
# once and shared, and each target's decisions must be those `decode` takes for it alone.
RANGES = {1: R_T, 2: (1, 40), 3: (300, 301), 4: (590, 601)}  # the first ids, one item, the last ids


@pytest.mark.parametrize("rule", RULES.values(), ids=RULES.keys())
@pytest.mark.parametrize("name", REGIMES)
def test_several_targets_decide_as_each_alone(name, rule):
    g = torch.Generator().manual_seed(7)
    for seed in range(2):
        z_source, z_mix = regime(name, seed=seed)[1:]
        z_targets = {t: regime(name, seed=10 * seed + t)[0] for t in RANGES}
        z_targets[4][:, 580:] = z_targets[4].amax() + torch.rand(64, 20, generator=g)  # winners on the range's edge
        together = decode_targets(z_targets, z_source, z_mix, RANGES, rule)
        for t, z_target in z_targets.items():
            for certified in (True, False):
                alone = decode(z_target, z_source, z_mix, RANGES[t], rule, certified_float32=certified)
                assert torch.equal(together[t].items, alone.items), (t, certified)
                assert torch.equal(together[t].convertible, alone.convertible), (t, certified)


def test_several_targets_leave_near_ties_to_float64(monkeypatch):
    fallback = spy_fallback(monkeypatch)
    z_target, z_source, z_mix = near_tie(0.0)
    together = decode_targets({1: z_target, 2: z_target.clone()}, z_source, z_mix, {1: R_T, 2: R_T})
    want = decode(z_target, z_source, z_mix, R_T, certified_float32=False)
    assert all(torch.equal(d.items, want.items) for d in together.values())
    assert fallback[:2] == [1, 1]  # the tie went to float64 for each target


def test_decode_targets_names_mismatched_targets():
    z = regime("typical", P=4)
    with pytest.raises(ValueError, match="same targets"):
        decode_targets({1: z[0]}, z[1], z[2], {2: R_T})
    with pytest.raises(ValueError, match="target_range"):
        decode_targets({1: z[0]}, z[1], z[2], {1: (0, 5)})


# The fused kernels (torch.compile of the float32 rule's global scores, what Stage II uses from
# FUSE_FROM_ITEMS items on): the same bound, the same decisions; and a clean fall-back without a compiler.
def test_fused_kernels_keep_the_bound_and_the_decisions():
    for name in REGIMES:
        z_target, z_source, z_mix = regime(name)
        for P in (64, 5):  # one kernel for every number of rows
            z = (z_target[:P], z_source[:P], z_mix[:P])
            S32, delta = certified.scores_float32(*z, source_experts=True, kernels=certified.FUSED)
            error = (S32.double() - contrastive_scores(*z)).abs().amax(dim=-1)
            assert (error <= delta.double()).all(), name
            got = decode_targets({1: z[0], 2: z[0].flip(-1)}, z[1], z[2], {1: R_T, 2: (1, 40)}, fused=True)
            assert torch.equal(got[1].items, decode(*z, R_T, certified_float32=False).items), name
            assert torch.equal(got[2].items, decode(z[0].flip(-1), z[1], z[2], (1, 40), certified_float32=False).items)
    # the kernels compiled (a failure would have fallen back to eager and passed the checks above);
    # the local scores of the convertible rows went through them too, their columns those of R_T
    assert not (certified.FUSED.confidence.failed or certified.FUSED.transfer.failed)
    # one row goes eagerly (a compiled kernel would specialise, or fail on, a size of 1)
    one_row = regime("typical")[0][:1]
    assert all(torch.equal(a, b) for a, b in zip(certified.FUSED.confidence(one_row),
                                                  certified.confidence_float32(one_row)))
    assert not certified.FUSED.confidence.failed


def test_fused_kernels_fall_back_to_eager_when_compiling_fails(monkeypatch, caplog):
    def no_compiler(function, **options):
        def fail(*args):
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")
        return fail

    monkeypatch.setattr(torch, "compile", no_compiler)
    fused = certified.Fused(certified.confidence_float32)
    z = regime("typical", P=8)[0]
    with caplog.at_level("WARNING"):
        got = fused(z)
    assert fused.failed and "InvalidCxxCompiler" in caplog.text
    want = certified.confidence_float32(z)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(fused(z)[0], want[0])  # and stays eager, without trying again
