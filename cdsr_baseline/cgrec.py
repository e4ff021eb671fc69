"""CGRec (Park et al., CIKM 2023): a cooperative-game view of negative transfer in cross-domain
sequential recommendation, as the authors' copy computes it (cdsr_baseline/README.md).

One causal Transformer reads the mixed sequence. Its loss is a weighted sum of per-domain losses,
with weights from Shapley-style values that estimate each domain's marginal effect on the loss by
running the network again on inputs restricted to coalitions of domains. A hierarchy of heads
predicts the next item's coarse category, its fine category, then the item.

NOTE: the shared data have no item categories, so the coarse category is the item's domain and the
fine one a constant token (the official run's categories came from raw Amazon attribute files).
NOTE (official, kept in both fidelities): the scalars that update the running Shapley state never
train; category negatives come from ids of no category; item negatives avoid the user's whole
sequence, its validation and test targets included.
Quirks with a switch (`baseline_fidelity`): `loss_slot` (official: a position's domain loss is chosen
by the domain of its input item; corrected: of the item it predicts), `shapley` pairing (official:
coalitions with and without a domain paired by list position, weight 1 / (C(n, |S|) |S|);
corrected: S against S + {j} with the Shapley weight), `extra_empty_slots` (official: one slot more
than there are domains, never used; corrected: none).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from cdsr_baseline.inputs import domain_of
from cdsr_baseline.layers import (BertConfig, Intermediate, bert_blocks, bert_init, binary_loss,
                                  in_length_groups, left_align, sample_excluding)
from core.distributed import summed_over_ranks
from core.schema import at_least
from data import SequenceBatch
from model.decoder import FastDropout, attention_mask

RESERVED = 5  # ids 0..4 of every vocabulary: pad, unknown, eos, sos, mask (the official tokenizer's)
SHAPLEY_TEMPERATURE = 0.05  # fixed in the official code


@dataclass(kw_only=True)
class CGRecConfig(BertConfig):
    """config/model/CGRec.yaml (the official script's values)."""

    hierarchical: bool = True  # the category heads and inputs
    shapley: bool = True  # the Shapley loss weights (false: every domain weighs 1)
    loss_slot: Literal["input", "target"] = "input"
    shapley_pairing: Literal["position", "marginal"] = "position"
    extra_empty_slots: int = field(default=1, metadata=at_least(0))


QUIRKS = {"loss_slot": ("input", "target"), "shapley_pairing": ("position", "marginal"),
          "extra_empty_slots": (1, 0)}


def coalitions(n_slots: int) -> list[tuple[int, ...]]:
    """Every slot subset S with 1 <= |S| <= n - 1 (slots 1..n), by size, then in lexicographic order."""
    slots = range(1, n_slots + 1)
    return [c for size in range(1, n_slots) for c in itertools.combinations(slots, size)]


def shapley_values(losses: dict[tuple[int, ...], float], n_slots: int, pairing: str) -> torch.Tensor:
    """phi_j of each slot from the coalition losses lambda(S).

    `position` (official): the coalitions with j and those without j, each in enumeration order, are
    paired by position, phi_j = sum_i (lambda(A_i) - lambda(C_i)) / (C(n, |A_i|) |A_i|).
    `marginal` (corrected): each C without j against C + {j}, when that is enumerated, with the
    Shapley weight |C|! (n - |C| - 1)! / n!.
    """
    order = list(losses)
    phi = []
    for j in range(1, n_slots + 1):
        if pairing == "position":
            with_j = [c for c in order if j in c]
            without_j = [c for c in order if j not in c]
            phi.append(sum((losses[a] - losses[c]) / (math.comb(n_slots, len(a)) * len(a))
                           for a, c in zip(with_j, without_j)))
        else:
            total = 0.0
            for c in order:
                if j in c:
                    continue
                joined = tuple(sorted(c + (j,)))
                if joined in losses:
                    weight = math.factorial(len(c)) * math.factorial(n_slots - len(c) - 1) / math.factorial(n_slots)
                    total += weight * (losses[joined] - losses[c])
            phi.append(total)
    return torch.tensor(phi)


class CGRec(nn.Module):
    # Under torchrun the per-domain losses are weighted means over the global batch and the Shapley
    # values come from the global batch's coalition losses, so every rank keeps the same Shapley state.
    loss_reduces_over_ranks = True

    def __init__(self, n_items: int, domain_starts: list[int], user_sequences: torch.Tensor, **params):
        super().__init__()
        self.params = p = CGRecConfig(**params)
        self.register_buffer("starts", torch.tensor(domain_starts), persistent=False)
        # each user's whole sequence s: the items its negatives avoid (not a parameter)
        self.register_buffer("sequences", user_sequences, persistent=False)
        self.K = len(domain_starts) - 1
        self.n_slots = self.K + p.extra_empty_slots
        D, L = p.hidden_size, p.max_seq_length
        self.n_items = n_items
        # category vocabularies: coarse = the domain, fine = one constant token (the official sizes)
        self.coarse_size = RESERVED + self.K + 2
        self.fine_size = RESERVED + 1 + 1
        self.item_emb = nn.Embedding(n_items + 1, D, padding_idx=0)
        self.pos_emb = nn.Embedding(L, D)
        self.slot_emb = nn.Embedding(self.n_slots + 1, D, padding_idx=0)
        self.coarse_emb = nn.Embedding(self.coarse_size, D, padding_idx=0)
        self.fine_emb = nn.Embedding(self.fine_size, D, padding_idx=0)
        self.ln_input = nn.LayerNorm(D, eps=1e-12)
        self.dropout = FastDropout(p.hidden_dropout_prob)
        self.blocks = bert_blocks(p)
        self.head_coarse = Intermediate(D, p.hidden_dropout_prob)  # I_1
        self.head_item = Intermediate(D, p.hidden_dropout_prob)  # I_2
        # the running Shapley state and its two update scalars (never trained: official, kept)
        self.register_buffer("shapley_state", torch.full((self.n_slots,), 1.0 / self.n_slots))
        self.state_decay = nn.Linear(1, 1, bias=False)
        self.state_gain = nn.Linear(1, 1, bias=False)
        bert_init(self)
        for p_ in (self.state_decay.weight, self.state_gain.weight):
            p_.requires_grad_(False)

    # ------------------------------------------------------------------ network

    def coarse(self, items: torch.Tensor) -> torch.Tensor:
        return torch.where(items > 0, RESERVED + domain_of(items, self.starts) - 1, 0)

    def fine(self, items: torch.Tensor) -> torch.Tensor:
        return torch.where(items > 0, RESERVED, 0)

    def heads(self, x: torch.Tensor, slots: torch.Tensor, coarse: torch.Tensor, fine: torch.Tensor,
              real: torch.Tensor, read: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(z^0, z^1, z^2) of left-padded inputs (B, W); `real` the attention's key mask.

        The rows are encoded in groups of similar length (`in_length_groups`), each cut to its last w
        slots, w its longest row (about a third of a batch of ACDT is padding): positions stay slots
        L - w .. L - 1 and the padded keys cut away were barred anyway, so every real position's
        states are those of the whole padded batch. The padded positions' states are 0 (the
        official code's are never read either: the losses weigh them 0). `read` (B, W) bool: the
        positions a loss reads (a coalition's kept ones); the last block's feed-forward and the
        heads run there only, the other states are 0 (every dropout draws its whole mask, so the
        random stream and the values read are those of computing everything)."""
        W = x.size(1)

        def encode(rows, w):
            cut = (t[rows, W - w:] for t in (x, slots, coarse, fine, real))
            return self._heads(*cut, None if read is None else read[rows, W - w:])

        return in_length_groups(encode, real.sum(1), W)

    def _heads(self, x, slots, coarse, fine, real, read):
        L, W = self.params.max_seq_length, x.size(1)
        positions = torch.arange(L - W, L, device=x.device)  # left-aligned rows end at slot L - 1
        e = self.item_emb(x) + self.pos_emb(positions)
        if self.params.hierarchical:
            e = e + self.slot_emb(slots) + self.fine_emb(fine) + self.coarse_emb(coarse)
        h = self.dropout(self.ln_input(e))
        mask = attention_mask(real)
        if read is None:
            for block in self.blocks:
                h = block(h, mask)
            z1 = self.head_coarse(h)
            return h, z1, self.head_item(h + z1)
        for block in self.blocks[:-1]:
            h = block(h, mask)
        at = read.nonzero(as_tuple=True)
        h_at = self.blocks[-1].forward_where(h, mask, at)  # (P, D)
        z1 = self.head_coarse.forward_where(h_at, at, h.shape)
        z2 = self.head_item.forward_where(h_at + z1, at, h.shape)
        return tuple(h.new_zeros(h.shape).index_put(at, z) for z in (h_at, z1, z2))

    def level_losses(self, z, targets, negatives, weight) -> torch.Tensor:
        """The three-level binary loss (one level without the hierarchy) with per-position weights."""
        z0, z1, z2 = z
        item_t, coarse_t, fine_t = targets
        item_n, coarse_n, fine_n = negatives
        loss = binary_loss(z2, self.item_emb.weight, item_t, item_n, weight)
        if self.params.hierarchical:
            loss = loss + binary_loss(z0, self.fine_emb.weight, fine_t, fine_n, weight)
            loss = loss + binary_loss(z1, self.coarse_emb.weight, coarse_t, coarse_n, weight)
        return loss

    # ------------------------------------------------------------------ training

    def loss(self, batch: SequenceBatch) -> torch.Tensor:
        # only the last W slots, W the batch's longest history: the slots before are padding in every
        # row (35-40% of a batch of ACDT), which the key mask and the loss weights leave out anyway
        history = batch.lengths - 1
        W = min(int(history.max()), self.params.max_seq_length)
        x = left_align(batch.items[:, :-1], history, W)
        y = left_align(batch.items[:, 1:], history, W)
        real = x != 0
        slots = domain_of(x, self.starts)
        targets = (y, self.coarse(y), self.fine(y))
        negatives = self.negatives(batch.users, x, real)
        z = self.heads(x, slots, self.coarse(x), self.fine(x), real)
        slot_of_loss = slots if self.params.loss_slot == "input" else domain_of(y, self.starts)
        per_slot = torch.stack([self.level_losses(z, targets, negatives, (slot_of_loss == j).float())
                                for j in range(1, self.n_slots + 1)])
        weights = self.shapley_weights(x, slots, targets, negatives) if self.params.shapley else 1.0
        return (weights * per_slot).sum()

    def negatives(self, users: torch.Tensor, x: torch.Tensor, real: torch.Tensor):
        """One item negative per input position (uniform over the items outside the user's whole
        sequence), and one coarse and one fine category negative (uniform over the ids that are
        neither reserved nor among the user's)."""
        rows, slots = real.nonzero(as_tuple=True)
        sequence = self.sequences[users][rows]  # (P, W) the user's items, for each position
        P = len(rows)
        ones = torch.ones(P, dtype=torch.long, device=x.device)
        out = []
        for size, of in ((self.n_items + 1, None), (self.coarse_size, self.coarse), (self.fine_size, self.fine)):
            excluded = sequence if of is None else of(sequence)
            lo = ones if of is None else ones * RESERVED
            drawn = sample_excluding(lo, ones * size, excluded)
            full = torch.zeros_like(x)
            full[rows, slots] = drawn
            out.append(full)
        return tuple(out)

    @torch.no_grad()
    def shapley_weights(self, x, slots, targets, negatives) -> torch.Tensor:
        """omega = softmax(v / 0.05), with the running state v updated by this batch's Shapley values."""
        coarse, fine = self.coarse(x), self.fine(x)
        parts = []
        for coalition in coalitions(self.n_slots):
            keep = torch.isin(slots, torch.tensor(coalition, device=x.device))
            # dropped positions lose their item and categories; slots and the attention mask stay
            z = self.heads(x * keep, slots, coarse * keep, fine * keep, x != 0, read=keep)
            kept_targets = tuple(t * keep for t in targets)
            parts.append(self.level_losses(z, kept_targets, negatives, keep.float()))
        # the global batch's coalition losses (each rank's parts added up under torchrun)
        losses = dict(zip(coalitions(self.n_slots), summed_over_ranks(torch.stack(parts)).tolist()))
        phi = shapley_values(losses, self.n_slots, self.params.shapley_pairing).to(x.device)
        state = self.state_decay(self.shapley_state[:, None])[:, 0] + self.state_gain(phi[:, None])[:, 0]
        self.shapley_state.copy_(state)
        return torch.softmax(state / SHAPLEY_TEMPERATURE, dim=0)

    # ------------------------------------------------------------------ prediction

    def scores(self, batch: SequenceBatch, item_range: tuple[int, int]) -> torch.Tensor:
        lo, hi = item_range
        x = left_align(batch.items, batch.lengths - 1, min(int((batch.lengths - 1).max()), self.params.max_seq_length))
        _, _, z2 = self.heads(x, domain_of(x, self.starts), self.coarse(x), self.fine(x), x != 0)
        return z2[:, -1] @ self.item_emb.weight[lo:hi].T
