"""The cross-domain baselines: their inputs, every loss term on hand-made inputs, the invariants of
their definitions, per-domain model selection, one-epoch runs in both fidelities, and bad keys."""
from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from cdsr_baseline.abxi import ABXI, compact, domain_inputs, positions, sample_negatives
from cdsr_baseline.cgrec import CGRec, coalitions, shapley_values
from cdsr_baseline.inputs import domain_of, user_sequences
from cdsr_baseline.layers import BertConfig, LoRA, bert_blocks, bert_init, binary_loss, left_align, sample_excluding
from cdsr_baseline.syncrec import SyNCRec
from cdsr_baseline.train import run_baseline
from data import SequenceBatch, SequenceLoader, SequenceRows
from evaluation import Evaluation
from pipeline.settings import stage_config
from tests.conftest import tiny_overrides
from trainer import TrainConfig, fit, load_checkpoint

# three domains of five items: A = 1..5, B = 6..10, C = 11..15
STARTS = [1, 6, 11, 16]
A1, A2, A3, B1, B2 = 1, 2, 3, 6, 7


# --------------------------------------------------------------------------- shared data and blocks


def test_evaluation_rows_are_the_domain_users_with_their_mixed_history(acdt_dataset):
    for split in ("valid", "test"):
        for dom in acdt_dataset.domains.names:
            rows = acdt_dataset.mixed_history_rows(split, dom)
            own = acdt_dataset.rows(f"{dom}.{split}")
            assert np.array_equal(rows.users, own.users) and np.array_equal(rows.targets, own.targets)
            # the same users as those whose full target lies in the domain (the data contract's promise)
            full = acdt_dataset.rows(f"full.{split}")
            lo, hi = acdt_dataset.domains.range(dom)
            assert set(full.users[(full.targets >= lo) & (full.targets < hi)]) == set(own.users)
            assert rows.lengths.mean() > own.lengths.mean()  # mixed histories are longer


def test_mixed_history_rows_refuse_files_of_two_preparations(acdt_dataset):
    import dataclasses

    from data import DataError, PreparedDataset

    dataset = PreparedDataset(acdt_dataset.root.parent, acdt_dataset.name)
    full = acdt_dataset.rows("full.test")
    dataset._rows["full.test"] = dataclasses.replace(full, items=full.items.copy())
    dataset._rows["full.test"].items[full.offsets[1] - 1] += 1  # the first user's target
    with pytest.raises(DataError, match=rf"dom\d\.test\.inter: user {full.users[0]}'s target differs"):
        [dataset.mixed_history_rows("test", dom) for dom in dataset.domains.names]
    dataset._rows["full.test"] = full.take(np.arange(1, len(full)))
    with pytest.raises(DataError, match=rf"user {full.users[0]} has no row in .*full\.test\.inter"):
        [dataset.mixed_history_rows("test", dom) for dom in dataset.domains.names]


def test_user_sequences_hold_each_users_whole_sequence(acdt_dataset):
    table = user_sequences(acdt_dataset, 128)
    test = acdt_dataset.rows("full.test")
    assert table.shape[0] == test.users.max() + 1 and not table[0].any()
    for r in (0, 17, len(test) - 1):
        sequence = test.sequence(r)[-128:]
        assert table[test.users[r], : len(sequence)].tolist() == sequence.tolist()


def test_left_align_and_positions():
    items = torch.tensor([[4, 5, 6, 0], [7, 8, 0, 0]])
    assert left_align(items, torch.tensor([3, 2]), 4).tolist() == [[0, 4, 5, 6], [0, 0, 7, 8]]
    assert left_align(items, torch.tensor([3, 2]), 2).tolist() == [[5, 6], [7, 8]]  # the most recent ones
    mask = torch.tensor([[0, 0, 1, 0, 1, 1]]).bool()
    assert positions(mask).tolist() == [[0, 0, 3, 0, 2, 1]]  # the most recent slot is 1, empty slots 0
    assert domain_of(torch.tensor([0, 1, 5, 6, 15]), torch.tensor(STARTS)).tolist() == [0, 1, 1, 2, 3]


