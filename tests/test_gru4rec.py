"""GRU4Rec: RecBole's network, trained sequence-to-sequence, scored from the history's last output."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
import yaml
from recbole.model.sequential_recommender.gru4rec import GRU4Rec as RecBoleGRU4Rec

from backbones.gru4rec import GRU4Rec
from backbones.recbole_adapter import build_recbole_model, to_interaction
from data import SequenceBatch
from data.paths import PROJECT_ROOT

N_ITEMS, MAX_LEN = 30, 16
# D != D_h, so a transposed or swapped weight cannot pass
PARAMS = {"embedding_size": 16, "hidden_size": 24, "num_layers": 2, "dropout_prob": 0.2}
RENAMED = {"item_embedding.": "item_emb.", "gru_layers.": "gru.", "dense.": "out."}


def from_recbole(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """RecBole GRU4Rec state dict -> ours (the same tensors under our module names)."""
    out = {}
    for name, tensor in state.items():
        prefix = next(p for p in RENAMED if name.startswith(p))
        out[RENAMED[prefix] + name[len(prefix):]] = tensor
    return out


def make_batch(lengths: list[int], seed: int = 0, width: int | None = None, lo: int = 1, hi: int = N_ITEMS + 1):
    """Right-padded random rows of ids in lo..hi-1, `width` columns (default: the longest row)."""
    width = width or max(lengths)
    g = torch.Generator().manual_seed(seed)
    lengths_t = torch.tensor(lengths)
    items = torch.randint(lo, hi, (len(lengths), width), generator=g) * (torch.arange(width) < lengths_t[:, None])
    return SequenceBatch(torch.arange(len(lengths)), items, lengths_t)


def make_model(seed: int = 0) -> GRU4Rec:
    torch.manual_seed(seed)
    return GRU4Rec(N_ITEMS, MAX_LEN, **PARAMS).eval()


def test_config_file_is_the_uniform_configuration():
    params = yaml.safe_load((PROJECT_ROOT / "config/model/GRU4Rec.yaml").read_text())
    assert params.pop("name") == "GRU4Rec"
    model = GRU4Rec(N_ITEMS, MAX_LEN, **params)
    assert dataclasses.asdict(model.config) == {"n_items": N_ITEMS, "max_len": MAX_LEN, "embedding_size": 128,
                                                "hidden_size": 128, "num_layers": 2, "dropout_prob": 0.2}
    # a checkpoint rebuilds the model from its config
    assert GRU4Rec(**dataclasses.asdict(model.config)).config == model.config
    with pytest.raises(TypeError):
        GRU4Rec(N_ITEMS, MAX_LEN, hidden_sise=8)


def test_matches_recbole_gru4rec():
    torch.manual_seed(0)
    reference = build_recbole_model(RecBoleGRU4Rec, N_ITEMS, MAX_LEN, PARAMS).eval()
    # RecBole's GRU has no biases either: the parameters correspond one to one ...
    assert not reference.gru_layers.bias
    ours = make_model(seed=0)
    theirs = from_recbole(reference.state_dict())
    assert theirs.keys() == ours.state_dict().keys()
    # ... and the same construction and init order draws the same initial weights
    for name, tensor in ours.state_dict().items():
        torch.testing.assert_close(tensor, theirs[name], rtol=0, atol=0, msg=name)

    # then the outputs agree at every real position, from weights at a scale where details show
    with torch.no_grad():
        for p in reference.parameters():
            p.normal_(std=0.3)
    ours.load_state_dict(from_recbole(reference.state_dict()))
    batch = make_batch([16, 9, 2, 5], width=16)
    with torch.no_grad():
        hidden = ours.encode(batch.items)
        # RecBole's forward returns the output at item_seq_len - 1: ask for every real position at once
        rows, positions = (torch.arange(16) < batch.lengths[:, None]).nonzero(as_tuple=True)
        expected = reference.forward(batch.items[rows], positions + 1)
        torch.testing.assert_close(hidden[rows, positions], expected, atol=1e-5, rtol=1e-5)
        # full ranking: RecBole's column 0 is the padding row
        expected_scores = reference.full_sort_predict(to_interaction(batch))[:, 1:]
        torch.testing.assert_close(ours.scores(batch, (1, N_ITEMS + 1)), expected_scores, atol=1e-5, rtol=1e-5)


def test_init():
    model = make_model()
    D, H = PARAMS["embedding_size"], PARAMS["hidden_size"]
    assert model.item_emb.weight.shape == (N_ITEMS + 1, D) and model.out.weight.shape == (D, H)
    assert not any(name.startswith("gru.bias") for name, _ in model.named_parameters())
    # the first layer is Xavier-uniform, the second keeps PyTorch's U(-1/sqrt(H), 1/sqrt(H))
    assert model.gru.weight_ih_l0.abs().max() <= (6 / (D + 3 * H)) ** 0.5
    assert model.gru.weight_hh_l0.abs().max() <= (6 / (H + 3 * H)) ** 0.5
    assert model.gru.weight_ih_l0.abs().max() > 1 / H**0.5  # beyond the default bound: re-initialised
    assert model.gru.weight_hh_l1.abs().max() <= 1 / H**0.5


def test_causal():
    model = make_model()
    batch = make_batch([10, 10])
    changed = batch.items.clone()
    changed[:, 6] = changed[:, 6] % N_ITEMS + 1
    with torch.no_grad():
        before, after = model.encode(batch.items), model.encode(changed)
    torch.testing.assert_close(before[:, :6], after[:, :6], rtol=0, atol=0)
    assert not torch.allclose(before[:, 6:], after[:, 6:])


@pytest.mark.parametrize("item_range", [None, (5, 21)])
def test_loss_is_cross_entropy_over_every_position(item_range):
    model = make_model()
    lo, hi = item_range or (1, N_ITEMS + 1)
    batch = make_batch([7, 2, 12, 4, 9, 5], lo=lo, hi=hi)
    with torch.no_grad():
        loss = model.loss(batch, item_range)
        hidden = model.encode(batch.items)
        table = model.item_emb.weight[lo:hi]
        terms = [
            F.cross_entropy(hidden[b, t] @ table.T, batch.items[b, t + 1] - lo)
            for b in range(len(batch.lengths))
            for t in range(int(batch.lengths[b]) - 1)
        ]
    # every position counts once: long rows weigh more than short ones
    assert len(terms) == int((batch.lengths - 1).sum())
    torch.testing.assert_close(loss, torch.stack(terms).mean(), atol=1e-6, rtol=1e-6)


def test_padding_invariance():
    model = make_model()
    batch = make_batch([7, 2, 12, 4])
    wider = SequenceBatch(batch.users, F.pad(batch.items, (0, 5)), batch.lengths)
    with torch.no_grad():
        torch.testing.assert_close(model.loss(wider, None), model.loss(batch, None))
        scores = model.scores(batch, (1, N_ITEMS + 1))
        torch.testing.assert_close(model.scores(wider, (1, N_ITEMS + 1)), scores)
        # a row scores the same alone, trimmed to its own length
        alone = SequenceBatch(batch.users[1:2], batch.items[1:2, :2], batch.lengths[1:2])
        torch.testing.assert_close(model.scores(alone, (1, N_ITEMS + 1)), scores[1:2])


def test_scores_read_the_history_only():
    model = make_model()
    batch = make_batch([7, 2, 12, 4])
    changed = batch.items.clone()
    changed[torch.arange(4), batch.lengths - 1] = changed[torch.arange(4), batch.lengths - 1] % N_ITEMS + 1
    with torch.no_grad():
        scores = model.scores(batch, (3, 11))
        changed_scores = model.scores(SequenceBatch(batch.users, changed, batch.lengths), (3, 11))
        torch.testing.assert_close(changed_scores, scores)
        last = model.encode(batch.items)[torch.arange(4), batch.lengths - 2]
    assert scores.shape == (4, 8)
    torch.testing.assert_close(scores, last @ model.item_emb.weight[3:11].T)
    for bad in [(0, 5), (5, 5), (1, N_ITEMS + 2)]:
        with pytest.raises(ValueError, match="item_range"):
            model.scores(batch, bad)


def test_gradients_reach_every_parameter():
    model = make_model()  # eval: no dropout, so the steps below are deterministic
    batch = make_batch([12, 7, 3, 9])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(3):
        optimizer.zero_grad()
        loss = model.loss(batch, None)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert losses[-1] < losses[0]
