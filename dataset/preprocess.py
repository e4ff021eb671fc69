"""The preparation of docs/data.md, vectorised over integer codes.

All domains live in one table with a domain column. Items of different
domains never share a code, so a per-domain k-core is one joint fixed-point
loop over the table (user counts are taken per (user, domain)), and "split
back into domains, align, merge again" needs no splitting at all. The k-core
is the unique largest sub-table meeting the thresholds, so the order in which
rows are dropped does not change the result.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, fields

import numpy as np

from data.files import DataError, SequenceRows

log = logging.getLogger(__name__)


@dataclass
class Interactions:
    """Interactions of all domains, one entry per raw row still kept."""

    # Compact types: at Amazon scale tens of millions of rows reach the alignment, which copies the
    # table at every round.
    user: np.ndarray  # int32 global user code
    item: np.ndarray  # int32 global item code (domains own disjoint codes)
    time: np.ndarray  # float64
    domain: np.ndarray  # int8 domain index, 0-based
    row: np.ndarray  # int32 (int64 past 2^31 rows) position in the concatenation of the raw files D1..Dk

    def take(self, index) -> "Interactions":
        return Interactions(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def __len__(self) -> int:
        return len(self.user)


def drop_duplicate_rows(table: Interactions, ratings: np.ndarray) -> Interactions:
    """Keep the first (in raw order) of rows equal in user, item, rating and timestamp.

    Items are domain-specific codes, so this deduplicates per domain.
    """
    keys = (table.user, table.item, ratings, table.time)
    order = np.lexsort((table.row,) + keys[::-1])
    duplicate = np.ones(len(order), dtype=bool)
    duplicate[:1] = False
    for key in keys:
        sorted_key = key[order]
        duplicate[1:] &= sorted_key[1:] == sorted_key[:-1]
    # Within a group of equal rows the sort put the earliest raw row first.
    keep = np.ones(len(order), dtype=bool)
    keep[order[duplicate]] = False
    return table.take(keep)


def users_in_every_domain(table: Interactions, n_users: int, n_domains: int) -> np.ndarray:
    """Boolean mask over user codes: the user has an interaction in every domain."""
    present = np.bincount(table.user.astype(np.int64) * n_domains + table.domain, minlength=n_users * n_domains) > 0
    return present.reshape(n_users, n_domains).all(axis=1)


def k_core(table: Interactions, n_users: int, n_domains: int, user_core: int, item_core: int) -> Interactions:
    """Iteratively drop rows until, in every domain, users and items have enough interactions."""
    n_items = int(table.item.max()) + 1 if len(table) else 0
    while len(table):
        user_key = table.user.astype(np.int64) * n_domains + table.domain
        user_count = np.bincount(user_key, minlength=n_users * n_domains)
        item_count = np.bincount(table.item, minlength=n_items)
        keep = (user_count[user_key] >= user_core) & (item_count[table.item] >= item_core)
        if keep.all():
            break
        table = table.take(keep)
    return table


def align(
    table: Interactions, n_users: int, domain_names: list[str], user_core: int, item_core: int
) -> Interactions:
    """Step 2 of docs/data.md: users in every domain, k-core per domain, until the user set is stable."""
    k = len(domain_names)
    users = users_in_every_domain(table, n_users, k)
    rounds = 0
    while True:
        rounds += 1
        table = k_core(table.take(users[table.user]), n_users, k, user_core, item_core)
        per_domain = np.bincount(table.domain, minlength=k)
        if not per_domain.all():
            empty = ", ".join(f"dom{d + 1} ({domain_names[d]})" for d in np.flatnonzero(per_domain == 0))
            raise DataError(
                f"filtering left domain(s) {empty} empty: no user keeps >= {user_core} interactions "
                f"with items of >= {item_core} interactions in every domain"
            )
        remaining = users_in_every_domain(table, n_users, k)
        if remaining.sum() == users.sum():
            log.info("aligned in %d round(s): %d users, %d interactions", rounds, remaining.sum(), len(table))
            return table
        users = remaining


def sort_and_cut(table: Interactions, max_seq_len: int) -> Interactions:
    """Step 4: order by (user, timestamp, raw position) and keep each user's most recent items.

    The raw position orders ties by domain first, then by line in the raw file,
    exactly a stable sort over the concatenation D1..Dk.
    """
    table = table.take(np.lexsort((table.row, table.time, table.user)))
    starts, lengths = group_bounds(table.user)
    from_end = np.repeat(starts + lengths, lengths) - np.arange(len(table)) - 1
    return table.take(from_end < max_seq_len)


def group_bounds(sorted_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start index and length of each run of equal keys in a sorted array."""
    if len(sorted_keys) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    is_start = np.empty(len(sorted_keys), dtype=bool)
    is_start[0] = True
    np.not_equal(sorted_keys[1:], sorted_keys[:-1], out=is_start[1:])
    starts = np.flatnonzero(is_start)
    lengths = np.diff(np.append(starts, len(sorted_keys)))
    return starts, lengths


