"""GCE-GNN's encoder as it was written before its edge-list local branch, distinct-pair global branch
and read-out on real slots (the three methods kept literally, so that tests can check that the new
ones compute the same loss and gradients)."""
import torch
import torch.nn.functional as F

from model.gcegnn import GCEGNN, N_EDGE_TYPES, reverse_history, session_graph


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
