"""Prepare a multi-domain dataset: raw per-domain atomic files -> the files of the data contract (docs/data.md).

    python -m dataset.prepare                      # ACDT, built from RecBole's ml-100k
    python -m dataset.prepare dataset=BEST         # the four Amazon files in dataset/raw/
    python -m dataset.prepare dataset=synthetic dataset.generator.n_users=5000

Output goes to `DATA_PATH/NAME/` (default `dataset/NAME/`). Everything is
written into a temporary folder that replaces the old one only when complete,
so an interrupted run never leaves a partial dataset. The same raw input and
settings give the same bytes.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import hydra
import numpy as np
import pyarrow as pa
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from core.schema import describe_differences
from data.dataset import MANIFEST, split_names
from data.domains import LETTERS, domain_suffix
from data.files import DIR_MODE, DataError, exclusive_lock, write_inter, write_item_file, write_text_atomic
from data.fingerprints import file_digest, stat_key
from data.paths import project_path
from dataset.preprocess import Interactions, align, build_splits, drop_duplicate_rows, sort_and_cut
from dataset.raw import file_users, read_kept_rows, users_present

log = logging.getLogger(__name__)
# Name parts of the folders beside DATA_PATH/NAME/ that a preparation works in.
_STAGING, _RETIRED = ".tmp-", ".old-"


def prepare_files(
    raw_files: list[Path],
    out_dir: Path,
    name: str,
    *,
    domain_names: list[str] | None = None,
    user_core: int = 3,
    item_core: int = 3,
    max_seq_len: int = 128,
    progress: bool = False,
    settings: dict | None = None,
    raw_records: list[dict] | None = None,
) -> dict:
    """Run the preprocessing of the data contract on `raw_files` (domain order) and write `out_dir`.

    Returns the summary that is also saved in `out_dir/manifest.json`, with `settings` (the
    configuration that produced it) and the raw files' fingerprints (`raw_records`, computed
    here when not given).
    """
    raw_files = [Path(p) for p in raw_files]
    domain_names = domain_names or [p.stem for p in raw_files]
    k = len(raw_files)
    if k < 2:
        raise DataError(f"dataset {name!r}: got {k} domain file(s); cross-domain preparation needs at least two")
    if k > len(LETTERS):
        raise DataError(f"dataset {name!r}: at most {len(LETTERS)} domains are supported, got {k}")
    if len(domain_names) != k:
        raise ValueError("one domain name per raw file is needed")
    for setting, value in (("user_core", user_core), ("item_core", item_core), ("max_seq_len", max_seq_len)):
        if int(value) < 1:
            raise DataError(f"dataset {name!r}: {setting} must be a positive integer, got {value}")

    started = time.perf_counter()
    # Pass 1: the users in every file. Users missing from a domain can never survive the alignment,
    # so only they go on (dropping the others before deduplication, which is row-local, changes
    # nothing but the cost). The smallest file's users are the first candidates, so memory follows
    # them rather than the largest file's; the set, not its order, decides the output.
    # (A missing file sorts first, so that its error comes before any reading.)
    by_size = sorted(range(k), key=lambda d: (raw_files[d].stat().st_size if raw_files[d].is_file() else -1, d))
    common, raw_rows = None, [0] * k
    for d in tqdm(by_size, desc="reading users", disable=not progress):
        if common is None:
            common, raw_rows[d] = file_users(raw_files[d])
            log.info("%s: %d rows, %d users", raw_files[d].name, raw_rows[d], len(common))
        else:
            present, raw_rows[d] = users_present(raw_files[d], common)
            common = common.filter(pa.array(present))
            log.info("%s: %d rows; %d users so far in every file read", raw_files[d].name, raw_rows[d], len(common))
        if raw_rows[d] == 0:
            raise DataError(f"{raw_files[d]}: domain {domain_names[d]!r} has no interactions")
    raw_records = raw_records or [raw_record(p) for p in raw_files]
    if len(common) == 0:
        raise DataError(f"dataset {name!r}: no user appears in every domain ({', '.join(domain_names)})")
    # Pass 2: their rows, one file at a time. Each domain's items get their own block of codes.
    raws = [read_kept_rows(p, common, n) for p, n in zip(tqdm(raw_files, desc="reading rows", disable=not progress), raw_rows)]
    n_users = len(common)
    item_offsets = np.concatenate([[0], np.cumsum([len(r.item_tokens) for r in raws])])
    row_offsets = np.concatenate([[0], np.cumsum(raw_rows)])
    table, ratings = _kept_table(raws, item_offsets, row_offsets)
    log.info("%d users appear in every domain; %d of their rows kept", n_users, len(table))

    table = drop_duplicate_rows(table, ratings)
    del ratings
    with tqdm(total=4, desc="filtering and aligning", disable=not progress) as bar:
        for step in (
            lambda t: align(t, n_users, domain_names, user_core, item_core),
            lambda t: sort_and_cut(t, max_seq_len),
            lambda t: align(t, n_users, domain_names, user_core, item_core),
            lambda t: sort_and_cut(t, max_seq_len),
        ):
            table = step(table)
            bar.update()

    item_tokens, item_ids, domain_sizes = _number_items(table, raws, item_offsets)
    user_ids = _number_users(table, common)
    table_user = user_ids[table.user]
    order = np.lexsort((table.row, table.time, table_user))
    splits = build_splits(table_user[order], item_ids[table.item[order]], table.domain[order] + 1, k)
    for split in split_names(k):
        if len(splits[split]) == 0:
            raise DataError(
                f"dataset {name!r}: split {split} is empty after preparation "
                f"(too few users or interactions; domains: {', '.join(domain_names)})"
            )

    summary = {
        "name": name,
        "domains": [
            {
                "dom": f"dom{d + 1}",
                "name": domain_names[d],
                "suffix": domain_suffix(d + 1),
                "raw_file": raw_files[d].name,
                "raw_rows": raw_rows[d],
                "items": domain_sizes[d],
                "interactions": int(np.count_nonzero(table.domain == d)),
            }
            for d in range(k)
        ],
        "users": int(len(np.unique(table.user))),
        "items": len(item_tokens),
        "interactions": len(table),
        "rows": {split: len(splits[split]) for split in split_names(k)},
        "user_core": int(user_core),
        "item_core": int(item_core),
        "max_seq_len": int(max_seq_len),
        "settings": settings,
        "raw": raw_records,
    }
    _write_dataset(out_dir, name, item_tokens, splits, summary)
    log.info(
        "prepared %s in %.1fs: %d users, %d items, %d interactions -> %s",
        name, time.perf_counter() - started, summary["users"], summary["items"], summary["interactions"], out_dir,
    )
    return summary


def _kept_table(raws: list, item_offsets: np.ndarray, row_offsets: np.ndarray) -> tuple[Interactions, np.ndarray]:
    """The kept rows of every file in one table (and their ratings), a column at a time.

    Each file's column is released as soon as it is copied, so the peak is the kept rows plus
    one column, not two copies of every column.
    """
    lengths = [len(raw) for raw in raws]

    def column(field: str, dtype, shift=None) -> np.ndarray:
        out = np.empty(sum(lengths), dtype)
        at = 0
        for d, raw in enumerate(raws):
            values = getattr(raw, field)
            out[at:at + len(values)] = values if shift is None else values.astype(dtype) + dtype(shift[d])
            at += len(values)
            setattr(raw, field, None)
        return out

    row_type = np.int32 if row_offsets[-1] < 2**31 else np.int64
    item_type = np.int32 if item_offsets[-1] < 2**31 else np.int64
    for raw in raws:  # a file without ratings: all of its rows rate the same
        if raw.ratings is None:
            raw.ratings = np.zeros(len(raw))
    table = Interactions(
        user=column("users", np.int32),
        item=column("items", item_type, item_offsets),
        time=column("times", np.float64),
        domain=np.repeat(np.arange(len(raws), dtype=np.int8), lengths),
        row=column("rows", row_type, row_offsets),
    )
    return table, column("ratings", np.float64)


def _number_items(table: Interactions, raws, item_offsets) -> tuple[list[str], np.ndarray, list[int]]:
    """Step 6: ids by domain, then by suffixed token in plain string order; 0 is padding."""
    kept = np.unique(table.item)
    tokens: list[str] = []
    sizes: list[int] = []
    item_ids = np.zeros(item_offsets[-1], dtype=np.int64)
    for d, raw in enumerate(raws):
        codes = kept[(kept >= item_offsets[d]) & (kept < item_offsets[d + 1])]
        suffix = domain_suffix(d + 1)
        suffixed = np.array([t + suffix for t in raw.item_tokens.take(codes - item_offsets[d]).to_pylist()], dtype=object)
        # Sorting the suffixed tokens (not the raw ones) is what docs/data.md asks:
        # "100_A" < "10_A" because "0" < "_".
        order = np.argsort(suffixed, kind="stable")
        item_ids[codes[order]] = len(tokens) + 1 + np.arange(len(codes))
        tokens.extend(suffixed[order].tolist())
        sizes.append(len(codes))
    return tokens, item_ids, sizes


def _number_users(table: Interactions, user_tokens: pa.Array) -> np.ndarray:
    """Step 7: user ids in plain string order of the tokens, from 1."""
    kept = np.unique(table.user)
    tokens = np.array(user_tokens.take(kept).to_pylist(), dtype=object)
    user_ids = np.zeros(len(user_tokens), dtype=np.int64)
    user_ids[kept[np.argsort(tokens, kind="stable")]] = np.arange(1, len(kept) + 1)
    return user_ids


def _write_dataset(out_dir: Path, name: str, item_tokens: list[str], splits: dict, summary: dict) -> None:
    """Write every file into a temporary folder, then swap it in for `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}{_STAGING}", dir=out_dir.parent))
    try:
        write_item_file(staging / f"{name}.item", item_tokens)
        for split, rows in splits.items():
            write_inter(staging / f"{name}.{split}.inter", rows)
        # What later stages check their inputs against: the digest of every file written.
        summary = {**summary, "files": {p.name: file_digest(p) for p in sorted(staging.iterdir())}}
        # The manifest comes last: its presence marks a complete dataset.
        write_text_atomic(staging / MANIFEST, json.dumps(summary, indent=2, sort_keys=True) + "\n")
        os.chmod(staging, DIR_MODE)
        if out_dir.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}{_RETIRED}", dir=out_dir.parent))
            os.replace(out_dir, retired / out_dir.name)
            os.replace(staging, out_dir)
            shutil.rmtree(retired)
        else:
            os.replace(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


# --------------------------------------------------------------------------- from config


def raw_domain_files(dataset_cfg, progress: bool = False) -> tuple[list[Path], list[str]]:
    """Materialise the raw files a dataset config names; returns (files, domain names) in domain order."""
    source = dataset_cfg.source
    raw_dir = project_path(dataset_cfg.raw_dir)
    if source == "acdt":
        from dataset.acdt import write_acdt_raw

        names = [d.name for d in dataset_cfg.domains]
        return write_acdt_raw(raw_dir, names), names
    if source == "synthetic":
        from dataset.synthetic import SyntheticConfig, domain_names, generate_raw

        # Lists from YAML become the tuples the frozen dataclass expects.
        knobs = OmegaConf.to_container(dataset_cfg.generator, resolve=True)
        config = SyntheticConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in knobs.items()})
        return generate_raw(raw_dir, config, progress=progress), domain_names(config)
    if source == "files":
        domains = dataset_cfg.domains
        if not domains or len(domains) < 2:
            raise DataError(f"dataset {dataset_cfg.name!r}: config key 'domains' must list at least two domains")
        return [raw_dir / d.file for d in domains], [d.name for d in domains]
    raise DataError(f"dataset {dataset_cfg.name!r}: config key 'source' must be files, acdt or synthetic, got {source!r}")


def preparation_settings(dataset_cfg) -> dict:
    """What a preparation is made from, besides the raw files' content: the dataset config without
    `raw_dir`, so that the same raw files in another folder are the same input."""
    settings = OmegaConf.to_container(dataset_cfg, resolve=True)
    settings.pop("raw_dir", None)
    return settings


def raw_record(path: Path, cached: dict | None = None) -> dict:
    """A raw file's fingerprint. `cached` (an earlier record of the same domain) is trusted while the
    file's inode, size, modification time and inode change time are all unchanged, so a large raw
    file is hashed once; anything else (an edit, a copy over it, `cp -p`, `rsync -t`, `touch -r`,
    all of which change the inode change time) hashes it again."""
    stat = Path(path).stat()
    ino, size, mtime_ns, ctime_ns = stat_key(stat)
    if cached and [cached.get(k) for k in ("inode", "size", "mtime_ns", "ctime_ns")] == [ino, size, mtime_ns, ctime_ns]:
        digest = cached["sha256"]
    else:
        digest = file_digest(path)
    return {"file": Path(path).name, "inode": ino, "size": size, "mtime_ns": mtime_ns, "ctime_ns": ctime_ns,
            "sha256": digest}


def stale_reason(out_dir: Path, settings: dict, dataset_cfg) -> tuple[str | None, list[dict] | None]:
    """Why `out_dir` is not an up-to-date preparation of these settings and raw files (None: it is),
    and the raw files' records when they were fingerprinted."""
    manifest_path = out_dir / MANIFEST
    if not manifest_path.is_file():
        return ("not prepared yet" if not out_dir.exists() else f"{manifest_path} is missing"), None
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    if manifest.get("settings") != settings:
        return f"its settings changed ({describe_differences(manifest.get('settings') or {}, settings)})", None
    for file, digest in (manifest.get("files") or {}).items():
        path = out_dir / file
        if not path.is_file() or file_digest(path) != digest:
            return f"{path} was changed or removed after preparation", None
    if "files" not in manifest:
        return "it was prepared by an older version without file fingerprints", None
    records = None
    if dataset_cfg.source == "files":
        # Raw files the user provides are inputs: their content decides, not their path.
        raw_dir = project_path(dataset_cfg.raw_dir)
        cached = manifest.get("raw") or []
        records = []
        for i, domain in enumerate(dataset_cfg.domains):
            path = raw_dir / domain.file
            if not path.is_file():
                raise DataError(f"{path}: raw file not found")
            records.append(raw_record(path, cached[i] if i < len(cached) else None))
        changed = [r["file"] for r, old in zip(records, cached) if r["sha256"] != old.get("sha256")]
        if changed or len(cached) != len(records):
            return f"raw file(s) {', '.join(changed) or 'list'} changed since the preparation", records
    # Generated raw files (acdt, synthetic) are a function of the settings compared above.
    return None, records


@contextlib.contextmanager
def preparation_lock(out_dir: Path):
    """Hold the dataset's lock (`DATA_PATH/.NAME.lock`) while preparing or checking it.

    Two jobs that start at once (a sweep) prepare one after the other, and the second finds the
    first one's output. Under the lock no other preparation of NAME is running, so the staging
    folders a killed run left behind are removed here.
    """
    lock = out_dir.parent / f".{out_dir.name}.lock"
    if out_dir.is_dir() and not os.access(out_dir.parent, os.W_OK):
        # A read-only store (archived, shared): nobody with our rights can change it, so it is
        # checked without the lock; a stale preparation then fails where it would be written.
        yield
        return
    with exclusive_lock(lock):
        for pattern in (_STAGING, _RETIRED):
            for leftover in out_dir.parent.glob(f".{out_dir.name}{pattern}*"):
                log.info("removing %s, left by an interrupted preparation", leftover)
                shutil.rmtree(leftover, ignore_errors=True)
        yield


def prepare_dataset(dataset_cfg, data_path: str | Path, overwrite: bool = False, progress: bool = True) -> Path:
    """Prepare the dataset a config describes, unless an up-to-date preparation is already there.

    Up to date: the same settings (`preparation_settings`), the prepared files as they were
    written, and, for raw files you provide (`source: files`), the same raw content.
    """
    settings = preparation_settings(dataset_cfg)
    out_dir = project_path(data_path) / dataset_cfg.name
    with preparation_lock(out_dir):
        reason, records = ("overwrite=true", None) if overwrite else stale_reason(out_dir, settings, dataset_cfg)
        if reason is None:
            log.info("%s is prepared and up to date (%s); pass overwrite=true to redo it", dataset_cfg.name, out_dir)
            return out_dir
        log.info("preparing %s into %s: %s", dataset_cfg.name, out_dir, reason)
        raw_files, names = raw_domain_files(dataset_cfg, progress=progress)
        prepare_files(
            raw_files,
            out_dir,
            dataset_cfg.name,
            domain_names=names,
            user_core=dataset_cfg.user_core,
            item_core=dataset_cfg.item_core,
            max_seq_len=dataset_cfg.max_seq_len,
            progress=progress,
            settings=settings,
            raw_records=records,
        )
    return out_dir


@hydra.main(version_base="1.3", config_path="../config", config_name="prepare")
def main(cfg) -> None:
    from pipeline.runs import user_errors
    from pipeline.settings import prepare_settings

    with user_errors():
        prepare_settings(cfg)
        prepare_dataset(cfg.dataset, cfg.data_path, overwrite=cfg.overwrite, progress=cfg.progress)


if __name__ == "__main__":
    main()
