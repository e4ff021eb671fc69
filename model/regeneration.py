"""Stage II over a whole training split: teacher-forced contrastive decoding, then post-processing.

Every batch of rows is encoded once per model and every position with a next
item scored once per model; the decisions of every target domain asked for
come from those logits (a target's source positions are those whose next item
is of another domain), so one pass decodes all target domains. Positions are
scored in chunks sized from a memory budget, so memory stays bounded for large
vocabularies. The decisions land in a flat array aligned with the input items,
and everything after that (filtering, collapsing repeats, statistics, the
mapping) is vectorised over that array. File writing is the caller's business.
"""
from __future__ import annotations

import contextlib
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


# Bytes a scored position needs: its logits under the base model and every expert (float32), and the
# rule's float64 working set for one target (three inputs, the score and about eight temporaries).
BYTES_PER_ITEM_AND_MODEL, RULE_BYTES_PER_ITEM = 4, 12 * 8


def positions_per_chunk(memory_gb: float, n_items: int, n_models: int) -> int:
    """How many positions to score at once within a memory budget of `memory_gb` (at least one)."""
    per_position = n_items * (BYTES_PER_ITEM_AND_MODEL * n_models + RULE_BYTES_PER_ITEM)
    return max(1, int(memory_gb * 1e9 // per_position))


@contextlib.contextmanager
def full_float32_matmuls():
    """Logits in full float32 on a GPU too: TF32 (which a user may have turned on globally) rounds
    the inputs of every matmul to 10 bits and so changes the logits the decisions are made on; no
    test has shown the decisions unchanged with it, so it is off while decoding."""
    cuda_matmul = torch.backends.cuda.matmul
    before = cuda_matmul.allow_tf32
    cuda_matmul.allow_tf32 = False
    try:
        yield
    finally:
        cuda_matmul.allow_tf32 = before


@torch.no_grad()
@full_float32_matmuls()
def decode_rows(
    rows: SequenceRows,
    domains: DomainRanges,
    targets: list[int],
    base: TaesarDecoder,
    experts: dict[int, TaesarDecoder],
    rule: DecodingRule,
    *,
    max_len: int,
    batch_size: int = 32,
    memory_gb: float = 2.0,
    chunk: int | None = None,
    device: torch.device = torch.device("cpu"),
    progress: bool = False,
    certified_float32: bool = True,
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Decide every source item that has a history, for each target domain of `targets`.

    Returns, per target, `(new_items, convertible)`, flat like `rows.items`: `new_items` keeps
    target items, holds the replacement of a replaced source item and 0 for a deleted one (or
    one without a history: the first item of a row, or one older than the `max_len` window);
    `convertible` marks the source items that passed the global test.

    Each batch of rows is encoded once by every model, and every position with a next item is
    scored once by every model (the logits a target's decisions need: its expert's, the next
    item's own domain expert's and the base model's); the decisions of every target come from
    those (by the rule in float32 where its error bound settles them, else in float64: the
    decisions are float64's either way; `certified_float32=False` takes float64 throughout).
    Positions are scored in chunks sized from `memory_gb` (or `chunk` positions). The
    chunks, and so every input of the rule, are the same whichever targets are asked for: one
    run for all targets writes the same decisions as one run per target.
    """
    item_domain = domains.domain_of(rows.items)
    results = {t: (np.where(item_domain == t, rows.items, 0), np.zeros(len(rows.items), dtype=bool)) for t in targets}
    domain_table = torch.from_numpy(domains.domain_of(np.arange(domains.n_items + 1))).to(device)
    models = [base, *(experts[d] for d in range(1, domains.n_domains + 1))]  # index 0: M, d: E_d
    for model in models:
        model.eval()
    chunk = chunk or positions_per_chunk(memory_gb, domains.n_items, len(models))

    loader = SequenceLoader(rows, batch_size, max_len, shuffle=False)
    # The window may have cut a row's oldest items: flat index of its column 0.
    window_start = rows.offsets[1:] - loader.lengths.numpy()
    first_row = 0
    for batch in tqdm(loader, desc=f"decoding dom{','.join(map(str, targets))}", disable=not progress):
        items = batch.items.to(device)
        next_domain = domain_table[items[:, 1:]]  # (B, W - 1): domain of the item each position predicts
        row, position = (next_domain != 0).nonzero(as_tuple=True)  # (P,) every position with a next item
        if len(row):
            hidden = torch.stack([model.encode(items)[row, position] for model in models])  # (1 + k, P, H)
            source = next_domain[row, position]  # (P,) the domain of each next item
            flat = window_start[first_row + row.cpu().numpy()] + position.cpu().numpy() + 1
            for start in range(0, len(row), chunk):
                part = slice(start, start + chunk)
                logits = torch.stack([model.logits(h[part]) for model, h in zip(models, hidden)])  # (1 + k, P', N)
                s = source[part]
                z_source = logits[s, torch.arange(len(s), device=device)]  # each position's own domain expert
                for t in targets:
                    chosen = (s != t).nonzero().squeeze(1)  # the source positions of target t
                    if len(chosen) == 0:
                        continue
                    decision = decode(logits[t][chosen], z_source[chosen], logits[0][chosen], domains.range(t), rule,
                                      certified_float32)
                    at = flat[part][chosen.cpu().numpy()]
                    results[t][0][at] = decision.items.cpu().numpy()
                    results[t][1][at] = decision.convertible.cpu().numpy()
        first_row += len(batch.users)
    return results


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


def regenerations(rows: SequenceRows, domains: DomainRanges,
                  decided: dict[int, tuple[np.ndarray, np.ndarray]]) -> dict[int, Regeneration]:
    """Post-process and summarise the decisions of `decode_rows` (by target) over all of `rows`."""
    results = {}
    for target, (new_items, convertible) in decided.items():
        regenerated = postprocess(rows, new_items)
        report, mapping = summarise(rows, domains, target, new_items, convertible, regenerated)
        results[target] = Regeneration(regenerated, new_items, report, mapping)
    return results


def regenerate(rows: SequenceRows, domains: DomainRanges, targets: int | list[int], base: TaesarDecoder,
               experts: dict[int, TaesarDecoder], rule: DecodingRule, **options):
    """Decode, post-process and summarise the rows of a mixed training split for one target domain
    (an int: returns its Regeneration) or several (a list: returns them by target), in one pass."""
    several = isinstance(targets, (list, tuple))
    decided = decode_rows(rows, domains, list(targets) if several else [targets], base, experts, rule, **options)
    results = regenerations(rows, domains, decided)
    return results if several else results[targets]
