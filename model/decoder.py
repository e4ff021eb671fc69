"""The causal sequence decoder shared by every Taesar model (base model M and domain experts E_d)."""

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from core.schema import ConfigError, above, at_least, from_config
from data.domains import checked_item_range

# The feed-forward activations RecBole's SASRec offers, by its names (gelu: the exact, erf form).
ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "swish": F.silu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}
Activation = Literal["gelu", "relu", "swish", "tanh", "sigmoid"]


@dataclass(kw_only=True)
class SASRecConfig:
    """The keys of config/model/SASRec.yaml (RecBole's names), the decoder's and the SASRec backbone's."""

    n_layers: int = field(default=2, metadata=at_least(1))
    n_heads: int = field(default=2, metadata=at_least(1))
    hidden_size: int = field(default=128, metadata=at_least(1))
    inner_size: int = field(default=128, metadata=at_least(1))
    hidden_dropout_prob: float = field(default=0.2, metadata=at_least(0))
    attn_dropout_prob: float = field(default=0.2, metadata=at_least(0))
    hidden_act: Activation = "gelu"
    layer_norm_eps: float = field(default=1e-12, metadata=above(0))
    initializer_range: float = field(default=0.02, metadata=above(0))


@dataclass
class DecoderConfig:
    n_items: int  # N; real items have ids 1..N and id 0 is padding
    max_len: int = 128  # rows of the position embedding = longest x = history + [target]
    hidden_size: int = 128
    inner_size: int = 128
    n_layers: int = 2
    n_heads: int = 2
    hidden_dropout: float = 0.2
    attn_dropout: float = 0.2
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    hidden_act: str = "gelu"  # feed-forward activation, a key of ACTIVATIONS

    # config/model/SASRec.yaml uses RecBole's names for the same hyperparameters.
    RECBOLE_NAMES = {"hidden_size": "hidden_size", "inner_size": "inner_size", "n_layers": "n_layers",
                     "n_heads": "n_heads", "hidden_dropout": "hidden_dropout_prob",
                     "attn_dropout": "attn_dropout_prob", "layer_norm_eps": "layer_norm_eps",
                     "initializer_range": "initializer_range", "hidden_act": "hidden_act"}

    @classmethod
    def from_model_params(cls, n_items: int, max_len: int, params, where: str = "model.") -> "DecoderConfig":
        """From a model config in RecBole's names (config/model/SASRec.yaml); every key is checked,
        and `where` names the config section in the errors (`decoder.`, `model.`)."""
        values = {k: v for k, v in dict(params).items() if k != "name"}
        checked = from_config(SASRecConfig, values, where)
        return cls(n_items=n_items, max_len=max_len,
                   **{ours: getattr(checked, theirs) for ours, theirs in cls.RECBOLE_NAMES.items()})

    def recbole_params(self) -> dict:
        """The same hyperparameters in RecBole's names, for building RecBole's SASRec."""
        return {theirs: getattr(self, ours) for ours, theirs in self.RECBOLE_NAMES.items()}

    def __post_init__(self):
        if self.n_items < 1:
            raise ValueError(f"n_items must be positive, got {self.n_items}")
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"hidden_act {self.hidden_act!r}: expected one of {', '.join(ACTIVATIONS)}")
        if self.hidden_size % self.n_heads != 0:
            raise ConfigError(f"hidden_size {self.hidden_size} is not a multiple of n_heads {self.n_heads}")


