"""Reading and writing the files of the data contract (docs/data.md).

Every `.inter` file of a prepared dataset holds one row per user,
`user_id \t item_id_list \t item_id`, where the item list is the history and
`item_id` the target. In memory a file is a `SequenceRows`: the rows'
sequences `x = history + [target]` stored flat, with offsets, so nothing here
loops over interactions.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from core.errors import BusyError, DataError

INTER_HEADER = "user_id:token\titem_id_list:token_seq\titem_id:token"
# mkstemp creates files readable by the owner only; finished files get the
# usual permissions instead (read once here: os.umask can only be read by setting it).
_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK
DIR_MODE = 0o777 & ~_UMASK


@dataclass(frozen=True)
class SequenceRows:
    """Rows `history -> target` of one split, as flat arrays.

    Row r is the sequence `items[offsets[r]:offsets[r + 1]]`, whose last item is
    the target and the rest the history (at least one item).
    """

    users: np.ndarray  # (R,) int64 user ids
    offsets: np.ndarray  # (R + 1,) int64, offsets[0] == 0
    items: np.ndarray  # (offsets[-1],) int64 item ids

    def __post_init__(self):
        if len(self.offsets) != len(self.users) + 1 or self.offsets[0] != 0 or self.offsets[-1] != len(self.items):
            raise ValueError("SequenceRows: offsets do not match users and items")
        if len(self.users) and np.diff(self.offsets).min() < 2:
            raise ValueError("SequenceRows: every row needs a history and a target (>= 2 items)")

    def __len__(self) -> int:
        return len(self.users)

    @property
    def lengths(self) -> np.ndarray:
        """Length of each row's full sequence (history + target)."""
        return np.diff(self.offsets)

    @property
    def targets(self) -> np.ndarray:
        return self.items[self.offsets[1:] - 1]

    def sequence(self, r: int) -> np.ndarray:
        return self.items[self.offsets[r] : self.offsets[r + 1]]

    def take(self, index) -> "SequenceRows":
        """The rows `index` (integer positions), in that order."""
        index = np.asarray(index, dtype=np.int64)
        lengths = self.lengths[index]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        flat = np.repeat(self.offsets[index] - offsets[:-1], lengths) + np.arange(offsets[-1])
        return SequenceRows(self.users[index], offsets, self.items[flat])

    def prefixes(self) -> "SequenceRows":
        """Every row `x` expanded into its rows `x[:t+1]`, t = 1..len(x)-1 (history -> next item), in order.

        For models whose loss reads one position per row: they then see every
        position a sequence-to-sequence model learns from.
        """
        lengths = self.lengths
        n_prefixes = lengths - 1
        row = np.repeat(np.arange(len(self)), n_prefixes)
        # prefix lengths 2..len(x) for each row
        first = np.concatenate([[0], np.cumsum(n_prefixes)])[:-1]
        prefix_length = np.arange(len(row)) - np.repeat(first, n_prefixes) + 2
        offsets = np.concatenate([[0], np.cumsum(prefix_length)]).astype(np.int64)
        flat = np.repeat(self.offsets[row] - offsets[:-1], prefix_length) + np.arange(offsets[-1])
        return SequenceRows(self.users[row], offsets, self.items[flat])

    @classmethod
    def concatenate(cls, parts: list["SequenceRows"]) -> "SequenceRows":
        lengths = np.concatenate([p.lengths for p in parts])
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        return cls(np.concatenate([p.users for p in parts]), offsets, np.concatenate([p.items for p in parts]))

    @classmethod
    def from_lists(cls, users, sequences) -> "SequenceRows":
        """Build from Python lists (tests, small data); `sequences[r]` = history + [target]."""
        lengths = np.array([len(s) for s in sequences], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        items = np.array([i for s in sequences for i in s], dtype=np.int64)
        return cls(np.asarray(users, dtype=np.int64), offsets, items)


# --------------------------------------------------------------------------- writing


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it into place only on success.

    A crash or an exception leaves `path` untouched (old content or absent) and
    removes the temporary file, so no reader ever sees half a file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:  # a read-only folder, a full disk: name the file that was to be written
        raise OSError(error.errno, error.strerror, str(path)) from None
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except OSError as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if error.filename == tmp:  # the temporary name means nothing to the user
            raise OSError(error.errno, error.strerror, str(path)) from None
        raise
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def exclusive_lock(path: Path, wait: bool = True, what: str = "") -> Iterator[None]:
    """Hold an exclusive lock on the file `path` (created empty, and left in place: removing a lock
    file while another process waits on it would let a third one take a second lock).

    `wait=False` raises `BusyError` at once when another process holds it; `what` says in that
    message what the holder is doing. The lock goes with the process, so a killed holder frees it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise BusyError(path, what) from None
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        # newline="" keeps "\n" on every platform: the files must be byte-identical.
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)


def format_inter(rows: SequenceRows) -> str:
    """The text of an `.inter` file: header, then one line per row.

    Built with one `str.join` over all tokens: each item token is followed by
    its separator (" " inside the history, "\\t" before the target, "\\n" after it).
    """
    if len(rows) == 0:
        return INTER_HEADER + "\n"
    ends = rows.offsets[1:]
    id_text = np.array([str(i) for i in range(int(rows.items.max()) + 1)], dtype=object)
    tokens = id_text[rows.items]
    starts = rows.offsets[:-1]
    user_prefix = np.array([f"{u}\t" for u in rows.users.tolist()], dtype=object)
    tokens[starts] = user_prefix + tokens[starts]
    separators = np.full(len(tokens), " ", dtype=object)
    separators[ends - 2] = "\t"
    separators[ends - 1] = "\n"
    interleaved = np.empty(2 * len(tokens), dtype=object)
    interleaved[0::2] = tokens
    interleaved[1::2] = separators
    return INTER_HEADER + "\n" + "".join(interleaved.tolist())


def write_inter(path: Path, rows: SequenceRows) -> None:
    write_text_atomic(path, format_inter(rows))


def write_item_file(path: Path, tokens: list[str]) -> None:
    """`NAME.item`: line i (1-based) is the token of item id i."""
    write_text_atomic(path, "".join(t + "\n" for t in tokens))


# --------------------------------------------------------------------------- reading


def _require_file(path: Path) -> None:
    if not Path(path).is_file():
        raise DataError(f"{path}: file not found")


def read_item_tokens(path: Path) -> list[str]:
    """Tokens of `NAME.item` in id order (index 0 is item id 1)."""
    _require_file(path)
    text = Path(path).read_text(encoding="utf-8")
    tokens = text.split("\n")
    if tokens and tokens[-1] == "":
        tokens.pop()
    for line, token in enumerate(tokens, start=1):
        if not token or "\t" in token or token != token.strip():
            raise DataError(f"{path}, line {line}: expected one item token per line, got {token!r}")
    if not tokens:
        raise DataError(f"{path}: no items")
    return tokens


def read_inter(path: Path, n_items: int | None = None, one_row_per_user: bool = True) -> SequenceRows:
    """Read an `.inter` file of the contract, checking every line.

    `n_items`, when given, is the size of the vocabulary (`NAME.item`): every
    item id must lie in 1..n_items. Rows are sorted by user id, one per user
    except in a regenerated training file (`one_row_per_user=False`).
    """
    path = Path(path)
    _require_file(path)
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines[-1] == "":
        lines.pop()
    if not lines or lines[0] != INTER_HEADER:
        got = lines[0] if lines else "an empty file"
        raise DataError(f"{path}, line 1: expected the header {INTER_HEADER!r}, got {got!r}")
    body = lines[1:]
    fields = [line.split("\t") for line in body]
    for n, parts in enumerate(fields):
        if len(parts) != 3:
            raise DataError(f"{path}, line {n + 2}: expected 3 tab-separated fields, got {len(parts)}")
    if not fields:
        return SequenceRows(np.zeros(0, np.int64), np.zeros(1, np.int64), np.zeros(0, np.int64))
    users_text, history_text, target_text = zip(*fields)
    # One history token count per row, then a single vectorised integer parse of
    # every token; a failure falls back to a scan that finds the bad line.
    history_tokens = " ".join(history_text).split(" ")
    history_lengths = np.fromiter((h.count(" ") + 1 for h in history_text), dtype=np.int64, count=len(body))
    try:
        users = np.array(users_text, dtype=np.int64)
        targets = np.array(target_text, dtype=np.int64)
        history = np.array(history_tokens, dtype=np.int64)
    except ValueError:
        _raise_first_bad_line(path, fields)
    lengths = history_lengths + 1
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    items = np.empty(offsets[-1], dtype=np.int64)
    target_slots = offsets[1:] - 1
    is_target = np.zeros(offsets[-1], dtype=bool)
    is_target[target_slots] = True
    items[is_target] = targets
    items[~is_target] = history
    if users.min() < 1:
        bad = int(np.argmax(users < 1))
        raise DataError(f"{path}, line {bad + 2}: user ids start at 1, got {users[bad]}")
    out_of_order = np.diff(users) <= 0 if one_row_per_user else np.diff(users) < 0
    if out_of_order.any():
        bad = int(np.argmax(out_of_order)) + 1
        rule = "one row per user" if one_row_per_user else "several rows of a user allowed"
        raise DataError(f"{path}, line {bad + 2}: rows must be sorted by user id ({rule})")
    upper = n_items if n_items is not None else np.iinfo(np.int64).max
    out_of_range = (items < 1) | (items > upper)
    if out_of_range.any():
        slot = int(np.argmax(out_of_range))
        row = int(np.searchsorted(offsets, slot, side="right")) - 1
        expected = f"1..{n_items} (the ids of the .item file)" if n_items is not None else ">= 1"
        raise DataError(f"{path}, line {row + 2}: item id {items[slot]} is not an item id, expected {expected}")
    return SequenceRows(users, offsets, items)


def _raise_first_bad_line(path: Path, fields: list[list[str]]):
    for n, (user, history, target) in enumerate(fields):
        for what, text in (("user_id", user), ("item_id_list", history), ("item_id", target)):
            for token in text.split(" "):
                try:
                    int(token)
                except ValueError:
                    raise DataError(
                        f"{path}, line {n + 2}: {what} must hold integer ids separated by single spaces, got {text!r}"
                    ) from None
    raise AssertionError("no bad line found")  # pragma: no cover - only reached on a logic error
