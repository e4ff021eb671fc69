"""The faster ABXI, CGRec and SyNCRec compute what they computed before, and their dropout is nn.Dropout's.

The implementations before the speed-ups are kept literally in reference/abxi.py,
reference/cgrec.py and reference/syncrec.py. With dropout off and the draws that are not dropout fixed (negatives,
gate noise, SyNCRec's permutation drawn alike), the loss, every gradient, the running state and the
evaluation scores equal the reference's on a hand-made batch of rows of many lengths. The dropout
(model.decoder.keep_mask) keeps each element with probability 1 - p and scales it by 1 / (1 - p),
checked against bounds that a wrong rate or correlated bits would fail, and the same seed gives the
same bytes.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cdsr_baseline.abxi import ABXI, packed_block
from data import SequenceBatch
from model.decoder import Block, attend, attention_mask, fast_dropout, keep_mask
from reference import abxi as reference_abxi, cgrec as reference_cgrec, syncrec as reference_syncrec
from tests.test_data_parallel import STARTS, fixed_negatives

NO_DROPOUT = {"num_hidden_layers": 2, "num_attention_heads": 2, "hidden_size": 16, "hidden_dropout_prob": 0.0,
              "attention_probs_dropout_prob": 0.0, "max_seq_length": 12}
CASES = {
    "CGRec official": ("cgrec", {}),
    "CGRec corrected": ("cgrec", {"loss_slot": "target", "shapley_pairing": "marginal", "extra_empty_slots": 0}),
    "SyNCRec official": ("syncrec", {"expert_num": 4}),
    "SyNCRec corrected": ("syncrec", {"expert_num": 4, "shared_modules": False, "gate_noise_at_eval": False,
                                      "single_view_mask": "own"}),
}


def batch_of_many_lengths() -> tuple[torch.Tensor, SequenceBatch]:
    """Nine users, 2 to 14 items (longer than the model's 12 slots too), over the three domains."""
    torch.manual_seed(3)
    lengths = [2, 3, 5, 6, 8, 9, 11, 13, 14]
    width = max(lengths)
    items = torch.zeros(len(lengths), width, dtype=torch.long)
    for r, n in enumerate(lengths):
        items[r, :n] = torch.randint(1, 16, (n,))
    sequences = torch.zeros(len(lengths) + 1, 16, dtype=torch.long)
    sequences[1:, :width] = items
    return sequences, SequenceBatch(torch.arange(1, len(lengths) + 1), items, torch.tensor(lengths))


def both(case: str):
    """(reference, faster) models of one case, with the same weights."""
    module, extra = CASES[case]
    name = {"cgrec": "CGRec", "syncrec": "SyNCRec"}[module]
    sequences, batch = batch_of_many_lengths()
    made = []
    for source in (getattr(reference_cgrec if module == "cgrec" else reference_syncrec, name),
                   getattr(__import__(f"cdsr_baseline.{module}", fromlist=["_"]), name)):
        torch.manual_seed(0)
        made.append(source(15, STARTS, sequences, **NO_DROPOUT, **extra))
    made[1].load_state_dict(made[0].state_dict())
    return (*made, batch)


@pytest.fixture
def fixed_draws(monkeypatch):
    import cdsr_baseline.cgrec
    import cdsr_baseline.syncrec

    for module in (cdsr_baseline.cgrec, cdsr_baseline.syncrec, reference_cgrec, reference_syncrec):
        monkeypatch.setattr(module, "sample_excluding", fixed_negatives)
    monkeypatch.setattr(torch, "randn_like", torch.zeros_like)  # SyNCRec's gate noise


@pytest.mark.parametrize("case", list(CASES))
def test_the_faster_model_computes_the_references_loss_gradients_state_and_scores(case, fixed_draws):
    reference, faster, batch = both(case)
    results = []
    for model in (reference, faster):
        model.train()
        torch.manual_seed(1)  # SyNCRec's permutation of the MIP term
        loss = model.loss(batch)
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        state = {n: b.clone() for n, b in model.named_buffers() if n in ("shapley_state", "lrb_state")}
        model.eval()
        with torch.no_grad():
            scores = [model.scores(batch, (lo, hi)) for lo, hi in zip(STARTS, STARTS[1:])]
        results.append((loss.detach(), grads, state, scores))
    (loss_a, grads_a, state_a, scores_a), (loss_b, grads_b, state_b, scores_b) = results
    assert loss_b.item() == pytest.approx(loss_a.item(), rel=1e-5)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for key in grads_a:
        torch.testing.assert_close(grads_b[key], grads_a[key], rtol=1e-5, atol=1e-7, msg=key)
    assert state_a.keys() == state_b.keys() and state_a
    for key in state_a:
        torch.testing.assert_close(state_b[key], state_a[key], rtol=1e-5, atol=1e-7)
    if case != "SyNCRec official":  # its gates draw noise at evaluation (the official quirk): patched to 0
        for a, b in zip(scores_a, scores_b):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("p", [0.2, 0.5])
def test_the_dropout_keeps_at_nn_dropouts_rate_and_scale(p):
    """Over n = 2^21 elements the kept share is within 6 standard deviations of 1 - p; so is the
    share of neighbouring pairs both kept ((1 - p)^2: the two halves of a 64-bit draw are
    independent); kept elements are scaled by 1 / (1 - p) exactly as nn.Dropout scales them."""
    torch.manual_seed(0)
    x = torch.rand(2**21) + 0.5
    out = fast_dropout(x, p)
    kept = out != 0
    n, q = x.numel(), 1 - p
    assert abs(kept.float().mean().item() - q) < 6 * math.sqrt(q * (1 - q) / n)
    pairs = (kept[0::2] & kept[1::2]).float().mean().item()
    assert abs(pairs - q * q) < 6 * math.sqrt(q * q * (1 - q * q) / (n / 2))
    assert torch.equal(out[kept], x[kept] * (1.0 / q))
    reference = F.dropout(x, p, training=True)
    assert torch.equal(reference[reference != 0], x[reference != 0] * (1.0 / q))  # nn.Dropout's scale, the same


def test_the_dropout_is_reproducible_and_off_where_nn_dropouts_is():
    x = torch.randn(64, 33)
    torch.manual_seed(5)
    first = fast_dropout(x, 0.3)
    torch.manual_seed(5)
    assert torch.equal(fast_dropout(x, 0.3), first)  # the same seed, the same bytes
    assert not torch.equal(fast_dropout(x, 0.3), first)  # the stream moves on
    assert fast_dropout(x, 0.3, training=False) is x and fast_dropout(x, 0.0) is x
    assert not fast_dropout(x, 1.0).any()
    assert keep_mask((3, 5), 0.5).shape == (3, 5) and keep_mask((7,), 1e-12).all()


@pytest.mark.parametrize("masked", [False, True])
def test_attention_written_out_is_scaled_dot_product_attention(masked):
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, 9, 8) for _ in range(3))
    real = torch.ones(3, 9, dtype=torch.bool)
    real[0, :4] = real[2, :7] = False  # left padding
    mask = attention_mask(real) if masked else None
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=not masked)
    torch.testing.assert_close(attend(q, k, v, mask, lambda w: w), expected, rtol=1e-5, atol=1e-6)


