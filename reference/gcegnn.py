"""GCE-GNN's encoder as it was written before its edge-list local branch, distinct-pair global branch
and read-out on real slots, with its dense session graph (kept literally, so that tests can check that
the new ones compute the same graphs, loss and gradients)."""
import torch
import torch.nn.functional as F

from backbones.gcegnn import GCEGNN, N_EDGE_TYPES, reverse_history


def dense_session_graph(w: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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


class ReferenceGCEGNN(GCEGNN):
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

    def encode(self, history: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, L) right-padded histories (oldest first), (B,) lengths >= 1 -> (B, D) session vectors r.

        Only the `max_len` most recent items of a longer history are read.
        """
        if not bool(self.graph_built):
            raise RuntimeError("GCEGNN: call build_global_graph(training rows) before using the model")
        w, lengths = reverse_history(history, lengths, self.config.max_len)
        L = w.size(1)
        valid = torch.arange(L, device=w.device) < lengths[:, None]  # (B, L)
        nodes, alias, adjacency = dense_session_graph(w, lengths)
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
