"""GCE-GNN (docs/method.md, Stage III): global graph, session graph, and the batched model against a
per-session reference written from the spec."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from backbones.gcegnn import GCEGNN, global_neighbours, reverse_history, session_graph
from data import SequenceBatch, SequenceRows
from data.paths import PROJECT_ROOT

N_ITEMS = 30
PARAMS = dict(embedding_size=16, sample_num=12, leakyrelu_alpha=0.2, dropout_local=0.0, dropout_gcn=0.0,
              dropout_global=0.2)


def random_rows(n_rows: int, n_items: int, seed: int, max_len: int = 12) -> SequenceRows:
    rng = np.random.default_rng(seed)
    # few items, so that repeats, consecutive repeats and ties are common
    return SequenceRows.from_lists(np.arange(1, n_rows + 1),
                                   [rng.integers(1, n_items + 1, rng.integers(2, max_len + 1)).tolist()
                                    for _ in range(n_rows)])


def make_model(seed: int = 0, rows: SequenceRows | None = None, **params) -> GCEGNN:
    torch.manual_seed(seed)
    model = GCEGNN(N_ITEMS, 16, **(PARAMS | params))
    model.see_training_rows(random_rows(40, N_ITEMS, seed=1) if rows is None else rows)
    return model


def batch_of(sequences: list[list[int]]) -> SequenceBatch:
    W = max(map(len, sequences))
    items = torch.tensor([s + [0] * (W - len(s)) for s in sequences])
    return SequenceBatch(torch.arange(len(sequences)), items, torch.tensor([len(s) for s in sequences]))


def edge_triples(nodes, alias, edges, b: int) -> set[tuple[int, int, int]]:
    """(source item, destination item, type) of every edge of session b."""
    mine = edges[0] == b
    return {(int(nodes[b, j]), int(nodes[b, i]), int(t)) for t, i, j in zip(*(e[mine] for e in edges[1:]))}


def dense(edges, B: int, n: int) -> torch.Tensor:
    """(B, 4, n, n) bool: [b, t, i, j] iff node i of session b receives from node j by type t."""
    adjacency = torch.zeros(B, 4, n, n, dtype=torch.bool)
    adjacency[edges] = True
    return adjacency


# --------------------------------------------------------------------------- global graph


def test_global_graph_by_hand():
    rows = SequenceRows.from_lists([1, 2], [[1, 2, 3], [3, 2, 2]])
    # samples: (1 -> 2), (1 2 -> 3), (3 -> 2), (3 2 -> 2); pairs linked both ways:
    # {1,2}: 1   {2,3}: 1 + 1 + 1 = 3   {1,3}: 1   (2,2): one pair of equal items adds 2
    ids, weights = global_neighbours(rows, n_items=5, sample_num=12)
    assert ids.shape == weights.shape == (6, 12)
    assert ids[1, :2].tolist() == [2, 3] and weights[1, :2].tolist() == [1, 1]  # tie: 2 was met first
    assert ids[2, :3].tolist() == [3, 2, 1] and weights[2, :3].tolist() == [3, 2, 1]
    assert ids[3, :2].tolist() == [2, 1] and weights[3, :2].tolist() == [3, 1]
    assert not ids[[0, 4, 5]].any() and not weights[[0, 4, 5]].any()
    assert not ids[1, 2:].any() and not ids[2, 3:].any() and not ids[3, 2:].any()


def test_global_graph_ties_keep_first_meeting_not_id_order():
    # samples (4 -> 6), (4 6 -> 1): met in the order (6,4), (1,6), (1,4); every count is 1
    ids, _ = global_neighbours(SequenceRows.from_lists([1], [[4, 6, 1]]), n_items=6, sample_num=12)
    assert ids[1, :2].tolist() == [6, 4]  # neither ascending nor descending ids
    assert ids[6, :2].tolist() == [4, 1]
    assert ids[4, :2].tolist() == [6, 1]


def test_global_graph_window_is_four_steps():
    ids, weights = global_neighbours(SequenceRows.from_lists([1], [[1, 2, 3, 4, 5, 6]]), n_items=6, sample_num=12)
    assert ids[6, :4].tolist() == [5, 4, 3, 2] and ids[6, 4] == 0  # 1 is 5 steps back
    assert sorted(ids[1, :4].tolist()) == [2, 3, 4, 5] and ids[1, 4] == 0
    assert weights[3, :5].tolist() == [1, 1, 1, 1, 1] and ids[3, :5].tolist() == [2, 1, 4, 5, 6]


def test_global_graph_keeps_the_strongest_twelve():
    # item 20 follows each of 1..14 once, and 14 twice: 14 neighbours, 12 kept
    rows = SequenceRows.from_lists(range(1, 16), [[i, 20] for i in range(1, 15)] + [[14, 20]])
    ids, weights = global_neighbours(rows, n_items=20, sample_num=12)
    assert ids[20].tolist() == [14] + list(range(1, 12))
    assert weights[20].tolist() == [2] + [1] * 11


def reference_global_graph(rows: SequenceRows, n_items: int, sample_num: int):
    """RecBole-GNN's construction, one sample at a time: dicts filled in order, stable sort by count."""
    graph = [{} for _ in range(n_items + 1)]
    for r in range(len(rows)):
        x = rows.sequence(r).tolist()
        for t in range(1, len(x)):
            for source in reversed(x[max(0, t - 4):t]):  # most recent first
                for a, b in ((x[t], source), (source, x[t])):
                    graph[a][b] = graph[a].get(b, 0) + 1
    ids = np.zeros((n_items + 1, sample_num), np.int64)
    weights = np.zeros((n_items + 1, sample_num), np.int64)
    for a in range(n_items + 1):
        kept = sorted(graph[a].items(), key=lambda kv: kv[1], reverse=True)[:sample_num]
        ids[a, :len(kept)] = [b for b, _ in kept]
        weights[a, :len(kept)] = [c for _, c in kept]
    return ids, weights


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_global_graph_matches_one_sample_at_a_time(seed):
    rows = random_rows(60, 25, seed, max_len=20)
    for got, want in zip(global_neighbours(rows, 25, 12), reference_global_graph(rows, 25, 12)):
        np.testing.assert_array_equal(got, want)