def test_a_block_with_the_fast_dropout_trains_like_one_without():
    """Dropout on: another random stream, the same expectation; dropout off: the same block."""
    torch.manual_seed(0)
    plain = Block(8, 2, 16, 0.0, 0.0, 1e-12)
    fast = Block(8, 2, 16, 0.0, 0.0, 1e-12, fast_dropout=True)
    fast.load_state_dict(plain.state_dict())
    x = torch.randn(4, 6, 8)
    torch.testing.assert_close(fast(x), plain(x))
    noisy = Block(8, 2, 16, 0.5, 0.5, 1e-12, fast_dropout=True).train()
    torch.manual_seed(1)
    first = noisy(x)
    torch.manual_seed(1)
    assert torch.equal(noisy(x), first) and not torch.equal(noisy(x), first)


# --------------------------------------------------------------------------- ABXI


@pytest.mark.parametrize("fidelity", [
    {},
    {"eval_domain_stream": "compacted", "domain_stream_dropout": True, "key_padding_mask": True},
])
def test_abxi_packed_computes_the_references_loss_gradients_and_scores(fidelity):
    """Real slots only, packed in groups, empty keys as one key of multiplicity n, the states after the
    encoder only where a loss reads them: with dropout off, the reference's loss, every gradient and
    the scores (negatives: every candidate of each 5-item domain is taken, nothing is drawn)."""
    _, batch = batch_of_many_lengths()
    made = []
    for source in (reference_abxi.ABXI, ABXI):
        torch.manual_seed(0)
        made.append(source(15, STARTS, n_attn=2, d_embed=8, ffn=8, rd=2, ri=2, n_neg=10, len_max=12, dropout=0.0,
                           **fidelity))
    made[1].load_state_dict(made[0].state_dict())
    results = []
    for model in made:
        loss = model.train().loss(batch)
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        model.eval()
        with torch.no_grad():
            scores = [model.scores(batch, (lo, hi)) for lo, hi in zip(STARTS, STARTS[1:])]
        results.append((loss.detach(), grads, scores))
    (loss_a, grads_a, scores_a), (loss_b, grads_b, scores_b) = results
    assert loss_b.item() == pytest.approx(loss_a.item(), rel=1e-5)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 20
    for key in grads_a:
        torch.testing.assert_close(grads_b[key], grads_a[key], rtol=1e-5, atol=1e-7, msg=key)
    for a, b in zip(scores_a, scores_b):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_abxi_empty_keys_take_dropout_as_n_independent_masks():
    """A causal block over zero (empty) and real slots, attention dropout 0.5, against the packed block
    with the empty keys merged: over 4000 draws each, the mean and the variance of every output agree
    within bounds that a wrong multiplicity or a single mask for the merged key would fail (that
    would double the variance the empty keys add)."""
    torch.manual_seed(0)
    block = Block(8, 2, 8, 0.0, 0.5, 1e-5, fast_dropout=True).train()
    with torch.no_grad():
        block.qkv.bias.normal_(0, 1.0)  # large biases: the empty keys carry weight
    real = torch.tensor([False, True, False, False, False, True, False, True])
    x = torch.randn(1, 8, 8) * real[None, :, None]
    slots = real.nonzero().squeeze(1)
    n_empty = (slots - torch.arange(len(slots)))[None]
    valid = torch.ones(1, len(slots), dtype=torch.bool)
    draws = 4000
    with torch.no_grad():
        dense = torch.stack([block(x)[0, slots] for _ in range(draws)])
        packed = torch.stack([packed_block(block, x[:, slots], valid, n_empty, False)[0] for _ in range(draws)])
        block.eval()
        exact = block(x)[0, slots]
        torch.testing.assert_close(packed_block(block, x[:, slots], valid, n_empty, False)[0], exact,
                                   rtol=1e-5, atol=1e-6)
    spread = dense.std(0)
    assert (spread[1:] > 1e-3).all()  # the draws do vary (not the first slot: it sees no real key but itself)
    assert ((packed.mean(0) - dense.mean(0)).abs() < 5 * spread * math.sqrt(2 / draws) + 1e-6).all()
    ratio = packed.var(0)[1:] / dense.var(0)[1:]
    assert ((ratio > 0.85) & (ratio < 1.15)).all(), ratio


