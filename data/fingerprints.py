"""Fingerprints of files: what an artifact was made from, and whether that is still what is on disk.

Every artifact of the pipeline (prepared data, checkpoints, regenerated files) records the
SHA-256 of the files it was made from; a stage compares those records with the files'
current digests before it reuses or reads the artifact (`check_inputs`), so nothing made
from other or older inputs is used silently.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

_CHUNK = 1 << 20
# (path, size, mtime_ns) -> digest: a file is hashed once per process unless it changes.
_CACHE: dict[tuple[str, int, int], str] = {}


class StaleArtifactError(ValueError):
    """An artifact made from inputs whose fingerprints no longer match the files on disk."""


def file_digest(path: Path | str) -> str:
    """SHA-256 (hex) of a file's bytes, streamed."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _CACHE:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(_CHUNK), b""):
                digest.update(block)
        _CACHE[key] = digest.hexdigest()
    return _CACHE[key]


def fingerprint(path: Path | str) -> dict:
    """The record of one input: where it was and its digest."""
    return {"path": os.fspath(path), "sha256": file_digest(path)}


def check_inputs(artifact: Path | str, recorded: dict, current: dict) -> None:
    """Refuse an artifact whose recorded input fingerprints differ from the inputs' current ones.

    Both map an input's name (`full.train`, `checkpoint dom1`, ...) to `{"path": ..., "sha256": ...}`;
    only the digests are compared, so moved files are still the same inputs.
    """
    changed = [name for name in current if (recorded.get(name) or {}).get("sha256") != current[name]["sha256"]]
    if changed:
        details = "; ".join(f"{name} was {_describe(recorded.get(name))}, is now {_describe(current[name])}"
                            for name in changed)
        raise StaleArtifactError(
            f"{artifact}: made from inputs that have changed since ({details}), so it is not used. "
            "Run its stage again with overwrite=true to replace it"
        )


def _describe(entry: dict | None) -> str:
    if not entry:
        return "not recorded"
    return f"{entry.get('path', '?')} with sha256 {str(entry.get('sha256'))[:12]}"
