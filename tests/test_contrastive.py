"""Adaptive contrastive decoding on hand-made logits over 10 items.

The target domain owns R_T = [4, 8) (items 4..7, columns 3..6); the other items are source items.
Expected weights and scores come from the plain NumPy formulas below, written from the spec and
independent of model/contrastive.py; expected decisions are stated by hand with the reason.

Every test runs twice: once as written (float64 logits, the rule in float64), and once with the
logits rounded to float32, where `decode` takes its certified float32 path; there every decision
is also checked against the float64 rule on the same float32 logits.
"""

import math
import sys

import numpy as np
import pytest
import torch

from model.contrastive import (
    EPS,
    Decision,
    DecodingRule,
    contrastive_scores,
    decode,
    domain_confidence,
    transfer_reward,
)

N = 10
R_T = (4, 8)
TARGET_COLUMNS = slice(3, 7)

WO_SDE = DecodingRule(source_experts=False)
WO_GCS = DecodingRule(global_test=False)
WO_LCS = DecodingRule(local_scores=False)
POSITION = DecodingRule(weights="position")
SHIFT = DecodingRule(reference_shift=True)


def logits(values: dict[int, float] | None = None, rest: float = 0.0, dtype=torch.float64) -> torch.Tensor:
    """One row (1, N): values maps item ids to logits, every other item gets `rest`."""
    z = torch.full((1, N), rest, dtype=dtype)
    for item, value in (values or {}).items():
        z[0, item - 1] = value
    return z


@pytest.fixture(autouse=True, params=["float64", "certified float32"])
def precision(request, monkeypatch):
    if request.param == "float64":
        return
    exact_decode = decode

    def float32(z):
        return z.float() if isinstance(z, torch.Tensor) and z.is_floating_point() else z

    def certified_and_checked(z_target, z_source, z_mix, *args, **kwargs):
        inputs = [float32(z) for z in (z_target, z_source, z_mix)]
        got = exact_decode(*inputs, *args, **kwargs)
        want = exact_decode(*inputs, *args, certified_float32=False, **kwargs)
        assert torch.equal(got.items, want.items) and torch.equal(got.convertible, want.convertible)
        return got

    monkeypatch.setattr(sys.modules[__name__], "decode", certified_and_checked)


def zeros() -> torch.Tensor:
    return logits()


def chosen(z_target, z_source, z_mix, rule=DecodingRule()) -> int:
    return int(decode(z_target, z_source, z_mix, R_T, rule).items[0])


# --- independent NumPy formulas (one row, float64) -------------------------------------------


def np_softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def np_alpha(z_target, weights="elementwise"):
    p = np_softmax(z_target)
    if weights == "elementwise":
        H = -p * np.log(p + EPS)
        return (1 - H) / (1 - H.max() + EPS)
    return 1 - (-(p * np.log(p)).sum()) / np.log(len(p))


def np_beta(z_mix, z_source, weights="elementwise"):
    p_mix, p_source = np_softmax(z_mix), np_softmax(z_source)
    m = (p_mix + p_source) / 2
    if weights == "elementwise":
        J = 0.5 * (m * (np.log(m) - np.log(p_mix)) + m * (np.log(m) - np.log(p_source)))
        return J / (J.max() + EPS)
    JSD = 0.5 * ((p_mix * np.log(p_mix / m)).sum() + (p_source * np.log(p_source / m)).sum())
    return 1 - JSD / np.log(2)


def np_score(z_target, z_source, z_mix, weights="elementwise"):
    return (1 + np_alpha(z_target, weights)) * z_target - np_beta(z_mix, z_source, weights) * z_source


# --- the weights -------------------------------------------------------------------------------