def test_abxi_is_reproducible_with_dropout_on():
    _, batch = batch_of_many_lengths()
    torch.manual_seed(0)
    model = ABXI(15, STARTS, n_attn=2, d_embed=8, ffn=8, rd=2, ri=2, n_neg=10, len_max=12, dropout=0.3).train()
    torch.manual_seed(4)
    first = model.loss(batch)
    torch.manual_seed(4)
    assert torch.equal(model.loss(batch), first) and not torch.equal(model.loss(batch), first)


# --------------------------------------------------------------------------- CGRec's coalition passes


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_cgrec_heads_at_the_read_positions_are_the_whole_computation_read_there(dropout):
    """A coalition pass computes the last block's feed-forward and the heads only where its loss reads
    (the kept positions); every dropout draws its whole mask, so with dropout on too and the same seed,
    the states there are those of the whole computation, and 0 elsewhere."""
    from cdsr_baseline.cgrec import CGRec
    from cdsr_baseline.inputs import domain_of

    sequences, batch = batch_of_many_lengths()
    params = NO_DROPOUT | {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}
    torch.manual_seed(0)
    model = CGRec(15, STARTS, sequences, **params).train()
    x = batch.items[:, :12].contiguous()
    slots = domain_of(x, model.starts)
    keep = torch.isin(slots, torch.tensor([1, 3]))
    inputs = (x * keep, slots, model.coarse(x) * keep, model.fine(x) * keep, x != 0)
    with torch.no_grad():
        torch.manual_seed(5)
        whole = model.heads(*inputs)
        torch.manual_seed(5)
        read = model.heads(*inputs, read=keep)
        after = torch.rand(3)
        torch.manual_seed(5)
        model.heads(*inputs)
        assert torch.equal(torch.rand(3), after)  # the same draws consumed
    assert keep.any() and (~keep & (x != 0)).any()
    for a, b in zip(whole, read):
        torch.testing.assert_close(b[keep], a[keep], rtol=1e-5, atol=1e-6)
        assert not b[~keep].any()


