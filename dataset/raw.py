"""Reading raw RecBole atomic `.inter` files (one per domain) into integer codes.

The files can be large (Amazon Books 2018: ~51 million rows), so tokens are
dictionary-encoded by pyarrow's multi-threaded CSV reader right away: what
stays in memory is int32 codes, float timestamps and one copy of each
distinct token.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv

from data.files import DataError

USER, ITEM, TIME, RATING = "user_id", "item_id", "timestamp", "rating"
REQUIRED = (USER, ITEM, TIME)


@dataclass
class RawDomain:
    """One raw file: row j is (user_tokens[users[j]], item_tokens[items[j]], times[j])."""

    path: Path
    users: np.ndarray  # (n,) int32 codes into user_tokens
    user_tokens: pa.Array  # distinct user tokens (strings)
    items: np.ndarray  # (n,) int32 codes into item_tokens
    item_tokens: pa.Array
    times: np.ndarray  # (n,) float64 seconds
    ratings: np.ndarray | None  # (n,) float64, only used to tell exact duplicates apart

    def __len__(self) -> int:
        return len(self.users)


def read_header(path: Path) -> list[str]:
    """Field names of an atomic file's header (`user_id:token` -> `user_id`)."""
    if not path.is_file():
        raise DataError(f"{path}: raw file not found")
    # utf-8-sig: a byte-order mark some editors write is not part of the first column's name
    with open(path, encoding="utf-8-sig") as f:
        header = f.readline().rstrip("\r\n")
    names = [field.split(":", 1)[0] for field in header.split("\t")]
    missing = [name for name in REQUIRED if name not in names]
    if missing:
        raise DataError(
            f"{path}, line 1: missing column(s) {', '.join(missing)}; a RecBole atomic header like "
            f"'user_id:token\\titem_id:token\\trating:float\\ttimestamp:float' is expected, got {header!r}"
        )
    return names


def read_raw_domain(path: Path) -> RawDomain:
    path = Path(path)
    names = read_header(path)
    wanted = [n for n in (USER, ITEM, RATING, TIME) if n in names]
    # Tokens are dictionary-encoded by the reader itself, block by block, so the
    # full string columns never exist in memory (they would need ~4x the file size).
    token = pa.dictionary(pa.int32(), pa.string())
    types = {USER: token, ITEM: token, RATING: pa.float64(), TIME: pa.float64()}
    try:
        table = pa_csv.read_csv(
            path,
            read_options=pa_csv.ReadOptions(skip_rows=1, column_names=names, block_size=64 << 20),
            # Atomic files are not quoted: a quote character is part of a token.
            parse_options=pa_csv.ParseOptions(delimiter="\t", quote_char=False),
            convert_options=pa_csv.ConvertOptions(
                include_columns=wanted,
                column_types={n: types[n] for n in wanted},
                # Tokens are strings, whatever they spell: an item named NA, null or nan is an item.
                # Only an empty field is missing (and reported as such).
                null_values=[""],
                strings_can_be_null=True,
            ),
            # The system allocator hands freed blocks back to the OS; pyarrow's default
            # (jemalloc) keeps them, which adds up over files of tens of millions of rows.
            memory_pool=pa.system_memory_pool(),
        )
    except pa.ArrowInvalid as error:
        _raise_first_bad_line(path, names, wanted, error)
    if any(table.column(n).null_count for n in wanted):
        _raise_first_bad_line(path, names, wanted, None)
    for name in (n for n in (TIME, RATING) if n in wanted):
        finite = pc.is_finite(table.column(name))
        if len(finite) and not pc.all(finite).as_py():
            line = int(pc.index(finite, False).as_py()) + 2
            raise DataError(f"{path}, line {line}: {name} must be a finite number, got "
                            f"{table.column(name)[line - 2].as_py()}")
    table = table.unify_dictionaries(pa.system_memory_pool())  # one dictionary per column across blocks
    users, user_tokens = _codes(table.column(USER))
    items, item_tokens = _codes(table.column(ITEM))
    return RawDomain(
        path=path,
        users=users,
        user_tokens=user_tokens,
        items=items,
        item_tokens=item_tokens,
        times=table.column(TIME).to_numpy(),
        ratings=table.column(RATING).to_numpy() if RATING in wanted else None,
    )


def _codes(column: pa.ChunkedArray) -> tuple[np.ndarray, pa.Array]:
    """int32 codes and the distinct tokens of a dictionary-encoded column with unified chunks."""
    if column.num_chunks == 0:
        return np.zeros(0, dtype=np.int32), pa.array([], type=pa.string())
    codes = np.concatenate([chunk.indices.to_numpy(zero_copy_only=False) for chunk in column.chunks])
    return codes.astype(np.int32, copy=False), column.chunk(0).dictionary


def _raise_first_bad_line(path: Path, names: list[str], wanted: list[str], error):
    """Slow line scan, run only after the fast reader failed, to name the bad line."""
    numeric = {n for n in wanted if n in (TIME, RATING)}
    with open(path, encoding="utf-8") as f:
        next(f)
        for line_number, line in enumerate(f, start=2):
            line = line.rstrip("\r\n")
            if not line:
                continue
            fields = line.split("\t")
            if len(fields) != len(names):
                raise DataError(
                    f"{path}, line {line_number}: expected {len(names)} tab-separated fields "
                    f"({', '.join(names)}), got {len(fields)}"
                )
            for name, value in zip(names, fields):
                if name not in wanted:
                    continue
                if value == "":
                    raise DataError(f"{path}, line {line_number}: empty {name}")
                if name in numeric:
                    try:
                        float(value)
                    except ValueError:
                        raise DataError(f"{path}, line {line_number}: {name} must be a number, got {value!r}") from None
    raise DataError(f"{path}: could not be parsed as a tab-separated atomic file ({error})")
