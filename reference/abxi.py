"""ABXI as it was before its speed-ups, kept literally (cdsr_baseline/abxi.py at commit 78ee4a1), so
that tests can check that the current implementation computes the same loss and gradients."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from cdsr_baseline.layers import LoRA, SwiGLU, left_align
from core.schema import above, at_least
from data import SequenceBatch
from model.decoder import Block, attention_mask


@dataclass(kw_only=True)
class ABXIConfig:
    """config/model/ABXI.yaml (the official script's values; the names of the authors' code)."""

    n_attn: int = field(default=3, metadata=at_least(1))  # Transformer layers
    n_head: int = field(default=2, metadata=at_least(1))
    d_embed: int = field(default=128, metadata=at_least(1))  # D
    ffn: int = field(default=128, metadata=at_least(1))  # F, the SwiGLUs' inner width (fixed in the code)
    rd: int = field(default=32, metadata=at_least(1))  # rank of the stream LoRAs (dLoRA)
    ri: int = field(default=32, metadata=at_least(1))  # rank of the projector LoRAs (iLoRA)
    dropout: float = field(default=0.2, metadata=at_least(0))
    temp: float = field(default=0.75, metadata=above(0))  # tau of the sampled softmax
    n_neg: int = field(default=512, metadata=at_least(1))  # Q negatives per target
    len_max: int = field(default=128, metadata=at_least(4))  # the data's cut; the model reads len_max - 3 slots
    eval_domain_stream: Literal["positional", "compacted"] = "positional"
    domain_stream_dropout: bool = False
    key_padding_mask: bool = False


# The quirk switches of the official copy: key -> (official value, corrected value).
QUIRKS = {"eval_domain_stream": ("positional", "compacted"), "domain_stream_dropout": (False, True)}


def positions(mask: torch.Tensor) -> torch.Tensor:
    """(B, L) bool -> (B, L) position ids: the most recent non-empty slot gets 1, empty slots 0."""
    count = mask.long()
    return count * count.flip(1).cumsum(1).flip(1)


def domain_inputs(x: torch.Tensor, y: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """The domain-aligned input of training for domain [lo, hi): at each slot whose target y_t is in the
    domain, the most recent domain item among x_1..x_t (x_t itself included); 0 elsewhere or when
    there is none."""
    B, L = x.shape
    slots = torch.arange(L, device=x.device).expand(B, L)
    in_domain = (x >= lo) & (x < hi)
    last = torch.where(in_domain, slots, -1).cummax(1).values  # (B, L) slot of the latest domain item
    found = (last >= 0) & (y >= lo) & (y < hi)
    return torch.where(found, x.gather(1, last.clamp(min=0)), 0)


def compact(history: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """(B, L) left-padded -> the domain items in order, left-padded to L (the corrected evaluation stream)."""
    keep = (history >= lo) & (history < hi)
    # stable sort: non-domain slots (key 0) first, the domain items (key 1) after, in their order
    order = keep.long().argsort(dim=1, stable=True)
    return torch.where(keep.gather(1, order), history.gather(1, order), 0)


class ABXI(nn.Module):
    def __init__(self, n_items: int, domain_starts: list[int], **params):
        super().__init__()
        self.params = p = ABXIConfig(**params)
        self.starts = list(domain_starts)
        self.K = len(self.starts) - 1
        D = p.d_embed
        self.width = p.len_max - 3  # u = s[:n-2] has at most len_max - 2 items, so at most len_max - 3 inputs
        self.item_emb = nn.Embedding(n_items + 1, D, padding_idx=0)
        self.pos_emb = nn.Embedding(self.width + 1, D, padding_idx=0)
        self.ln_input = nn.LayerNorm(D, eps=1e-12)
        self.dropout = nn.Dropout(p.dropout)
        # LayerNorms of the blocks keep PyTorch's default epsilon, as in the authors' code
        self.blocks = nn.ModuleList(Block(D, p.n_head, p.ffn, p.dropout, p.dropout, 1e-5, ffn=SwiGLU(D, p.ffn))
                                    for _ in range(p.n_attn))
        self.adapter = SwiGLU(D, p.ffn)  # Phi_s
        self.lora_mixed = LoRA(D, p.rd)  # Lambda^x
        self.ln_mixed = nn.LayerNorm(D)
        self.lora_domain = nn.ModuleList(LoRA(D, p.rd) for _ in range(self.K))  # Lambda^dom_d
        self.ln_domain = nn.ModuleList(nn.LayerNorm(D) for _ in range(self.K))
        self.projector = SwiGLU(D, p.ffn)  # Phi_i
        self.lora_invariant = nn.ModuleList(LoRA(D, p.ri) for _ in range(self.K))  # Lambda^inv_d
        self.domain_projector = nn.ModuleList(SwiGLU(D, p.ffn) for _ in range(self.K))  # Phi_d
        self.ln_from_mixed = nn.ModuleList(nn.LayerNorm(D) for _ in range(self.K))  # LN_{i->d}
        self.ln_from_domain = nn.ModuleList(nn.LayerNorm(D) for _ in range(self.K))  # LN_{d->d}
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for block in self.blocks:  # the in-projection keeps nn.MultiheadAttention's own init
            nn.init.xavier_uniform_(block.qkv.weight)
        for table in (self.item_emb, self.pos_emb):  # padding rows included: they then stay as drawn
            nn.init.trunc_normal_(table.weight, std=0.02, a=-0.04, b=0.04)

    # ------------------------------------------------------------------ encoder

    def embed(self, items: torch.Tensor, dropout: bool) -> torch.Tensor:
        mask = items != 0
        h = self.ln_input(self.item_emb(items) + self.pos_emb(positions(mask)))
        return (self.dropout(h) if dropout else h) * mask[..., None]

    def encode(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        bar = attention_mask(mask) if self.params.key_padding_mask else None
        for block in self.blocks:
            h = block(h, bar) * mask[..., None]
        return h

    def streams(self, mixed: torch.Tensor, per_domain: list[torch.Tensor], train: bool):
        """(B, L) mixed input and domain inputs (any number) -> their encoded states, all in one pass."""
        B = mixed.size(0)
        inputs = torch.cat([mixed, *per_domain])  # ((K + 1) B, L)
        domain_dropout = train and self.params.domain_stream_dropout
        h = torch.cat([self.embed(mixed, train), self.embed(torch.cat(per_domain), domain_dropout)])
        encoded = self.encode(h, inputs != 0)
        return encoded[:B], list(encoded[B:].split(B))

    def adapt(self, h: torch.Tensor, d: int | None) -> torch.Tensor:
        """G: the shared adapter plus the stream's LoRA (d None: the mixed stream)."""
        lora, norm = (self.lora_mixed, self.ln_mixed) if d is None else (self.lora_domain[d], self.ln_domain[d])
        return norm(h + self.dropout(self.adapter(h)) + self.dropout(lora(h)))

    def fuse(self, g_mixed: torch.Tensor, g_domain: torch.Tensor, d: int, gate: torch.Tensor) -> torch.Tensor:
        """O^(d) = LN_{i->d}((G^x + Phi_i(G^x) + iLoRA_d(G^x)) gate) + LN_{d->d}((G^d + Phi_d(G^d)) gate)."""
        from_mixed = g_mixed + self.dropout(self.projector(g_mixed)) + self.dropout(self.lora_invariant[d](g_mixed))
        from_domain = g_domain + self.dropout(self.domain_projector[d](g_domain))
        return self.ln_from_mixed[d](from_mixed * gate) + self.ln_from_domain[d](from_domain * gate)

    # ------------------------------------------------------------------ training

    def loss(self, batch: SequenceBatch) -> torch.Tensor:
        history = batch.lengths - 1
        x = left_align(batch.items[:, :-1], history, self.width)  # u_1..u_{m-1}
        y = left_align(batch.items[:, 1:], history, self.width)  # u_2..u_m
        ranges = [(self.starts[d], self.starts[d + 1]) for d in range(self.K)]
        inputs = [domain_inputs(x, y, lo, hi) for lo, hi in ranges]
        mixed, domains = self.streams(x, inputs, train=True)
        g_mixed = self.adapt(mixed, None) * (x != 0)[..., None]
        total = 0.0
        for d, (lo, hi) in enumerate(ranges):
            gate = (y >= lo) & (y < hi)
            g_domain = self.adapt(domains[d], d) * (inputs[d] != 0)[..., None]
            fused = self.fuse(g_mixed, g_domain, d, gate[..., None])  # (B, L, D), zero where the target is elsewhere
            total = total + self.domain_loss(fused, batch.items, y, lo, hi, gate)
        return total

    def domain_loss(self, fused, u, y, lo, hi, gate) -> torch.Tensor:
        """L_d: the sampled softmax of every domain-d target, averaged per user, then over the batch."""
        rows, slots = gate.nonzero(as_tuple=True)  # (P,)
        if len(rows) == 0:
            return fused.sum() * 0.0
        states = fused[rows, slots]  # (P, D)
        targets = y[rows, slots]
        # the user's whole training sequence u is excluded from the candidates (the target included)
        seen = torch.zeros(u.size(0), hi - lo, dtype=torch.bool, device=u.device)
        in_domain = (u >= lo) & (u < hi)
        seen[torch.nonzero(in_domain, as_tuple=True)[0], (u - lo)[in_domain]] = True
        table = self.item_emb.weight
        positive = (states * table[targets]).sum(-1, keepdim=True)  # (P, 1)
        n_neg, size = self.params.n_neg, hi - lo
        if size <= n_neg + int(seen.sum(1).max()):
            # A small domain: score all of it, and keep n_neg of each row's candidates (all of them when
            # there are fewer; nothing is padded into the softmax).
            negative = states @ table[lo:hi].T  # (P, |R_d|)
            chosen = ~seen[rows]
            if size > n_neg:
                keys = torch.rand(chosen.shape, device=u.device).masked_fill(~chosen, -1.0)
                chosen &= keys >= keys.topk(n_neg, dim=1).values[:, -1:]
            negative = negative.masked_fill(~chosen, float("-inf"))
        else:
            picks = sample_negatives(seen, rows, n_neg) + lo  # (P, Q)
            negative = (states[:, None, :] * table[picks]).sum(-1)
        logits = torch.cat([positive, negative], dim=1) / self.params.temp
        per_target = -F.log_softmax(logits, dim=1)[:, 0]  # (P,)
        per_user = torch.zeros(u.size(0), device=u.device).index_add_(0, rows, per_target)
        counts = torch.zeros(u.size(0), device=u.device).index_add_(0, rows, torch.ones_like(per_target))
        return (per_user / counts.clamp(min=1)).mean()

    # ------------------------------------------------------------------ prediction

    def scores(self, batch: SequenceBatch, item_range: tuple[int, int]) -> torch.Tensor:
        lo, hi = item_range
        d = self.starts.index(lo)
        history = left_align(batch.items, batch.lengths - 1, self.width)  # the most recent 125 history items
        in_domain = (history >= lo) & (history < hi)
        if self.params.eval_domain_stream == "positional":
            own = torch.where(in_domain, history, 0)
        else:
            own = compact(history, lo, hi)
        mixed, (domain,) = self.streams(history, [own], train=False)
        # the adapter and the fusion read the last slot with every mask at 1
        g_mixed = self.adapt(mixed[:, -1], None)
        g_domain = self.adapt(domain[:, -1], d)
        fused = self.fuse(g_mixed, g_domain, d, torch.ones(1, 1, device=history.device))
        return fused @ self.item_emb.weight[lo:hi].T


def sample_negatives(seen: torch.Tensor, owner: torch.Tensor, n: int) -> torch.Tensor:
    """n distinct candidates (column indices of `seen`) for each of P positions, drawn uniformly
    without replacement from those its user has not seen: `seen` (B, C) bool by user, `owner` (P,)
    the user of each position. Rejection: repeats and seen ones are redrawn until none is left
    (each row must have at least n candidates)."""
    P, C = len(owner), seen.size(1)
    picks = torch.randint(C, (P, n), device=seen.device)
    for _ in range(1000):
        ordered, order = picks.sort(dim=1)
        repeat = torch.zeros_like(picks, dtype=torch.bool)
        repeat.scatter_(1, order[:, 1:], ordered[:, 1:] == ordered[:, :-1])
        bad = repeat | seen[owner[:, None], picks]
        if not bad.any():
            return picks
        picks = torch.where(bad, torch.randint(C, (P, n), device=seen.device), picks)
    raise RuntimeError("could not draw distinct negatives: too few candidates outside the user's items")