def test_binary_loss_mean_and_sum_forms():
    table = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    h = torch.tensor([[1.0, 1.0], [2.0, 0.0]])
    pos, neg, w = torch.tensor([1, 2]), torch.tensor([2, 1]), torch.tensor([1.0, 0.0])
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    first = -math.log(sig(1.0) + 1e-24) - math.log(1 - sig(2.0) + 1e-24)  # h0.E1 = 1, h0.E2 = 2
    assert binary_loss(h, table, pos, neg, w, "sum").item() == pytest.approx(first)
    assert binary_loss(h, table, pos, neg, w, "mean").item() == pytest.approx(first / (1 + 1e-24))
    both = torch.ones(2)
    second = -math.log(sig(0.0)) - math.log(1 - sig(2.0))  # h1.E2 = 0, h1.E1 = 2
    assert binary_loss(h, table, pos, neg, both, "mean").item() == pytest.approx((first + second) / 2)


def test_lora_starts_at_zero_and_learns():
    lora = LoRA(4, 2)
    z = torch.randn(3, 4)
    assert torch.equal(lora(z), torch.zeros(3, 4))
    lora.B.data.fill_(1.0)
    assert torch.allclose(lora(z), z @ (lora.A @ lora.B).T)


def test_bert_blocks_and_initialisation():
    blocks = bert_blocks(BertConfig(num_hidden_layers=2, hidden_size=64))
    assert len(blocks) == 2
    inner = [m for m in blocks[0].modules() if isinstance(m, torch.nn.Linear) and m.in_features == 64]
    assert 4 * 64 in {m.out_features for m in inner}  # the feed-forward is 4D wide
    torch.manual_seed(0)
    root = torch.nn.ModuleDict({"blocks": blocks, "table": torch.nn.Embedding(2000, 64, padding_idx=0)})
    bert_init(root)
    linears = [m for m in root.modules() if isinstance(m, torch.nn.Linear)]
    assert all(torch.count_nonzero(m.bias) == 0 for m in linears if m.bias is not None)
    weights = torch.cat([root["table"].weight.flatten()] + [m.weight.flatten() for m in linears])
    assert weights.std().item() == pytest.approx(0.02, rel=0.02)
    assert torch.count_nonzero(root["table"].weight[0]) == 64  # the padding row is drawn too


def test_negative_samplers_avoid_what_they_must():
    torch.manual_seed(0)
    seen = torch.zeros(2, 50, dtype=torch.bool)
    seen[0, :10] = True
    seen[1, 40:] = True
    owner = torch.tensor([0, 1, 1, 0])
    picks = sample_negatives(seen, owner, 30)
    for row, user in zip(picks, owner):
        assert len(set(row.tolist())) == 30 and not seen[user, row].any()  # distinct, unseen
    lo, hi = torch.tensor([1, 5]), torch.tensor([4, 8])
    excluded = torch.tensor([[1, 2, 0], [5, 6, 0]])
    draws = torch.stack([sample_excluding(lo, hi, excluded) for _ in range(50)])
    assert set(draws[:, 0].tolist()) == {3} and set(draws[:, 1].tolist()) == {7}


# --------------------------------------------------------------------------- ABXI


def test_abxi_domain_inputs_of_the_worked_example():
    # u = (A1, B1, A2, B2, A3): x = (A1, B1, A2, B2), y = (B1, A2, B2, A3)
    x, y = torch.tensor([[A1, B1, A2, B2]]), torch.tensor([[B1, A2, B2, A3]])
    assert domain_inputs(x, y, 1, 6).tolist() == [[0, A1, 0, A2]]
    assert domain_inputs(x, y, 6, 11).tolist() == [[0, 0, B1, 0]]
    assert domain_inputs(x, y, 11, 16).tolist() == [[0, 0, 0, 0]]


