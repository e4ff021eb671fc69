"""The cross-domain baseline as cdsr_baseline/syncrec.py computed it before its speed-ups (2026-12-06),
kept literally as the reference the faster implementation must equal (tests/test_baseline_speed.py).

SyNCRec (Park et al., SIGIR 2024): single-domain "pacers" and a cross-domain "runner" sharing experts,
as the authors' copy computes it (cdsr_baseline/README.md).

Multi-task learning with K single-domain tasks (each sees its own domain's items only) and one
cross-domain task (the mixed sequence), over a pool of Transformer experts behind partitioned
noisy gates: some experts are single-domain, some cross-domain, and gradients are stopped across
the partition. The cross-domain task's per-domain losses are re-balanced by how the single- and
cross-domain losses of that domain compare (LRB), and an auxiliary loss ties the cross-domain and
single-domain representations (MIP).

NOTE (official, kept in both fidelities): the LRB scalars never train; task losses are batch sums
divided by 1000 and the MIP loss averages over every slot, padding included (so the effective
weights depend on batch size and sequence length); item negatives come from every domain.
Quirks with a switch (`baseline_fidelity`): `shared_modules` (official: every expert, every tower
and every gate is one shared module, so experts differ only by dropout noise; corrected:
independent modules, with the cross task's own gate and tower), `gate_noise_at_eval` (official:
the gates draw noise at evaluation too; corrected: training only), `single_view_mask` (official:
a single-domain view still attends to the other domains' slots; corrected: they are padding).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from cdsr_baseline.inputs import domain_of
from cdsr_baseline.layers import (BertConfig, Intermediate, bert_blocks, bert_init, binary_loss,
                                  left_align, sample_excluding)
from core.distributed import mean_over_ranks, rows_over_ranks, shared_permutation, summed_over_ranks
from core.schema import at_least
from data import SequenceBatch
from model.decoder import attention_mask

LOSS_SCALE = 1000.0  # the official divisor of the task losses (batch sums)


@dataclass(kw_only=True)
class SyNCRecConfig(BertConfig):
    """config/model/SyNCRec.yaml (the official script's values)."""

    expert_num: int = field(default=8, metadata=at_least(2))
    cross_expert_ratio: float = field(default=0.8, metadata=at_least(0))
    temperature: float = 1.0  # of the LRB softmax
    shared_modules: bool = True
    gate_noise_at_eval: bool = True
    single_view_mask: Literal["mixed", "own"] = "mixed"

    def __post_init__(self):
        cross = math.floor(self.expert_num * self.cross_expert_ratio)
        if not 1 <= cross < self.expert_num:
            raise ValueError(f"expert_num {self.expert_num} with cross_expert_ratio {self.cross_expert_ratio} "
                             "leaves no single-domain or no cross-domain expert")


QUIRKS = {"shared_modules": (True, False), "gate_noise_at_eval": (True, False),
          "single_view_mask": ("mixed", "own")}


class NoisyGate(nn.Module):
    """Partitioned noisy top-all gate over the flattened embedded sequence: a softmax over the single
    experts and one over the cross experts, each with input-dependent Gaussian noise."""

    def __init__(self, n_inputs: int, n_single: int, n_cross: int):
        super().__init__()
        self.single, self.single_noise = nn.Linear(n_inputs, n_single), nn.Linear(n_inputs, n_single)
        self.cross, self.cross_noise = nn.Linear(n_inputs, n_cross), nn.Linear(n_inputs, n_cross)

    def forward(self, e: torch.Tensor, noise: bool) -> tuple[torch.Tensor, torch.Tensor]:
        g = e.flatten(1)  # (B, L D)

        def gate(mean, spread):
            logits = mean(g)
            if noise:
                logits = logits + torch.randn_like(logits) * (F.softplus(spread(g)) + 1e-3)
            return torch.softmax(logits, dim=-1)

        return gate(self.single, self.single_noise), gate(self.cross, self.cross_noise)


class Expert(nn.Module):
    def __init__(self, p: SyNCRecConfig):
        super().__init__()
        D = p.hidden_size
        self.blocks = bert_blocks(p)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            h = block(h, mask)
        return h


class SyNCRec(nn.Module):
    # Under torchrun the task losses are sums (each rank adds its part), the re-balancing reads the
    # global batch's domain means (so every rank keeps the same LRB state), and the MIP loss is a mean
    # over the global batch's slots whose "other user" is drawn from the whole global batch.
    loss_reduces_over_ranks = True

    def __init__(self, n_items: int, domain_starts: list[int], user_sequences: torch.Tensor, **params):
        super().__init__()
        self.params = p = SyNCRecConfig(**params)
        self.register_buffer("starts", torch.tensor(domain_starts), persistent=False)
        self.register_buffer("sequences", user_sequences, persistent=False)
        self.K = len(domain_starts) - 1
        self.n_items = n_items
        D, L = p.hidden_size, p.max_seq_length
        self.n_cross = math.floor(p.expert_num * p.cross_expert_ratio)
        self.n_single = p.expert_num - self.n_cross
        self.item_emb = nn.Embedding(n_items + 1, D, padding_idx=0)
        self.slot_emb = nn.Embedding(self.K + 1, D, padding_idx=0)
        self.pos_emb = nn.Embedding(L, D)
        self.ln_input = nn.LayerNorm(D, eps=1e-12)
        self.dropout = nn.Dropout(p.hidden_dropout_prob)
        # official: one expert, one tower and one gate serve every slot of their lists
        n_modules = 1 if p.shared_modules else None
        self.experts = nn.ModuleList(Expert(p) for _ in range(n_modules or p.expert_num))
        self.towers = nn.ModuleList(Intermediate(D, p.hidden_dropout_prob) for _ in range(n_modules or self.K + 1))
        self.gates = nn.ModuleList(NoisyGate(L * D, self.n_single, self.n_cross) for _ in range(n_modules or self.K + 1))
        self.register_buffer("lrb_state", torch.full((self.K,), 1.0 / self.K))
        bert_init(self)
        # made after the initialisation above, so with PyTorch's defaults (as in the official code)
        self.mip = nn.Linear(D, D)
        self.lrb_decay = nn.Linear(1, 1, bias=False)
        self.lrb_gain = nn.Linear(1, 1, bias=False)
        for weight in (self.lrb_decay.weight, self.lrb_gain.weight):
            weight.requires_grad_(False)

    # ------------------------------------------------------------------ network

    def embed(self, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(x.size(1), device=x.device)
        return self.dropout(self.ln_input(self.item_emb(x) + self.slot_emb(slots) + self.pos_emb(positions)))

    def _module(self, modules: nn.ModuleList, index: int) -> nn.Module:
        return modules[0] if self.params.shared_modules else modules[index]

    def task(self, e: torch.Tensor, mask: torch.Tensor, task: int) -> torch.Tensor:
        """The tower's output of one task: 0..K-1 the single-domain tasks, K the cross-domain one."""
        cross = task == self.K
        r = self.params.cross_expert_ratio
        noise = self.training or self.params.gate_noise_at_eval
        pi_single, pi_cross = self._module(self.gates, task)(e, noise)
        share_single, share_cross = (1 - r, r) if cross else (r, 1 - r)
        weights = torch.cat([share_single * pi_single, share_cross * pi_cross], dim=-1)  # (B, n_e)
        mixture = 0.0
        for i in range(self.params.expert_num):
            # the other partition's experts send no gradient into this task: they run without a
            # graph (the same values and dropout draws as computing and detaching them, less memory)
            detached = cross == (i < self.n_single)
            with torch.set_grad_enabled(torch.is_grad_enabled() and not detached):
                out = self._module(self.experts, i)(e, mask)  # each call with its own dropout noise
            mixture = mixture + weights[:, i, None, None] * out
        return self._module(self.towers, task)(mixture)

    # ------------------------------------------------------------------ training

    def loss(self, batch: SequenceBatch) -> torch.Tensor:
        L = self.params.max_seq_length
        history = batch.lengths - 1
        x = left_align(batch.items[:, :-1], history, L)
        y = left_align(batch.items[:, 1:], history, L)
        real = x != 0
        slots, target_slots = domain_of(x, self.starts), domain_of(y, self.starts)
        negative = self.negatives(batch.users, x, real)
        mixed_mask = attention_mask(real)
        c = self.task(self.embed(x, slots), mixed_mask, self.K)
        single_sum, single_mean, cross_sum, cross_mean = [], [], [], []
        summary = torch.zeros_like(c)  # S_t: the single-domain representation of the input item's domain
        for d in range(1, self.K + 1):
            own = slots == d
            view_mask = mixed_mask if self.params.single_view_mask == "mixed" else attention_mask(own)
            h = self.task(self.embed(x * own, slots * own), view_mask, d - 1)
            summary = summary + own[..., None] * h
            m = (target_slots == d).float()
            single_sum.append(binary_loss(h, self.item_emb.weight, y, negative, m, "sum"))
            single_mean.append(binary_loss(h, self.item_emb.weight, y, negative, m, "mean"))
            cross_sum.append(binary_loss(c, self.item_emb.weight, y, negative, m, "sum"))
            cross_mean.append(binary_loss(c, self.item_emb.weight, y, negative, m, "mean"))
        omega = self.rebalance(summed_over_ranks(torch.stack(single_mean).detach() - torch.stack(cross_mean).detach()))
        tasks = (torch.stack(single_sum).mean() + (omega * torch.stack(cross_sum)).sum()) / LOSS_SCALE
        return tasks + self.mip_loss(c, summary, x, y)

    def negatives(self, users: torch.Tensor, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """One item per input position, uniform over the items outside the user's whole sequence."""
        rows, slots = real.nonzero(as_tuple=True)
        ones = torch.ones(len(rows), dtype=torch.long, device=x.device)
        full = torch.zeros_like(x)
        full[rows, slots] = sample_excluding(ones, ones * (self.n_items + 1), self.sequences[users][rows])
        return full

    @torch.no_grad()
    def rebalance(self, delta: torch.Tensor) -> torch.Tensor:
        """LRB: v <- a v + b delta (a, b untrained scalars); omega = softmax(v / T)."""
        state = self.lrb_decay(self.lrb_state[:, None])[:, 0] + self.lrb_gain(delta[:, None])[:, 0]
        self.lrb_state.copy_(state)
        return torch.softmax(state / self.params.temperature, dim=0)

    def mip_loss(self, c: torch.Tensor, summary: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """-log sigma(p - q) at every slot with a target, averaged over all B * L slots (padding included):
        p = sigma(<W c, S>), q = sigma(<W c, E_x'>) with x' another user's input at the same slot."""
        projected = self.mip(c)
        everyone, first = rows_over_ranks(x)  # the global batch's inputs (x itself in one process)
        other = everyone[shared_permutation(len(everyone), device=x.device)][first:first + len(x)]
        p = torch.sigmoid((projected * summary).sum(-1))
        q = torch.sigmoid((projected * self.item_emb(other)).sum(-1))
        per_slot = -torch.clamp(F.logsigmoid(p - q), min=-100.0)
        return mean_over_ranks(per_slot * (y != 0))

    # ------------------------------------------------------------------ prediction

    def scores(self, batch: SequenceBatch, item_range: tuple[int, int]) -> torch.Tensor:
        lo, hi = item_range
        x = left_align(batch.items, batch.lengths - 1, self.params.max_seq_length)
        c = self.task(self.embed(x, domain_of(x, self.starts)), attention_mask(x != 0), self.K)
        return c[:, -1] @ self.item_emb.weight[lo:hi].T
