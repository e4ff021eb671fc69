"""A prepared dataset on disk: `DATA_PATH/NAME/` with the files of the data contract (docs/data.md)."""
from __future__ import annotations

import json
import re

import numpy as np
from functools import cached_property
from pathlib import Path

from data.domains import DomainRanges
from data.files import DataError, SequenceRows, read_inter
from data.fingerprints import file_digest

SPLITS = ("train", "valid", "test")
MANIFEST = "manifest.json"
# "full.train", "dom2.test", ...
_SPLIT = re.compile(r"^(?P<part>full|dom\d+)\.(?P<split>train|valid|test)$")


def split_names(n_domains: int) -> list[str]:
    """All split names a preparation writes, in a fixed order."""
    parts = ["full"] + [f"dom{d}" for d in range(1, n_domains + 1)]
    return [f"{part}.{split}" for part in parts for split in SPLITS]


class PreparedDataset:
    """Read access to one prepared dataset; splits are read (and checked) on first use."""

    def __init__(self, data_path: Path | str, name: str):
        self.name = name
        self.root = Path(data_path) / name
        if not self.root.is_dir():
            raise DataError(
                f"{self.root}: no prepared dataset {name!r}; run `python -m dataset.prepare dataset={name}` first"
            )
        self._rows: dict[str, SequenceRows] = {}

    @cached_property
    def domains(self) -> DomainRanges:
        return DomainRanges.from_item_file(self.item_path)

    @cached_property
    def manifest(self) -> dict:
        path = self.root / MANIFEST
        if not path.is_file():
            raise DataError(f"{path}: file not found (the preparation did not finish; run it again)")
        return json.loads(path.read_text(encoding="utf-8"))

    @property
    def item_path(self) -> Path:
        return self.root / f"{self.name}.item"

    def path(self, split: str) -> Path:
        """File of a split such as `full.train` or `dom1.valid`."""
        match = _SPLIT.match(split)
        if not match:
            raise ValueError(f"unknown split {split!r}: expected full.train, dom1.valid, dom2.test, ...")
        if match["part"] != "full":
            self.domains.index(match["part"])
        return self.root / f"{self.name}.{split}.inter"

    def fingerprint(self, split: str) -> dict:
        """The record of a split's file (or of `item`, the vocabulary) as an input of an artifact,
        checked against the digest the preparation wrote into the manifest."""
        path = self.item_path if split == "item" else self.path(split)
        if not path.is_file():
            raise DataError(f"{path}: file not found")
        digest = file_digest(path)
        recorded = (self.manifest.get("files") or {}).get(path.name)
        if recorded != digest:
            raise DataError(
                f"{path}: changed after the preparation (its digest is not the one in {self.root / MANIFEST}); "
                f"prepare it again with `python -m dataset.prepare dataset={self.name} overwrite=true`"
            )
        return {"file": path.name, "sha256": digest}

    def rows(self, split: str) -> SequenceRows:
        if split not in self._rows:
            path = self.path(split)
            self.fingerprint(split)
            rows = read_inter(path, n_items=self.domains.n_items)
            if len(rows) == 0:
                raise DataError(f"{path}: the split has no rows")
            self._rows[split] = rows
        return self._rows[split]

    def mixed_history_rows(self, split: str, dom: str) -> SequenceRows:
        """The `full.{split}` rows of the users of `{dom}.{split}`: the same (user, target) pairs,
        each with the user's mixed history instead of the target-only one (how the cross-domain
        models, and SASRec4 with `eval_history=mixed`, are evaluated).

        Stops when a user of the domain split has no such row or another target: the two files would
        then not be of one preparation.
        """
        full, own = self.rows(f"full.{split}"), self.rows(f"{dom}.{split}")
        index = np.searchsorted(full.users, own.users)
        found = (index < len(full)) & (full.users[np.minimum(index, len(full) - 1)] == own.users)
        if not found.all():
            user = int(own.users[np.argmin(found)])
            raise DataError(f"{self.path(f'{dom}.{split}')}: user {user} has no row in {self.path(f'full.{split}')}")
        rows = full.take(index)
        differs = rows.targets != own.targets
        if differs.any():
            user = int(own.users[np.argmax(differs)])
            raise DataError(f"{self.path(f'{dom}.{split}')}: user {user}'s target differs from its row in "
                            f"{self.path(f'full.{split}')}")
        return rows
