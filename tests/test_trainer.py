"""The training loop: metric names, evaluation, checkpoints, resume and determinism."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from checkpoints import load_checkpoint, lock_file, resume_file
from core.errors import CheckpointError
from data import SequenceLoader, SequenceRows
from data.files import BusyError, exclusive_lock
from evaluation import Evaluation, evaluate, metric_key
from model.decoder import DecoderConfig, TaesarDecoder
from model.objectives import next_item_objective, target_scores
from trainer import TrainConfig, fit

N_ITEMS = 12


def toy_rows(n_rows=40, seed=0) -> SequenceRows:
    rng = np.random.default_rng(seed)
    # Item i tends to be followed by i + 1: something learnable in a few epochs.
    sequences = []
    for _ in range(n_rows):
        start = rng.integers(1, N_ITEMS)
        length = rng.integers(3, 9)
        sequences.append([(start + j - 1) % N_ITEMS + 1 for j in range(length)])
    return SequenceRows.from_lists(range(1, n_rows + 1), sequences)


def toy_setup(seed=0):
    torch.manual_seed(seed)
    model = TaesarDecoder(DecoderConfig(n_items=N_ITEMS, max_len=10, hidden_size=16, inner_size=16))
    train = SequenceLoader(toy_rows(), batch_size=8, max_len=10, shuffle=True, seed=seed)
    valid = Evaluation(SequenceLoader(toy_rows(20, seed=1), 64, 10), target_scores(), (1, N_ITEMS + 1))
    return model, train, valid


def test_metric_names():
    assert metric_key("NDCG@10") == "ndcg@10" and metric_key("Hit@5") == "hr@5" and metric_key("mrr@20") == "mrr@20"
    with pytest.raises(ValueError, match="unknown metric 'AUC@10'"):
        metric_key("AUC@10")


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"epochs": -1}, "config key 'epochs' must be >= 1, got -1"),
        ({"epochs": 0}, "config key 'epochs' must be >= 1, got 0"),  # would write an untrained "finished" model
        ({"batch_size": 0}, "config key 'batch_size' must be >= 1"),
        ({"topk": (0, 10)}, "config key 'topk' must list positive cut-offs"),
        ({"topk": ()}, "config key 'topk' must list positive cut-offs"),
        ({"valid_metric": "NDCG@7"}, r"config key 'valid_metric' \(NDCG@7\) needs its cut-off in topk"),
        ({"learning_rate": 0.0}, "config key 'learning_rate' must be > 0"),
        ({"keep": "first"}, "config key 'keep' must be best or last"),
    ],
)
def test_impossible_training_settings(changes, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{"epochs": 1, "learning_rate": 1e-3, **changes})


class FixedScores(torch.nn.Module):
    """Scores that do not depend on the input: every row ranks items by this vector."""

    def __init__(self, scores):
        super().__init__()
        self.scores = torch.nn.Parameter(torch.tensor(scores))


def test_evaluate_against_hand_computed_metrics():
    model = FixedScores([0.5, 0.9, 0.1, 0.7])  # items 1..4; ranking 2, 4, 1, 3
    rows = SequenceRows.from_lists([1, 2, 3], [[1, 2], [3, 1], [2, 3]])  # targets 2, 1, 3 -> ranks 0, 2, 3
    evaluation = Evaluation(SequenceLoader(rows, 2, 5), lambda m, b: m.scores.expand(len(b.users), -1), (1, 5))
    metrics = evaluate(model, evaluation, topk=(1, 3))
    assert metrics["hr@1"] == pytest.approx(1 / 3)
    assert metrics["hr@3"] == pytest.approx(2 / 3)
    assert metrics["mrr@3"] == pytest.approx((1 + 1 / 3) / 3)
    assert metrics["ndcg@3"] == pytest.approx((1 + 1 / np.log2(4)) / 3)


def test_fit_learns_and_writes_a_weights_only_checkpoint(tmp_path):
    model, train, valid = toy_setup()
    config = TrainConfig(epochs=6, learning_rate=1e-2, stopping_step=3, topk=(1, 5, 10), valid_metric="NDCG@5")
    before = evaluate(model, valid, config.topk)
    result = fit(model, next_item_objective(), train, config, checkpoint=tmp_path / "m.ckpt",
                 meta={"dataset": "toy"}, valid=valid, progress=False)
    assert result.valid_metrics["ndcg@5"] > before["ndcg@5"] + 0.2
    saved = torch.load(tmp_path / "m.ckpt", weights_only=True)  # plain data and tensors only
    assert saved["meta"] == {"dataset": "toy"} and saved["valid_metrics"] == result.valid_metrics
    restored = TaesarDecoder(model.config)
    restored.load_state_dict(saved["state_dict"])
    assert evaluate(restored, valid, config.topk) == pytest.approx(result.valid_metrics)
    assert not resume_file(tmp_path / "m.ckpt").exists()


def test_resumed_run_ends_with_the_same_weights(tmp_path, caplog):
    config = TrainConfig(epochs=5, learning_rate=1e-2, stopping_step=0, topk=(5, 10), keep="last")
    model, train, valid = toy_setup()
    fit(model, next_item_objective(), train, config, checkpoint=tmp_path / "a.ckpt", meta={}, valid=valid,
        progress=False)

    calls = {"n": 0}

    def dies_in_epoch_four(m, batch):
        calls["n"] += 1
        if calls["n"] == 3 * len(train) + 2:
            raise KeyboardInterrupt  # killed half-way through the fourth epoch
        return next_item_objective()(m, batch)

    model_b, train_b, valid_b = toy_setup()
    with pytest.raises(KeyboardInterrupt):
        fit(model_b, dies_in_epoch_four, train_b, config, checkpoint=tmp_path / "b.ckpt", meta={}, valid=valid_b,
            progress=False)
    assert load_checkpoint(resume_file(tmp_path / "b.ckpt"))["trainer"]["epoch"] == 3
    torch.manual_seed(123)  # whatever the new process does to the RNG, the saved state is restored
    model_c, train_c, valid_c = toy_setup(seed=0)
    model_c.load_state_dict(TaesarDecoder(model.config).state_dict())  # fresh weights: all come from the resume state
    with caplog.at_level(logging.INFO, logger="trainer"):
        result = fit(model_c, next_item_objective(), train_c, config, checkpoint=tmp_path / "b.ckpt", meta={},
                     valid=valid_c, progress=False, log_prefix="full")
    assert f"full: resuming from {resume_file(tmp_path / 'b.ckpt')} after epoch 2" in caplog.text  # epochs 0-2 done
    assert result.epochs_run == 5
    a, b = load_checkpoint(tmp_path / "a.ckpt"), load_checkpoint(tmp_path / "b.ckpt")
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    assert a["history"][-1]["train_loss"] == b["history"][-1]["train_loss"]


def test_a_time_limit_pauses_at_an_epoch_end_and_the_same_call_continues_exactly(tmp_path, monkeypatch, capsys):
    """TAESAR_TIME_LIMIT=0: every call trains one epoch and pauses with its resume file (the command's
    exit says `paused:` with code 75); calls again until done end with the uninterrupted run's weights."""
    from pipeline.runs import user_errors
    from core.schema import ConfigError
    from trainer import PAUSED_EXIT_CODE, TrainingPaused, resumed_seconds, time_limit_minutes

    config = TrainConfig(epochs=3, learning_rate=1e-2, stopping_step=0, topk=(5, 10), keep="last")
    model, train, valid = toy_setup()
    fit(model, next_item_objective(), train, config, checkpoint=tmp_path / "a.ckpt", meta={}, valid=valid,
        progress=False)
    monkeypatch.setenv("TAESAR_TIME_LIMIT", "0")
    elapsed = [0.0]  # the resume file's wall time of the pieces so far
    for epochs_done in (1, 2):
        model_b, train_b, valid_b = toy_setup()
        tally = resumed_seconds()
        with pytest.raises(TrainingPaused, match=f"paused after epoch {epochs_done - 1} of at most 3"):
            fit(model_b, next_item_objective(), train_b, config, checkpoint=tmp_path / "b.ckpt", meta={},
                valid=valid_b, progress=False)
        resumed = load_checkpoint(resume_file(tmp_path / "b.ckpt"))
        assert resumed["trainer"]["epoch"] == epochs_done
        assert not (tmp_path / "b.ckpt").exists()
        # what the pieces before this one ran is added to the process's tally when this one resumes
        assert resumed_seconds() - tally == pytest.approx(elapsed[-1])
        assert resumed["elapsed_seconds"] > elapsed[-1]
        elapsed.append(resumed["elapsed_seconds"])
    model_b, train_b, valid_b = toy_setup()
    tally = resumed_seconds()
    result = fit(model_b, next_item_objective(), train_b, config, checkpoint=tmp_path / "b.ckpt", meta={},
                 valid=valid_b, progress=False)  # the last epoch never pauses
    assert result.epochs_run == 3 and not resume_file(tmp_path / "b.ckpt").exists()
    assert resumed_seconds() - tally == pytest.approx(elapsed[-1])
    a, b = load_checkpoint(tmp_path / "a.ckpt"), load_checkpoint(tmp_path / "b.ckpt")
    assert "elapsed_seconds" not in b and set(a) == set(b)  # the checkpoint itself holds no timings
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    with pytest.raises(SystemExit) as stopped, user_errors():
        raise TrainingPaused("paused after epoch 4")
    assert stopped.value.code == PAUSED_EXIT_CODE and "paused: paused after epoch 4" in capsys.readouterr().err
    monkeypatch.setenv("TAESAR_TIME_LIMIT", "soon")
    with pytest.raises(ConfigError, match="TAESAR_TIME_LIMIT='soon': expected minutes"):
        time_limit_minutes()


