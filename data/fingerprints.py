"""Fingerprints of files: what an artifact was made from, and whether that is still what is on disk.

Every artifact of the pipeline (prepared data, checkpoints, regenerated files) records the
SHA-256 of the files it was made from; a stage compares those records with the files'
current digests before it reuses or reads the artifact (`check_inputs`), so nothing made
from other or older inputs is used silently.

A record holds the file's name and digest, never the folder it lies in: the same data and
settings trained in another folder give byte-identical checkpoints, so what was made from them
(a regenerated file) stays valid.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from core.errors import StaleArtifactError

_CHUNK = 1 << 20
# (path, inode, size, mtime_ns, ctime_ns) -> digest: a file is hashed once per process unless it
# changes. The inode change time is in the key because tools that copy or restore a file (`cp -p`,
# `rsync -t`, `touch -r`) can give edited content its old size and modification time, but not its ctime.
_CACHE: dict[tuple, str] = {}


def file_digest(path: Path | str) -> str:
    """SHA-256 (hex) of a file's bytes, streamed."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), *stat_key(stat))
    if key not in _CACHE:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(_CHUNK), b""):
                digest.update(block)
        _CACHE[key] = digest.hexdigest()
    return _CACHE[key]


def stat_key(stat: os.stat_result) -> tuple[int, int, int, int]:
    """What says a file is unchanged without reading it: inode, size, modification and inode change
    times (an edit, a copy over it or a `touch -r` changes at least the last)."""
    return stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


def fingerprint(path: Path | str) -> dict:
    """The record of one input: its file name and digest (content, not location)."""
    return {"file": Path(path).name, "sha256": file_digest(path)}


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
    # records written before fingerprints left out the folder hold a path
    return f"{entry.get('file') or entry.get('path', '?')} with sha256 {str(entry.get('sha256'))[:12]}"
