"""Reading raw RecBole atomic `.inter` files (one per domain), in two passes that bound memory.

The files can be large (Amazon 2018: 94 million rows over four files, 15 million distinct users
in Books alone), and most users appear in one or two domains only; such a user can never survive
the alignment, whose first step keeps the users present in every domain. So:

1. `file_users` reads the user column of the smallest file alone and returns its distinct user
   tokens, and `users_present` tells which of them every other file has (one block of a file
   in memory at a time); this intersection is the only user set carried on;
2. `read_kept_rows` streams a file block by block and keeps only the rows of those users, as
   integer codes (the user's place in the intersection, the item's among the kept items of the
   file), timestamps, ratings and the row's line in the file.

Memory then follows the smallest file's distinct users and the kept rows, not every row of every
file. Tokens are strings whatever they spell (`NA` is an item); a bad line stops with the file,
the line and what was expected.
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
_BLOCK = 64 << 20  # bytes of the file parsed at a time
_TOKEN = pa.dictionary(pa.int32(), pa.string())
# Memory that Arrow frees must leave the process, or it adds up over files of tens of millions of
# rows (measured: +0.7 GB resident after one pass over a 16M-row file). The parsed columns come
# from jemalloc told to return freed pages at once; the reader's file buffers come from Arrow's
# default pool, which is switched to the system allocator while a file is read (its 64 MiB
# buffers are mapped and unmapped whole), since jemalloc's default pool kept them.
try:
    pa.jemalloc_set_decay_ms(0)
    _POOL = pa.jemalloc_memory_pool()
except NotImplementedError:  # a pyarrow built without jemalloc
    _POOL = pa.system_memory_pool()
_TYPES = {USER: _TOKEN, ITEM: _TOKEN, RATING: pa.float64(), TIME: pa.float64()}


@dataclass
class KeptRows:
    """The rows of one raw file whose user appears in every domain.

    Row j is (common_users[users[j]], item_tokens[items[j]], times[j]), at data line rows[j] of
    the file (0 for the first line after the header).
    """

    path: Path
    raw_rows: int  # every data line of the file
    users: np.ndarray  # (n,) int32 codes into the users common to every file
    items: np.ndarray  # (n,) int32 codes into item_tokens
    item_tokens: pa.Array  # the distinct items of the kept rows
    times: np.ndarray  # (n,) float64 seconds
    ratings: np.ndarray | None  # (n,) float64, only used to tell exact duplicates apart
    rows: np.ndarray  # (n,) line of each row among the file's data lines (int32; int64 past 2^31 lines)

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


def _blocks(path: Path, names: list[str], columns: list[str]):
    """The file's record batches of `columns`, with tokens dictionary-encoded per block."""
    default_pool = pa.default_memory_pool()
    pa.set_memory_pool(pa.system_memory_pool())
    try:
        reader = pa_csv.open_csv(
            path,
            read_options=pa_csv.ReadOptions(skip_rows=1, column_names=names, block_size=_BLOCK),
            # Atomic files are not quoted: a quote character is part of a token.
            parse_options=pa_csv.ParseOptions(delimiter="\t", quote_char=False),
            convert_options=pa_csv.ConvertOptions(
                include_columns=columns,
                column_types={n: _TYPES[n] for n in columns},
                # Tokens are strings, whatever they spell: an item named NA, null or nan is an item.
                # Only an empty field is missing (and reported as such).
                null_values=[""],
                strings_can_be_null=True,
            ),
            memory_pool=_POOL,
        )
        for batch in reader:
            if any(batch.column(i).null_count for i in range(batch.num_columns)):
                _raise_first_bad_line(path, names, columns, None)
            yield batch
    except pa.ArrowInvalid as error:
        _raise_first_bad_line(path, names, columns, error)
    finally:
        pa.set_memory_pool(default_pool)


def file_users(path: Path) -> tuple[pa.Array, int]:
    """(distinct user tokens, number of data lines) of a raw file, from its user column alone."""
    path = Path(path)
    names = read_header(path)
    # Each block's dictionary is its distinct users; only those are held, not a code per row.
    distinct, rows = [], 0
    for batch in _blocks(path, names, [USER]):
        distinct.append(batch.column(0).dictionary)
        rows += batch.num_rows
    if not rows:
        return pa.array([], type=pa.string()), 0
    return pc.unique(pa.chunked_array(distinct), memory_pool=_POOL), rows


