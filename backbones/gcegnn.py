"""GCE-GNN, a Stage III backbone (docs/method.md, Stage III)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from backbones.base import Backbone
from core.schema import at_least
from data import SequenceBatch, SequenceRows, checked_item_range

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


def session_graph(w: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """The session graphs of a batch of reversed sessions `w` (B, L) (w[:, 0] most recent, 0-padded).

    Returns
    - nodes (B, n): the distinct items of each session (ascending), padded with 0;
    - alias (B, L): node index of each slot's item (0 on padding slots);
    - edges (b, t, i, j), four (E,) tensors: node i of session b receives from node j by an edge of
      type t. For consecutive w_k, w_{k+1}: j = node(w_k), i = node(w_{k+1}) is type 1 and the
      reverse is type 2; a pair met both ways (or a repeat w_k = w_{k+1}, its own reverse) is type 3
      instead; every real node has one type-0 self-loop (RecBole-GNN's GCEGNNDataset). Each edge
      once, in (b, t, i, j) order; built from the L - 1 consecutive pairs, never as (B, n, n) matrices.
    """
    B, L = w.shape
    valid = torch.arange(L, device=w.device) < lengths[:, None]
    # distinct items: sort each row (padding last), a node starts wherever the value changes
    sorted_items, perm = torch.where(valid, w, torch.iinfo(w.dtype).max).sort(dim=1, stable=True)
    is_new = torch.ones_like(valid)
    is_new[:, 1:] = sorted_items[:, 1:] != sorted_items[:, :-1]
    is_new &= valid  # after sorting, the real items still fill the first `lengths` slots
    node_of_sorted = is_new.cumsum(1) - 1  # (B, L)
    n_nodes = is_new.sum(1)
    n = int(n_nodes.max())
    alias = torch.zeros_like(w).scatter_(1, perm, node_of_sorted) * valid
    # one extra column collects the repeats, then is dropped
    nodes = torch.zeros(B, n + 1, dtype=w.dtype, device=w.device)
    nodes = nodes.scatter_(1, torch.where(is_new, node_of_sorted, n), sorted_items)[:, :n]

    # forward pairs (b, i, j): some k has w_k = node j and w_{k+1} = node i; each once, as integer keys
    pair_valid = valid[:, 1:]
    session = torch.arange(B, device=w.device)[:, None].expand(-1, L - 1)[pair_valid]
    forward = torch.unique((session * n + alias[:, 1:][pair_valid]) * n + alias[:, :-1][pair_valid])
    fb, fi, fj = forward // (n * n), forward // n % n, forward % n
    both = torch.isin(forward, (fb * n + fj) * n + fi)  # met both ways (a repeat is its own reverse)
    one_way = ~both
    loop_b, loop_i = (torch.arange(n, device=w.device) < n_nodes[:, None]).nonzero(as_tuple=True)
    b = torch.cat([loop_b, fb[one_way], fb[one_way], fb[both]])
    per_type = torch.stack([torch.tensor(len(loop_b), device=w.device), one_way.sum(), one_way.sum(), both.sum()])
    t = torch.repeat_interleave(torch.arange(N_EDGE_TYPES, device=w.device), per_type)
    i = torch.cat([loop_i, fi[one_way], fj[one_way], fi[both]])
    j = torch.cat([loop_i, fj[one_way], fi[one_way], fj[both]])
    order = (((b * N_EDGE_TYPES + t) * n + i) * n + j).argsort()
    return nodes, alias, (b[order], t[order], i[order], j[order])


class GCEGNN(Backbone):
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
    NOTE: the session graph is an edge list per batch (as PyG's in RecBole-GNN), built from the
    consecutive pairs with integer keys: the softmax runs over the same incoming edges (a consecutive
    repeat gives a node a type-3 self-edge beside its type-0 loop, as in RecBole-GNN).
    NOTE: one global hop only (RecBole-GNN `hop: 1`); its unused `bias` parameter is left out; the global
    attention uses `leakyrelu_alpha` where RecBole-GNN fixes 0.2 (the same value here).
    NOTE: everything after the session graph is computed on real slots only, where RecBole-GNN pads
    every session to MAX_ITEM_LIST_LENGTH slots and masks them in the read-out; padded slots never reach
    r either way. The global attention is computed once per distinct (session, neighbour, count).
    NOTE: `logits` scores real items only (column j is item lo + j); RecBole-GNN scores the padding row too.
    """

    last_position_only = True  # one prediction per row: the caller expands rows into prefixes (backbones/registry.py)

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

    def see_training_rows(self, rows: SequenceRows) -> None:
        """Build the global neighbour table from the training rows as read (one sequence per row, NOT
        prefix-expanded: every prefix of each row is counted here). Called once, before training."""
        ids, counts = global_neighbours(rows, self.config.n_items, self.config.sample_num)
        self.neighbours.copy_(torch.from_numpy(ids))
        self.neighbour_weights.copy_(torch.from_numpy(counts))
        self.graph_built.fill_(True)

    def local_aggregate(self, h: torch.Tensor, edges: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """(B, n, D) node embeddings, the typed edges (b, t, i, j) of `session_graph` -> (B, n, D) h_loc:
        for each node i, softmax over its incoming edges (j, t) of LeakyReLU(<E_j * E_i, a_t>), then
        sum of E_j.

        Computed on the edge list (a node has a handful of incoming edges, not n): O(edges * D) where
        dense (B, 4, n, n) scores cost O(B * n^2 * D). Padding nodes have no edges and get zeros.
        """
        B, n, D = h.shape
        b, t, i, j = edges  # edge j -> i of type t
        receiver, sender = b * n + i, b * n + j  # rows of the flattened (B * n, D) nodes
        nodes = h.reshape(B * n, D)
        # index_select, not x[index]: its backward is an index_add, far cheaper than an accumulating
        # index_put on a CPU (here and below)
        from_sender = nodes.index_select(0, sender)
        score = F.leaky_relu((nodes.index_select(0, receiver) * self.edge_attention.index_select(0, t)
                              * from_sender).sum(-1), self.config.leakyrelu_alpha)  # (edges,)
        # softmax over each receiver's incoming edges; the shift by its maximum is a constant
        top = torch.full((B * n,), float("-inf"), dtype=score.dtype, device=score.device)
        top = top.scatter_reduce(0, receiver, score.detach(), "amax")
        weight = (score - top.index_select(0, receiver)).exp()
        total = torch.zeros(B * n, dtype=score.dtype, device=score.device).index_add(0, receiver, weight)
        weight = weight / total.index_select(0, receiver)
        out = torch.zeros_like(nodes).index_add(0, receiver, weight[:, None] * from_sender)
        return out.view(B, n, D)

    def global_aggregate(self, session: torch.Tensor, items: torch.Tensor, item_emb: torch.Tensor,
                         e_bar: torch.Tensor) -> torch.Tensor:
        """The real slots (V,) (their session, item and embedding (V, D)) and each session's mean
        embedding e_bar (B, D) -> (V, D) h_glob, before its dropout.

        pi_j = softmax_j(q^T LeakyReLU(U^T [e_bar * E_{n_j}; kappa_j])) for each slot's neighbours j.
        The pre-activation splits into (e_bar * E_n) U[:D], which depends on the (session, neighbour)
        pair only, plus kappa U[D]; the logit depends on (session, neighbour, kappa) only. A session's
        slots share most of their neighbours (about 3 in 4 pairs repeat on ACDT's prefixes), so both
        are computed once per distinct pair and triple and gathered: the same function with a quarter
        of the (V, S, D) work.
        """
        D = self.config.embedding_size
        E = self.item_emb.weight
        neighbours = self.neighbours[items]  # (V, S); padded neighbours (item 0, weight 0) stay in the softmax
        kappa = self.neighbour_weights[items]  # (V, S)
        # distinct (session, neighbour) pairs, then distinct (pair, kappa) triples, as sorted integer keys
        n_ids = self.config.n_items + 1
        pairs, pair_of = torch.unique(session[:, None] * n_ids + neighbours, return_inverse=True)
        pair_session, pair_item = pairs.div(n_ids, rounding_mode="floor"), pairs.remainder(n_ids)
        n_counts = int(kappa.max()) + 1 if kappa.numel() else 1  # counts are whole numbers
        triples, triple_of = torch.unique(pair_of * n_counts + kappa.long(), return_inverse=True)
        triple_pair = triples.div(n_counts, rounding_mode="floor")
        pre = (e_bar.index_select(0, pair_session) * self.item_emb(pair_item)) @ self.U[:D]  # (pairs, D)
        pre = pre.index_select(0, triple_pair) + triples.remainder(n_counts).to(pre.dtype)[:, None] * self.U[D]
        logit = (F.leaky_relu(pre, self.config.leakyrelu_alpha) @ self.q).squeeze(1)  # (triples,)
        pi = logit.index_select(0, triple_of.flatten()).view(triple_of.shape).softmax(1)  # (V, S)
        # g = sum_j pi_j E_{n_j} without a (V, S, D) tensor; item 0 (padding_idx: never trained) is
        # left out of the bag and added back with its row detached
        g = F.embedding_bag(neighbours, E, per_sample_weights=pi, mode="sum", padding_idx=0)
        g = g + pi.masked_fill(neighbours != 0, 0.0).sum(1, keepdim=True) * E[0].detach()
        x = F.dropout(torch.cat([item_emb, g], -1), self.config.dropout_gcn, self.training)
        return torch.relu(x @ self.W_3)

    def encode(self, history: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, L) right-padded histories (oldest first), (B,) lengths >= 1 -> (B, D) session vectors r.

        Only the `max_len` most recent items of a longer history are read. Everything after the
        session graph runs on the V real slots (prefixes of random length leave most of a padded batch
        empty); the global dropout still draws its mask over the padded (B, L, D) block, so the random
        stream is that of dropout on the padded tensor.
        """
        if not bool(self.graph_built):
            raise RuntimeError("GCEGNN: call see_training_rows(training rows) before using the model")
        w, lengths = reverse_history(history, lengths, self.config.max_len)
        B, L = w.shape
        valid = torch.arange(L, device=w.device) < lengths[:, None]  # (B, L)
        session, slot = valid.nonzero(as_tuple=True)  # the V real slots, session by session
        items = w[session, slot]

        def per_session_mean(x):  # (V, D) -> (B, D)
            return torch.zeros(B, x.size(1), dtype=x.dtype, device=x.device).index_add(0, session, x) / lengths[:, None]

        nodes, alias, edges = session_graph(w, lengths)
        h_loc = self.local_aggregate(self.item_emb(nodes), edges)  # (B, n, D)
        h_loc = F.dropout(h_loc, self.config.dropout_local, self.training).flatten(0, 1).index_select(
            0, session * h_loc.size(1) + alias[session, slot])  # (V, D)
        item_emb = self.item_emb(items)  # (V, D)
        h_glob = self.global_aggregate(session, items, item_emb, per_session_mean(item_emb))
        p = self.config.dropout_global
        if self.training and p > 0:  # F.dropout's draw on the padded (B, L, D) block, read at the real slots
            noise = torch.empty(B, L, h_glob.size(1), dtype=h_glob.dtype, device=h_glob.device).bernoulli_(1 - p)
            h_glob = h_glob * noise[session, slot].div_(1 - p) if p < 1 else h_glob * 0
        h = h_loc + h_glob  # (V, D)

        # soft-attention read-out with reversed positions
        z = torch.tanh(self.W_1(torch.cat([self.pos_emb(slot), h], -1)))  # (V, D)
        eta = self.w_2(torch.sigmoid(self.glu1(z) + self.glu2(per_session_mean(h)).index_select(0, session)))  # (V, 1)
        return torch.zeros(B, h.size(1), dtype=h.dtype, device=h.device).index_add(0, session, eta * h)

    def logits(self, r: torch.Tensor, item_range: tuple[int, int] | None = None) -> torch.Tensor:
        """(B, D) session vectors -> (B, hi - lo) scores r E[lo:hi]^T; column j is item lo + j (None: all items)."""
        lo, hi = checked_item_range(item_range, self.config.n_items)
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
