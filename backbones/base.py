"""What Stage III asks of every backbone (backbones/registry.py builds them by name).

    model.loss(batch, item_range)    -> scalar training loss (softmax over `item_range`, None: all items)
    model.scores(batch, item_range)  -> (B, hi - lo) scores of the candidates from each row's history
    model.see_training_rows(rows)    -> called once with the training rows before training

`last_position_only` tells whether the loss reads one position per row; those
models get every training row expanded into its prefixes, so that every
backbone learns from the same next-item targets.
"""
from __future__ import annotations

import torch
from torch import nn

from data import SequenceBatch, SequenceRows


class Backbone(nn.Module):
    last_position_only = False

    def see_training_rows(self, rows: SequenceRows) -> None:
        """Derive whatever the model keeps from its training rows (GCE-GNN: its global item graph).
        Called once, with the rows as read (before any prefix expansion); most backbones keep nothing."""

    def loss(self, batch: SequenceBatch, item_range: tuple[int, int] | None) -> torch.Tensor:
        raise NotImplementedError

    def scores(self, batch: SequenceBatch, item_range: tuple[int, int] | None) -> torch.Tensor:
        raise NotImplementedError
