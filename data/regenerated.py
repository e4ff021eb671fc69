"""The rows of a regenerated training file (docs/data.md).

`NAME.SEED.dom{d}.train.inter` holds the rows of `NAME.dom{d}.train.inter` plus one
regenerated row per user, exact duplicate rows dropped, sorted by user id (a
user's original row before its regenerated one). Where it is written, and with
which records, is `pipeline.artifacts.Regenerated`'s business.
"""
from __future__ import annotations

import numpy as np

from data.batches import pad_rows
from data.files import SequenceRows


def merge_training_rows(original: SequenceRows, regenerated: SequenceRows) -> SequenceRows:
    """Both sets of rows, exact duplicates dropped, stably sorted by user id."""
    both = SequenceRows.concatenate([original, regenerated])
    padded, _ = pad_rows(both, max_len=int(both.lengths.max()))
    # A row is (user, length, items...): equal keys are exact duplicates; keep the first.
    keys = np.concatenate([both.users[:, None], both.lengths[:, None], padded], axis=1)
    keep = np.sort(np.unique(keys, axis=0, return_index=True)[1])
    return both.take(keep[np.argsort(both.users[keep], kind="stable")])