def test_abxi_domain_inputs_on_random_sequences():
    generator = np.random.default_rng(0)
    for _ in range(200):
        u = generator.integers(1, 16, size=generator.integers(2, 12))
        x, y = torch.tensor(u[None, :-1]), torch.tensor(u[None, 1:])
        for d in range(3):
            lo, hi = STARTS[d], STARTS[d + 1]
            xd = domain_inputs(x, y, lo, hi)[0]
            nonzero = xd != 0
            assert ((y[0] >= lo) & (y[0] < hi))[nonzero].all() and ((xd >= lo) & (xd < hi))[nonzero].all()
            targets = int(((y[0] >= lo) & (y[0] < hi)).sum())
            has_item, first_in = bool(((u >= lo) & (u < hi)).any()), lo <= u[0] < hi
            assert int(nonzero.sum()) == targets - (1 if has_item and not first_in else 0)


def test_abxi_compacted_stream():
    history = torch.tensor([[0, 1, 7, 2, 8]])
    assert compact(history, 1, 6).tolist() == [[0, 0, 0, 1, 2]]


def test_abxi_loss_on_a_hand_made_case():
    """With every candidate of a domain taken (n_neg >= the domain), L_d is the softmax over the target
    and the items outside u, at temperature tau, averaged per user, then over the batch."""
    torch.manual_seed(0)
    model = ABXI(15, STARTS, n_attn=1, d_embed=8, ffn=8, rd=2, ri=2, n_neg=10, len_max=8, dropout=0.0)
    fused = torch.randn(2, 3, 8)
    u = torch.tensor([[A1, A2, B1, 0], [B1, A3, A1, A2]])
    y = torch.tensor([[0, A2, 0], [A3, A1, A2]])
    gate = (y >= 1) & (y < 6)
    rows, slots = gate.nonzero(as_tuple=True)
    loss = model.domain_loss(fused[rows, slots], rows, u, y[rows, slots], 1, 6)
    E = model.item_emb.weight
    expected = []
    for b, seen in ((0, {A1, A2}), (1, {A1, A2, A3})):
        terms = []
        for t in gate[b].nonzero()[:, 0].tolist():
            candidates = [int(y[b, t])] + [v for v in range(1, 6) if v not in seen]
            logits = torch.stack([fused[b, t] @ E[v] for v in candidates]) / 0.75
            terms.append(-torch.log_softmax(logits, 0)[0])
        expected.append(torch.stack(terms).mean())
    assert loss.item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-5)


# --------------------------------------------------------------------------- CGRec


@pytest.mark.parametrize("n", [3, 4, 5])
def test_cgrec_coalitions(n):
    found = coalitions(n)
    assert len(found) == 2**n - 2 and len(set(found)) == len(found)
    for j in range(1, n + 1):
        assert sum(j in c for c in found) == 2 ** (n - 1) - 1
    assert [len(c) for c in found] == sorted(len(c) for c in found)  # by size, then lexicographic


def test_cgrec_shapley_values_on_hand_made_losses():
    n = 3
    losses = {c: float(sum(c)) for c in coalitions(n)}  # lambda(S) = sum of its slot numbers
    # official: with j = 1, A = (1), (1,2), (1,3); C = (2), (3), (2,3)
    expected_1 = (1 - 2) / (3 * 1) + (3 - 3) / (3 * 2) + (4 - 5) / (3 * 2)
    assert shapley_values(losses, n, "position")[0].item() == pytest.approx(expected_1)
    # corrected: C without 1 against C + {1} where enumerated: (2)->(1,2), (3)->(1,3); weight 1! 1! / 3!
    assert shapley_values(losses, n, "marginal")[0].item() == pytest.approx(2 * (1 / 6) * 1.0)


def test_cgrec_the_empty_slot_alone_costs_nothing():
    torch.manual_seed(0)
    sequences = torch.zeros(3, 8, dtype=torch.long)
    sequences[1, :5], sequences[2, :5] = torch.tensor([1, 6, 2, 7, 3]), torch.tensor([11, 1, 12, 6, 13])
    model = CGRec(15, STARTS, sequences, num_hidden_layers=1, hidden_size=8, max_seq_length=6)
    assert model.n_slots == 4  # three domains and the official empty slot
    x = left_align(torch.tensor([[1, 6, 2, 7], [11, 1, 12, 6]]), torch.tensor([4, 4]), 6)
    keep = torch.isin(domain_of(x, model.starts), torch.tensor([4]))  # the coalition {empty slot}
    assert not keep.any()
    z = model.heads(x * keep, domain_of(x, model.starts), model.coarse(x) * keep, model.fine(x) * keep, x != 0)
    targets = tuple(t * keep for t in (x, model.coarse(x), model.fine(x)))
    assert model.level_losses(z, targets, targets, keep.float()).item() == 0.0


