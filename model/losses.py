"""Training losses of Stage I as functions of (hidden, items, item range).

Both losses are a cross-entropy at chosen positions of x = history + [target]; they differ only in
which positions predict which item. A `*_targets` function picks those as a (B, L) mask and (B, L)
item ids, and `masked_cross_entropy` scores only the masked states, so the loss never builds logits
for positions it does not train.
"""

import torch
import torch.nn.functional as F

from model.decoder import TaesarDecoder


def in_range(items: torch.Tensor, item_range: tuple[int, int]) -> torch.Tensor:
    lo, hi = item_range
    return (items >= lo) & (items < hi)


def next_item_targets(
    items: torch.Tensor, item_range: tuple[int, int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) right-padded items -> (mask, targets), both (B, L): position t predicts items[t + 1].

    mask[b, t] is True where a real next item exists (and, with item_range, lies inside it);
    targets holds that item id where mask is True and 0 elsewhere.
    """
    next_items = F.pad(items[:, 1:], (0, 1))  # (B, L), 0 after the last position
    mask = next_items != 0
    if item_range is not None:
        mask &= in_range(next_items, item_range)
    return mask, next_items * mask


def domain_specific_targets(
    items: torch.Tensor, domain_range: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) right-padded items -> (mask, targets), both (B, L), for domain-specific prediction.

    Each domain-d item except the last one of its row predicts the next domain-d item later in the
    row, however many other-domain items lie between. targets holds that item id where mask is
    True and 0 elsewhere.
    """
    B, L = items.shape
    in_domain = in_range(items, domain_range)
    positions = torch.arange(L, device=items.device).expand(B, L)
    # position of each in-domain item, L (past the end) for the others ...
    candidates = torch.where(in_domain, positions, L)
    # ... so the nearest in-domain position strictly after t is the minimum over candidates[t+1:],
    # a reverse running minimum of the candidates shifted left by one
    later = F.pad(candidates[:, 1:], (0, 1), value=L)
    next_position = later.flip(1).cummin(1).values.flip(1)  # (B, L), L where none follows
    mask = in_domain & (next_position < L)
    targets = items.gather(1, next_position.clamp(max=L - 1)) * mask
    return mask, targets


def masked_cross_entropy(
    decoder: TaesarDecoder,
    hidden: torch.Tensor,
    mask: torch.Tensor,
    targets: torch.Tensor,
    item_range: tuple[int, int] | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy of the states hidden[mask] (B, L, H) -> (P, H) against targets[mask],
    with a softmax over item_range (all real items if None). Targets must lie inside the range.

    `mean` averages over the P positions; a batch with no masked position gives 0 (with a
    graph) rather than the NaN of an empty mean. `sum` adds them up.
    """
    lo = decoder.all_items[0] if item_range is None else item_range[0]
    logits = decoder.logits(hidden[mask], item_range)  # (P, C)
    loss = F.cross_entropy(logits, targets[mask] - lo, reduction="sum")
    return loss if reduction == "sum" else loss / mask.sum().clamp(min=1)


def next_item_loss(
    decoder: TaesarDecoder,
    hidden: torch.Tensor,
    items: torch.Tensor,
    item_range: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Next-item cross-entropy of every position that has a real next item, averaged over them.

    With item_range, the softmax runs over that range only and positions whose next item lies
    outside it are left out (e.g. `DSA w/o DSP` on single-domain rows, where none are).
    """
    mask, targets = next_item_targets(items, item_range)
    return masked_cross_entropy(decoder, hidden, mask, targets, item_range)


def domain_specific_loss(
    decoder: TaesarDecoder,
    hidden: torch.Tensor,
    items: torch.Tensor,
    domain_range: tuple[int, int],
) -> torch.Tensor:
    """Domain-specific prediction (DSP) loss of expert E_d: each domain-d item predicts the next
    domain-d item of its row, softmax over the domain's items only, averaged over those positions.

    hidden comes from the full mixed prefix, so the expert still reads every domain's items.
    """
    mask, targets = domain_specific_targets(items, domain_range)
    return masked_cross_entropy(decoder, hidden, mask, targets, domain_range)
