"""Small builders shared by the tests."""
from __future__ import annotations

from pathlib import Path

RAW_HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"


def write_raw(path: Path, rows, header: str = RAW_HEADER) -> Path:
    """Write a raw atomic file from (user, item, rating, timestamp) tuples."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + "".join("\t".join(map(str, row)) + "\n" for row in rows), encoding="utf-8")
    return path


def read_all(folder: Path, name: str) -> dict[str, str]:
    """Every contract file of a prepared dataset, keyed like reference_prepare's output."""
    files = {"item": (folder / f"{name}.item").read_text(encoding="utf-8")}
    for path in sorted(folder.glob(f"{name}.*.inter")):
        files[path.name[len(name) + 1 : -len(".inter")]] = path.read_text(encoding="utf-8")
    return files
