"""GCE-GNN, a Stage III backbone (docs/method.md, Stage III)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from data import SequenceBatch, SequenceRows
from pipeline.schema import at_least

GLOBAL_WINDOW = 4  # a target is linked to its 4 most recent history items (fixed in RecBole-GNN)
N_EDGE_TYPES = 4  # 0 self-loop, 1 w_k -> w_{k+1}, 2 w_{k+1} -> w_k, 3 both directions


@dataclass
class GCEGNNConfig:
    n_items: int  # N; real items have ids 1..N and id 0 is padding
    max_len: int = 128  # rows of the reversed-position table = longest history read; older items are dropped
    # RecBole-GNN's names and defaults, but embedding 128 and global dropout 0.2: the paper's uniform
    # setting (RecBole-GNN: 64 and 0.5)
    embedding_size: int = field(default=128, metadata=at_least(1))
    sample_num: int = field(default=12, metadata=at_least(1))  # global neighbours kept per item
    leakyrelu_alpha: float = field(default=0.2, metadata=at_least(0))
    dropout_local: float = field(default=0.0, metadata=at_least(0))
    dropout_gcn: float = field(default=0.0, metadata=at_least(0))
    dropout_global: float = field(default=0.2, metadata=at_least(0))

    def __post_init__(self):
        if self.n_items < 1:
            raise ValueError(f"n_items must be positive, got {self.n_items}")
        if self.max_len < 1 or self.sample_num < 1:
            raise ValueError(f"max_len and sample_num must be positive, got {self.max_len}, {self.sample_num}")


def global_neighbours(rows: SequenceRows, n_items: int, sample_num: int) -> tuple[np.ndarray, np.ndarray]:
    """GCE-GNN's global graph as a neighbour table: `(ids, counts)`, both (n_items + 1, sample_num).

    The samples are every prefix of every row, `x_1..x_t -> x_{t+1}`, so every item of a row is linked
    to each of the (up to) 4 items before it, both ways; a pair of equal items adds 2 to the item's own
    count. Each item keeps the `sample_num` neighbours of largest count, padded with item 0 / count 0.

    Ties keep the order in which RecBole-GNN's dictionaries first meet the pairs: samples row by row in
    file order and, within a row, by target position; within a sample, history items from the most
    recent back. `sorted(..., reverse=True)` is stable, so that is the order among equal counts.
    """
    items = rows.items
    if len(items) and (items.min() < 1 or items.max() > n_items):
        raise ValueError(f"item ids must lie in 1..{n_items}")
    position = np.arange(len(items)) - np.repeat(rows.offsets[:-1], rows.lengths)  # position within its row
    owner, neighbour, event = [], [], []
    for k in range(1, GLOBAL_WINDOW + 1):
        target = np.flatnonzero(position >= k)  # flat index of every target with a k-th most recent item
        source = target - k
        # the moment the pair is met; flat target index orders samples row by row, prefix by prefix
        met = target * GLOBAL_WINDOW + (k - 1)
        owner += [items[target], items[source]]
        neighbour += [items[source], items[target]]
        event += [met, met]
    owner, neighbour, event = (np.concatenate(a) if a else np.zeros(0, np.int64) for a in (owner, neighbour, event))

    # one entry per (owner, neighbour) pair: its count and the moment it was first met
    pair = owner * (n_items + 1) + neighbour
    order = np.lexsort((event, pair))
    pair, event = pair[order], event[order]
    starts = np.flatnonzero(np.r_[True, pair[1:] != pair[:-1]]) if len(pair) else np.zeros(0, np.int64)
    counts = np.diff(np.r_[starts, len(pair)])
    first_met = event[starts]
    pair_owner, pair_neighbour = np.divmod(pair[starts], n_items + 1)

    # rank each owner's neighbours by count (descending), then first meeting (ascending)
    ranked = np.lexsort((first_met, -counts, pair_owner))
    pair_owner, pair_neighbour, counts = pair_owner[ranked], pair_neighbour[ranked], counts[ranked]
    owner_start = np.searchsorted(pair_owner, pair_owner, side="left")
    rank = np.arange(len(pair_owner)) - owner_start
    kept = rank < sample_num
    ids = np.zeros((n_items + 1, sample_num), dtype=np.int64)
    weights = np.zeros((n_items + 1, sample_num), dtype=np.int64)
    ids[pair_owner[kept], rank[kept]] = pair_neighbour[kept]
    weights[pair_owner[kept], rank[kept]] = counts[kept]
    return ids, weights


def reverse_history(history: torch.Tensor, lengths: torch.Tensor, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) right-padded histories (oldest first) -> (w (B, L'), lengths (B,)): w[:, 0] is the most
    recent item, right-padded with 0, keeping at most the `max_len` most recent items (L' <= max_len)."""
    if (lengths < 1).any():
        raise ValueError("every row needs at least one history item")
    L = history.size(1)
    slots = torch.arange(L, device=history.device)
    valid = slots < lengths[:, None]
    w = history.gather(1, (lengths[:, None] - 1 - slots).clamp(min=0)) * valid  # (B, L)
    return w[:, :max_len], lengths.clamp(max=max_len)