def test_model_stores_the_neighbour_table():
    model = make_model()
    assert model.neighbours.shape == model.neighbour_weights.shape == (N_ITEMS + 1, 12)
    assert model.neighbours.dtype == torch.long and model.neighbour_weights.dtype == torch.float32
    assert {"neighbours", "neighbour_weights", "graph_built"} <= set(model.state_dict())
    with pytest.raises(RuntimeError, match="see_training_rows"):
        GCEGNN(N_ITEMS, 16, **PARAMS).scores(batch_of([[1, 2]]), None)


# --------------------------------------------------------------------------- session graph


def test_reverse_history_puts_the_most_recent_first_and_cuts_to_max_len():
    history = torch.tensor([[1, 2, 3, 4], [5, 6, 0, 0]])
    w, lengths = reverse_history(history, torch.tensor([4, 2]), max_len=8)
    assert w.tolist() == [[4, 3, 2, 1], [6, 5, 0, 0]] and lengths.tolist() == [4, 2]
    w, lengths = reverse_history(history, torch.tensor([4, 2]), max_len=3)
    assert w.tolist() == [[4, 3, 2], [6, 5, 0]] and lengths.tolist() == [3, 2]


def test_session_graph_edge_types_by_hand():
    # history 1 2 1 3 3 (oldest first) -> reversed session w = 3 3 1 2 1
    w, lengths = reverse_history(torch.tensor([[1, 2, 1, 3, 3], [4, 5, 0, 0, 0]]), torch.tensor([5, 2]), 8)
    nodes, alias, edges = session_graph(w, lengths)
    assert nodes[0].tolist() == [1, 2, 3] and nodes[1].tolist() == [4, 5, 0]
    assert nodes[0, alias[0]].tolist() == [3, 3, 1, 2, 1]
    # consecutive pairs w_k -> w_{k+1}: 3->3, 3->1, 1->2, 2->1
    assert edge_triples(nodes, alias, edges, 0) == {
        (1, 1, 0), (2, 2, 0), (3, 3, 0),  # self-loops
        (3, 1, 1), (1, 3, 2),  # met one way only: type 1 forward, type 2 its reverse
        (1, 2, 3), (2, 1, 3),  # met both ways
        (3, 3, 3),  # the repeat 3 3 is its own reverse
    }
    # reversed session 5 4: 5 -> 4 is type 1, 4 -> 5 type 2; the padding node has no edge
    assert edge_triples(nodes, alias, edges, 1) == {(4, 4, 0), (5, 5, 0), (5, 4, 1), (4, 5, 2)}
    assert len(edges[0]) == 8 + 4  # each edge once


