"""Stage II over a whole training split: teacher-forced contrastive decoding, then post-processing.

Only the positions whose next item belongs to a source domain are scored, for
all source domains in one pass over the rows; the scores are computed in
chunks of positions so that memory stays bounded for large vocabularies. The
decisions land in a flat array aligned with the input items, and everything
after that (filtering, collapsing repeats, statistics, the mapping) is
vectorised over that array. File writing is the caller's business.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from data import DomainRanges, SequenceLoader, SequenceRows
from model.contrastive import DecodingRule, decode
from model.decoder import TaesarDecoder

log = logging.getLogger(__name__)


@dataclass
class Regeneration:
    """The result for one target domain."""

    rows: SequenceRows  # regenerated rows (>= 2 target items), in input order
    new_items: np.ndarray  # per input item: itself (target), its replacement, or 0 (deleted)
    report: dict = field(default_factory=dict)
    mapping: dict[int, dict[int, int]] = field(default_factory=dict)  # source item -> target item -> count


@torch.no_grad()
def decode_rows(
    rows: SequenceRows,
    domains: DomainRanges,
    target: int,
    base: TaesarDecoder,
    experts: dict[int, TaesarDecoder],
    rule: DecodingRule,
    *,
    max_len: int,
    batch_size: int = 32,
    positions_per_chunk: int = 256,
    device: torch.device = torch.device("cpu"),
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Decide every source item that has a history: returns `(new_items, convertible)`, flat like `rows.items`.

    `new_items` keeps target items, holds the replacement of a replaced source
    item and 0 for a deleted one (or one without a history: the first item of a
    row, or one older than the `max_len` window). `convertible` marks the
    source items that passed the global test.
    """
    item_domain = domains.domain_of(rows.items)
    new_items = np.where(item_domain == target, rows.items, 0)
    convertible = np.zeros(len(rows.items), dtype=bool)
    target_range = domains.range(target)
    domain_table = torch.from_numpy(domains.domain_of(np.arange(domains.n_items + 1))).to(device)
    for model in (base, *experts.values()):
        model.eval()

    loader = SequenceLoader(rows, batch_size, max_len, shuffle=False)
    # The window may have cut a row's oldest items: flat index of its column 0.
    window_start = rows.offsets[1:] - loader.lengths.numpy()
    first_row = 0
    for batch in tqdm(loader, desc=f"decoding dom{target}", disable=not progress):
        items = batch.items.to(device)
        next_domain = domain_table[items[:, 1:]]  # (B, W - 1): domain of the item each position predicts
        is_source = (next_domain != 0) & (next_domain != target)
        row, position = is_source.nonzero(as_tuple=True)  # (P,) each
        if len(row):
            source = next_domain[row, position]
            hidden_target = experts[target].encode(items)[row, position]
            hidden_base = base.encode(items)[row, position]
            hidden_source = torch.empty_like(hidden_target)
            for s in source.unique().tolist():
                chosen = source == s
                hidden_source[chosen] = experts[s].encode(items)[row[chosen], position[chosen]]
            for start in range(0, len(row), positions_per_chunk):
                chunk = slice(start, start + positions_per_chunk)
                z_source = torch.empty(hidden_source[chunk].shape[0], domains.n_items, device=device)
                for s in source[chunk].unique().tolist():
                    chosen = source[chunk] == s
                    z_source[chosen] = experts[s].logits(hidden_source[chunk][chosen])
                decision = decode(
                    experts[target].logits(hidden_target[chunk]), z_source, base.logits(hidden_base[chunk]),
                    target_range, rule,
                )
                flat = window_start[first_row + row[chunk].cpu().numpy()] + position[chunk].cpu().numpy() + 1
                new_items[flat] = decision.items.cpu().numpy()
                convertible[flat] = decision.convertible.cpu().numpy()
        first_row += len(batch.users)
    return new_items, convertible


def postprocess(rows: SequenceRows, new_items: np.ndarray) -> SequenceRows:
    """Keep the target items of each row, collapse runs of one item, keep rows of >= 2 items."""
    owner = np.repeat(np.arange(len(rows)), rows.lengths)
    kept = np.flatnonzero(new_items)
    items, owner = new_items[kept], owner[kept]
    repeat = np.zeros(len(items), dtype=bool)
    repeat[1:] = (items[1:] == items[:-1]) & (owner[1:] == owner[:-1])
    items, owner = items[~repeat], owner[~repeat]
    count = np.bincount(owner, minlength=len(rows))
    long_enough = count >= 2
    keep = long_enough[owner]
    offsets = np.concatenate([[0], np.cumsum(count[long_enough])]).astype(np.int64)
    return SequenceRows(rows.users[long_enough], offsets, items[keep])


def summarise(rows: SequenceRows, domains: DomainRanges, target: int, new_items: np.ndarray,
              convertible: np.ndarray, regenerated: SequenceRows) -> tuple[dict, dict]:
    """The report (counts per source domain, lengths) and the source -> target mapping with counts."""
    item_domain = domains.domain_of(rows.items)
    first = np.zeros(len(rows.items), dtype=bool)
    first[rows.offsets[:-1]] = True
    per_domain = {}
    for d in range(1, domains.n_domains + 1):
        if d == target:
            continue
        source = item_domain == d
        replaced = source & (new_items != 0)
        per_domain[f"dom{d}"] = {
            "seen": int(source.sum()),
            "replaced": int(replaced.sum()),
            "deleted": int((source & (new_items == 0)).sum()),
            "convertible": int((source & convertible).sum()),
            "without_history": int((source & first).sum()),
        }
    replaced = (item_domain != target) & (new_items != 0)
    pairs, counts = np.unique(np.stack([rows.items[replaced], new_items[replaced]]), axis=1, return_counts=True)
    mapping: dict[int, dict[int, int]] = {}
    for (source_item, target_item), count in zip(pairs.T.tolist(), counts.tolist()):
        mapping.setdefault(source_item, {})[target_item] = count
    target_only = postprocess(rows, np.where(item_domain == target, rows.items, 0))
    report = {
        "target_dom": f"dom{target}",
        "rows_in": len(rows),
        "regenerated_rows": len(regenerated),
        "source_items": per_domain,
        "source_items_seen": sum(v["seen"] for v in per_domain.values()),
        "source_items_replaced": sum(v["replaced"] for v in per_domain.values()),
        "source_items_deleted": sum(v["deleted"] for v in per_domain.values()),
        "distinct_target_items_introduced": int(len(np.unique(new_items[replaced]))),
        "mean_length_mixed": float(rows.lengths.mean()) if len(rows) else 0.0,
        "mean_length_target_only": float(target_only.lengths.mean()) if len(target_only) else 0.0,
        "mean_length_regenerated": float(regenerated.lengths.mean()) if len(regenerated) else 0.0,
    }
    return report, mapping


def regenerate(rows: SequenceRows, domains: DomainRanges, target: int, base: TaesarDecoder,
               experts: dict[int, TaesarDecoder], rule: DecodingRule, **options) -> Regeneration:
    """Decode, post-process and summarise the rows of a mixed training split for target domain `target`."""
    new_items, convertible = decode_rows(rows, domains, target, base, experts, rule, **options)
    regenerated = postprocess(rows, new_items)
    report, mapping = summarise(rows, domains, target, new_items, convertible, regenerated)
    return Regeneration(regenerated, new_items, report, mapping)