# --------------------------------------------------------------------------- splits


def prefix_rows(
    user_ids: np.ndarray,
    starts: np.ndarray,
    lengths: np.ndarray,
    items: np.ndarray,
    item_domain: np.ndarray,
    cut: np.ndarray,
    domain: int | None = None,
    last_in_domain: bool = False,
) -> SequenceRows:
    """One row per user from the prefix `s[:cut]` of its sequence, optionally kept to one domain.

    `domain` (1-based) filters the prefix to that domain's items; `last_in_domain`
    additionally requires the prefix's last item to be in it. A row needs >= 2 items.
    """
    owner = np.repeat(np.arange(len(starts)), lengths)
    position = np.arange(len(items)) - starts[owner]
    keep = position < cut[owner]
    if domain is not None:
        keep &= item_domain == domain
    count = np.bincount(owner[keep], minlength=len(starts))
    has_row = count >= 2
    if last_in_domain:
        last = starts + np.maximum(cut, 1) - 1
        has_row &= (cut >= 1) & (item_domain[last] == domain)
    keep &= has_row[owner]
    offsets = np.concatenate([[0], np.cumsum(count[has_row])]).astype(np.int64)
    return SequenceRows(user_ids[has_row].astype(np.int64), offsets, items[keep].astype(np.int64))


def build_splits(
    user_ids: np.ndarray, items: np.ndarray, item_domain: np.ndarray, n_domains: int
) -> dict[str, SequenceRows]:
    """Steps 8-9 of docs/data.md from the merged table sorted by (user id, time).

    `user_ids` and `items` are per interaction; `item_domain` is the 1-based
    domain of each interaction's item.
    """
    starts, n = group_bounds(user_ids)
    users = user_ids[starts]
    zero = np.zeros_like(n)
    test_cut = np.where(n >= 2, n, zero)  # test: s[:-1] -> s[-1]
    valid_cut = np.where(n >= 4, n - 1, zero)  # valid: s[:-2] -> s[-2]
    train_cut = np.where(n >= 4, n - 2, np.where(n == 3, n - 1, zero))  # n == 3 trains on s[:-2] -> s[-2]
    common = (users, starts, n, items, item_domain)
    splits = {
        "full.train": prefix_rows(*common, train_cut),
        "full.valid": prefix_rows(*common, valid_cut),
        "full.test": prefix_rows(*common, test_cut),
    }
    # Domain rows come from each user's full test row t: test from t, valid from
    # t[:-1], train from t[:-2]; only users that have a test row contribute.
    has_test = n >= 2
    for d in range(1, n_domains + 1):
        splits[f"dom{d}.train"] = prefix_rows(*common, np.where(has_test, n - 2, zero), domain=d)
        splits[f"dom{d}.valid"] = prefix_rows(*common, np.where(has_test, n - 1, zero), d, last_in_domain=True)
        splits[f"dom{d}.test"] = prefix_rows(*common, test_cut, d, last_in_domain=True)
    return splits
