"""CL4SRec: the augmentations on hand-made rows, NT-Xent, and the model's loss and scores."""
from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
import yaml

from data import SequenceBatch
from data.paths import PROJECT_ROOT
from backbones.cl4srec import (CL4SRec, CROP, IDENTITY, MASK, REORDER, augment, crop, draw_operators, mask, nt_xent,
                           reorder)
from model.objectives import target_scores

N_ITEMS, MAX_LEN, MASK_ID = 30, 16, 31
PARAMS = {"n_layers": 2, "n_heads": 2, "hidden_size": 16, "inner_size": 24, "hidden_dropout_prob": 0.2,
          "attn_dropout_prob": 0.2}
# distinct items, so a view shows where each of its items came from
HISTORY = torch.tensor([
    [1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
    [11, 12, 13, 14, 15, 0, 0, 0, 0, 0],
    [16, 17, 18, 0, 0, 0, 0, 0, 0, 0],
    [19, 0, 0, 0, 0, 0, 0, 0, 0, 0],
])
LENGTHS = torch.tensor([10, 5, 3, 1])
SEEDS = range(200)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_batch(lengths: list[int], seed: int = 0) -> SequenceBatch:
    width = max(lengths)
    lengths_t = torch.tensor(lengths)
    items = torch.randint(1, N_ITEMS + 1, (len(lengths), width), generator=generator(seed))
    return SequenceBatch(torch.arange(len(lengths)), items * (torch.arange(width) < lengths_t[:, None]), lengths_t)


def make_model(seed: int = 0, **params) -> CL4SRec:
    torch.manual_seed(seed)
    return CL4SRec(N_ITEMS, MAX_LEN, **(PARAMS | params)).eval()


def test_crop_keeps_a_contiguous_block():
    original = HISTORY.clone()
    starts = [set() for _ in LENGTHS]
    for seed in SEEDS:
        views, kept = crop(HISTORY, LENGTHS, 0.6, generator(seed))
        assert kept.tolist() == [6, 3, 1, 1]  # floor(0.6 l), at least 1
        for b, (row, n, l) in enumerate(zip(views.tolist(), kept.tolist(), LENGTHS.tolist())):
            start = HISTORY[b].tolist().index(row[0])
            assert row[:n] == HISTORY[b, start:start + n].tolist() and start + n <= l
            assert row[n:] == [0] * (len(row) - n)
            starts[b].add(start)
    # every offset 0..l - n occurs
    assert starts == [set(range(5)), set(range(3)), set(range(3)), {0}]
    assert torch.equal(HISTORY, original)


def test_crop_is_never_empty():
    views, kept = crop(HISTORY, LENGTHS, 0.1, generator(0))
    assert kept.tolist() == [1, 1, 1, 1] and (views[:, 0] > 0).all() and (views[:, 1:] == 0).all()


def test_mask_hides_distinct_positions():
    original = HISTORY.clone()
    positions = set()
    for seed in SEEDS:
        views = mask(HISTORY, LENGTHS, 0.3, MASK_ID, generator(seed))
        hidden = views == MASK_ID
        assert hidden.sum(1).tolist() == [3, 1, 0, 0]  # floor(0.3 l) distinct positions
        assert not (hidden & (HISTORY == 0)).any()  # padding stays padding
        assert torch.equal(views[~hidden], HISTORY[~hidden])
        positions |= set(hidden[0].nonzero().flatten().tolist())
    assert positions == set(range(10))
    assert torch.equal(HISTORY, original)
    # floor(0.7 * 10) is 7, as in RecBole's Python arithmetic (float32 would give 6)
    assert (mask(HISTORY, LENGTHS, 0.7, MASK_ID, generator(0)) == MASK_ID).sum(1).tolist() == [7, 3, 2, 0]


def test_reorder_shuffles_a_contiguous_block():
    original = HISTORY.clone()
    orders = set()
    for seed in SEEDS:
        views = reorder(HISTORY, LENGTHS, 0.6, generator(seed))
        for b, (n, l) in enumerate(zip([6, 3, 1, 0], LENGTHS.tolist())):
            moved = (views[b] != HISTORY[b]).nonzero().flatten().tolist()
            # the moved items lie inside one window of floor(0.6 l) real positions ...
            assert not moved or (moved[-1] - moved[0] < n and moved[-1] < l)
            # ... and the row keeps its items
            assert sorted(views[b].tolist()) == sorted(HISTORY[b].tolist())
        orders.add(tuple(views[1, :5].tolist()))
    # row 2 (l = 5) shuffles 3 items at offset 0, 1 or 2: every arrangement of every window occurs
    expected = {tuple(HISTORY[1, :s].tolist()) + p + tuple(HISTORY[1, s + 3:5].tolist())
                for s in range(3) for p in itertools.permutations(HISTORY[1, s:s + 3].tolist())}
    assert orders == expected
    assert torch.equal(HISTORY, original)


def test_two_different_operators_per_row():
    lengths = torch.tensor([5, 1, 2, 0] * 300)
    operators = draw_operators(lengths, generator(0))
    long = lengths > 1
    assert (operators[~long] == IDENTITY).all()
    assert (operators[long] != IDENTITY).all() and (operators[long, 0] != operators[long, 1]).all()
    pairs = {tuple(p) for p in operators[long].tolist()}
    assert pairs == set(itertools.permutations([CROP, MASK, REORDER], 2))


def test_augment_applies_each_rows_operators():
    operators = torch.tensor([[CROP, MASK], [REORDER, CROP], [MASK, REORDER], [IDENTITY, IDENTITY]])
    original = HISTORY.clone()
    views, lengths = augment(HISTORY, LENGTHS, operators, 0.6, 0.3, 0.6, MASK_ID, generator(3))
    assert views.shape == (2, 4, 10) and lengths.tolist() == [[6, 5, 3, 1], [10, 3, 3, 1]]
    assert (views[1, 0] == MASK_ID).sum() == 3 and (views[0, 0, 6:] == 0).all()  # row 0: crop, then mask
    assert sorted(views[0, 1].tolist()) == sorted(HISTORY[1].tolist())  # row 1: reorder, then crop
    assert (views[1, 1, 3:] == 0).all()
    assert torch.equal(views[:, 3], HISTORY[[3, 3]])  # l = 1: both views are the row
    assert torch.equal(HISTORY, original)
    # the same generator state gives the same views
    again, _ = augment(HISTORY, LENGTHS, operators, 0.6, 0.3, 0.6, MASK_ID, generator(3))
    assert torch.equal(views, again)


def test_model_views_come_from_the_history():
    model = make_model()
    batch = make_batch([11, 2, 6, 16, 3])
    items = batch.items.clone()
    views, lengths = model.views(batch, generator(0))
    assert torch.equal(batch.items, items)  # the batch is untouched
    assert views.shape == (2, 5, 15)
    # each view holds history items (or the mask token) only, never the target
    for b, l in enumerate((batch.lengths - 1).tolist()):
        history = set(batch.items[b, :l].tolist())
        for v in range(2):
            assert set(views[v, b, : lengths[v, b]].tolist()) <= history | {MASK_ID}
            assert (views[v, b, lengths[v, b]:] == 0).all()
    assert torch.equal(views[:, 1], batch.items[[1, 1], :1].expand(2, 15) * (torch.arange(15) < 1))  # l = 1


def test_nt_xent_by_hand():
    # four unit vectors, each equal to its partner and orthogonal to the other pair: every anchor
    # sees its positive at similarity 1 / tau and two negatives at 0
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z2 = z1.clone()
    torch.testing.assert_close(nt_xent(z1, z2, 1.0), torch.tensor(math.log(1 + 2 / math.e)))
    torch.testing.assert_close(nt_xent(z1, z2, 0.5), torch.tensor(math.log(1 + 2 / math.e**2)))

    # a general case against the definition, one anchor at a time
    torch.manual_seed(0)
    z1, z2 = torch.randn(3, 4), torch.randn(3, 4)
    z = torch.cat([z1, z2])
    terms = []
    for i in range(6):
        partner = (i + 3) % 6
        others = [j for j in range(6) if j != i]
        logits = torch.stack([z[i] @ z[j] / 0.7 for j in others])
        terms.append(-(logits[others.index(partner)] - logits.logsumexp(0)))
    torch.testing.assert_close(nt_xent(z1, z2, 0.7), torch.stack(terms).mean())


@pytest.mark.parametrize("item_range", [None, (5, 21)])
def test_loss_is_main_plus_weighted_contrastive(item_range):
    model = make_model()  # eval: no dropout, the only randomness is the augmentation
    lo, hi = item_range or (1, N_ITEMS + 1)
    batch = make_batch([7, 2, 12, 4, 9, 5])
    batch.items[batch.items > 0] = batch.items[batch.items > 0] % (hi - lo) + lo
    with torch.no_grad():
        torch.manual_seed(1)
        loss = model.loss(batch, item_range)

        # main: cross-entropy of every position against the next item, softmax over the range
        hidden = model.encoder.encode(batch.items)
        table = model.encoder.item_emb.weight[lo:hi]
        main = torch.stack([F.cross_entropy(hidden[b, t] @ table.T, batch.items[b, t + 1] - lo)
                            for b in range(6) for t in range(int(batch.lengths[b]) - 1)]).mean()
        # contrastive: the same draws as inside `loss`
        torch.manual_seed(1)
        views, lengths = model.views(batch)
        z = [model.encoder.encode(views[v])[torch.arange(6), lengths[v] - 1] for v in range(2)]
        cl = nt_xent(z[0], z[1], 1.0)
    torch.testing.assert_close(loss, main + 0.1 * cl, atol=1e-5, rtol=1e-5)
    assert cl > 0


def test_the_grouped_contrastive_loss_equals_the_one_before():
    """Views in length groups with the last block at the read positions only (backbones/cl4srec.py): with
    dropout off, the loss and every gradient of the implementation before (reference/cl4srec.py),
    the augmentations drawn alike; with dropout on, the same seed gives the same bytes."""
    from reference.cl4srec import ReferenceCL4SRec

    batch = make_batch([16, 12, 9, 14, 2, 5, 7, 3, 11, 16], seed=4)
    quiet = PARAMS | {"hidden_dropout_prob": 0.0, "attn_dropout_prob": 0.0}
    results = []
    for cls in (CL4SRec, ReferenceCL4SRec):
        torch.manual_seed(0)
        model = cls(N_ITEMS, MAX_LEN, **quiet).train()
        torch.manual_seed(1)
        loss = model.loss(batch, None)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss, grads), (want, want_grads) = results
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=0)
    for name, grad in want_grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    model = make_model().train()
    torch.manual_seed(2)
    first = model.loss(batch, None)
    torch.manual_seed(2)
    assert torch.equal(model.loss(batch, None), first) and not torch.equal(model.loss(batch, None), first)