def test_syncrec_recomputing_its_activations_changes_nothing_but_memory():
    """`recompute_activations`: the expert passes with a graph run again in the backward pass with the
    random state restored, so with dropout on, the loss, every gradient and the running state are
    those of keeping the activations, and the stream after the step is the same."""
    from cdsr_baseline.syncrec import SyNCRec

    sequences, batch = batch_of_many_lengths()
    params = NO_DROPOUT | {"hidden_dropout_prob": 0.3, "attention_probs_dropout_prob": 0.3, "expert_num": 4}
    results = []
    for recompute in (False, True):
        torch.manual_seed(0)
        model = SyNCRec(15, STARTS, sequences, **params).train()
        model.recompute_activations = recompute
        torch.manual_seed(1)
        loss = model.loss(batch)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
                        model.lrb_state.clone(), torch.rand(3)))
    (loss_a, grads_a, state_a, after_a), (loss_b, grads_b, state_b, after_b) = results
    assert torch.equal(loss_a, loss_b) and torch.equal(state_a, state_b) and torch.equal(after_a, after_b)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for key in grads_a:
        torch.testing.assert_close(grads_b[key], grads_a[key], rtol=1e-6, atol=1e-9, msg=key)


@pytest.mark.parametrize("corrected", [False, True])
def test_syncrec_single_tasks_computed_where_read_are_the_whole_computation(corrected, monkeypatch):
    """A single-domain task's output is read at its own domain's slots and where the target is of its
    domain; computing the experts' last feed-forward and the tower there only changes nothing else:
    with dropout on and the same seed, the loss, every gradient and the draws consumed are those of
    computing every slot."""
    from cdsr_baseline.syncrec import SyNCRec

    sequences, batch = batch_of_many_lengths()
    extra = CASES["SyNCRec corrected" if corrected else "SyNCRec official"][1]
    params = NO_DROPOUT | {"hidden_dropout_prob": 0.3, "attention_probs_dropout_prob": 0.3} | extra
    whole_task = SyNCRec.task
    results = []
    for where_read in (True, False):
        if not where_read:
            monkeypatch.setattr(SyNCRec, "task", lambda self, *args, read=None: whole_task(self, *args))
        torch.manual_seed(0)
        model = SyNCRec(15, STARTS, sequences, **params).train()
        torch.manual_seed(1)
        loss = model.loss(batch)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
                        torch.rand(3)))
    (loss_a, grads_a, after_a), (loss_b, grads_b, after_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=0)
    assert torch.equal(after_a, after_b)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for key in grads_a:
        torch.testing.assert_close(grads_a[key], grads_b[key], rtol=1e-5, atol=1e-7, msg=key)
