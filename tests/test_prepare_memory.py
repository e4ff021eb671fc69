"""The preparation's memory is bounded by design: it grows with the rows it keeps, not with the raw
users or rows it reads.

Measured as benchmarks/prepare_benchmark.py does, in a fresh child process (its own peak RSS, not
this one's), on Amazon-shaped raw files (dataset/amazon_shape.py: most users in one or two of the
four files) read in small blocks, so that even a small input takes many blocks and whatever a
block leaves behind would add up. Two inputs, the second twice the first in rows, distinct users
and items; the peak may grow by at most BYTES_PER_RAW_ROW for each added raw row. Holding a code
per raw row, per-domain frames of every row, or the resident garbage of freed blocks (the causes
of the 22 GB peak on the full-size input) each cost more than that.
"""
from __future__ import annotations

import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from benchmarks.resources import peak_rss_bytes, rss_bytes
from dataset.amazon_shape import AMAZON_2018, generate

# The kept rows (about 40% of the raw rows here) cost 28 bytes each while read and 29 in the
# table; the alignment copies a shrinking table: 44 to 48.5 bytes per raw row measured (the more
# on a busy machine, where the allocator returns less). 56 is the bound; the old reader took about 140.
BYTES_PER_RAW_ROW = 56
SMALL_ROWS = 1_000_000


def _prepare_peak(raw_files: list[Path], out_dir: Path) -> tuple[int, int]:
    """(resident bytes before, peak resident bytes after) of preparing `raw_files` in this process."""
    import dataset.raw
    from dataset.prepare import prepare_files

    dataset.raw._BLOCK = 1 << 20  # many blocks per file
    before = rss_bytes()
    prepare_files(raw_files, out_dir, "MEM", progress=False)
    return before, peak_rss_bytes()


def _growth(tmp_path: Path, rows: int) -> tuple[int, int]:
    raw = generate(tmp_path / f"raw{rows}", AMAZON_2018.scaled(rows), seed=3)
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        before, peak = pool.submit(_prepare_peak, raw, tmp_path / f"out{rows}").result()
    return peak - before, sum(1 for p in raw for _ in open(p, "rb")) - len(raw)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")
def test_peak_grows_with_kept_rows_not_with_raw_users(tmp_path):
    small, small_rows = _growth(tmp_path, SMALL_ROWS)
    large, large_rows = _growth(tmp_path, 2 * SMALL_ROWS)
    per_row = (large - small) / (large_rows - small_rows)
    assert per_row <= BYTES_PER_RAW_ROW, (
        f"peak grew by {per_row:.0f} bytes per added raw row ({small / 1e6:.0f} MB at {small_rows:,} rows, "
        f"{large / 1e6:.0f} MB at {large_rows:,}); at most {BYTES_PER_RAW_ROW} expected"
    )