# --------------------------------------------------------------------------- SyNCRec


def tiny_batch():
    sequences = torch.zeros(3, 8, dtype=torch.long)
    sequences[1, :6], sequences[2, :7] = torch.tensor([1, 6, 2, 7, 3, 8]), torch.tensor([11, 1, 12, 6, 13, 2, 4])
    items = torch.tensor([[1, 6, 2, 7, 0], [11, 1, 12, 6, 13]])
    return sequences, SequenceBatch(torch.tensor([1, 2]), items, torch.tensor([4, 5]))


def test_syncrec_shared_experts_reduce_to_tower_of_encoder_at_evaluation():
    torch.manual_seed(0)
    sequences, batch = tiny_batch()
    model = SyNCRec(15, STARTS, sequences, num_hidden_layers=1, hidden_size=8, max_seq_length=6, expert_num=4).eval()
    x = left_align(batch.items, batch.lengths - 1, 6)
    e = model.embed(x, domain_of(x, model.starts))
    from model.decoder import attention_mask

    mask = attention_mask(x != 0)
    expected = model.towers[0](model.experts[0](e, mask))
    for _ in range(3):  # the gate noise is drawn anew each time and changes nothing
        assert torch.allclose(model.task(e, mask, model.K, (x != 0).sum(1)), expected, atol=1e-5)


def test_syncrec_loss_re_balancing_and_mip():
    torch.manual_seed(0)
    sequences, batch = tiny_batch()
    model = SyNCRec(15, STARTS, sequences, num_hidden_layers=1, hidden_size=8, max_seq_length=6, expert_num=4)
    a, b = model.lrb_decay.weight.item(), model.lrb_gain.weight.item()
    delta = torch.tensor([0.5, -1.0, 2.0])
    omega = model.rebalance(delta)
    state = a * torch.full((3,), 1 / 3) + b * delta
    assert torch.allclose(model.lrb_state, state) and torch.allclose(omega, torch.softmax(state, 0))
    c, summary = torch.randn(2, 6, 8), torch.randn(2, 6, 8)
    x = torch.tensor([[0, 0, 1, 6, 2, 7], [1, 2, 3, 4, 5, 6]])
    y = torch.tensor([[0, 0, 6, 2, 7, 3], [2, 3, 4, 5, 6, 7]])
    torch.manual_seed(1)
    loss = model.mip_loss(c, summary, x, y)
    torch.manual_seed(1)
    other = x[torch.randperm(2)]
    W = model.mip
    p = torch.sigmoid((W(c) * summary).sum(-1))
    q = torch.sigmoid((W(c) * model.item_emb(other)).sum(-1))
    expected = (-torch.log(torch.sigmoid(p - q)) * (y != 0)).sum() / 12  # over all B L slots
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("corrected", [False, True])
def test_syncrec_trains_in_both_fidelities(corrected):
    torch.manual_seed(0)
    sequences, batch = tiny_batch()
    model = SyNCRec(15, STARTS, sequences, num_hidden_layers=1, hidden_size=8, max_seq_length=6, expert_num=4,
                    shared_modules=not corrected, gate_noise_at_eval=not corrected,
                    single_view_mask="own" if corrected else "mixed")
    assert len(model.experts) == (4 if corrected else 1) and len(model.gates) == (4 if corrected else 1)
    loss = model.loss(batch)
    loss.backward()
    assert torch.isfinite(loss) and model.item_emb.weight.grad.abs().sum() > 0
    if corrected:  # noise-free gates: evaluation is deterministic
        model.eval()
        assert torch.equal(model.scores(batch, (6, 11)), model.scores(batch, (6, 11)))


# --------------------------------------------------------------------------- per-domain selection


