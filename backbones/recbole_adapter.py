"""Running RecBole's sequential models on this project's data, without RecBole's data pipeline.

RecBole's loader renumbers items by first appearance; feeding its models our
batches instead keeps the contract's item ids everywhere. A RecBole model only
asks its dataset for the number of item ids, and its config for a handful of
field names, so both are built here from plain values.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import recbole.model.sequential_recommender  # noqa: F401  (here, once, for the line below)
from recbole.data.interaction import Interaction

# Importing RecBole's sequential models runs recbole/model/sequential_recommender/sine.py, which turns
# on autograd anomaly detection for the whole process: every backward pass after it, of any model,
# is several times slower. Nothing here relies on it.
torch.autograd.set_detect_anomaly(False)

from data import SequenceBatch

ITEM_SEQ, ITEM_SEQ_LEN, ITEM, USER = "item_id_list", "item_length", "item_id", "user_id"


class Vocabulary:
    """The part of a RecBole Dataset a SequentialRecommender reads: id counts (padding included)."""

    def __init__(self, n_items: int, n_users: int):
        self.counts = {ITEM: n_items + 1, USER: n_users + 1}
        self.item_num, self.user_num = self.counts[ITEM], self.counts[USER]

    def num(self, field: str) -> int:
        if field not in self.counts:
            raise KeyError(f"only user and item ids are known to this adapter, not {field!r}")
        return self.counts[field]


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


def build_recbole_model(model_class, n_items: int, max_len: int, params: dict, device=torch.device("cpu"),
                        n_users: int = 0):
    """An instance of a RecBole sequential model class over item ids 1..n_items (and users 1..n_users,
    for the models that embed users, such as Caser)."""
    return model_class(recbole_config(n_items, max_len, params, device), Vocabulary(n_items, n_users)).to(device)


def to_interaction(batch: SequenceBatch, width: int | None = None) -> Interaction:
    """Our right-padded `history + [target]` rows as RecBole's (history, history length, target).

    `width` pads the history to a fixed number of columns, as RecBole's own loader does
    (MAX_ITEM_LIST_LENGTH); some models (Caser, SINE) depend on it.
    """
    history_length = batch.lengths - 1
    history = batch.items[:, :-1]
    if width is not None:
        history = F.pad(history, (0, width - history.size(1)))[:, :width]
    columns = torch.arange(history.size(1), device=batch.items.device)
    history = history * (columns < history_length[:, None])
    return Interaction({USER: batch.users, ITEM_SEQ: history, ITEM_SEQ_LEN: history_length, ITEM: batch.targets})
