"""Paired comparisons of two models on the same test users, with a bootstrap confidence interval.

A claim such as "new beats sim on dom4" compares two runs per seed that rank the same users'
targets. Per user and seed the difference of NDCG@10 is taken, averaged over the seeds (the
user's mean difference), and the users are resampled with replacement (a paired bootstrap over
test users, pooled over seeds): the interval covers the uncertainty that comes from which users
happen to be in the test split, for these seeds. The spread over seeds is reported beside it as
the standard deviation of the per-seed means; with three seeds, resampling seeds as well would
say little more.

Verdict at level 95%: `holds` when the whole interval is above 0, `does not hold` when it is below
0, `undecided` when it contains 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

HOLDS, FAILS, UNDECIDED = "holds", "does not hold", "undecided"


def ndcg_at(ranks: np.ndarray, k: int = 10) -> np.ndarray:
    """Per-row NDCG@k of 0-based ranks (one relevant item: 1 / log2(rank + 2) inside the top k)."""
    ranks = np.asarray(ranks, dtype=np.float64)
    return np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0)


@dataclass(frozen=True)
class Comparison:
    mean: float  # mean over seeds and users of a - b
    low: float
    high: float
    seed_std: float  # standard deviation over seeds of the per-seed mean difference (0 with one seed)
    users: int
    seeds: int

    @property
    def verdict(self) -> str:
        return verdict(self.low, self.high)


def verdict(low: float, high: float) -> str:
    if low > 0:
        return HOLDS
    if high < 0:
        return FAILS
    return UNDECIDED


def paired_bootstrap(a: np.ndarray, b: np.ndarray, resamples: int = 10_000, level: float = 0.95,
                     seed: int = 0) -> Comparison:
    """a, b: (seeds, users) per-user values of two models on the same users, in the same order.

    Returns the mean of a - b and its percentile interval at `level` from `resamples` resamplings
    of the users (the same resampled users for every seed).
    """
    a, b = np.atleast_2d(np.asarray(a, dtype=np.float64)), np.atleast_2d(np.asarray(b, dtype=np.float64))
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"paired values need one shape (seeds, users), got {a.shape} and {b.shape}")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    diff = a - b
    per_user = diff.mean(axis=0)  # (users,) each user's difference, averaged over the seeds
    n = len(per_user)
    generator = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, 1000):  # bounded memory: 1000 resamples of n users at a time
        count = min(1000, resamples - start)
        means[start:start + count] = per_user[generator.integers(0, n, size=(count, n))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    per_seed = diff.mean(axis=1)
    return Comparison(float(per_user.mean()), float(low), float(high),
                      float(per_seed.std(ddof=1)) if len(per_seed) > 1 else 0.0, n, diff.shape[0])


def aligned(runs_a: list[dict], runs_b: list[dict], k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """(seeds, users) NDCG@k of two lists of runs paired by seed, each `{"seed", "users", "ranks"}`;
    users are matched by id (both must rank the same users)."""
    by_seed_b = {run["seed"]: run for run in runs_b}
    seeds = sorted({run["seed"] for run in runs_a} & set(by_seed_b))
    if not seeds:
        raise ValueError("no seed is shared by the two sets of runs")
    rows_a, rows_b = [], []
    by_seed_a = {run["seed"]: run for run in runs_a}
    for s in seeds:
        ua, ub = np.asarray(by_seed_a[s]["users"]), np.asarray(by_seed_b[s]["users"])
        if not np.array_equal(np.sort(ua), np.sort(ub)):
            raise ValueError(f"seed {s}: the two runs rank different users")
        order_a, order_b = np.argsort(ua, kind="stable"), np.argsort(ub, kind="stable")
        rows_a.append(ndcg_at(np.asarray(by_seed_a[s]["ranks"])[order_a], k))
        rows_b.append(ndcg_at(np.asarray(by_seed_b[s]["ranks"])[order_b], k))
    return np.stack(rows_a), np.stack(rows_b)
