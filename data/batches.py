"""Batches of right-padded sequences, for training and full-ranking evaluation.

A batch holds each row's whole sequence `x = history + [target]`, right-padded
with 0 (RecBole's layout: position 0 is the oldest item). One layout serves
both uses: a sequence-to-sequence model reads `items[:, :-1]` and predicts
`items[:, 1:]`; an evaluator scores the state at `lengths - 2` against the
target at `lengths - 1`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from data.files import SequenceRows


@dataclass
class SequenceBatch:
    users: torch.Tensor  # (B,)
    items: torch.Tensor  # (B, W) right-padded history + [target]
    lengths: torch.Tensor  # (B,) real items per row, >= 2

    @property
    def targets(self) -> torch.Tensor:
        return self.items.gather(1, (self.lengths - 1)[:, None]).squeeze(1)

    def to(self, device) -> "SequenceBatch":
        return SequenceBatch(self.users.to(device), self.items.to(device), self.lengths.to(device))

    def rows(self, start: int, stop: int) -> "SequenceBatch":
        """Rows start..stop-1 (a rank's share of a batch)."""
        return SequenceBatch(self.users[start:stop], self.items[start:stop], self.lengths[start:stop])


def pad_rows(rows: SequenceRows, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded matrix of every row's sequence, keeping its `max_len` most recent items.

    `max_len` bounds the whole sequence (history + target), which is what a
    model's position embedding must cover; a long history loses its oldest
    items. Returns `(items (R, W), lengths (R,))` with `W = min(longest row, max_len)`.
    """
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2 (a history item and the target), got {max_len}")
    lengths = np.minimum(rows.lengths, max_len)
    width = int(lengths.max()) if len(rows) else 1
    starts = rows.offsets[1:] - lengths
    columns = np.arange(width)
    real = columns[None, :] < lengths[:, None]
    index = np.where(real, starts[:, None] + columns[None, :], 0)
    items = np.where(real, rows.items[index] if len(rows.items) else 0, 0)
    return items.astype(np.int64), lengths.astype(np.int64)


class SequenceLoader:
    """Iterates `SequenceBatch`es over the rows of one split.

    The padded matrix is built once; a shuffled epoch draws its order from a
    generator seeded with `seed + epoch`, so runs are reproducible and a resumed
    run sees the same order as an uninterrupted one. Each batch is trimmed to
    its own longest row.
    """

    def __init__(self, rows: SequenceRows, batch_size: int, max_len: int, shuffle: bool = False, seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        items, lengths = pad_rows(rows, max_len)
        self.users = torch.from_numpy(rows.users.copy())
        self.items = torch.from_numpy(items)
        self.lengths = torch.from_numpy(lengths)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return (len(self.users) + self.batch_size - 1) // self.batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        n = len(self.users)
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=generator)
        else:
            order = torch.arange(n)
        for start in range(0, n, self.batch_size):
            index = order[start : start + self.batch_size]
            lengths = self.lengths[index]
            width = int(lengths.max())
            yield SequenceBatch(self.users[index], self.items[index, :width], lengths)
