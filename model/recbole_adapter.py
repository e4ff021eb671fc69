"""Running RecBole's sequential models on this project's data, without RecBole's data pipeline.

RecBole's loader renumbers items by first appearance; feeding its models our
batches instead keeps the contract's item ids everywhere. A RecBole model only
asks its dataset for the number of item ids, and its config for a handful of
field names, so both are built here from plain values.
"""
from __future__ import annotations

import torch
from recbole.data.interaction import Interaction

from data import SequenceBatch

ITEM_SEQ, ITEM_SEQ_LEN, ITEM = "item_id_list", "item_length", "item_id"


class _Vocabulary:
    """The part of a RecBole Dataset a SequentialRecommender reads: id counts (padding included)."""

    def __init__(self, n_items: int):
        self.n_items = n_items

    def num(self, field: str) -> int:
        if field != ITEM:
            raise KeyError(f"only item ids are known to this adapter, not {field!r}")
        return self.n_items + 1


def recbole_config(n_items: int, max_len: int, params: dict, device: torch.device) -> dict:
    """The keys RecBole's SequentialRecommender base class reads, plus the model's own parameters."""
    return {
        "USER_ID_FIELD": "user_id",
        "ITEM_ID_FIELD": ITEM,
        "LIST_SUFFIX": "_list",
        "ITEM_LIST_LENGTH_FIELD": ITEM_SEQ_LEN,
        "NEG_PREFIX": "neg_",
        "MAX_ITEM_LIST_LENGTH": max_len,
        "device": device,
        "loss_type": "CE",
        **params,
    }


def build_recbole_model(model_class, n_items: int, max_len: int, params: dict, device=torch.device("cpu")):
    """An instance of a RecBole sequential model class over item ids 1..n_items."""
    return model_class(recbole_config(n_items, max_len, params, device), _Vocabulary(n_items)).to(device)


def to_interaction(batch: SequenceBatch) -> Interaction:
    """Our right-padded `history + [target]` rows as RecBole's (history, history length, target)."""
    history_length = batch.lengths - 1
    width = batch.items.size(1) - 1
    history = batch.items[:, :width] * (torch.arange(width, device=batch.items.device) < history_length[:, None])
    return Interaction({ITEM_SEQ: history, ITEM_SEQ_LEN: history_length, ITEM: batch.targets})