@pytest.mark.parametrize("fast", [False, True])
def test_a_block_at_one_position_is_the_block_there(fast):
    from model.decoder import Block

    torch.manual_seed(0)
    block = Block(16, 2, 24, 0.3, 0.3, 1e-12, fast_dropout=fast).eval()
    x = torch.randn(5, 9, 16)
    positions = torch.tensor([0, 8, 3, 5, 8])
    torch.testing.assert_close(block.forward_at(x, positions), block(x)[torch.arange(5), positions],
                               rtol=1e-5, atol=1e-6)
    block.train()
    torch.manual_seed(1)
    noisy = block.forward_at(x, positions)
    assert not torch.allclose(noisy, block.eval().forward_at(x, positions))  # dropout is on in training


@pytest.mark.parametrize("fast", [False, True])
def test_a_block_at_any_positions_is_the_block_there(fast):
    """Several positions per row, rows out of order, a row with none, one repeated position."""
    from model.decoder import Block, DecoderConfig, TaesarDecoder

    torch.manual_seed(0)
    block = Block(16, 2, 24, 0.3, 0.3, 1e-12, fast_dropout=fast).eval()
    x = torch.randn(4, 9, 16)
    rows = torch.tensor([2, 0, 2, 3, 0, 2, 2])
    positions = torch.tensor([8, 0, 3, 5, 4, 0, 3])
    torch.testing.assert_close(block.forward_at(x, positions, rows), block(x)[rows, positions], rtol=1e-5, atol=1e-6)
    assert block.forward_at(x, positions[:0], rows[:0]).shape == (0, 16)
    with pytest.raises(ValueError, match="positions must lie in"):
        block.forward_at(x, torch.tensor([-1]), torch.tensor([0]))
    model = TaesarDecoder(DecoderConfig(n_items=30, max_len=9)).eval()
    items = torch.randint(1, 31, (4, 9))
    with torch.no_grad():
        torch.testing.assert_close(model.states_at(items, positions, rows), model.encode(items)[rows, positions],
                                   rtol=1e-5, atol=1e-6)