def keep_mask(shape: torch.Size | tuple, p: float, device=None) -> torch.Tensor:
    """A bool mask of `shape`, each element True with probability 1 - p, independently.

    32 random bits an element, cut from 64-bit draws of the global generator (`torch.randint`),
    compared with round((1 - p) 2^32): the keep probability is 1 - p within 2^-32. On a CPU this
    costs about a fifth of `bernoulli_`, which draws element by element (nn.Dropout's mask)."""
    n = math.prod(shape)
    bits = torch.randint(-2**63, 2**63 - 1, ((n + 1) // 2,), dtype=torch.int64, device=device).view(torch.int32)[:n]
    threshold = round((1 - p) * 2**32) - 2**31  # bits are uniform over [-2^31, 2^31): keep below it
    if threshold >= 2**31:
        return torch.ones(shape, dtype=torch.bool, device=device)
    return (bits < threshold).view(shape)


def fast_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """nn.Dropout's computation (each element kept with probability 1 - p and scaled by 1 / (1 - p),
    the others 0) with the cheaper mask of `keep_mask`: another random stream than nn.Dropout's,
    as reproducible from the seed."""
    if not training or p == 0:
        return x
    if p >= 1:
        return x * 0.0
    return x * _scaled_keep(x.shape, p, x.dtype, x.device, fast=True)


def _scaled_keep(shape, p: float, dtype, device, fast: bool) -> torch.Tensor:
    """The dropout multiplier of a `shape` tensor (0 < p < 1): 1 / (1 - p) where kept, else 0; the mask
    of `keep_mask` (fast) or nn.Dropout's (`bernoulli_`)."""
    if fast:
        keep = keep_mask(shape, p, device).to(dtype)
    else:
        keep = torch.empty(shape, dtype=dtype, device=device).bernoulli_(1 - p)
    return keep.mul_(1.0 / (1.0 - p))


def dropout_at(x_at: torch.Tensor, at: tuple[torch.Tensor, ...], shape: torch.Size, p: float, training: bool,
               fast: bool) -> torch.Tensor:
    """Dropout of a whole `shape` tensor read at the index `at` (x_at = x[at]): the mask is drawn for
    the whole tensor, as `fast_dropout` (fast) or nn.Dropout would draw it, so the random stream and
    the kept elements are those of dropping out x and then indexing."""
    if not training or p == 0:
        return x_at
    if p >= 1:
        return x_at * 0.0
    return x_at * _scaled_keep(shape, p, x_at.dtype, x_at.device, fast)[at]


class FastDropout(nn.Dropout):
    """nn.Dropout with the mask of `keep_mask` (see `fast_dropout`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fast_dropout(x, self.p, self.training)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, dropout) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v with `dropout` applied to the attention weights: what
    scaled_dot_product_attention computes (causal when `mask` is None), written out so that the
    weights go through our dropout; on a CPU, SDPA with dropout takes its unfused path anyway."""
    scores = q @ (k.transpose(-2, -1) * (1.0 / math.sqrt(q.size(-1))))
    if mask is None:
        L = q.size(-2)
        scores = scores.masked_fill(torch.ones(L, L, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    else:
        scores = scores + mask
    return dropout(torch.softmax(scores, dim=-1)) @ v


class Block(nn.Module):
    """Post-LN Transformer block: x = LN(x + drop(attn(x))); x = LN(x + drop(ffn(x))).

    The one Transformer layer of the project: the Taesar decoder's and SASRec's, and (with a
    padding mask, or another feed-forward) the cross-domain baselines'. `ffn` replaces the
    default feed-forward `W_2 act(W_1 x)` (ABXI uses a SwiGLU). `fast_dropout`: the dropouts draw
    their masks with `keep_mask` (the same computation, another random stream; CGRec and SyNCRec).
    """

    def __init__(self, hidden_size: int, n_heads: int, inner_size: int, hidden_dropout: float, attn_dropout: float,
                 layer_norm_eps: float, hidden_act: str = "gelu", ffn: nn.Module | None = None,
                 fast_dropout: bool = False):
        super().__init__()
        H = hidden_size
        if H % n_heads:
            raise ConfigError(f"hidden_size {H} is not a multiple of n_heads {n_heads}")
        self.n_heads = n_heads
        self.attn_dropout = attn_dropout
        self.fast_dropout = fast_dropout
        self.qkv = nn.Linear(H, 3 * H)
        self.attn_out = nn.Linear(H, H)
        self.ln_attn = nn.LayerNorm(H, eps=layer_norm_eps)
        if ffn is None:
            self.ffn_in = nn.Linear(H, inner_size)
            self.ffn_out = nn.Linear(inner_size, H)
            self.activation = ACTIVATIONS[hidden_act]
        else:
            self.ffn = ffn
        self.ln_ffn = nn.LayerNorm(H, eps=layer_norm_eps)
        self.dropout = (FastDropout if fast_dropout else nn.Dropout)(hidden_dropout)

    @classmethod
    def of(cls, config: "DecoderConfig") -> "Block":
        return cls(config.hidden_size, config.n_heads, config.inner_size, config.hidden_dropout, config.attn_dropout,
                   config.layer_norm_eps, config.hidden_act)

    def attention(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, L, H = x.shape
        q, k, v = self.qkv(x).split(H, dim=2)
        # (B, L, H) -> (B, nh, L, hs)
        q, k, v = (t.view(B, L, self.n_heads, H // self.n_heads).transpose(1, 2) for t in (q, k, v))
        # Without a mask, causal only: with right padding a real position only ever sees real items,
        # so causality also hides the padding, and the fused kernels need no mask tensor. `mask` is
        # added to the scores (B, 1, L, L): -10000 where attention is barred, as RecBole does, so a
        # query with nothing to attend to (left padding) stays finite.
        y = self._attend(q, k, v, mask)
        # (B, nh, L, hs) -> (B, L, H)
        y = y.transpose(1, 2).contiguous().view(B, L, H)
        return self.attn_out(y)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """softmax(q k^T / sqrt(d) + mask) v with this block's attention dropout (causal without a
        mask): torch's attention, or written out where the dropout is ours (`fast_dropout`)."""
        dropout_p = self.attn_dropout if self.training else 0.0
        if self.fast_dropout and dropout_p > 0:
            return attend(q, k, v, mask, lambda weights: fast_dropout(weights, dropout_p))
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "ffn"):
            return self.ffn(x)
        # gelu is the exact (erf) form, as RecBole's FeedForward.gelu
        return self.ffn_out(self.activation(self.ffn_in(x)))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.ln_attn(x + self.dropout(self.attention(x, mask)))
        return self.ln_ffn(x + self.dropout(self.feed_forward(x)))

    def forward_where(self, x: torch.Tensor, mask: torch.Tensor | None, at: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """`forward(x, mask)[at]` ((P, H) for an index `at` of (b, w) positions): the attention runs
        over the whole block, the feed-forward only at `at`; every dropout draws the mask of the whole
        block, so the random stream and the values are those of `forward` read at `at`."""
        shape = x.shape
        y = self.attention(x, mask)
        x = self.ln_attn(x[at] + dropout_at(y[at], at, shape, self.dropout.p, self.training, self.fast_dropout))
        return self.ln_ffn(x + dropout_at(self.feed_forward(x), at, shape, self.dropout.p, self.training,
                                          self.fast_dropout))

    def forward_at(self, x: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L, H) inputs, (P,) positions of the rows `rows` (default: one position per row, rows
        0..B-1) -> (P, H): the causal block's output there, `forward(x)[rows, positions]`, with the
        queries, their attention and the feed-forward computed at those positions only (the keys and
        values at every position). Dropout draws only for what is computed: the same distribution,
        another stream than `forward`'s; one position per row draws as it always has."""
        B, L, H = x.shape
        nh, hs = self.n_heads, H // self.n_heads
        if rows is None:
            rows = torch.arange(B, device=x.device)
        if not len(rows):
            return x.new_zeros(0, H)
        if not bool(((positions >= 0) & (positions < L)).all()):
            # fancy indexing would wrap a negative position around to the last, padded, one
            raise ValueError(f"positions must lie in [0, {L}), got {positions.min().item()}..{positions.max().item()}")
        here = x[rows, positions]  # (P, H)
        # Each row's queries go to its slots 0..Q-1 (in the order given), so that one batched
        # attention serves them; a slot left empty attends to the row's first key and is dropped.
        counts = torch.bincount(rows, minlength=B)
        by_row = torch.argsort(rows, stable=True)
        slots = torch.empty_like(rows)
        slots[by_row] = torch.arange(len(rows), device=x.device) - (counts.cumsum(0) - counts)[rows[by_row]]
        Q = int(counts.max())
        q = x.new_zeros(B, Q, H).index_put_((rows, slots), F.linear(here, self.qkv.weight[:H], self.qkv.bias[:H]))
        k, v = (t.view(B, L, nh, hs).transpose(1, 2)
                for t in F.linear(x, self.qkv.weight[H:], self.qkv.bias[H:]).split(H, dim=2))
        last_key = torch.zeros(B, Q, dtype=positions.dtype, device=x.device).index_put_((rows, slots), positions)
        later = (torch.arange(L, device=x.device) > last_key[..., None])[:, None]  # (B, 1, Q, L) barred keys
        y = self._attend(q.view(B, Q, nh, hs).transpose(1, 2), k, v,
                         torch.zeros(later.shape, device=x.device).masked_fill(later, float("-inf")))
        y = y.transpose(1, 2)[rows, slots].reshape(len(rows), H)  # (P, H)
        here = self.ln_attn(here + self.dropout(self.attn_out(y)))
        return self.ln_ffn(here + self.dropout(self.feed_forward(here)))


def attention_mask(keep: torch.Tensor) -> torch.Tensor:
    """(B, L) bool of the real positions -> (B, 1, L, L) additive mask: causal, padded keys barred
    (-10000, RecBole's value)."""
    L = keep.size(1)
    causal = torch.ones(L, L, dtype=torch.bool, device=keep.device).tril()
    allowed = causal[None, None] & keep[:, None, None, :]
    return torch.zeros(allowed.shape, device=keep.device).masked_fill(~allowed, -10000.0)


class TaesarDecoder(nn.Module):
    """SASRec-style causal decoder (Kang & McAuley, ICDM 2018) with tied item embeddings, the one
    architecture Taesar uses for its base model and its domain experts.

    The layer arithmetic is RecBole 1.2.1's SASRec (`recbole/model/sequential_recommender/sasrec.py`,
    `TransformerEncoder` in `recbole/model/layers.py`); a RecBole SASRec state dict loads into it and
    gives the same states (tests/test_decoder.py).

    NOTE: query, key and value are one fused Linear and attention is torch's fused
    `scaled_dot_product_attention`; RecBole has three Linears and an explicit softmax. The weights of
    RecBole's three projections concatenate into `qkv`.
    NOTE: the mask is causal only, where RecBole also adds -10000 to the scores of padded keys.
    With right padding a real position never has a padded key before it, so at real positions the
    two agree (exp(-10000) is 0 in float32); padded positions stay finite and are never used.
    NOTE: `encode` returns every position and `logits` scores real items only (column j is item
    lo + j); RecBole gathers the last position in `forward` and scores the padding row too.
    NOTE: the padding embedding row is zero after init (RecBole's init overwrites it with noise). Its
    gradient is always zero, and it only ever reaches padded positions.
    """

    # trained with the objectives of model/objectives.py, which reduce over torchrun's ranks themselves
    loss_reduces_over_ranks = True

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = config
        H = config.hidden_size
        self.item_emb = nn.Embedding(config.n_items + 1, H, padding_idx=0)
        self.pos_emb = nn.Embedding(config.max_len, H)
        self.ln_emb = nn.LayerNorm(H, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.blocks = nn.ModuleList(Block.of(config) for _ in range(config.n_layers))
        self.apply(self._init_weights)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    @classmethod
    def from_dict(cls, args: dict) -> "TaesarDecoder":
        """Rebuild from the plain dict a checkpoint stores (`dataclasses.asdict(model.config)`)."""
        return cls(DecoderConfig(**args))

    def _init_weights(self, module: nn.Module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
        if isinstance(module, nn.Linear):
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    @property
    def all_items(self) -> tuple[int, int]:
        """Half-open id range of every real item, i.e. all rows of the embedding but padding."""
        return 1, self.config.n_items + 1

    def encode(self, items: torch.Tensor, last_block: bool = True) -> torch.Tensor:
        """(B, L) right-padded item ids -> (B, L, H) states; the state at t has seen items[:, :t+1].
        `last_block=False`: the last block's inputs instead (for `states_at`)."""
        L = items.size(1)
        if L > self.config.max_len:
            raise ValueError(f"sequence length {L} exceeds max_len {self.config.max_len}")
        positions = torch.arange(L, device=items.device)
        x = self.item_emb(items) + self.pos_emb(positions)  # (B, L, H) + (L, H)
        x = self.dropout(self.ln_emb(x))
        for block in self.blocks if last_block else self.blocks[:-1]:
            x = block(x)
        return x

    def states_at(self, items: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) right-padded item ids, (P,) positions of the rows `rows` (default: one per row) ->
        (P, H): `encode(items)[rows, positions]`, the last block computed at those positions only."""
        x = self.encode(items, last_block=False)
        return self.blocks[-1].forward_at(x, positions, rows)

    def logits(self, hidden: torch.Tensor, item_range: tuple[int, int] | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """(..., H) states -> (..., hi - lo) scores h E[lo:hi]^T; column j is item lo + j.

        None scores all real items (lo = 1). Gather the states you need before calling, so that a
        (B, L, N) tensor is built only when it is wanted. `out`: a (P, hi - lo) buffer to write
        (P, H) states' scores into (Stage II reuses one, rather than fault in fresh pages per chunk).
        """
        lo, hi = checked_item_range(item_range, self.config.n_items)
        if out is not None:
            return torch.mm(hidden, self.item_emb.weight[lo:hi].T, out=out)
        return hidden @ self.item_emb.weight[lo:hi].T


def gather_states(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(B, L, H) states, (B,) positions -> (B, H), the state of row b at positions[b]."""
    # gather rather than fancy indexing: a negative position (a row too short) raises instead of
    # silently wrapping around to the last, padded, position
    index = positions[:, None, None].expand(-1, 1, hidden.size(-1))  # (B, 1, H)
    return hidden.gather(1, index).squeeze(1)


def target_states(hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, L, H) states of x = history + [target], (B,) lengths -> (B, H) states that predict the target.

    The target sits at lengths - 1, so the state that has seen exactly the history is at lengths - 2.
    """
    return gather_states(hidden, lengths - 2)
