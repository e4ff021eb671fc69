"""Stage II over a whole training split: teacher-forced contrastive decoding, then post-processing.

Every batch of rows is encoded once per model. A position is a source position
of every target domain but its next item's, and is scored once by each model
those targets need; the decisions of every target domain asked for come from
those logits, sharing what does not depend on the target, so one pass decodes
all target domains. Logits are computed in chunks sized from a memory budget
and decided in cache-sized blocks, so memory stays bounded for large
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
from model.contrastive import DecodingRule, decode_targets
from model.decoder import TaesarDecoder

log = logging.getLogger(__name__)


@dataclass
class Regeneration:
    """The result for one target domain."""

    rows: SequenceRows  # regenerated rows (>= 2 target items), in input order
    new_items: np.ndarray  # per input item: itself (target), its replacement, or 0 (deleted)
    report: dict = field(default_factory=dict)
    mapping: dict[int, dict[int, int]] = field(default_factory=dict)  # source item -> target item -> count


# Bytes a scored position needs: its logits under the base model, its source expert and each target's
# expert (float32). The rule then runs on blocks of BLOCK_BYTES of logits a model: its dozen passes
# stay in cache, and its temporaries are small enough for the allocator to reuse, where (P, N)
# tensors of the paper's size (tens of MB) were mapped afresh and page-faulted on every pass.
BYTES_PER_ITEM_AND_MODEL, BLOCK_BYTES = 4, 2 ** 22
# From this many items on, the float32 rule runs in compiled kernels on a CPU (model.certified.Fused):
# several times less time for the rule at the paper's 191,652 items, against a one-off compile of ~20 s.
FUSE_FROM_ITEMS = 20_000
# A model wanted at less than this share of a batch's positions runs its last block at those only:
# 18% less time than the whole encoder at a third of the positions, 11% more at all of them (ACDT).
STATES_AT_BELOW = 0.5


def positions_per_chunk(memory_gb: float, n_items: int, n_models: int) -> int:
    """How many positions to score at once within a memory budget of `memory_gb` (at least one)."""
    per_position = n_items * BYTES_PER_ITEM_AND_MODEL * n_models
    return max(1, int(memory_gb * 1e9 // per_position))


def positions_per_block(n_items: int) -> int:
    """How many positions the rule decides at once: BLOCK_BYTES of float32 logits (at least one)."""
    return max(1, BLOCK_BYTES // (n_items * BYTES_PER_ITEM_AND_MODEL))


def longest_first(rows: SequenceRows, max_len: int) -> np.ndarray:
    """The order in which the decoder encodes `rows`: longest window first (ties in file order).
    A batch is trimmed to its longest row, so rows of like length leave almost no padding, where
    rows in file order leave a third of ACDT's slots padding. A position's states depend on its
    own row only, so the order changes no decision."""
    return np.argsort(-np.minimum(rows.lengths, max_len), kind="stable")


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
    block: int | None = None,
    device: torch.device = torch.device("cpu"),
    progress: bool = False,
    certified_float32: bool = True,
    fused: bool | None = None,
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Decide every source item that has a history, for each target domain of `targets`.

    Returns, per target, `(new_items, convertible)`, flat like `rows.items`: `new_items` keeps
    target items, holds the replacement of a replaced source item and 0 for a deleted one (or
    one without a history: the first item of a row, or one older than the `max_len` window);
    `convertible` marks the source items that passed the global test.

    Each batch of rows is encoded once by every model. Its positions are taken by the domain d
    of the item they predict: those are source positions of every target t != d, and need the
    logits of three kinds of model only, the base model's, expert d's (the source expert) and
    each such target's expert, each computed once however many targets share it. The rule then
    decides every target at once on blocks of `block` positions (sized from BLOCK_BYTES), sharing
    the transfer reward, which does not depend on the target; by the rule in float32 where its
    error bound settles the decision, else in float64: the decisions are float64's either way
    (`certified_float32=False` takes float64 throughout). Logits are computed for `chunk`
    positions at a time (sized from `memory_gb`). A position's decision depends on its own logits
    only, so one run for all targets writes the same decisions as one run per target.
    `fused`: the rule's global and local scores by compiled kernels (None: on a CPU from FUSE_FROM_ITEMS
    items on), the same decisions.
    """
    item_domain = domains.domain_of(rows.items)
    results = {t: (np.where(item_domain == t, rows.items, 0), np.zeros(len(rows.items), dtype=bool)) for t in targets}
    domain_table = torch.from_numpy(domains.domain_of(np.arange(domains.n_items + 1))).to(device)
    models = [base, *(experts[d] for d in range(1, domains.n_domains + 1))]  # index 0: M, d: E_d
    for model in models:
        model.eval()
    # the targets decided at the positions whose next item lies in domain d
    decided_at = {d: [t for t in targets if t != d] for d in range(1, domains.n_domains + 1)}
    logit_rows = 2 + max(len(wanted) for wanted in decided_at.values())
    chunk = chunk or positions_per_chunk(memory_gb, domains.n_items, logit_rows)
    block = block or positions_per_block(domains.n_items)
    ranges = {t: domains.range(t) for t in targets}
    if fused is None:
        fused = torch.device(device).type == "cpu" and domains.n_items >= FUSE_FROM_ITEMS
    buffers: list[torch.Tensor] = []  # one (chunk, N) logits buffer per model a source domain needs

    def logits(model: TaesarDecoder, states: torch.Tensor, slot: int) -> torch.Tensor:
        if slot == len(buffers):
            buffers.append(torch.empty(min(chunk, len(rows.items)), domains.n_items, device=device))
        return model.logits(states, out=buffers[slot][: len(states)])

    order = longest_first(rows, max_len)
    loader = SequenceLoader(rows.take(order), batch_size, max_len, shuffle=False)
    # The window may have cut a row's oldest items: flat index (in `rows`) of each sorted row's column 0.
    window_start = rows.offsets[1:][order] - loader.lengths.numpy()
    first_row = 0
    for batch in tqdm(loader, desc=f"decoding dom{','.join(map(str, targets))}", disable=not progress):
        items = batch.items.to(device)
        next_domain = domain_table[items[:, 1:]]  # (B, W - 1): domain of the item each position predicts
        row, position = (next_domain != 0).nonzero(as_tuple=True)  # (P,) every position with a next item
        source = next_domain[row, position]  # (P,) the domain of each next item
        at_source = {d: (source == d).nonzero().squeeze(1) for d, wanted in decided_at.items() if wanted}
        needed = [d for d, at_d in at_source.items() if len(at_d)]  # source domains with positions to decide
        if needed:
            # Each model is run only where it is scored: the base model at every decided position,
            # expert d where d is the source domain or a target, and no model past the last position
            # with a next item. Where a model is wanted at few positions (a source expert of one
            # target: about a third on ACDT), its last block runs at those positions only
            # (`states_at`); at most positions, the whole block is cheaper (fused causal attention).
            items = items[:, : int(position.max()) + 1]
            states = []
            for m, model in enumerate(models):
                scored_for = [d for d in needed if m == 0 or m == d or m in decided_at[d]]  # next-item domains
                at = torch.isin(source, torch.tensor(scored_for, device=device)).nonzero().squeeze(1)
                if len(at) > len(source) * STATES_AT_BELOW:
                    states.append(model.encode(items)[row, position])  # (P, H)
                elif len(at):
                    states.append(torch.zeros(len(source), model.config.hidden_size, device=device)
                                  .index_copy_(0, at, model.states_at(items, position[at], row[at])))
                else:
                    states.append(None)
            flat = window_start[first_row + row.cpu().numpy()] + position.cpu().numpy() + 1
        for d in needed:
            wanted, at_d = decided_at[d], at_source[d]
            for start in range(0, len(at_d), chunk):
                at = at_d[start:start + chunk]
                z_mix, z_source = logits(base, states[0][at], 0), logits(experts[d], states[d][at], 1)
                z_targets = {t: logits(experts[t], states[t][at], 2 + i) for i, t in enumerate(wanted)}
                where = flat[at.cpu().numpy()]
                for first in range(0, len(at), block):
                    part = slice(first, first + block)
                    decisions = decode_targets({t: z[part] for t, z in z_targets.items()}, z_source[part],
                                               z_mix[part], {t: ranges[t] for t in wanted}, rule, certified_float32,
                                               fused)
                    for t, decision in decisions.items():
                        results[t][0][where[part]] = decision.items.cpu().numpy()
                        results[t][1][where[part]] = decision.convertible.cpu().numpy()
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