def test_a_block_at_one_position_per_row_draws_as_before():
    """CL4SRec's recorded runs go through `forward_at` with one position per row: generalised to any
    positions, it must give the same bytes in training mode, dropout draws included, as the
    one-position form it replaced (written out here)."""
    import torch.nn.functional as F

    from model.decoder import Block

    def one_per_row(block, x, positions):  # the former Block.forward_at
        B, L, H = x.shape
        nh, hs = block.n_heads, H // block.n_heads
        here = x.gather(1, positions[:, None, None].expand(-1, 1, H)).squeeze(1)
        q = F.linear(here, block.qkv.weight[:H], block.qkv.bias[:H]).view(B, nh, 1, hs)
        k, v = (t.view(B, L, nh, hs).transpose(1, 2)
                for t in F.linear(x, block.qkv.weight[H:], block.qkv.bias[H:]).split(H, dim=2))
        later = (torch.arange(L) > positions[:, None])[:, None, None]
        y = block._attend(q, k, v, torch.zeros(later.shape).masked_fill(later, float("-inf")))
        here = block.ln_attn(here + block.dropout(block.attn_out(y.reshape(B, H))))
        return block.ln_ffn(here + block.dropout(block.feed_forward(here)))

    torch.manual_seed(0)
    block = Block(16, 2, 24, 0.3, 0.3, 1e-12).train()
    x = torch.randn(5, 9, 16)
    positions = torch.tensor([0, 8, 3, 5, 8])
    torch.manual_seed(7)
    before = one_per_row(block, x, positions)
    torch.manual_seed(7)
    assert torch.equal(block.forward_at(x, positions), before)