def test_alpha_and_beta_by_hand():
    uniform = zeros()
    # p = 1/C everywhere: every H(v) is the max, so alpha = 1 element-wise; entropy log C -> alpha = 0
    assert torch.allclose(domain_confidence(uniform), torch.ones(1, N, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(domain_confidence(uniform, "position"), torch.zeros(1, 1, dtype=torch.float64), atol=1e-12)
    # two candidates with p = (3/4, 1/4): H = (-3/4 log 3/4, -1/4 log 1/4), the max is the second
    H = torch.tensor([-0.75 * math.log(0.75), -0.25 * math.log(0.25)], dtype=torch.float64)
    two = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)
    assert torch.allclose(domain_confidence(two), ((1 - H) / (1 - H[1])).unsqueeze(0), atol=1e-9)
    assert torch.allclose(domain_confidence(two, "position"), 1 - H.sum().view(1, 1) / math.log(2), atol=1e-12)
    # p_mix == p_source: J = 0 everywhere -> beta = 0 element-wise; JSD = 0 -> beta = 1 per position
    z = logits({5: 2.0, 9: 1.0})
    assert torch.equal(transfer_reward(z, z), torch.zeros(1, N, dtype=torch.float64))
    assert torch.allclose(transfer_reward(z, z, "position"), torch.ones(1, 1, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("weights", ["elementwise", "position"])
def test_alpha_beta_and_scores_match_the_formulas(weights):
    rng = np.random.default_rng(0)
    z_target, z_source, z_mix = (torch.from_numpy(rng.normal(0, 2, size=(3, N))) for _ in range(3))
    alpha = domain_confidence(z_target, weights)
    beta = transfer_reward(z_mix, z_source, weights)
    G = contrastive_scores(z_target, z_source, z_mix, weights)
    shape = (3, N) if weights == "elementwise" else (3, 1)
    assert alpha.shape == beta.shape == shape and G.shape == (3, N)
    for row in range(3):
        zt, zs, zm = z_target[row].numpy(), z_source[row].numpy(), z_mix[row].numpy()
        np.testing.assert_allclose(alpha[row].numpy(), np_alpha(zt, weights), rtol=1e-12)
        np.testing.assert_allclose(beta[row].numpy(), np_beta(zm, zs, weights), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(G[row].numpy(), np_score(zt, zs, zm, weights), rtol=1e-9, atol=1e-12)
    without_sde = contrastive_scores(z_target, None, None, weights, source_experts=False)
    assert torch.allclose(without_sde, (1 + alpha) * z_target, rtol=1e-12)


# --- decisions ---------------------------------------------------------------------------------


def test_replaced_when_the_global_argmax_is_a_target_item():
    decision = decode(logits({5: 3.0}), zeros(), zeros(), R_T)
    assert isinstance(decision, Decision)
    assert decision.items.tolist() == [5] and decision.convertible.tolist() == [True]
    assert decision.items.dtype == torch.long


def test_deleted_when_the_global_argmax_is_outside_the_target_domain():
    # item 9 (a source item) beats item 5; the source and mixed models agree, so beta does not help
    decision = decode(logits({9: 3.0, 5: 2.9}), zeros(), zeros(), R_T)
    assert decision.items.tolist() == [0] and decision.convertible.tolist() == [False]


def test_local_beats_global():
    z_target, z_source, z_mix = logits({5: 2.0, 6: 1.0}), logits({5: 2.0}), zeros()
    G = contrastive_scores(z_target, z_source, z_mix)[0]
    L = contrastive_scores(z_target[:, TARGET_COLUMNS], z_source[:, TARGET_COLUMNS], z_mix[:, TARGET_COLUMNS])[0]
    np.testing.assert_allclose(G.numpy(), np_score(z_target[0].numpy(), z_source[0].numpy(), z_mix[0].numpy()))
    expected_L = np_score(*(z[0, TARGET_COLUMNS].numpy() for z in (z_target, z_source, z_mix)))
    np.testing.assert_allclose(L.numpy(), expected_L)
    # globally item 5 is the source expert's top item (beta = 1) and drops below item 6; over R_T
    # only, the weights are renormalised and item 5 wins back
    assert int(G.argmax()) + 1 == 6 and int(L.argmax()) + 4 == 5
    assert chosen(z_target, z_source, z_mix) == 5
    assert chosen(z_target, z_source, z_mix, WO_LCS) == 6  # w/o LCS keeps the global choice


def test_without_source_experts():
    # the source expert is sure of item 9 where the mixed model is not: beta(9) = 1 removes it
    z_target, z_source, z_mix = logits({9: 3.0, 5: 2.9}), logits({9: 5.0}), zeros()
    assert chosen(z_target, z_source, z_mix) == 5
    assert chosen(z_target, z_source, z_mix, WO_SDE) == 0
    assert chosen(z_target, None, None, WO_SDE) == 0  # w/o SDE needs neither model


def test_without_global_test_never_deletes():
    z_target = logits({9: 3.0, 5: 2.9})
    assert chosen(z_target, zeros(), zeros()) == 0
    decision = decode(z_target, zeros(), zeros(), R_T, WO_GCS)
    assert decision.items.tolist() == [5] and decision.convertible.tolist() == [True]


def test_position_rule():
    # p_mix == p_source: element-wise beta = 0 and item 9 wins; per position beta = 1 subtracts z_source
    z_target, z_source = logits({9: 3.0, 5: 2.9}), logits({9: 2.0})
    assert chosen(z_target, z_source, z_source) == 0
    assert chosen(z_target, z_source, z_source, POSITION) == 5
    G = contrastive_scores(z_target, z_source, z_source, "position")[0]
    zt, zs = z_target[0].numpy(), z_source[0].numpy()
    np.testing.assert_allclose(G.numpy(), np_score(zt, zs, zs, "position"))


def test_reference_shift():
    # arg-max on item 3, just before R_T: not convertible, yet the shifted id 4 is a target item
    before = decode(logits({3: 3.0}), zeros(), zeros(), R_T, SHIFT)
    assert before.items.tolist() == [4] and before.convertible.tolist() == [False]
    assert chosen(logits({3: 3.0}), zeros(), zeros()) == 0
    # arg-max on the last target item 7: convertible, but the shifted id 8 = hi is deleted
    last = decode(logits({7: 3.0}), zeros(), zeros(), R_T, SHIFT)
    assert last.items.tolist() == [0] and last.convertible.tolist() == [True]
    assert chosen(logits({7: 3.0}), zeros(), zeros()) == 7
    assert chosen(logits({5: 3.0}), zeros(), zeros(), SHIFT) == 6
    assert chosen(logits({7: 3.0}), zeros(), zeros(), DecodingRule(global_test=False, reference_shift=True)) == 0


def test_exact_ties_go_to_the_lowest_id():
    assert chosen(logits({5: 3.0, 6: 3.0}), zeros(), zeros()) == 5
    assert chosen(logits({5: 3.0, 9: 3.0}), zeros(), zeros()) == 5
    # item 2 ties with item 5 and comes first: the global arg-max is a source item -> deleted
    assert chosen(logits({2: 3.0, 5: 3.0}), zeros(), zeros()) == 0
    assert chosen(logits({2: 3.0, 5: 3.0}), zeros(), zeros(), WO_GCS) == 5
    assert chosen(zeros(), zeros(), zeros(), WO_GCS) == 4


RULES = [DecodingRule(), WO_SDE, WO_GCS, WO_LCS, POSITION, SHIFT, DecodingRule(weights="position", global_test=False)]


@pytest.mark.parametrize("rule", RULES, ids=repr)
def test_underflowing_probabilities_stay_finite(rule):
    # every softmax is one-hot in float32: the other probabilities underflow to exactly 0
    z_target = logits({5: 1e4}, rest=-1e4, dtype=torch.float32)
    z_source = logits({9: 1e4}, rest=-1e4, dtype=torch.float32)
    z_mix = logits({1: 1e4}, rest=-1e4, dtype=torch.float32)
    for z in (z_target, z_target[:, TARGET_COLUMNS]):
        assert torch.isfinite(domain_confidence(z, rule.weights)).all()
    for zs, zm in ((z_source, z_mix), (z_source[:, TARGET_COLUMNS], z_mix[:, TARGET_COLUMNS]), (z_mix, z_mix)):
        assert torch.isfinite(transfer_reward(zm, zs, rule.weights)).all()
        assert torch.isfinite(contrastive_scores(z_target[:, TARGET_COLUMNS], zs[:, :4], zm[:, :4], rule.weights)).all()
    assert torch.isfinite(contrastive_scores(z_target, z_source, z_mix, rule.weights)).all()
    assert chosen(z_target, z_source, z_mix, rule) == (6 if rule.reference_shift else 5)


def test_one_hot_weights_by_hand():
    z_target = logits({5: 1e4}, rest=-1e4, dtype=torch.float32)
    z_source = logits({9: 1e4}, rest=-1e4, dtype=torch.float32)
    z_mix = logits({1: 1e4}, rest=-1e4, dtype=torch.float32)
    # a point mass: H = 0 (up to EPS), so alpha = 1 by either rule
    assert torch.allclose(domain_confidence(z_target).float(), torch.ones(1, N))
    assert torch.allclose(domain_confidence(z_target, "position").float(), torch.ones(1, 1))
    # disjoint point masses: J is equal and large on items 1 and 9, exactly 0 elsewhere; JSD = log 2
    beta = transfer_reward(z_mix, z_source).float()
    assert torch.allclose(beta, logits({1: 1.0, 9: 1.0}, dtype=torch.float32))
    assert torch.allclose(transfer_reward(z_mix, z_source, "position").float(), torch.zeros(1, 1), atol=1e-6)


# --- vectorisation, purity, arguments ----------------------------------------------------------

CASES = [
    (logits({5: 3.0}), zeros(), zeros()),
    (logits({9: 3.0, 5: 2.9}), zeros(), zeros()),
    (logits({5: 2.0, 6: 1.0}), logits({5: 2.0}), zeros()),
    (logits({9: 3.0, 5: 2.9}), logits({9: 5.0}), zeros()),
    (logits({3: 3.0}), zeros(), zeros()),
    (logits({7: 3.0}), logits({2: 1.0}), logits({6: -1.0})),
]


@pytest.mark.parametrize("rule", RULES, ids=repr)
def test_a_batch_decodes_like_its_rows_and_inputs_stay_untouched(rule):
    z_target, z_source, z_mix = (torch.cat(column) for column in zip(*CASES))
    copies = [z.clone() for z in (z_target, z_source, z_mix)]
    batch = decode(z_target, z_source, z_mix, R_T, rule)
    rows = [decode(*case, R_T, rule) for case in CASES]
    assert batch.items.tolist() == [int(d.items[0]) for d in rows]
    assert batch.convertible.tolist() == [bool(d.convertible[0]) for d in rows]
    for z, copy in zip((z_target, z_source, z_mix), copies):
        assert torch.equal(z, copy)
    contrastive_scores(z_target, z_source, z_mix, rule.weights)
    for z, copy in zip((z_target, z_source, z_mix), copies):
        assert torch.equal(z, copy)


def test_the_paper_decisions_on_the_batch():
    z_target, z_source, z_mix = (torch.cat(column) for column in zip(*CASES))
    decision = decode(z_target, z_source, z_mix, R_T)
    assert decision.items.tolist() == [5, 0, 5, 5, 0, 7]
    assert decision.convertible.tolist() == [True, False, True, True, False, True]


def test_bad_arguments():
    z = zeros()
    with pytest.raises(ValueError, match="shape"):
        contrastive_scores(z, logits()[:, :5], z)
    with pytest.raises(ValueError, match="shape"):
        transfer_reward(z, torch.zeros(2, N, dtype=torch.float64))
    with pytest.raises(ValueError, match="shape"):
        decode(z, z, torch.zeros(2, N, dtype=torch.float64), R_T)
    with pytest.raises(ValueError, match=r"\(P, N\)"):
        decode(z[0], z[0], z[0], R_T)
    with pytest.raises(ValueError, match="unknown weighting"):
        domain_confidence(z, "entropy")
    with pytest.raises(ValueError, match="unknown weighting"):
        transfer_reward(z, z, "jsd")
    with pytest.raises(ValueError, match="unknown weighting"):
        DecodingRule(weights="per_item")
    with pytest.raises(ValueError, match="no score"):
        DecodingRule(global_test=False, local_scores=False)
    with pytest.raises(ValueError, match="required"):
        contrastive_scores(z, None, None)
    with pytest.raises(ValueError, match="floating-point"):
        domain_confidence(torch.zeros(1, N, dtype=torch.long))
    with pytest.raises(ValueError, match="candidate"):
        domain_confidence(torch.zeros(1, 0))
    for bad_range in [(4, 4), (6, 5), (0, 5), (4, N + 2), (4,), None]:
        with pytest.raises(ValueError, match="target_range"):
            decode(z, z, z, bad_range)
    assert decode(z, z, z, (1, N + 1)).items.tolist() == [1]  # the whole catalogue is a valid R_T
    with pytest.raises(ValueError, match="DecodingRule"):
        decode(z, z, z, R_T, rule="elementwise")
