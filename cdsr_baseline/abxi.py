"""ABXI (Bian et al., WWW 2025): invariant interest adaptation for cross-domain sequential recommendation,
as the authors' K-domain copy computes it (cdsr_baseline/README.md).

One causal Transformer encoder, shared by every stream, reads the mixed sequence and one sequence
per domain. A shared SwiGLU with a stream-specific LoRA ("dLoRA") specialises each stream; the mixed
stream is projected into each domain by a shared SwiGLU projector plus a per-domain LoRA ("iLoRA").
The state that predicts an item of domain d sums the projected mixed stream and the (projected)
domain-d stream: the branch is chosen by the domain of the item to predict.

NOTE (official, kept in both fidelities): attention has a causal mask only, so padded and empty slots
(zero vectors) are attended (`key_padding_mask=true` bars them); the padding rows of the embedding
tables are truncated-normal, not zero, and frozen; negatives come from the target's domain only.
NOTE (protocol, both fidelities): with fewer than `n_neg` candidates the official loader pads with
item 0 inside the softmax; here all candidates are taken and nothing is padded in. The 30,000 sampled
evaluation candidates of the official loader are not drawn: evaluation ranks every item of the domain.
NOTE (speed): an empty slot's state is zero at every layer, so as a key it is the in-projection's
bias; only real slots are encoded (packed, in groups of rows of similar count), and a query's empty
keys enter its attention as one key of multiplicity n (score + log n) whose dropout keeps
Binomial(n, 1 - p) of the n: the same distribution as n weights dropped one by one. The states
after the encoder are computed only where a loss reads them. Dropout masks come from
`model.decoder.keep_mask` (another random stream than nn.Dropout's; the same computation).
Quirks with a switch (`baseline_fidelity`): `eval_domain_stream` (official: the domain-d items stay in
their slots at evaluation, so the stream is empty whenever the last history item is of another domain;
corrected: compacted, as upstream ABXI and as in training) and `domain_stream_dropout` (official: the
domain streams' embedding dropout is lost; corrected: the same dropout as the mixed stream).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import math

import torch
import torch.nn.functional as F
from torch import nn

from cdsr_baseline.layers import LENGTH_GROUPS, LoRA, SwiGLU, left_align
from core.schema import above, at_least
from data import SequenceBatch
from model.decoder import Block, FastDropout, fast_dropout


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
        self.dropout = FastDropout(p.dropout)
        # LayerNorms of the blocks keep PyTorch's default epsilon, as in the authors' code
        self.blocks = nn.ModuleList(Block(D, p.n_head, p.ffn, p.dropout, p.dropout, 1e-5, ffn=SwiGLU(D, p.ffn),
                                          fast_dropout=True)
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

    def streams(self, mixed: torch.Tensor, per_domain: list[torch.Tensor], train: bool):
        """(B, L) mixed input and domain inputs (any number) -> their encoded states (B, L, D), zero at
        the empty slots, all streams in one pass."""
        B, L = mixed.shape
        inputs = torch.cat([mixed, *per_domain])  # ((K + 1) B, L)
        real = inputs != 0
        stream_dropout = torch.ones(len(inputs), dtype=torch.bool, device=inputs.device)
        stream_dropout[:B] = train
        stream_dropout[B:] = train and self.params.domain_stream_dropout
        encoded = torch.zeros(*inputs.shape, self.params.d_embed, device=inputs.device)
        pos = positions(real)
        counts = real.sum(1)
        busy = counts.nonzero().squeeze(1)  # rows without a real slot stay zero
        for rows in busy[counts[busy].argsort()].chunk(LENGTH_GROUPS):
            width = int(counts[rows].max())
            # the r-th real slot of each row (r < its count), in order; later columns are padding
            slot = torch.where(real[rows], torch.arange(L, device=inputs.device), L).sort(1).values[:, :width]
            valid = slot < L
            slot = slot.clamp(max=L - 1)
            items = inputs[rows].gather(1, slot) * valid
            h = self.ln_input(self.item_emb(items) + self.pos_emb(pos[rows].gather(1, slot) * valid))
            h = torch.where(stream_dropout[rows, None, None], self.dropout(h), h) if train else h
            # empty keys before the r-th real slot: its slot index minus the r real ones
            n_empty = slot - torch.arange(width, device=inputs.device)
            for block in self.blocks:
                h = packed_block(block, h, valid, n_empty, self.params.key_padding_mask)
            at = valid.nonzero(as_tuple=True)
            encoded[rows[at[0]], slot[at]] = h[at]
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
        # the states are computed only where a loss reads them: at the slots with a target (each is
        # in one domain; x is real wherever y is), where the fusion's gate is 1
        target = y != 0
        g_mixed = torch.zeros_like(mixed)
        g_mixed[target] = self.adapt(mixed[target], None)
        total = 0.0
        for d, (lo, hi) in enumerate(ranges):
            gate = (y >= lo) & (y < hi)
            rows, slots = gate.nonzero(as_tuple=True)
            g_domain = self.adapt(domains[d][rows, slots], d) * (inputs[d][rows, slots] != 0)[:, None]
            fused = self.fuse(g_mixed[rows, slots], g_domain, d, 1.0)  # (P, D)
            total = total + self.domain_loss(fused, rows, batch.items, y[rows, slots], lo, hi)
        return total

    def domain_loss(self, states, rows, u, targets, lo, hi) -> torch.Tensor:
        """L_d: the sampled softmax of every domain-d target (`states` (P, D) of the users `rows`),
        averaged per user, then over the batch."""
        if len(rows) == 0:
            return states.sum() * 0.0
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


def packed_block(block: Block, x: torch.Tensor, valid: torch.Tensor, n_empty: torch.Tensor,
                 key_padding_mask: bool) -> torch.Tensor:
    """One post-LN block over the real slots of rows, packed: x (b, r, D), `valid` (b, r) which packed
    columns hold a slot, `n_empty` (b, r) the empty slots before each. What `block` computes at the real
    slots of the whole causal width, where every empty slot's state is zero: as a key it is the
    in-projection's bias (b_k, b_v). The n empty keys of a query are one key of score q.b_k / sqrt(d) +
    log n; its attention dropout keeps Binomial(n, 1 - p) / n of its weight, the sum of n independent
    masks (`key_padding_mask`: barred instead)."""
    b, r, D = x.shape
    H = block.n_heads
    hs = D // H
    scale = 1.0 / math.sqrt(hs)
    q, k, v = (t.view(b, r, H, hs).transpose(1, 2) for t in block.qkv(x).split(D, dim=2))  # (b, H, r, hs)
    allowed = torch.ones(r, r, dtype=torch.bool, device=x.device).tril()[None] & valid[:, None, :]  # (b, r, r)
    scores = (q @ k.transpose(-2, -1) * scale).masked_fill(~allowed[:, None], float("-inf"))
    p = block.attn_dropout if block.training else 0.0
    if key_padding_mask:
        weights = torch.softmax(scores, dim=-1)
        y = fast_dropout(weights, p, p > 0) @ v
    else:
        bias_k, bias_v = (t.view(H, hs) for t in block.qkv.bias[D:].split(D))
        empty = (q * bias_k[None, :, None, :]).sum(-1) * scale + n_empty.clamp(min=0).log()[:, None]  # (b, H, r)
        weights = torch.softmax(torch.cat([scores, empty[..., None]], dim=-1), dim=-1)
        weights, w_empty = weights[..., :r], weights[..., r]
        if p > 0:
            n = n_empty.clamp(min=0)[:, None].expand_as(w_empty).to(weights.dtype)
            kept = torch.binomial(n, torch.full_like(n, 1 - p))
            w_empty = w_empty * torch.where(n > 0, kept / n.clamp(min=1), 0.0) / (1 - p)
        y = fast_dropout(weights, p, p > 0) @ v + w_empty[..., None] * bias_v[None, :, None, :]
    x = block.ln_attn(x + block.dropout(block.attn_out(y.transpose(1, 2).reshape(b, r, D))))
    return block.ln_ffn(x + block.dropout(block.feed_forward(x)))


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
