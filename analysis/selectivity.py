"""What decides how many source items decoding converts: where the target expert's own arg-max lies.

The global test converts a source position when the arg-max of (1 + alpha) z_T - beta z_S over all
items lies in the target domain R_T. The target expert E_T is adapted with domain-specific
prediction, a softmax over R_T only: its scores of R_T items are trained, its scores of every other
item are whatever the base model left in them. So whether E_T's plain arg-max lies in R_T depends on
how sharp the inherited out-of-domain scores are, that is on how long the base model trained.
`expert_argmax_in_target` measures that share at the positions decoding decides (each position
whose next item is a source item, with the original mixed prefix); the report sets it beside the
conversion rate.
"""
from __future__ import annotations

import numpy as np
import torch

from data import DomainRanges, SequenceLoader, SequenceRows
from model.decoder import TaesarDecoder


@torch.no_grad()
def expert_argmax_in_target(expert: TaesarDecoder, rows: SequenceRows, domains: DomainRanges, target: int,
                            max_len: int, batch_size: int = 64,
                            device: torch.device = torch.device("cpu")) -> dict[str, dict[str, int]]:
    """Per source domain: how many positions predict one of its items (`positions`), and at how many
    of them the target expert's arg-max over all items lies in the target domain (`in_target`).

    Positions are those decoding decides: every position t of a row (within the `max_len` window)
    whose next item x[t+1] belongs to another domain than `target`.
    """
    expert.eval()
    lo, hi = domains.range(target)
    n = domains.n_items
    domain_table = torch.from_numpy(domains.domain_of(np.arange(n + 1))).to(device)
    positions = torch.zeros(domains.n_domains + 1, dtype=torch.int64)
    in_target = torch.zeros(domains.n_domains + 1, dtype=torch.int64)
    for batch in SequenceLoader(rows, batch_size, max_len, shuffle=False):
        items = batch.items.to(device)
        next_domain = domain_table[items[:, 1:]]
        row, position = ((next_domain != 0) & (next_domain != target)).nonzero(as_tuple=True)
        if len(row) == 0:
            continue
        hidden = expert.encode(items)[row, position]  # (P, H)
        best_inside = expert.logits(hidden, (lo, hi)).max(dim=1).values
        # the best score outside R_T, over the ranges below and above it (either may be empty)
        outside = [expert.logits(hidden, r).max(dim=1).values for r in ((1, lo), (hi, n + 1)) if r[0] < r[1]]
        best_outside = torch.stack(outside).max(dim=0).values
        source = next_domain[row, position].cpu()
        positions += torch.bincount(source, minlength=domains.n_domains + 1)
        wins = best_inside > best_outside  # an exact tie (never seen with float scores) counts as outside
        in_target += torch.bincount(source[wins.cpu()], minlength=domains.n_domains + 1)
    return {domains.names[d - 1]: {"positions": int(positions[d]), "in_target": int(in_target[d])}
            for d in range(1, domains.n_domains + 1) if d != target}
