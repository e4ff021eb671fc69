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


def fork_dataset(source: Path, target: Path, split: str = "full.train") -> Path:
    """A copy of a prepared dataset whose `split` holds other rows of the same shape (one row's history
    reversed), with a manifest that vouches for the copy: data a checkpoint was not trained on,
    though every size agrees."""
    import json
    import shutil

    from data.fingerprints import file_digest

    shutil.copytree(source, target)
    path = next(target.glob(f"*.{split}.inter"))
    header, *rows = path.read_text(encoding="utf-8").splitlines(keepends=True)
    row = next(i for i, r in enumerate(rows) if len(r.split("\t")[1].split(" ")) > 2)
    user, history, item = rows[row].split("\t")
    rows[row] = "\t".join([user, " ".join(reversed(history.split(" "))), item])
    path.write_text(header + "".join(rows), encoding="utf-8")
    manifest = json.loads((target / "manifest.json").read_text(encoding="utf-8"))
    manifest["files"][path.name] = file_digest(path)
    (target / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return target