class Scripted(torch.nn.Module):
    """A model whose validation scores follow a script: `history[epoch][dom]` is the NDCG@1 it gets
    (a target ranked first with that probability, over rows given in a fixed order)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))


def test_per_domain_selection_on_a_hand_made_validation_history(tmp_path):
    """Each domain keeps its own best epoch; training stops once no domain improved for
    stopping_step evaluations; the checkpoint holds each domain's weights."""
    history = [{"dom1": 0.2, "dom2": 0.5}, {"dom1": 0.4, "dom2": 0.3}, {"dom1": 0.3, "dom2": 0.6},
               {"dom1": 0.3, "dom2": 0.5}, {"dom1": 0.1, "dom2": 0.2}, {"dom1": 0.9, "dom2": 0.9}]
    model = Scripted()
    rows = SequenceRows.from_lists(list(range(1, 11)), [[1, 2]] * 10)
    train = SequenceLoader(rows, 10, 4)
    epoch_of = {"n": 0}

    def scores(dom):
        def score(m, batch):
            # rows 0..k-1 rank the target first, the others last: HR@1 = NDCG@1 = k / 10
            k = round(history[epoch_of["n"]][dom] * 10)
            first = (torch.arange(len(batch.users)) < k).float()
            return torch.stack([first, 1 - first], dim=1)  # target is item 1 (column 0)
        return score

    rows_valid = SequenceRows.from_lists(list(range(1, 11)), [[2, 1]] * 10)
    valid = {dom: Evaluation(SequenceLoader(rows_valid, 10, 4), scores(dom), (1, 3)) for dom in ("dom1", "dom2")}

    def loss(m, batch):  # every step moves w by the same amount, so w tells the epoch
        return -m.w

    class Counting(SequenceLoader):
        def set_epoch(self, epoch):
            epoch_of["n"] = epoch
            super().set_epoch(epoch)

    train = Counting(rows, 10, 4)
    config = TrainConfig(epochs=6, learning_rate=0.1, stopping_step=2, topk=(1,), valid_metric="NDCG@1")
    result = fit(model, loss, train, config, checkpoint=tmp_path / "x.ckpt", meta={}, valid=valid, progress=False)
    # dom1 best at epoch 1 (0.4), dom2 at epoch 2 (0.6); epochs 3 and 4 improve neither: stop after 4
    assert result.best_epoch == {"dom1": 1, "dom2": 2} and result.epochs_run == 5
    saved = load_checkpoint(tmp_path / "x.ckpt")
    w = {dom: saved["domain_state_dicts"][dom]["w"].item() for dom in ("dom1", "dom2")}
    assert w["dom1"] < w["dom2"]  # the weights of two different epochs
    assert saved["valid_metrics"]["dom1"]["ndcg@1"] == pytest.approx(0.4)
    assert saved["valid_metrics"]["dom2"]["ndcg@1"] == pytest.approx(0.6)
    # on the mean instead: one epoch, the best mean (epoch 2: 0.45)
    model = Scripted()
    result = fit(model, loss, Counting(rows, 10, 4), config, checkpoint=tmp_path / "y.ckpt", meta={}, valid=valid,
                 select_on="mean", progress=False)
    assert result.best_epoch == 2 and "state_dict" in load_checkpoint(tmp_path / "y.ckpt")


def test_warm_up_epochs_are_neither_validated_nor_kept(tmp_path):
    model = Scripted()
    rows = SequenceRows.from_lists([1, 2], [[1, 2], [2, 1]])
    valid = Evaluation(SequenceLoader(rows, 2, 4), lambda m, b: torch.zeros(len(b.users), 2), (1, 3))
    config = TrainConfig(epochs=4, learning_rate=0.1, warmup_epochs=2, topk=(1,), valid_metric="NDCG@1")
    result = fit(model, lambda m, b: -m.w, SequenceLoader(rows, 2, 4), config, checkpoint=tmp_path / "w.ckpt",
                 meta={}, valid=valid, progress=False)
    assert [("valid" in r) for r in result.history] == [False, False, True, True]
    assert result.best_epoch == 2


# --------------------------------------------------------------------------- runs


