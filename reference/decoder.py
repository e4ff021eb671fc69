"""A plain Stage II decoder, kept only to check the fast one: a loop over every row and every
timestep, the formulas of docs/method.md written out once more for one position at a time.

Nothing here is shared with `model/contrastive.py` or `model/regeneration.py`.
"""
from __future__ import annotations

import math

import torch

EPS = 1e-10


def _alpha(z: torch.Tensor, weights: str) -> torch.Tensor:
    p = torch.softmax(z, dim=0)
    if weights == "position":
        entropy = -(p * torch.log_softmax(z, dim=0)).sum()
        return 1 - entropy / math.log(len(z))
    h = -p * torch.log(p + EPS)
    return (1 - h) / (1 - h.max() + EPS)


def _beta(z_mix: torch.Tensor, z_source: torch.Tensor, weights: str) -> torch.Tensor:
    log_p_mix, log_p_source = torch.log_softmax(z_mix, dim=0), torch.log_softmax(z_source, dim=0)
    log_m = torch.logaddexp(log_p_mix, log_p_source) - math.log(2)
    if weights == "position":  # the Jensen-Shannon divergence, in [0, log 2]
        kl_mix = (log_p_mix.exp() * (log_p_mix - log_m)).sum()
        kl_source = (log_p_source.exp() * (log_p_source - log_m)).sum()
        return 1 - 0.5 * (kl_mix + kl_source) / math.log(2)
    m = log_m.exp()
    j = 0.5 * (m * (log_m - log_p_mix) + m * (log_m - log_p_source))
    return j / (j.max() + EPS)


def _score(z_target, z_source, z_mix, weights, source_experts):
    beta = _beta(z_mix, z_source, weights) if source_experts else 0.0
    return (1 + _alpha(z_target, weights)) * z_target - beta * z_source


def decide(z_target, z_source, z_mix, lo, hi, rule) -> int:
    """Item id for one source position (column c is item c + 1), or 0 for delete."""
    z_target, z_source, z_mix = (z.double() for z in (z_target, z_source, z_mix))
    inside = slice(lo - 1, hi - 1)
    local = _score(z_target[inside], z_source[inside], z_mix[inside], rule.weights, rule.source_experts)
    if not rule.global_test:
        item = lo + int(torch.argmax(local))
    else:
        scores = _score(z_target, z_source, z_mix, rule.weights, rule.source_experts)
        convertible = lo <= int(torch.argmax(scores)) + 1 < hi
        if convertible and rule.local_scores:
            scores = scores.clone()
            scores[inside] = local
        item = int(torch.argmax(scores)) + 1
    # The reference code writes the id after the arg-max and keeps it when that id is a target
    # item: an arg-max just before R_T becomes the first target item, even if not convertible.
    if rule.reference_shift:
        item += 1
    return item if lo <= item < hi else 0


@torch.no_grad()
def reference_regenerate(rows, domains, target, base, experts, rule) -> list[tuple[int, list[int]]]:
    """(user, regenerated sequence) for every row whose regenerated sequence has >= 2 items.

    Literally: for every timestep t whose next item x[t+1] is a source item, the three models
    read the original prefix x[:t+1] (teacher forcing) and their last state scores all items.
    """
    lo, hi = domains.range(target)
    out = []
    for r in range(len(rows)):
        x = torch.as_tensor(rows.sequence(r))
        item_domain = domains.domain_of(x.numpy())
        kept = [int(x[0])] if item_domain[0] == target else []  # a source item at the very start is dropped
        for t in range(len(x) - 1):
            s = int(item_domain[t + 1])
            if s == target:
                kept.append(int(x[t + 1]))
                continue
            prefix = x[None, : t + 1]
            z_target, z_source, z_mix = (model.logits(model.encode(prefix)[0, -1])
                                         for model in (experts[target], experts[s], base))
            item = decide(z_target, z_source, z_mix, lo, hi, rule)
            if item:
                kept.append(item)
        collapsed = [item for k, item in enumerate(kept) if k == 0 or item != kept[k - 1]]
        if len(collapsed) >= 2:
            out.append((int(rows.users[r]), collapsed))
    return out
