"""CL4SRec, a Stage III backbone (docs/method.md, Stage III): the SASRec encoder trained with a next-item
loss plus a contrastive loss between two augmented views of each row's history.

The augmentations act on a whole batch of right-padded histories at once: every random choice
(offsets, masked positions, shuffles, operators) is one tensor draw from torch's generator, so a
batch's views are reproducible from the seed and no Python loop runs over rows or timesteps.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from backbones.base import Backbone
from core.distributed import count_over_ranks
from core.schema import above, at_least
from data import SequenceBatch, checked_item_range
from model.decoder import DecoderConfig, SASRecConfig, TaesarDecoder
from model.objectives import LENGTH_GROUPS, next_item_objective, target_scores

# the operators, as drawn per row; IDENTITY serves the rows too short to augment
CROP, MASK, REORDER, IDENTITY = 0, 1, 2, 3


def _uniform_offsets(counts: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """(B,) counts >= 1 -> (B,) integers uniform in 0..counts-1."""
    u = torch.rand(counts.shape, generator=generator, device=counts.device)
    # rounding can lift u * count to count itself
    return (u * counts).long().clamp(max=counts - 1)


def _share(lengths: torch.Tensor, fraction: float) -> torch.Tensor:
    """floor(fraction * l) in float64, as RecBole's `math.floor(length * eta)` (float32 gives 6 for 0.7 * 10)."""
    return (lengths.double() * fraction).floor().long()


def crop(history: torch.Tensor, lengths: torch.Tensor, eta: float,
         generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, W) right-padded histories, (B,) lengths l -> (views (B, W), view lengths (B,)).

    Keeps a contiguous block of floor(eta * l) items (at least 1: RecBole-DA can crop to nothing) starting at a
    uniform offset, moved to the front.
    """
    W = history.size(1)
    kept = _share(lengths, eta).clamp(min=1).minimum(lengths)
    begin = _uniform_offsets(lengths - kept + 1, generator)
    columns = torch.arange(W, device=history.device)
    index = (begin[:, None] + columns).clamp(max=W - 1)  # (B, W)
    views = history.gather(1, index) * (columns < kept[:, None])
    return views, kept


def mask(history: torch.Tensor, lengths: torch.Tensor, gamma: float, mask_id: int,
         generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, W) right-padded histories, (B,) lengths l -> (B, W) views where floor(gamma * l) distinct
    uniform positions of each row hold `mask_id`."""
    W = history.size(1)
    columns = torch.arange(W, device=history.device)
    real = columns < lengths[:, None]
    # a uniform random order of each row's real positions (padding, keyed 2 > any u < 1, comes last);
    # its first floor(gamma * l) entries are a uniform draw without replacement
    keys = torch.rand(history.shape, generator=generator, device=history.device).masked_fill(~real, 2.0)
    order = keys.argsort(1)  # (B, W)
    n_masked = _share(lengths, gamma)
    masked = torch.zeros_like(real).scatter(1, order, columns < n_masked[:, None])
    return history.masked_fill(masked, mask_id)


def reorder(history: torch.Tensor, lengths: torch.Tensor, beta: float,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, W) right-padded histories, (B,) lengths l -> (B, W) views where a contiguous block of
    floor(beta * l) items at a uniform offset is uniformly shuffled."""
    W = history.size(1)
    columns = torch.arange(W, device=history.device)
    n_shuffled = _share(lengths, beta)
    begin = _uniform_offsets(lengths - n_shuffled + 1, generator)
    in_block = (columns >= begin[:, None]) & (columns < (begin + n_shuffled)[:, None])  # (B, W)
    # Sort the columns by (group, random key), group = the column outside the block and `begin`
    # inside it: outside columns keep their place, the block's columns come out in random order.
    # Two sorts, the second stable, give the lexicographic order without float ties.
    group = torch.where(in_block, begin[:, None], columns)  # (B, W)
    by_key = torch.rand(history.shape, generator=generator, device=history.device).argsort(1)
    by_group = group.gather(1, by_key).argsort(dim=1, stable=True)
    permutation = by_key.gather(1, by_group)  # (B, W): view[t] = history[permutation[t]]
    return history.gather(1, permutation)


def draw_operators(lengths: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B,) history lengths -> (B, 2) operators: two different ones drawn uniformly where l > 1,
    IDENTITY twice where l <= 1."""
    first = torch.randint(0, 3, lengths.shape, generator=generator, device=lengths.device)
    # a uniform shift of 1 or 2 makes the second a uniform choice among the two others
    second = (first + torch.randint(1, 3, lengths.shape, generator=generator, device=lengths.device)) % 3
    operators = torch.stack([first, second], dim=1)
    return operators.masked_fill((lengths <= 1)[:, None], IDENTITY)


def augment(history: torch.Tensor, lengths: torch.Tensor, operators: torch.Tensor, eta: float, gamma: float,
            beta: float, mask_id: int, generator: torch.Generator | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, W) right-padded histories, (B,) lengths, (B, 2) operators -> (views (2, B, W), lengths (2, B)).

    Each operator runs once on the whole batch with its own draws; since a row's two operators
    differ, its two views come from independent draws. The input is never modified.
    """
    cropped, cropped_lengths = crop(history, lengths, eta, generator)
    candidates = torch.stack([cropped, mask(history, lengths, gamma, mask_id, generator),
                              reorder(history, lengths, beta, generator), history])  # (4, B, W)
    candidate_lengths = torch.stack([cropped_lengths, lengths, lengths, lengths])  # (4, B)
    rows = torch.arange(history.size(0), device=history.device)
    views = candidates[operators.T, rows]  # (2, B, W)
    return views, candidate_lengths[operators.T, rows]


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent of two (B, H) batches of views: each of the 2B vectors is an anchor whose partner view
    is the positive and the other 2B - 2 the negatives; dot-product similarity / temperature,
    cross-entropy averaged over the 2B anchors."""
    B = z1.size(0)
    z = torch.cat([z1, z2])  # (2B, H)
    self_pairs = torch.eye(2 * B, dtype=torch.bool, device=z.device)
    similarity = (z @ z.T / temperature).masked_fill(self_pairs, float("-inf"))  # (2B, 2B)
    partner = torch.arange(2 * B, device=z.device).roll(B)  # i <-> i + B
    return F.cross_entropy(similarity, partner)


