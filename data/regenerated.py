"""The regenerated training file of a target domain (data.md) and the reports beside it.

`NAME.SEED.dom{d}.train.inter` holds the rows of `NAME.dom{d}.train.inter` plus one
regenerated row per user, exact duplicate rows dropped, sorted by user id (a
user's original row before its regenerated one). The folder it goes to is keyed
by the settings that produced it, so that ablations never overwrite each other.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from data.batches import pad_rows
from data.files import SequenceRows, write_inter, write_text_atomic


def regenerated_name(name: str, seed: int, target_dom: str) -> str:
    return f"{name}.{seed}.{target_dom}.train"


def merge_training_rows(original: SequenceRows, regenerated: SequenceRows) -> SequenceRows:
    """Both sets of rows, exact duplicates dropped, stably sorted by user id."""
    both = SequenceRows.concatenate([original, regenerated])
    padded, _ = pad_rows(both, max_len=int(both.lengths.max()))
    # A row is (user, length, items...): equal keys are exact duplicates; keep the first.
    keys = np.concatenate([both.users[:, None], both.lengths[:, None], padded], axis=1)
    keep = np.sort(np.unique(keys, axis=0, return_index=True)[1])
    return both.take(keep[np.argsort(both.users[keep], kind="stable")])


def write_regenerated(folder: Path, name: str, seed: int, target_dom: str, rows: SequenceRows,
                      report: dict, mapping: dict, manifest: dict) -> Path:
    """Write the training file, its report, the mapping and the manifest; returns the training file.

    The training file comes last, each file atomically: a later stage never
    finds a training file without the record of how it was made.
    """
    stem = regenerated_name(name, seed, target_dom)
    folder.mkdir(parents=True, exist_ok=True)
    dump = lambda value: json.dumps(value, indent=2, sort_keys=True) + "\n"  # noqa: E731
    write_text_atomic(folder / f"{stem}.summary.json", dump(report))
    write_text_atomic(folder / f"{stem}.mapping.json", dump({str(s): {str(t): c for t, c in targets.items()}
                                                             for s, targets in mapping.items()}))
    write_text_atomic(folder / f"{stem}.manifest.json", dump(manifest))
    path = folder / f"{stem}.inter"
    write_inter(path, rows)
    return path
