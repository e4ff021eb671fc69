"""The decoder's training objectives and evaluation scores as functions of (model, batch).

These adapt the pure losses of `model/losses.py` to the trainer's interface;
the trainer never knows which stage it is training.

A training batch is encoded in `length_groups` sub-batches of similar length,
each trimmed to its own longest row: the loss (summed over every predicted
position, divided by their count) is the one of the whole padded batch, but
the padding is not computed (about 30% of a step on ACDT). Under torchrun the
count is the global batch's, so the ranks' losses add up to one process's (the
models trained with these objectives declare `loss_reduces_over_ranks`).
"""
from __future__ import annotations

from functools import partial

import torch

from core.distributed import count_over_ranks
from data import SequenceBatch
from model.decoder import TaesarDecoder, target_states
from model.losses import domain_specific_targets, masked_cross_entropy, next_item_targets

LENGTH_GROUPS = 4


def _grouped_loss(targets_fn, item_range, length_groups, model: TaesarDecoder, batch: SequenceBatch):
    if not getattr(model, "loss_reduces_over_ranks", False):
        # the trainer would weight this loss by the rank's share of rows a second time
        raise TypeError(f"{type(model).__name__} is trained with a loss that reduces over torchrun's ranks; "
                        "declare `loss_reduces_over_ranks = True` on it (core/distributed.py)")
    total, count = 0.0, 0
    for rows in batch.lengths.argsort().chunk(length_groups):
        items = batch.items[rows, : int(batch.lengths[rows].max())]
        mask, targets = targets_fn(items)
        total = total + masked_cross_entropy(model, model.encode(items), mask, targets, item_range, reduction="sum")
        count += int(mask.sum())
    # a mean over the global batch's predicted positions (under torchrun this rank's part of it)
    return total / max(count_over_ranks(count), 1)


def _target_scores(item_range, model: TaesarDecoder, batch: SequenceBatch) -> torch.Tensor:
    return model.logits(target_states(model.encode(batch.items), batch.lengths), item_range)


def next_item_objective(item_range: tuple[int, int] | None = None, length_groups: int = LENGTH_GROUPS):
    """Every position predicts the next item (softmax over `item_range`, all items by default)."""
    return partial(_grouped_loss, partial(next_item_targets, item_range=item_range), item_range, length_groups)


def domain_specific_objective(domain_range: tuple[int, int], length_groups: int = LENGTH_GROUPS):
    """Domain-specific prediction (DSP) for the domain owning `domain_range`."""
    return partial(_grouped_loss, partial(domain_specific_targets, domain_range=domain_range), domain_range,
                   length_groups)


def target_scores(item_range: tuple[int, int] | None = None):
    """Scores of the candidates `item_range` from the state that has read each row's history."""
    return partial(_target_scores, item_range)