def reference_session_edges(w: list[int]) -> set[tuple[int, int, int]]:
    """RecBole-GNN's GCEGNNDataset on one reversed session, as (source item, destination item, type)."""
    pairs = list(zip(w[:-1], w[1:]))
    out = set()
    for family, kind in ((pairs, 1), ([(b, a) for a, b in pairs], 2)):
        out |= {(a, b, 3 if (b, a) in family else kind) for a, b in family}
    return out | {(v, v, 0) for v in w}


def test_session_graph_matches_edge_lists_and_has_one_self_loop_per_node():
    rows = random_rows(50, 6, seed=3, max_len=14)
    batch = batch_of([rows.sequence(r).tolist() for r in range(len(rows))])
    w, lengths = reverse_history(batch.items, batch.lengths, 128)
    nodes, alias, edges = session_graph(w, lengths)
    adjacency = dense(edges, len(rows), nodes.size(1))
    assert int(adjacency.sum()) == len(edges[0])  # no edge twice
    for b in range(len(rows)):
        session = w[b, : lengths[b]].tolist()
        assert edge_triples(nodes, alias, edges, b) == reference_session_edges(session)
        n_real = len(set(session))
        assert sorted(nodes[b, :n_real].tolist()) == sorted(set(session)) and not nodes[b, n_real:].any()
        assert adjacency[b, 0].sum(1)[:n_real].tolist() == [1] * n_real  # one type-0 loop into each node ...
        assert adjacency[b, 0].diagonal()[:n_real].all()  # ... on itself
        assert not adjacency[b, :, n_real:].any() and not adjacency[b, :, :, n_real:].any()


def test_session_graph_is_the_dense_one_before_it_in_the_same_order():
    """The edge list equals the nonzeros of the dense (B, 4, n, n) matrix of the implementation before
    (reference/gcegnn.py), in the same (b, t, i, j) order, so the sums over edges are the same."""
    from reference.gcegnn import dense_session_graph

    rows = random_rows(60, 7, seed=5, max_len=20)
    batch = batch_of([rows.sequence(r).tolist() for r in range(len(rows))])
    w, lengths = reverse_history(batch.items, batch.lengths, 16)
    nodes, alias, edges = session_graph(w, lengths)
    want_nodes, want_alias, adjacency = dense_session_graph(w, lengths)
    assert torch.equal(nodes, want_nodes) and torch.equal(alias, want_alias)
    for got, want in zip(edges, adjacency.nonzero(as_tuple=True)):
        assert torch.equal(got, want)


# --------------------------------------------------------------------------- the model


