"""What the cross-domain baselines read, from the prepared data of every other model (docs/data.md).

Training rows are `full.train`: each user's training sequence u = s[:n-2] (history + target),
whose positions t predict u[t+1] (the sequence-to-sequence layout). Evaluating target domain d
uses the users of `dom{d}.valid` / `dom{d}.test` with their mixed history, i.e. their rows of
`full.valid` / `full.test`; the targets are the same (checked), so every model is scored on the
same (user, target) pairs as the backbones, only the history differs.
"""
from __future__ import annotations

import numpy as np
import torch

from data import DataError, PreparedDataset, SequenceRows, pad_rows


def evaluation_rows(dataset: PreparedDataset, split: str, dom: str) -> SequenceRows:
    """The `full.{split}` rows (mixed history) of the users of `{dom}.{split}`.

    Stops when a user of the domain split has no such row or another target: the two files would
    then not be of one preparation.
    """
    full, own = dataset.rows(f"full.{split}"), dataset.rows(f"{dom}.{split}")
    index = np.searchsorted(full.users, own.users)
    found = (index < len(full)) & (full.users[np.minimum(index, len(full) - 1)] == own.users)
    if not found.all():
        user = int(own.users[np.argmin(found)])
        raise DataError(f"{dataset.path(f'{dom}.{split}')}: user {user} has no row in {dataset.path(f'full.{split}')}")
    rows = full.take(index)
    differs = rows.targets != own.targets
    if differs.any():
        user = int(own.users[np.argmax(differs)])
        raise DataError(f"{dataset.path(f'{dom}.{split}')}: user {user}'s target differs from its row in "
                        f"{dataset.path(f'full.{split}')}")
    return rows


def user_sequences(dataset: PreparedDataset, width: int) -> torch.Tensor:
    """(users + 1, width) right-padded: row u is user u's whole sequence s (its `full.test` row), the
    items that CGRec's and SyNCRec's negatives avoid; row 0 and absent users are empty."""
    rows = dataset.rows("full.test")
    items, _ = pad_rows(rows, max_len=width)
    table = np.zeros((int(rows.users.max()) + 1, items.shape[1]), dtype=np.int64)
    table[rows.users] = items
    return torch.from_numpy(table)


def domain_of(items: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """1-based domain of each item id (0 for padding), with `starts` the k + 1 domain boundaries."""
    return torch.bucketize(items, starts, right=True) * (items > 0)
