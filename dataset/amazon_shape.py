"""Raw files shaped like the paper's four Amazon 2018 categories in users and items as well as in rows:
the input that the preparation's memory benchmark measures.

The planted-structure generator of dataset/synthetic.py makes Amazon-sized files with few distinct
users per file; the real files have millions (a user's token is what the preparation holds per
row until the alignment drops it). Here, per domain d:

- its users are `users[d]` distinct members of one pool of `pool` users shared by every file,
  drawn without replacement with weight proportional to a heavy-tailed activity (Pareto, shape
  1.5), so that active users tend to appear in several domains;
- its `rows[d]` rows give every one of those users one row and share the rest in proportion to
  the activity (a multinomial draw): most users have a row or two, a few have thousands;
- items are heavy-tailed too: ranks log-uniform over `items[d]` (a Zipf-like popularity with
  exponent 1), mapped to item ids through a fixed hash so that popularity and token order are
  unrelated;
- timestamps are whole days (seconds, multiples of 86,400) within a span that grows with the
  user's activity, so a user's interactions on one day tie;
- ratings follow Amazon's skew to five stars, and 0.05% of the rows are written twice (exact
  duplicates);
- rows are in random order, written in fixed-width chunks.

    python -m dataset.amazon_shape dataset/raw/AMAZON --rows 10000000 --seed 0
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

import numpy as np

from data.files import atomic_path
from dataset.synthetic import RAW_HEADER, _decimal_digits, _hash48, _hex_digits, _tsv_bytes

DAY = 86_400
_BASE_DAY = 10_957  # 2000-01-01 as days since 1970
_SPAN_DAYS = 18 * 365
_RATING_P = np.array([0.06, 0.06, 0.10, 0.20, 0.58])
_DUPLICATE_SHARE = 0.0005
_ROWS_PER_WRITE = 2_000_000
NAMES = ("Books", "Electronics", "Sports", "Tools")


@dataclasses.dataclass(frozen=True)
class AmazonShape:
    rows: tuple[int, ...]  # raw rows per domain
    users: tuple[int, ...]  # distinct users per domain, from one pool
    items: tuple[int, ...]  # distinct item ids a domain draws from
    pool: int  # users of all domains together

    def __post_init__(self):
        if not len(self.rows) == len(self.users) == len(self.items) >= 2:
            raise ValueError("rows, users and items need one entry per domain (at least two)")
        if any(u > r for u, r in zip(self.users, self.rows)) or max(self.users) > self.pool:
            raise ValueError("a domain has more users than rows, or than the pool")

    def scaled(self, total_rows: int) -> "AmazonShape":
        """The same shape with `total_rows` rows: users, items and the pool scale with the rows."""
        f = total_rows / sum(self.rows)
        scale = lambda values: tuple(max(3, round(v * f)) for v in values)  # noqa: E731
        return AmazonShape(scale(self.rows), scale(self.users), scale(self.items), max(3, round(self.pool * f)))


# Amazon 2018 (the ratings files of Books, Electronics, Sports and Outdoors, Tools and Home
# Improvement): ratings, distinct users and items per file; the users drawn from one pool.
AMAZON_2018 = AmazonShape(rows=(51_311_621, 20_994_353, 12_980_837, 9_015_203),
                          users=(15_362_619, 9_838_676, 6_703_391, 4_704_014),
                          items=(2_930_451, 756_489, 962_876, 559_775), pool=16_000_000)


def generate(raw_dir: Path, shape: AmazonShape, seed: int = 0) -> list[Path]:
    """Write one raw atomic file per domain into `raw_dir`; returns them in domain order."""
    raw_dir = Path(raw_dir)
    raw_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    activity = (1 - rng.random(shape.pool)) ** (-1 / 1.5)  # Pareto(1.5) on [1, inf)
    log_activity = np.log(activity)
    salt = np.uint64(int(np.random.SeedSequence([seed, 1]).generate_state(1)[0]) & ((1 << 40) - 1))
    paths = []
    for d, (n_rows, n_users, n_items) in enumerate(zip(shape.rows, shape.users, shape.items)):
        name = NAMES[d] if d < len(NAMES) else f"D{d + 1}"
        # users of the domain: the n_users largest of log activity + Gumbel noise (weighted draws)
        keys = log_activity - np.log(-np.log(rng.random(shape.pool)))
        users = np.argpartition(-keys, n_users - 1)[:n_users]
        del keys
        extra = rng.multinomial(n_rows - n_users, activity[users] / activity[users].sum())
        per_user = 1 + extra
        user = np.repeat(users.astype(np.int64), per_user)
        rank = np.floor(np.exp(rng.random(n_rows) * np.log(n_items + 1))).astype(np.int64) - 1
        item = (_hash48(rank.astype(np.uint64) + salt) % np.uint64(n_items)).astype(np.int64)
        start = rng.integers(_SPAN_DAYS, size=shape.pool)
        span = np.minimum(1 + 30 * per_user, _SPAN_DAYS)
        span_of = np.repeat(span, per_user)
        day = _BASE_DAY + start[user] + (rng.random(n_rows) * span_of).astype(np.int64)
        rating = rng.choice(5, size=n_rows, p=_RATING_P) + 1
        duplicates = rng.choice(n_rows, size=int(n_rows * _DUPLICATE_SHARE), replace=False)
        order = rng.permutation(np.concatenate([np.arange(n_rows), duplicates]))
        path = raw_dir / f"{name}.inter"
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            f.write(RAW_HEADER)
            for at in range(0, len(order), _ROWS_PER_WRITE):
                rows = order[at:at + _ROWS_PER_WRITE]
                u = _hex_digits(_hash48(user[rows].astype(np.uint64) + salt), 12)
                i = _hex_digits(_hash48((np.uint64(d + 1) << np.uint64(40)) | item[rows].astype(np.uint64)), 12)
                r = _decimal_digits(rating[rows], 1)
                t = _decimal_digits(day[rows] * DAY, 10)
                f.write(_tsv_bytes([u, i, r, t]))
        paths.append(path)
        del user, item, day, rating, order
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("raw_dir", type=Path)
    parser.add_argument("--rows", type=int, default=sum(AMAZON_2018.rows), help="total raw rows (scales the shape)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for path in generate(args.raw_dir, AMAZON_2018.scaled(args.rows), args.seed):
        print(path, os.path.getsize(path))


if __name__ == "__main__":
    main()