def test_a_second_job_of_the_same_checkpoint_stops_while_the_first_trains(tmp_path):
    config = TrainConfig(epochs=2, learning_rate=1e-2, stopping_step=0, topk=(5, 10))
    model, train, valid = toy_setup()
    checkpoint = tmp_path / "m.ckpt"
    # flock locks belong to open files, so a second open in this process stands for another job
    with exclusive_lock(lock_file(checkpoint)):
        with pytest.raises(BusyError, match=r"\.m\.ckpt\.lock: held by another process \(another job is training "
                                            r"m\.ckpt now; run this one again once it is done"):
            fit(model, next_item_objective(), train, config, checkpoint=checkpoint, meta={}, valid=valid,
                progress=False)
        assert not checkpoint.exists() and not resume_file(checkpoint).exists()  # nothing written
    fit(model, next_item_objective(), train, config, checkpoint=checkpoint, meta={}, valid=valid, progress=False)
    assert checkpoint.is_file()
    with exclusive_lock(lock_file(checkpoint), wait=False):  # released when the training ended
        pass


def test_resume_refuses_a_state_of_other_data(tmp_path):
    config = TrainConfig(epochs=3, learning_rate=1e-2, topk=(5, 10))
    model, train, valid = toy_setup()
    seen = {"batches": 0}

    def dies_in_epoch_two(m, batch):
        seen["batches"] += 1
        if seen["batches"] > len(train):
            raise KeyboardInterrupt
        return next_item_objective()(m, batch)

    with pytest.raises(KeyboardInterrupt):
        fit(model, dies_in_epoch_two, train, config, checkpoint=tmp_path / "x.ckpt", meta={"dataset": "toy"},
            progress=False)
    assert resume_file(tmp_path / "x.ckpt").is_file()
    with pytest.raises(ValueError, match=r"checkpoint dataset is 'toy' but this run expects 'other'"):
        fit(model, next_item_objective(), train, config, checkpoint=tmp_path / "x.ckpt", meta={"dataset": "other"},
            progress=False)


