"""What the cross-domain baselines read, from the prepared data of every other model (docs/data.md).

Training rows are `full.train`: each user's training sequence u = s[:n-2] (history + target),
whose positions t predict u[t+1] (the sequence-to-sequence layout). Evaluating target domain d
uses the users of `dom{d}.valid` / `dom{d}.test` with their mixed history
(`PreparedDataset.mixed_history_rows`), so every model is scored on the same (user, target) pairs
as the backbones, only the history differs.
"""
from __future__ import annotations

import numpy as np
import torch

from data import PreparedDataset, pad_rows


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
