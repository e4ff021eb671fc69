"""The paired bootstrap and the verdicts of the report, on hand-made cases with known answers."""
from __future__ import annotations

import numpy as np
import pytest

from analysis.statistics import FAILS, HOLDS, UNDECIDED, aligned, ndcg_at, paired_bootstrap, verdict


def test_ndcg_of_ranks():
    assert ndcg_at(np.array([0, 1, 9, 10])).tolist() == pytest.approx([1.0, 1 / np.log2(3), 1 / np.log2(11), 0.0])


def test_a_constant_difference_has_a_degenerate_interval():
    a = np.full((3, 50), 0.3)
    b = np.full((3, 50), 0.1)
    c = paired_bootstrap(a, b, resamples=500)
    assert (c.mean, c.low, c.high) == pytest.approx((0.2, 0.2, 0.2)) and c.seed_std == pytest.approx(0.0)
    assert c.verdict == HOLDS and paired_bootstrap(b, a, resamples=500).verdict == FAILS


def test_the_interval_matches_the_normal_approximation():
    """Per-user differences of mean 0.05 and sd 0.5 over 4,000 users: the bootstrap's 95% interval is
    the mean +- 1.96 sd / sqrt(n) of the sample, to within a few percent of its width."""
    generator = np.random.default_rng(1)
    diff = generator.normal(0.05, 0.5, size=4000)
    a, b = diff[None, :] + 0.5, np.full((1, 4000), 0.5)
    c = paired_bootstrap(a, b, resamples=4000, seed=2)
    half = 1.96 * diff.std(ddof=1) / np.sqrt(len(diff))
    assert c.mean == pytest.approx(diff.mean())
    assert c.low == pytest.approx(diff.mean() - half, abs=0.05 * half)
    assert c.high == pytest.approx(diff.mean() + half, abs=0.05 * half)
    assert c.verdict == HOLDS


def test_no_difference_is_undecided_and_pairing_matters():
    generator = np.random.default_rng(3)
    base = generator.uniform(size=(3, 300))
    noise = generator.normal(0, 0.01, size=(3, 300))
    # a tiny but consistent improvement on the same users: paired, it is decided
    assert paired_bootstrap(base + 0.005 + noise * 0.1, base).verdict == HOLDS
    # differences +d and -d in equal numbers: mean 0, and the interval straddles it
    d = np.abs(generator.normal(0, 0.2, size=(3, 150)))
    symmetric = paired_bootstrap(base + np.concatenate([d, -d], axis=1), base)
    assert symmetric.mean == pytest.approx(0.0, abs=1e-12)
    assert symmetric.low < 0 < symmetric.high and symmetric.verdict == UNDECIDED
    same = paired_bootstrap(base, base)
    assert (same.low, same.high) == (0.0, 0.0) and same.verdict == UNDECIDED


def test_verdicts():
    assert (verdict(0.01, 0.2), verdict(-0.2, -0.01), verdict(-0.1, 0.1), verdict(0.0, 0.1)) == (
        HOLDS, FAILS, UNDECIDED, UNDECIDED)


def test_aligned_pairs_users_and_seeds():
    runs_a = [{"seed": 1, "users": [3, 1, 2], "ranks": [0, 5, 20]}, {"seed": 2, "users": [1, 2, 3], "ranks": [0, 0, 0]}]
    runs_b = [{"seed": 1, "users": [1, 2, 3], "ranks": [5, 20, 0]}, {"seed": 3, "users": [1, 2, 3], "ranks": [1, 1, 1]}]
    a, b = aligned(runs_a, runs_b)
    assert a.shape == b.shape == (1, 3) and np.array_equal(a, b)  # seed 1 only, users matched by id
    with pytest.raises(ValueError, match="different users"):
        aligned([{"seed": 1, "users": [1, 2], "ranks": [0, 0]}], [{"seed": 1, "users": [1, 4], "ranks": [0, 0]}])
    with pytest.raises(ValueError, match="one shape"):
        paired_bootstrap(np.zeros((2, 3)), np.zeros((2, 4)))