def test_same_seed_same_result(tmp_path):
    config = TrainConfig(epochs=3, learning_rate=1e-2, topk=(5, 10))
    results = []
    for run in ("a", "b"):
        model, train, valid = toy_setup(seed=7)
        results.append(fit(model, next_item_objective(), train, config, checkpoint=tmp_path / f"{run}.ckpt",
                           meta={}, valid=valid, progress=False))
    assert results[0].valid_metrics == results[1].valid_metrics
    assert [r["train_loss"] for r in results[0].history] == [r["train_loss"] for r in results[1].history]


def test_a_truncated_checkpoint_is_named_and_called_corrupt(tmp_path):
    config = TrainConfig(epochs=1, learning_rate=1e-2, topk=(5, 10))
    model, train, valid = toy_setup()
    fit(model, next_item_objective(), train, config, checkpoint=tmp_path / "a.ckpt", meta={}, progress=False)
    data = (tmp_path / "a.ckpt").read_bytes()
    (tmp_path / "a.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"a\.ckpt: corrupt or truncated checkpoint, not loaded .*"
                                              r"train it again with overwrite=true"):
        load_checkpoint(tmp_path / "a.ckpt")
    (tmp_path / "a.ckpt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"a\.ckpt: corrupt or truncated checkpoint"):
        load_checkpoint(tmp_path / "a.ckpt")


class NotPlainData:
    pass


def test_a_pickled_checkpoint_is_refused_as_unsafe(tmp_path):
    torch.save({"state_dict": {}, "extra": NotPlainData()}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(tmp_path / "evil.ckpt")
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'evil.ckpt'}: unsafe checkpoint, not loaded")
    assert "NotPlainData" in message and "overwrite=true" in message
    assert "weights_only=False" not in message and "weights_only" not in message