def reference_session_vector(model: GCEGNN, history: list[int]) -> torch.Tensor:
    """r for one history, written from the model description with edge lists (evaluation mode)."""
    E = model.item_emb.weight
    w = history[::-1][: model.config.max_len]
    nodes = sorted(set(w))
    edges = reference_session_edges(w)
    alpha = model.config.leakyrelu_alpha
    h_loc = {}
    for i in nodes:
        incoming = [(j, t) for j, d, t in edges if d == i]
        beta = torch.stack([F.leaky_relu((E[j] * E[i] * model.edge_attention[t]).sum(), alpha) for j, t in incoming])
        h_loc[i] = (beta.softmax(0)[:, None] * torch.stack([E[j] for j, _ in incoming])).sum(0)
    e_bar = torch.stack([E[v] for v in w]).mean(0)
    h = []
    for v in w:
        nb, kappa = model.neighbours[v], model.neighbour_weights[v]
        x = torch.cat([e_bar * E[nb], kappa[:, None]], 1)
        pi = (F.leaky_relu(x @ model.U, alpha) @ model.q).squeeze(1).softmax(0)
        g = (pi[:, None] * E[nb]).sum(0)
        h.append(h_loc[v] + torch.relu(torch.cat([E[v], g]) @ model.W_3))
    h = torch.stack(h)
    z = torch.tanh(model.W_1(torch.cat([model.pos_emb.weight[: len(w)], h], 1)))
    eta = model.w_2(torch.sigmoid(model.glu1(z) + model.glu2(h.mean(0))))
    return (eta * h).sum(0)


@pytest.mark.parametrize("graph_rows", [40, 3])  # with 3 rows most neighbour lists are padded
def test_batched_model_matches_the_per_session_reference(graph_rows):
    model = make_model(rows=random_rows(graph_rows, N_ITEMS, seed=1)).eval()
    assert (model.neighbours[1:] == 0).any() == (graph_rows == 3)
    sequences = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7], [5, 5, 5, 1], [8, 8, 3, 8, 3, 9], [11, 12, 13]]
    sequences += [random_rows(1, 8, seed=s, max_len=20).sequence(0).tolist() for s in range(6)]  # some > max_len
    batch = batch_of(sequences)
    got = model.scores(batch, None)
    E = model.item_emb.weight[1:]
    with torch.no_grad():
        want = torch.stack([reference_session_vector(model, s[:-1]) @ E.T for s in sequences])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("graph_rows", [40, 3])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_loss_and_gradients_equal_the_dense_implementation(graph_rows, dropout):
    """The edge-list local branch and the distinct-pair global branch compute what the dense
    implementation before them computed (kept literally in reference/gcegnn.py): with dropout off,
    and with it on too, since they draw the same masks in the same order."""
    from reference.gcegnn import ReferenceGCEGNN

    graph = random_rows(graph_rows, N_ITEMS, seed=1)
    params = PARAMS | dict(dropout_local=dropout, dropout_gcn=dropout, dropout_global=dropout)
    models = []
    for cls in (GCEGNN, ReferenceGCEGNN):
        torch.manual_seed(3)
        model = cls(N_ITEMS, 16, **params)
        model.see_training_rows(graph)
        models.append(model.train())
    sequences = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7], [5, 5, 5, 1], [8, 8, 3, 8, 3, 9], [11, 12, 13]]
    sequences += [random_rows(1, 8, seed=s, max_len=20).sequence(0).tolist() for s in range(6)]
    batch = batch_of(sequences)
    losses = []
    for model in models:
        torch.manual_seed(7)
        loss = model.loss(batch, None)
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=0)
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        assert q.grad.abs().sum() > 0 or name == "pos_emb.weight", name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)
    assert not models[0].item_emb.weight.grad[0].any()  # the padding row still never trains


