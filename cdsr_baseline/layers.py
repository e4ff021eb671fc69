"""Building blocks the cross-domain baselines share (their Transformer layer is model.decoder.Block).

    SwiGLU          W_3 (SiLU(W_2 z) * W_1 z), no biases (ABXI's feed-forward, adapters, projectors)
    LoRA            z (A B)^T, A ~ N(0, 1) / 50, B = 0 (ABXI's dLoRA and iLoRA)
    Intermediate    LN(z + drop(W_b GELU(W_a z + a) + b)), inner 4D (CGRec's heads, SyNCRec's towers)
    (CGRec's and SyNCRec's dropouts draw their masks with model.decoder.keep_mask: nn.Dropout's
    computation at a fraction of its CPU cost, another random stream)
    binary_loss     -log(sigma(h.E_pos) + 1e-24) - log(1 - sigma(h.E_neg) + 1e-24), mean or sum form
    left_align      right-padded rows -> their most recent items, left-padded (the baselines' layout)
    in_length_groups  a left-padded batch encoded in groups of similar length, without their padding
    BertConfig      the Transformer keys CGRec and SyNCRec share (their official copies' common names),
                    with bert_blocks (the layer stack) and bert_init (their initialisation)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from core.distributed import summed_over_ranks
from core.schema import at_least
from model.decoder import Block, FastDropout, dropout_at

BINARY_EPS = 1e-24  # the official copies' guard inside both logs and in the mean's denominator


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.w1 = nn.Linear(hidden, inner, bias=False)
        self.w2 = nn.Linear(hidden, inner, bias=False)
        self.w3 = nn.Linear(inner, hidden, bias=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.w3(F.silu(self.w2(z)) * self.w1(z))


class LoRA(nn.Module):
    """A low-rank linear map z -> z (A B)^T; B starts at 0, so the map starts at 0."""

    def __init__(self, hidden: int, rank: int):
        super().__init__()
        self.A = nn.Parameter(torch.randn(hidden, rank) / 50)
        self.B = nn.Parameter(torch.zeros(rank, hidden))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z @ (self.A @ self.B).T


class Intermediate(nn.Module):
    """Position-wise residual feed-forward with inner width 4D: LN(z + drop(W_b GELU(W_a z + a) + b))."""

    def __init__(self, hidden: int, dropout: float, layer_norm_eps: float = 1e-12):
        super().__init__()
        self.inner = nn.Linear(hidden, 4 * hidden)
        self.outer = nn.Linear(4 * hidden, hidden)
        self.norm = nn.LayerNorm(hidden, eps=layer_norm_eps)
        self.dropout = FastDropout(dropout)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.norm(z + self.dropout(self.outer(F.gelu(self.inner(z)))))

    def forward_where(self, z_at: torch.Tensor, at: tuple[torch.Tensor, ...], shape: torch.Size) -> torch.Tensor:
        """`forward(z)[at]` from z_at = z[at] of a `shape` tensor z, the dropout mask drawn for the whole
        of it (the same random stream)."""
        out = dropout_at(self.outer(F.gelu(self.inner(z_at))), at, shape, self.dropout.p, self.training, True)
        return self.norm(z_at + out)


@dataclass(kw_only=True)
class BertConfig:
    """The Transformer keys of config/model/CGRec.yaml and SyNCRec.yaml (the official scripts' values)."""

    num_hidden_layers: int = field(default=3, metadata=at_least(1))
    num_attention_heads: int = field(default=2, metadata=at_least(1))
    hidden_size: int = field(default=128, metadata=at_least(1))
    hidden_dropout_prob: float = field(default=0.5, metadata=at_least(0))
    attention_probs_dropout_prob: float = field(default=0.5, metadata=at_least(0))
    max_seq_length: int = field(default=128, metadata=at_least(2))


def bert_blocks(p: BertConfig) -> nn.ModuleList:
    """num_hidden_layers post-LN blocks of inner width 4D and LayerNorm eps 1e-12."""
    D = p.hidden_size
    return nn.ModuleList(
        Block(D, p.num_attention_heads, 4 * D, p.hidden_dropout_prob, p.attention_probs_dropout_prob, 1e-12,
              fast_dropout=True)
        for _ in range(p.num_hidden_layers))


def bert_init(root: nn.Module) -> None:
    """Every Linear and Embedding weight of `root` from N(0, 0.02), padding rows included (they then
    stay as drawn), every Linear bias 0."""
    for module in root.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)