def users_present(path: Path, candidates: pa.Array) -> tuple[np.ndarray, int]:
    """(which of `candidates` have a row in the file, number of data lines), from its user column.

    Memory follows the candidates and one block, not the file's own distinct users: the
    alignment needs only the users of the smallest file that every other file has too.
    """
    path = Path(path)
    names = read_header(path)
    present, rows = np.zeros(len(candidates), dtype=bool), 0
    for batch in _blocks(path, names, [USER]):
        at = pc.index_in(candidates, value_set=batch.column(0).dictionary, memory_pool=_POOL)
        present |= at.is_valid().to_numpy(zero_copy_only=False)
        rows += batch.num_rows
    return present, rows


def read_kept_rows(path: Path, users: pa.Array, lines: int) -> KeptRows:
    """Pass 2: the rows of `path` (`lines` data lines, from pass 1) whose user is one of `users`.

    The kept columns are written into arrays of `lines` entries allocated up front: their pages
    become resident only where rows are written, and the block-sized temporaries in between
    do not fragment the heap into resident garbage (which, collected block by block, grew by
    about 50 bytes per kept row).
    """
    path = Path(path)
    names = read_header(path)
    wanted = [n for n in (USER, ITEM, RATING, TIME) if n in names]
    at = {n: i for i, n in enumerate(wanted)}
    codes, times = np.empty(lines, np.int32), np.empty(lines, np.float64)
    ratings = np.empty(lines, np.float64) if RATING in at else None
    rows = np.empty(lines, np.int32 if lines < 2**31 else np.int64)
    items = []  # per block: the kept rows' items, dictionary-encoded
    start = kept = 0  # data line of the block's first row; rows kept so far
    for batch in _blocks(path, names, wanted):
        if start + batch.num_rows > lines:
            raise DataError(f"{path}: the file changed while it was read ({lines} data lines at first)")
        for name in (n for n in (TIME, RATING) if n in wanted):
            finite = pc.is_finite(batch.column(at[name]))
            if len(finite) and not pc.all(finite).as_py():
                bad = int(pc.index(finite, False).as_py())
                raise DataError(f"{path}, line {start + bad + 2}: {name} must be a finite number, got "
                                f"{batch.column(at[name])[bad].as_py()}")
        user = batch.column(at[USER])
        # the block's user codes, through its own dictionary, into the common users (null: not common)
        common = pc.index_in(user.dictionary, value_set=users).fill_null(-1).to_numpy()
        code = common[user.indices.to_numpy(zero_copy_only=False)]
        keep = np.flatnonzero(code >= 0)
        end = kept + len(keep)
        codes[kept:end] = code[keep]
        # the kept rows' items with a dictionary of their own (the block's holds every row's)
        items.append(pc.dictionary_encode(batch.column(at[ITEM]).take(pa.array(keep)).dictionary_decode()))
        times[kept:end] = batch.column(at[TIME]).to_numpy()[keep]
        if ratings is not None:
            ratings[kept:end] = batch.column(at[RATING]).to_numpy()[keep]
        rows[kept:end] = keep + start
        start, kept = start + batch.num_rows, end
    if start != lines:
        raise DataError(f"{path}: the file changed while it was read ({lines} data lines at first, {start} now)")
    item_codes, item_tokens = np.empty(lines, np.int32), pa.array([], type=pa.string())
    if items:
        unified = pa.chunked_array(items).unify_dictionaries(_POOL)
        del items
        at_row = 0
        for chunk in unified.chunks:
            item_codes[at_row:at_row + len(chunk)] = chunk.indices.to_numpy(zero_copy_only=False)
            at_row += len(chunk)
        if unified.num_chunks:
            item_tokens = unified.chunk(0).dictionary
    # Views of the first `kept` entries: the untouched rest was never resident.
    return KeptRows(path=path, raw_rows=start, users=codes[:kept], items=item_codes[:kept], item_tokens=item_tokens,
                    times=times[:kept], ratings=None if ratings is None else ratings[:kept], rows=rows[:kept])


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