def test_scores_as_sasrec_without_the_mask_token():
    model = make_model()
    batch = make_batch([7, 2, 12, 4])
    with torch.no_grad():
        scores = model.scores(batch, (1, N_ITEMS + 1))
        assert scores.shape == (4, N_ITEMS)  # real items only
        torch.testing.assert_close(scores, target_scores((1, N_ITEMS + 1))(model.encoder, batch))
        torch.testing.assert_close(model.scores(batch, (5, 21)), scores[:, 4:20])
        # no augmentation at evaluation: the same scores every time
        torch.testing.assert_close(model.scores(batch, (1, N_ITEMS + 1)), scores)
    for bad in [(1, N_ITEMS + 2), (MASK_ID, MASK_ID + 1), (0, 5)]:
        with pytest.raises(ValueError, match="item_range"):
            model.scores(batch, bad)
        with pytest.raises(ValueError, match="item_range"):
            model.loss(batch, bad)


def test_gradients_flow_to_the_mask_token():
    model = make_model().train()
    batch = make_batch([16, 12, 9, 14])
    model.loss(batch, None).backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())
    # the mask row is trained by the contrastive loss only
    assert model.encoder.item_emb.weight.grad[MASK_ID].abs().sum() > 0
    unweighted = make_model(cl_weight=0.0).train()
    unweighted.loss(batch, None).backward()
    assert unweighted.encoder.item_emb.weight.grad[MASK_ID].abs().sum() == 0


def test_config_file():
    params = yaml.safe_load((PROJECT_ROOT / "config/model/CL4SRec.yaml").read_text())
    assert params.pop("name") == "CL4SRec"
    sasrec = yaml.safe_load((PROJECT_ROOT / "config/model/SASRec.yaml").read_text())
    # the encoder keys and values are SASRec's
    assert {k: params[k] for k in sasrec if k != "name"} == {k: v for k, v in sasrec.items() if k != "name"}
    model = CL4SRec(N_ITEMS, MAX_LEN, **params)
    c = model.config
    assert (c.cl_weight, c.temperature, c.crop, c.mask, c.reorder) == (0.1, 1.0, 0.6, 0.3, 0.6)
    assert model.encoder.item_emb.weight.shape == (N_ITEMS + 2, 128)  # padding, items, mask token
    assert CL4SRec(**dataclasses.asdict(c)).config == c  # a checkpoint rebuilds the model
    with pytest.raises(TypeError):
        CL4SRec(N_ITEMS, MAX_LEN, cl_wieght=0.1)
    assert CL4SRec(N_ITEMS, MAX_LEN, hidden_act="relu").encoder.config.hidden_act == "relu"  # read, not ignored
