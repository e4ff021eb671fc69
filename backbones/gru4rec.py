"""GRU4Rec, a Stage III backbone (docs/method.md, Stage III)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from backbones.base import Backbone
from core.schema import at_least, check_ranges
from data import SequenceBatch, checked_item_range
from model.objectives import next_item_objective, target_scores


@dataclass
class GRU4RecConfig:
    n_items: int  # N; real items have ids 1..N and id 0 is padding
    max_len: int = 128  # longest x = history + [target]; an RNN needs no bound, kept for the common interface
    # RecBole's names; the paper's uniform configuration mapped onto an RNN: sizes 128, 2 layers,
    # dropout 0.2 (RecBole's defaults are 64/128, 1 layer, 0.3; the paper does not say how it mapped them)
    embedding_size: int = field(default=128, metadata=at_least(1))  # D: item embeddings and output states
    hidden_size: int = field(default=128, metadata=at_least(1))  # D_h: GRU states
    num_layers: int = field(default=2, metadata=at_least(1))
    dropout_prob: float = field(default=0.2, metadata=at_least(0))  # on the input item embeddings

    def __post_init__(self):
        if self.n_items < 1:
            raise ValueError(f"n_items must be positive, got {self.n_items}")
        check_ranges(self, "model.")


class GRU4Rec(Backbone):
    """GRU4Rec (Hidasi et al., ICLR 2016; Tan et al., DLRS 2016) as RecBole 1.2.1 builds it
    (`recbole/model/sequential_recommender/gru4rec.py`): dropout on the item embeddings, a stack of
    GRU layers without biases, a Linear D_h -> D, and scores o_t E^T with the input table E.

    A RecBole GRU4Rec state dict loads into it (renamed) and gives the same scores
    (tests/test_gru4rec.py); construction and initialisation follow RecBole's order, so the same
    seed gives the same weights.

    NOTE: trained sequence-to-sequence (every position predicts the next item), where stock RecBole
    on benchmark files trains on the last position of each row only.
    NOTE: `encode` returns every position and `logits` scores real items only (column j is item
    lo + j); RecBole gathers the last position in `forward` and scores the padding row too.
    """

    last_position_only = False  # the loss reads every position: no prefix expansion (backbones/registry.py)
    loss_reduces_over_ranks = True  # the decoder's objective (model/objectives.py) reduces over torchrun's ranks

    def __init__(self, n_items: int, max_len: int, **params):
        super().__init__()
        self.config = config = GRU4RecConfig(n_items=n_items, max_len=max_len, **params)
        self.item_emb = nn.Embedding(n_items + 1, config.embedding_size, padding_idx=0)
        self.emb_dropout = nn.Dropout(config.dropout_prob)
        self.gru = nn.GRU(config.embedding_size, config.hidden_size, num_layers=config.num_layers, bias=False,
                          batch_first=True)
        self.out = nn.Linear(config.hidden_size, config.embedding_size)
        # RecBole's init (its padding row included, which only ever reaches padded positions); the
        # other GRU layers and the Linear keep PyTorch's defaults
        nn.init.xavier_normal_(self.item_emb.weight)
        nn.init.xavier_uniform_(self.gru.weight_hh_l0)
        nn.init.xavier_uniform_(self.gru.weight_ih_l0)

    @property
    def all_items(self) -> tuple[int, int]:
        """Half-open id range of every real item."""
        return 1, self.config.n_items + 1

    def encode(self, items: torch.Tensor) -> torch.Tensor:
        """(B, L) right-padded item ids -> (B, L, D) outputs o_t; o_t has seen items[:, :t+1]."""
        states, _ = self.gru(self.emb_dropout(self.item_emb(items)))  # (B, L, D_h)
        return self.out(states)

    def logits(self, hidden: torch.Tensor, item_range: tuple[int, int] | None = None) -> torch.Tensor:
        """(..., D) outputs -> (..., hi - lo) scores o E[lo:hi]^T; column j is item lo + j (None: all items)."""
        lo, hi = checked_item_range(item_range, self.config.n_items)
        return hidden @ self.item_emb.weight[lo:hi].T

    def loss(self, batch: SequenceBatch, item_range: tuple[int, int] | None) -> torch.Tensor:
        """s2s cross-entropy over `item_range` (None: all items), averaged over every predicted position."""
        # the decoder's objective: it reads the model only through encode / logits / all_items
        return next_item_objective(item_range)(self, batch)

    def scores(self, batch: SequenceBatch, item_range: tuple[int, int]) -> torch.Tensor:
        """(B, hi - lo) scores of the candidates from the output that has read each row's history."""
        return target_scores(item_range)(self, batch)