def binary_loss(h: torch.Tensor, table: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor,
                weight: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Binary cross-entropy with one negative per position.

    h (..., D) states; table (V, D) the embeddings scored against; positive, negative (...) ids into
    it; weight (...) 0/1. `mean`: sum(w l) / (sum(w) + 1e-24); `sum`: sum(w l), over every position.
    Under torchrun sum(w) is the global batch's, so the ranks' means add up to one process's.
    """
    pos = torch.sigmoid((h * table[positive]).sum(-1))
    neg = torch.sigmoid((h * table[negative]).sum(-1))
    loss = -torch.log(pos + BINARY_EPS) - torch.log(1 - neg + BINARY_EPS)
    weighted = (loss * weight).sum()
    if reduction == "sum":
        return weighted
    if reduction == "mean":
        return weighted / (summed_over_ranks(weight.sum()) + BINARY_EPS)
    raise ValueError(f"reduction must be mean or sum, got {reduction!r}")


LENGTH_GROUPS = 4  # CGRec's network and SyNCRec's experts encode a batch in this many groups


def in_length_groups(encode, lengths: torch.Tensor, width: int):
    """What `encode(rows, w)` gives for left-padded rows (B, width), computed in LENGTH_GROUPS groups of
    rows of similar length, each cut to its last w slots, w its longest row (`lengths`: each row's
    real slots, the last ones). `encode` returns one (b, w, D) tensor or a tuple of them for the
    rows `rows` cut that way; they are put back in place in (B, width, D) tensors, 0 at the slots cut
    away. Those are padding in every row of their group; where the padded keys are barred, the real
    slots' outputs are the whole width's. Fewer rows than groups: `encode(slice(None), width)`."""
    B = len(lengths)
    if B < LENGTH_GROUPS:
        return encode(slice(None), width)
    out, single = None, False
    for rows in lengths.argsort().chunk(LENGTH_GROUPS):
        w = max(int(lengths[rows].max()), 1)
        parts = encode(rows, w)
        single = isinstance(parts, torch.Tensor)
        parts = (parts,) if single else parts
        if out is None:
            out = [part.new_zeros(B, width, part.size(-1)) for part in parts]
        for full, part in zip(out, parts):
            full[rows, width - w:] = part
    return out[0] if single else tuple(out)


def left_align(items: torch.Tensor, lengths: torch.Tensor, width: int) -> torch.Tensor:
    """(B, W) right-padded rows with (B,) lengths -> (B, width): each row's most recent `width`
    items at the right end, zeros before (left padding)."""
    B, W = items.shape
    columns = torch.arange(width, device=items.device)
    # column c of the output holds item lengths - width + c of the row, when that is >= 0
    source = lengths[:, None] - width + columns[None, :]
    valid = source >= 0
    gathered = items.gather(1, source.clamp(min=0, max=max(W - 1, 0)))
    return torch.where(valid, gathered, torch.zeros_like(gathered))


def sample_excluding(candidates_lo: torch.Tensor, candidates_hi: torch.Tensor, excluded: torch.Tensor,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """One uniform draw per row from [lo, hi) minus the row's `excluded` ids.

    lo, hi (P,) ranges; excluded (P, X) ids (0 is never drawn, so it pads). Rejection sampling:
    redraw the rows whose draw is excluded until none is (the excluded share of a range is small
    in every use here). Draws with the global torch generator unless one is given.
    """
    device = candidates_lo.device
    span = (candidates_hi - candidates_lo).to(torch.float64)
    draw = torch.empty_like(candidates_lo)
    todo = torch.ones_like(candidates_lo, dtype=torch.bool)
    for _ in range(1000):
        index = todo.nonzero().squeeze(1)
        if len(index) == 0:
            return draw
        u = torch.rand(len(index), generator=generator, dtype=torch.float64, device=device)
        # min(): u * span can round up to span itself
        draw[index] = torch.minimum(candidates_lo[index] + (u * span[index]).long(), candidates_hi[index] - 1)
        todo[index] = (excluded[index] == draw[index, None]).any(1)
    raise RuntimeError("could not draw a negative outside the excluded ids: a range is (almost) all excluded")
