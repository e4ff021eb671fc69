"""Checkpoint files: where a checkpoint's resume file and lock lie, writing one atomically (the same
payload gives the same bytes), loading one safely (tensors and plain data only, `weights_only=True`;
anything else is refused, never executed) and checking that it was made from this run's data,
vocabulary and model. The training loop (trainer.py) and every stage use these.
"""
from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path

import torch

from core.errors import CheckpointError
from data.files import atomic_path
from data.fingerprints import check_inputs


def resume_file(checkpoint: Path) -> Path:
    return Path(f"{checkpoint}.resume")


def lock_file(checkpoint: Path) -> Path:
    checkpoint = Path(checkpoint)
    return checkpoint.parent / f".{checkpoint.name}.lock"


def save_checkpoint(path: Path, payload: dict) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        # Through a file object, torch names the archive's root `archive` rather than after the
        # (random) temporary file: the same payload gives the same bytes.
        torch.save(payload, f)


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint of this project: tensors and plain data only (`weights_only=True`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's own text suggests weights_only=False, i.e. running whatever code the file holds: never.
        # Only the part naming what was refused is passed on.
        refused = re.search(r"WeightsUnpickler error: ([^\n]*)", str(error))
        detail = f" ({refused.group(1).strip()[:200]})" if refused else ""
        raise CheckpointError(
            f"{path}: unsafe checkpoint, not loaded: it holds Python objects besides tensors and plain data"
            f"{detail}. This project only loads its own weights-only checkpoints; delete the file or train it "
            "again with overwrite=true"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile) as error:
        raise CheckpointError(
            f"{path}: corrupt or truncated checkpoint, not loaded ({type(error).__name__}: {str(error)[:200]}); "
            "delete it or train it again with overwrite=true"
        ) from None


def check_meta(saved: dict, expected: dict, path: Path) -> None:
    """Stop with a clear message when a checkpoint belongs to other data, another vocabulary or model.

    Every key of `expected` must match; keys it does not name are not checked. `inputs` (the
    fingerprints of the files a checkpoint was made from) is compared file by file.
    """
    # In the order `expected` lists them: the dataset first, then its vocabulary, then the model.
    for key in expected:
        if key == "inputs":
            check_inputs(path, saved.get("inputs") or {}, expected["inputs"])
        elif saved.get(key) != expected.get(key):
            raise CheckpointError(
                f"{path}: checkpoint {key} is {saved.get(key)!r} but this run expects {expected.get(key)!r}; "
                "it was trained with other data or settings (use overwrite=true to train anew)"
            )