def test_scores_shape_range_and_independence_of_the_target():
    model = make_model().eval()
    batch = batch_of([[1, 2, 3, 4], [5, 6], [7, 8, 7]])
    scores = model.scores(batch, (5, 12))
    assert scores.shape == (3, 7) and torch.isfinite(scores).all()
    torch.testing.assert_close(scores, model.scores(batch, None)[:, 4:11])
    other = batch_of([[1, 2, 3, 9], [5, 1], [7, 8, 30]])
    torch.testing.assert_close(scores, model.scores(other, (5, 12)))
    # padding past a row's length is never read
    wider = SequenceBatch(batch.users, F.pad(batch.items, (0, 3), value=0), batch.lengths)
    torch.testing.assert_close(scores, model.scores(wider, (5, 12)))
    with pytest.raises(ValueError, match="item_range"):
        model.scores(batch, (0, 5))
    with pytest.raises(ValueError, match="outside item_range"):
        model.loss(batch, (5, 8))


def test_order_matters_and_the_most_recent_item_is_position_zero():
    model = make_model().eval()
    a, b = model.scores(batch_of([[1, 2, 3, 4, 9], [3, 2, 1, 4, 9]]), None)
    assert not torch.allclose(a, b)
    # a one-item history reads only E_w and P_0
    model.pos_emb.weight.data[1:] = 0
    s = model.scores(batch_of([[4, 9]]), None)
    model.pos_emb.weight.data[0] = 0
    assert not torch.allclose(s, model.scores(batch_of([[4, 9]]), None))


def test_training_learns_a_pattern_and_every_parameter_gets_a_gradient():
    # next item = last item + 1 (mod 30): learnable from the local and global graphs
    rng = np.random.default_rng(0)
    starts = rng.integers(1, N_ITEMS + 1, 64)
    rows = SequenceRows.from_lists(range(64), [[(s + k - 1) % N_ITEMS + 1 for k in range(6)] for s in starts])
    model = make_model(rows=rows)
    prefixes = [rows.sequence(r)[: t + 1].tolist() for r in range(len(rows)) for t in range(1, 6)]
    batch = batch_of(prefixes)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for step in range(30):
        optimiser.zero_grad()
        loss = model.loss(batch, None)
        loss.backward()
        if step == 0:
            for name, p in model.named_parameters():
                assert p.grad is not None and p.grad.abs().sum() > 0, name
            assert not model.item_emb.weight.grad[0].any()  # the padding row never trains
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_deterministic_given_the_seed():
    batch = batch_of([[1, 2, 3, 4], [5, 6], [7, 8, 7]])
    one, two = make_model(seed=5), make_model(seed=5)
    for (name, p), q in zip(one.state_dict().items(), two.state_dict().values()):
        assert torch.equal(p, q), name
    torch.manual_seed(0)
    loss_one = one.train().loss(batch, None)
    torch.manual_seed(0)
    assert torch.equal(loss_one, two.train().loss(batch, None))
    assert not torch.equal(one.item_emb.weight, make_model(seed=6).item_emb.weight)
    bound = 1 / np.sqrt(PARAMS["embedding_size"])
    assert all(p.abs().max() <= bound for p in one.parameters())


def test_state_dict_round_trip_keeps_the_graph():
    model = make_model().eval()
    clone = GCEGNN(N_ITEMS, 16, **PARAMS).eval()
    clone.load_state_dict(model.state_dict())
    batch = batch_of([[1, 2, 3, 4], [5, 6]])
    torch.testing.assert_close(clone.scores(batch, None), model.scores(batch, None))


def test_model_yaml_builds_the_model():
    params = OmegaConf.to_container(OmegaConf.load(PROJECT_ROOT / "config/model/GCEGNN.yaml"))
    assert params.pop("name") == "GCEGNN"
    model = GCEGNN(N_ITEMS, 128, **params)
    assert model.last_position_only  # finetune.py expands the training rows into prefixes
    assert model.config.embedding_size == 128 and model.config.sample_num == 12
    assert (model.config.dropout_local, model.config.dropout_gcn, model.config.dropout_global) == (0.0, 0.0, 0.2)