@dataclass(kw_only=True)
class CL4SRecConfig(SASRecConfig):
    """The SASRec encoder's keys (config/model/SASRec.yaml) and the contrastive task's."""

    n_items: int  # N; real items have ids 1..N, 0 is padding and N + 1 the mask token
    max_len: int = 128  # longest x = history + [target]
    # the contrastive task (RecBole-DA's values)
    cl_weight: float = field(default=0.1, metadata=at_least(0))  # lambda: total = main + lambda * cl
    temperature: float = field(default=1.0, metadata=above(0))  # tau of the similarity
    crop: float = 0.6  # eta: share of a history a crop keeps
    mask: float = 0.3  # gamma: share of a history masked
    reorder: float = 0.6  # beta: share of a history shuffled

    def __post_init__(self):
        for name in ("crop", "mask", "reorder"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")


class CL4SRec(Backbone):
    """CL4SRec (Xie et al., ICDE 2022) as RecBole-DA builds it: the SASRec encoder (Taesar's decoder,
    `model/decoder.py`) with one extra item row, id N + 1, as the mask token; crop / mask / reorder
    views of each row's history and an NT-Xent loss between their last states.

    NOTE: the main loss is the decoder's sequence-to-sequence next-item loss on the un-augmented
    row (RecBole-DA trains the last position only); the contrastive views are one pair per row,
    not per prefix.
    NOTE: empty crops are impossible (at least one item is kept) and the original sequence is
    never masked in place (RecBole-DA can crop to nothing and masks the original in place).
    NOTE: the mask token is never a candidate: scores and the loss's softmax cover real items only.
    """

    last_position_only = False  # the loss reads every position: no prefix expansion (backbones/registry.py)
    loss_reduces_over_ranks = True  # the main loss reduces over torchrun's ranks; the contrastive part is weighted

    def __init__(self, n_items: int, max_len: int, **params):
        super().__init__()
        self.config = config = CL4SRecConfig(n_items=n_items, max_len=max_len, **params)
        self.mask_id = n_items + 1
        # the encoder's vocabulary is N + 1 "items": the real ones and the mask token
        encoder = {f.name: getattr(config, f.name) for f in fields(SASRecConfig)}
        self.encoder = TaesarDecoder(DecoderConfig.from_model_params(n_items + 1, max_len, encoder))

    def _item_range(self, item_range: tuple[int, int] | None) -> tuple[int, int]:
        return checked_item_range(item_range, self.mask_id - 1)

    def views(self, batch: SequenceBatch, generator: torch.Generator | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Two augmented views of each row's history: (views (2, B, W'), lengths (2, B)), W' = W - 1."""
        lengths = batch.lengths - 1
        width = batch.items.size(1) - 1
        history = batch.items[:, :width] * (torch.arange(width, device=batch.items.device) < lengths[:, None])
        c = self.config
        operators = draw_operators(lengths, generator)
        return augment(history, lengths, operators, c.crop, c.mask, c.reorder, self.mask_id, generator)

    def contrastive_loss(self, batch: SequenceBatch, generator: torch.Generator | None = None) -> torch.Tensor:
        views, lengths = self.views(batch, generator)
        B = views.size(1)
        views, lengths = views.reshape(2 * B, -1), lengths.reshape(2 * B)  # both views in one pass
        # each view's last real state: the views are encoded in groups of similar length, each cut to
        # its longest (crops are shorter than their rows; right padding is never read by a causal
        # state), and the last block runs at the read position only
        order = lengths.argsort()
        z = torch.cat([self.encoder.states_at(views[rows, : int(lengths[rows].max())], lengths[rows] - 1)
                       for rows in order.chunk(LENGTH_GROUPS)])[order.argsort()]  # (2B, H), in row order
        return nt_xent(z[:B], z[B:], self.config.temperature)

    def loss(self, batch: SequenceBatch, item_range: tuple[int, int] | None) -> torch.Tensor:
        """Next-item s2s cross-entropy over `item_range` (None: all real items) + cl_weight * NT-Xent."""
        main = next_item_objective(self._item_range(item_range))(self.encoder, batch)
        contrastive = self.contrastive_loss(batch)
        rows, everyone = len(batch.users), count_over_ranks(len(batch.users))
        if everyone != rows:
            # under torchrun: a mean over this rank's rows (whose views are each other's negatives, as
            # in-batch negatives are under any data-parallel training), weighted as its share of the batch
            contrastive = contrastive * (rows / everyone)
        return main + self.config.cl_weight * contrastive

    def scores(self, batch: SequenceBatch, item_range: tuple[int, int]) -> torch.Tensor:
        """(B, hi - lo) scores of the candidates from the state that has read each row's history (as SASRec)."""
        return target_scores(self._item_range(item_range))(self.encoder, batch)