def baseline_overrides(tmp_path, model, *extra) -> list[str]:
    # the tiny dataset and folders; debug=tiny is the pipeline's preset, so its keys that a baseline reads are spelled out
    shared = [o for o in tiny_overrides(tmp_path) if not o.startswith(("regenerated_dir", "debug="))]
    shared += ["logger.mode=disabled", "progress=false", "MAX_ITEM_LIST_LENGTH=64", "eval_batch_size=64"]
    small = {"ABXI": ["model.d_embed=16", "model.ffn=16", "model.n_attn=1", "model.rd=4", "model.ri=4",
                      "model.len_max=32", "trainer.baseline.warmup_epochs=1"],
             "CGRec": ["model.hidden_size=16", "model.num_hidden_layers=1", "model.max_seq_length=32"],
             "SyNCRec": ["model.hidden_size=16", "model.num_hidden_layers=1", "model.max_seq_length=32",
                         "model.expert_num=4"]}[model]
    return [f"model={model}", "trainer.baseline.epochs=2", *shared, *small, *extra]


def baseline_config(tmp_path, model, *extra):
    return stage_config("baseline", baseline_overrides(tmp_path, model, *extra))


@pytest.mark.parametrize("model, fidelity", [("ABXI", "official"), ("CGRec", "corrected"), ("SyNCRec", "official")])
def test_each_baseline_trains_and_tests_every_domain(tmp_path, model, fidelity):
    cfg = baseline_config(tmp_path, model, f"baseline_fidelity={fidelity}")
    metrics = run_baseline(cfg)
    assert metrics["model_name"] == model and metrics["fidelity"] == fidelity
    assert set(metrics["test"]) == set(metrics["valid"]) == {"dom1", "dom2", "dom3"}
    for values in metrics["test"].values():
        assert all(0.0 <= v <= 1.0 and math.isfinite(v) for v in values.values())
    # the effective choices are in the run's files
    run_metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert run_metrics["quirks"] == metrics["quirks"]
    assert all(f"{k}: {json.dumps(v).strip(chr(34))}" in (tmp_path / "run" / "config.yaml").read_text()
               for k, v in metrics["quirks"].items())
    # a finished run is reused, and nothing is written into the store (settings.json included)
    from tests.test_pretrain import store_state

    before = store_state(tmp_path / "checkpoint")
    assert run_baseline(baseline_config(tmp_path, model, f"baseline_fidelity={fidelity}"))["test"] == metrics["test"]
    assert store_state(tmp_path / "checkpoint") == before


def test_fidelity_switch_and_per_quirk_overrides(tmp_path):
    official = baseline_config(tmp_path, "CGRec")
    assert (official.model.loss_slot, official.model.shapley_pairing, official.model.extra_empty_slots) == (
        "input", "position", 1)
    corrected = baseline_config(tmp_path, "CGRec", "baseline_fidelity=corrected")
    assert (corrected.model.loss_slot, corrected.model.shapley_pairing, corrected.model.extra_empty_slots) == (
        "target", "marginal", 0)
    one = baseline_config(tmp_path, "CGRec", "model.loss_slot=target")  # one quirk alone
    assert (one.model.loss_slot, one.model.shapley_pairing) == ("target", "position")
    for model, key, official_value in (("ABXI", "eval_domain_stream", "positional"),
                                       ("SyNCRec", "shared_modules", True)):
        assert baseline_config(tmp_path, model).model[key] == official_value


