"""The domain vocabulary: which contiguous item-id range each domain owns."""
from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.files import DataError, read_item_tokens

# Domain d (1-based) suffixes its item tokens with "_" + LETTERS[d - 1].
LETTERS = string.ascii_uppercase


def checked_item_range(item_range, n_items: int, name: str = "item_range") -> tuple[int, int]:
    """(lo, hi) of a non-empty half-open range of item ids inside [1, n_items + 1); None means every
    item. Scorers take such ranges (a domain's, or all items) and check them here, with one message."""
    if item_range is None:
        return 1, n_items + 1
    try:
        lo, hi = (int(b) for b in item_range)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair of item ids (lo, hi), got {item_range!r}") from None
    if not 1 <= lo < hi <= n_items + 1:
        raise ValueError(f"{name} {(lo, hi)} must be a non-empty half-open id range inside [1, {n_items + 1}) "
                         f"for {n_items} items")
    return lo, hi


def domain_suffix(d: int) -> str:
    if not 1 <= d <= len(LETTERS):
        raise ValueError(f"domain index {d} out of range 1..{len(LETTERS)}")
    return "_" + LETTERS[d - 1]


@dataclass(frozen=True)
class DomainRanges:
    """Domain d owns item ids `range(d)` = [starts[d-1], starts[d]) (half-open).

    Ids start at 1 (0 is padding); dom1's range comes first. Domains are named
    `dom1..domk` as in the configs (`target_dom=dom2`).
    """

    starts: tuple[int, ...]  # k + 1 boundaries: starts[0] == 1, starts[k] == n_items + 1

    def __post_init__(self):
        if len(self.starts) < 3:
            raise ValueError(f"need at least two domains, got {len(self.starts) - 1}")
        if self.starts[0] != 1 or any(b <= a for a, b in zip(self.starts, self.starts[1:])):
            raise ValueError(f"domain boundaries must start at 1 and increase strictly: {self.starts}")

    @classmethod
    def from_sizes(cls, sizes) -> "DomainRanges":
        return cls(tuple(int(s) for s in np.concatenate([[1], 1 + np.cumsum(sizes)])))

    @classmethod
    def from_item_file(cls, path: Path) -> "DomainRanges":
        """Read `NAME.item` and check that the `_A`, `_B`, ... suffixes form contiguous blocks in order."""
        tokens = read_item_tokens(path)
        suffixes = [t.rsplit("_", 1)[1] if "_" in t else "" for t in tokens]
        sizes = []
        line = 0
        for d in range(1, len(LETTERS) + 1):
            letter = LETTERS[d - 1]
            size = 0
            while line < len(suffixes) and suffixes[line] == letter:
                size += 1
                line += 1
            if size == 0:
                break
            sizes.append(size)
        if line < len(tokens):
            done = LETTERS[: len(sizes)]
            raise DataError(
                f"{path}, line {line + 1}: item {tokens[line]!r} breaks the domain blocks; items must be "
                f"grouped by domain suffix in order _A, _B, ... (blocks so far: {', '.join('_' + c for c in done) or 'none'})"
            )
        if len(sizes) < 2:
            raise DataError(f"{path}: found {len(sizes)} domain(s); a multi-domain dataset needs at least two")
        return cls.from_sizes(sizes)

    @property
    def n_domains(self) -> int:
        return len(self.starts) - 1

    @property
    def n_items(self) -> int:
        return self.starts[-1] - 1

    @property
    def names(self) -> list[str]:
        return [f"dom{d}" for d in range(1, self.n_domains + 1)]

    def index(self, domain: str | int) -> int:
        """1-based index of a domain given as `dom2` or 2; a clear error otherwise."""
        if isinstance(domain, str) and domain.startswith("dom") and domain[3:].isdigit():
            d = int(domain[3:])
        elif isinstance(domain, (int, np.integer)) and not isinstance(domain, bool):
            d = int(domain)
        else:
            d = -1
        if not 1 <= d <= self.n_domains:
            raise ValueError(f"unknown domain {domain!r}: this dataset has {', '.join(self.names)}")
        return d

    def range(self, domain: str | int) -> tuple[int, int]:
        """Half-open id range (lo, hi) of a domain."""
        d = self.index(domain)
        return self.starts[d - 1], self.starts[d]

    def domain_of(self, items) -> np.ndarray:
        """1-based domain index of each item id (0 for padding)."""
        items = np.asarray(items)
        return np.searchsorted(np.asarray(self.starts), items, side="right").astype(np.int64) * (items > 0)