def session_graph(w: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The session graphs of a batch of reversed sessions `w` (B, L) (w[:, 0] most recent, 0-padded).

    Returns
    - nodes (B, n): the distinct items of each session (ascending), padded with 0;
    - alias (B, L): node index of each slot's item (0 on padding slots);
    - adjacency (B, 4, n, n) bool: adjacency[b, t, i, j] is an edge j -> i of type t, i.e. node i
      receives from node j. For consecutive w_k, w_{k+1}: j = node(w_k), i = node(w_{k+1}) is type 1 and
      the reverse is type 2; a pair met both ways (or a repeat w_k = w_{k+1}, its own reverse) is type 3
      instead; every real node has one type-0 self-loop (RecBole-GNN's GCEGNNDataset, as a dense matrix).
    """
    B, L = w.shape
    valid = torch.arange(L, device=w.device) < lengths[:, None]
    # distinct items: sort each row (padding last), a node starts wherever the value changes
    sorted_items, perm = torch.where(valid, w, torch.iinfo(w.dtype).max).sort(dim=1, stable=True)
    is_new = torch.ones_like(valid)
    is_new[:, 1:] = sorted_items[:, 1:] != sorted_items[:, :-1]
    is_new &= valid  # after sorting, the real items still fill the first `lengths` slots
    node_of_sorted = is_new.cumsum(1) - 1  # (B, L)
    n = int(is_new.sum(1).max())
    alias = torch.zeros_like(w).scatter_(1, perm, node_of_sorted) * valid
    # one extra column collects the repeats, then is dropped
    nodes = torch.zeros(B, n + 1, dtype=w.dtype, device=w.device)
    nodes = nodes.scatter_(1, torch.where(is_new, node_of_sorted, n), sorted_items)[:, :n]
    node_valid = torch.arange(n, device=w.device) < is_new.sum(1, keepdim=True)  # (B, n)

    # forward[b, i, j]: some k has w_k = node j and w_{k+1} = node i
    pair_valid = valid[:, 1:]
    rows = torch.arange(B, device=w.device)[:, None].expand(-1, L - 1)
    forward = torch.zeros(B, n, n, dtype=torch.bool, device=w.device)
    forward[rows[pair_valid], alias[:, 1:][pair_valid], alias[:, :-1][pair_valid]] = True
    backward = forward.transpose(1, 2)
    both = forward & backward
    self_loop = torch.eye(n, dtype=torch.bool, device=w.device) & node_valid[:, :, None]
    adjacency = torch.stack([self_loop, forward & ~both, backward & ~both, both], dim=1)
    return nodes, alias, adjacency


class GCEGNN(nn.Module):
    """GCE-GNN (Wang et al., SIGIR 2020) as RecBole-GNN builds it
    (`recbole_gnn/model/sequential_recommender/gcegnn.py`, `GCEGNNDataset` in `recbole_gnn/data/dataset.py`):
    sessions read in reverse (w_1 = most recent item); a typed session graph with attention over each
    node's incoming edges (local); one hop of session-aware attention over each item's 12 strongest
    neighbours in a global co-occurrence graph (global); their sum read out by soft attention with
    reversed positions; scores r E^T with the input table E.

    Every parameter is uniform on +-1/sqrt(D), the padding row of E included; that row then never trains
    (RecBole-GNN's `padding_idx=0`), although padded global neighbours attend to it.

    NOTE: trained on every prefix of every training row (the fine-tuning script expands them), and the
    global graph counts every prefix sample, where stock RecBole on benchmark files sees each row's last
    target only.
    NOTE: the session graph is a dense (B, 4, n, n) type matrix per batch instead of PyG edge lists; the
    attention softmax runs over the same incoming edges (a consecutive repeat gives a node a type-3
    self-edge beside its type-0 loop, as in RecBole-GNN).
    NOTE: one global hop only (RecBole-GNN `hop: 1`); its unused `bias` parameter is left out; the global
    attention uses `leakyrelu_alpha` where RecBole-GNN fixes 0.2 (the same value here).
    NOTE: the global branch is computed on real slots only, where RecBole-GNN pads every session to
    MAX_ITEM_LIST_LENGTH slots and masks them in the read-out; padded slots never reach r either way.
    NOTE: `logits` scores real items only (column j is item lo + j); RecBole-GNN scores the padding row too.
    """

    last_position_only = True  # one prediction per row: the caller expands rows into prefixes (model/backbones.py)

    def __init__(self, n_items: int, max_len: int, **params):
        super().__init__()
        self.config = config = GCEGNNConfig(n_items=n_items, max_len=max_len, **params)
        D = config.embedding_size
        self.item_emb = nn.Embedding(n_items + 1, D, padding_idx=0)
        self.pos_emb = nn.Embedding(max_len, D)  # P_k, k = 0 for the most recent item
        # local: one attention vector a_t per edge type
        self.edge_attention = nn.Parameter(torch.empty(N_EDGE_TYPES, D))
        # global: pi_j = softmax_j(q^T LeakyReLU(U^T [e_bar * E_{n_j}; kappa_j])), h_glob = ReLU(W_3^T [E_w; g])
        self.U = nn.Parameter(torch.empty(D + 1, D))
        self.q = nn.Parameter(torch.empty(D, 1))
        self.W_3 = nn.Parameter(torch.empty(2 * D, D))
        # read-out
        self.W_1 = nn.Linear(2 * D, D, bias=False)
        self.w_2 = nn.Linear(D, 1, bias=False)
        self.glu1 = nn.Linear(D, D)
        self.glu2 = nn.Linear(D, D, bias=False)
        bound = 1.0 / np.sqrt(D)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)
        self.register_buffer("neighbours", torch.zeros(n_items + 1, config.sample_num, dtype=torch.long))
        self.register_buffer("neighbour_weights", torch.zeros(n_items + 1, config.sample_num))
        # stored in the state dict, so a reloaded model knows its graph was built
        self.register_buffer("graph_built", torch.tensor(False))

    @property
    def all_items(self) -> tuple[int, int]:
        """Half-open id range of every real item."""
        return 1, self.config.n_items + 1

    def build_global_graph(self, rows: SequenceRows) -> None:
        """Build the global neighbour table from the training rows as read (one sequence per row, NOT
        prefix-expanded: every prefix of each row is counted here). Call once, before training."""
        ids, counts = global_neighbours(rows, self.config.n_items, self.config.sample_num)
        self.neighbours.copy_(torch.from_numpy(ids))
        self.neighbour_weights.copy_(torch.from_numpy(counts))
        self.graph_built.fill_(True)

    def local_aggregate(self, h: torch.Tensor, adjacency: torch.Tensor) -> torch.Tensor:
        """(B, n, D) node embeddings, (B, 4, n, n) typed edges -> (B, n, D) h_loc: for each node i,
        softmax over its incoming edges (j, t) of LeakyReLU(<E_j * E_i, a_t>), then sum of E_j."""
        B, n, D = h.shape
        # <E_j * E_i, a_t> = (E_i * a_t) . E_j, so no (B, n, n, D) tensor is built
        e = torch.einsum("bid,td,bjd->btij", h, self.edge_attention, h)  # (B, 4, n, n)
        e = F.leaky_relu(e, self.config.leakyrelu_alpha)
        # padding nodes have no edges; a self-loop keeps their (unused) softmax finite
        padding_node = ~adjacency.any(dim=(1, 3))  # (B, n)
        allowed = adjacency.clone()
        allowed[:, 0] |= torch.diag_embed(padding_node)
        e = e.masked_fill(~allowed, float("-inf"))
        # (B, 4, n, n) -> (B, n, 4 * n): one softmax over all incoming edges of node i, whatever their type
        p = e.transpose(1, 2).reshape(B, n, N_EDGE_TYPES * n).softmax(-1)
        return p.view(B, n, N_EDGE_TYPES, n).sum(2) @ h

    def global_aggregate(self, w: torch.Tensor, valid: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, L) reversed sessions -> (B, L, D) h_glob (zero on padding slots)."""
        emb = self.item_emb(w) * valid[..., None]  # (B, L, D)
        e_bar = emb.sum(1) / lengths[:, None]  # (B, D) session summary
        b, k = valid.nonzero(as_tuple=True)  # the V real slots
        items = w[b, k]  # (V,)
        neighbour_emb = self.item_emb(self.neighbours[items])  # (V, S, D)
        kappa = self.neighbour_weights[items]  # (V, S)
        # padded neighbours (item 0, weight 0) stay in the softmax, as in RecBole-GNN
        x = torch.cat([e_bar[b, None, :] * neighbour_emb, kappa[..., None]], -1)  # (V, S, D + 1)
        logit = F.leaky_relu(x @ self.U, self.config.leakyrelu_alpha) @ self.q  # (V, S, 1)
        g = (logit.softmax(1) * neighbour_emb).sum(1)  # (V, D)
        x = F.dropout(torch.cat([emb[b, k], g], -1), self.config.dropout_gcn, self.training)
        h_glob = torch.relu(x @ self.W_3)  # (V, D)
        return torch.zeros_like(emb).index_put((b, k), h_glob)

    def encode(self, history: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, L) right-padded histories (oldest first), (B,) lengths >= 1 -> (B, D) session vectors r.

        Only the `max_len` most recent items of a longer history are read.
        """
        if not bool(self.graph_built):
            raise RuntimeError("GCEGNN: call build_global_graph(training rows) before using the model")
        w, lengths = reverse_history(history, lengths, self.config.max_len)
        L = w.size(1)
        valid = torch.arange(L, device=w.device) < lengths[:, None]  # (B, L)
        nodes, alias, adjacency = session_graph(w, lengths)
        h_loc = self.local_aggregate(self.item_emb(nodes), adjacency)  # (B, n, D)
        h_loc = F.dropout(h_loc, self.config.dropout_local, self.training)
        h_loc = h_loc.gather(1, alias[..., None].expand(-1, -1, h_loc.size(-1)))  # (B, L, D) per slot
        h_glob = F.dropout(self.global_aggregate(w, valid, lengths), self.config.dropout_global, self.training)
        h = (h_loc + h_glob) * valid[..., None]  # (B, L, D)

        # soft-attention read-out with reversed positions
        B = h.size(0)
        z = torch.tanh(self.W_1(torch.cat([self.pos_emb.weight[:L].expand(B, L, -1), h], -1)))  # (B, L, D)
        h_mean = h.sum(1) / lengths[:, None]  # (B, D)
        eta = self.w_2(torch.sigmoid(self.glu1(z) + self.glu2(h_mean)[:, None])) * valid[..., None]  # (B, L, 1)
        return (eta * h).sum(1)

    def logits(self, r: torch.Tensor, item_range: tuple[int, int] | None = None) -> torch.Tensor:
        """(B, D) session vectors -> (B, hi - lo) scores r E[lo:hi]^T; column j is item lo + j (None: all items)."""
        lo, hi = self.all_items if item_range is None else item_range
        if not 1 <= lo < hi <= self.config.n_items + 1:
            raise ValueError(f"item_range {item_range} is not a non-empty range inside 1..{self.config.n_items}")
        return r @ self.item_emb.weight[lo:hi].T

    def _history_vectors(self, batch: SequenceBatch) -> torch.Tensor:
        # the target sits at lengths - 1; reverse_history never reads a slot at or past its length
        return self.encode(batch.items, batch.lengths - 1)

    def loss(self, batch: SequenceBatch, item_range: tuple[int, int] | None) -> torch.Tensor:
        """Softmax cross-entropy over `item_range` (None: all items) of each row's history against its
        target (the last item), averaged over rows. Rows are samples: prefix-expanded by the caller."""
        lo, hi = self.all_items if item_range is None else item_range
        targets = batch.targets
        if ((targets < lo) | (targets >= hi)).any():
            raise ValueError(f"a target lies outside item_range [{lo}, {hi})")
        return F.cross_entropy(self.logits(self._history_vectors(batch), item_range), targets - lo)

    def scores(self, batch: SequenceBatch, item_range: tuple[int, int] | None) -> torch.Tensor:
        """(B, hi - lo) scores of the candidates from each row's history (the target is not read)."""
        return self.logits(self._history_vectors(batch), item_range)