@pytest.mark.parametrize("override, message", [
    ("model.n_attn=0", r"config key 'model\.n_attn' must be >= 1"),
    ("+model.n_atn=2", r"unknown config key 'model\.n_atn'; did you mean 'model\.n_attn'\?"),
    ("model.eval_domain_stream=last", r"config key 'model\.eval_domain_stream' is 'last'; expected one of "
                                      r"positional, compacted"),
    ("baseline_fidelity=exact", r"config key 'baseline_fidelity' is 'exact'; expected one of official, corrected"),
    ("select_on=max", r"config key 'select_on' is 'max'; expected one of each, mean"),
    ("trainer.baseline.warmup_epochs=-1", r"config key 'trainer\.baseline\.warmup_epochs' must be >= 0"),
])
def test_bad_keys_stop_with_the_key_named(tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        baseline_config(tmp_path, "ABXI", override)


def test_recomputing_activations_is_syncrecs_and_keys_no_artifact(tmp_path):
    from pipeline.artifacts import baseline_checkpoint

    with pytest.raises(ValueError, match="only SyNCRec has activations to recompute, not ABXI"):
        run_baseline(baseline_config(tmp_path, "ABXI", "recompute_activations=true"))
    plain = baseline_config(tmp_path, "SyNCRec")
    recomputing = baseline_config(tmp_path, "SyNCRec", "recompute_activations=true")
    assert baseline_checkpoint(plain) == baseline_checkpoint(recomputing)  # memory only: the same artifact


def test_sweep_configs_compose():
    for model in ("ABXI", "CGRec", "SyNCRec"):
        cfg = stage_config("baseline", [f"model={model}", f"search={model}"])
        assert cfg.model.name == model


def test_the_official_scripts_values_are_the_defaults():
    cfg = stage_config("baseline", ["model=ABXI"])
    assert (cfg.model.n_attn, cfg.model.rd, cfg.model.ri, cfg.trainer.baseline.learning_rate,
            cfg.trainer.baseline.warmup_epochs) == (3, 32, 32, 1e-4, 10)
    for model, experts in (("CGRec", None), ("SyNCRec", 8)):
        cfg = stage_config("baseline", [f"model={model}"])
        assert cfg.model.num_hidden_layers == 3 and cfg.trainer.baseline.learning_rate == 1e-4
        assert cfg.model.get("expert_num") == experts
    assert list(itertools.islice(coalitions(5), 3)) == [(1,), (2,), (3,)]


def test_abxi_evaluation_streams_of_both_fidelities():
    """positional (official): the domain stream reads its last slot, empty when the last history item
    is of another domain; compacted (corrected): the domain items moved to the end. They agree when
    the last item is in the domain and differ when it is not."""
    torch.manual_seed(0)
    kwargs = dict(n_attn=1, d_embed=8, ffn=8, rd=2, ri=2, n_neg=10, len_max=8, dropout=0.0)
    official = ABXI(15, STARTS, **kwargs).eval()
    corrected = ABXI(15, STARTS, **kwargs, eval_domain_stream="compacted").eval()
    corrected.load_state_dict(official.state_dict())
    ends_in_a = SequenceBatch(torch.tensor([1]), torch.tensor([[A1, B1, A2, A3]]), torch.tensor([4]))
    ends_in_b = SequenceBatch(torch.tensor([1]), torch.tensor([[A1, A2, B1, A3]]), torch.tensor([4]))
    with torch.no_grad():
        for model in (official, corrected):
            assert model.scores(ends_in_a, (1, 6)).shape == (1, 5)  # the domain's items only
        assert not torch.allclose(official.scores(ends_in_b, (1, 6)), corrected.scores(ends_in_b, (1, 6)))
        history = left_align(ends_in_a.items, ends_in_a.lengths - 1, official.width)
        assert compact(history, 1, 6)[0, -1] == history[0, -1]  # last item in the domain: same last slot


def test_torchrun_trains_a_baseline_data_parallel_and_tests_like_one_process(tmp_path):
    """Two gloo processes train CGRec (per-domain selection) data-parallel; rank 0 writes; every
    domain's test metrics and per-user ranks are one process's evaluation of the same weights."""
    import os
    import subprocess
    import sys

    from data.paths import PROJECT_ROOT

    overrides = baseline_overrides(tmp_path, "CGRec")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "cdsr_baseline/train.py", *overrides, f"hydra.run.dir={tmp_path}/hydra" + "${rank_suffix:}"],
                          cwd=PROJECT_ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (tmp_path / "hydra-rank1" / "metrics.json").exists()
    parallel = json.loads((tmp_path / "hydra" / "metrics.json").read_text())
    alone = run_baseline(stage_config("baseline", overrides))  # reuses the checkpoint the two wrote: it only evaluates
    assert torch.load(parallel["checkpoint"], weights_only=True)["epochs_run"] == 2
    assert alone["test_ranks"] == parallel["test_ranks"]
    for dom, values in alone["test"].items():
        for key, value in values.items():
            assert abs(value - parallel["test"][dom][key]) < 1e-12, (dom, key)
