import math

import numpy as np
import pytest
import torch
from recbole.evaluator.metrics import MRR, NDCG, Hit

from model.metrics import RankingAccumulator, rank_of_target, ranking_metrics


def test_rank_by_hand():
    scores = torch.tensor(
        [
            [0.1, 0.9, 0.3, 0.7, 0.5],
            [0.1, 0.9, 0.3, 0.7, 0.5],
            [0.1, 0.9, 0.3, 0.7, 0.5],
        ]
    )
    assert rank_of_target(scores, torch.tensor([1, 4, 0])).tolist() == [0, 2, 4]


def test_ties_go_in_the_targets_favour():
    scores = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0], [0.2, 0.5, 0.5, 0.5, 0.1], [0.2, 0.5, 0.5, 0.5, 0.1]])
    # docs/method.md, Stage III: rank = 1 + |{v : f(v) > f(y)}| (0-based here)
    assert rank_of_target(scores, torch.tensor([3, 2, 4])).tolist() == [0, 0, 4]


def test_invariants_of_the_protocol():
    """Rank 1 scores 1 everywhere, rank 3 gives NDCG@5 = 0.5 and MRR@5 = 1/3,
    rank 11 scores 0 at cut-off 10."""
    metrics = ranking_metrics(torch.tensor([0, 2, 10]), ks=(5, 10, 20))
    for k in (5, 10, 20):
        assert metrics[f"hr@{k}"][0] == metrics[f"ndcg@{k}"][0] == metrics[f"mrr@{k}"][0] == 1
    torch.testing.assert_close(metrics["ndcg@5"][1], torch.tensor(0.5))
    torch.testing.assert_close(metrics["mrr@5"][1], torch.tensor(1 / 3))
    assert metrics["hr@10"][2] == metrics["ndcg@10"][2] == metrics["mrr@10"][2] == 0 < metrics["hr@20"][2]


def test_metrics_by_hand():
    metrics = ranking_metrics(torch.tensor([0, 2, 4]), ks=(1, 3))
    assert metrics["hr@1"].tolist() == [1, 0, 0]
    assert metrics["hr@3"].tolist() == [1, 1, 0]
    torch.testing.assert_close(metrics["ndcg@3"], torch.tensor([1.0, 1 / math.log2(4), 0.0]))
    torch.testing.assert_close(metrics["mrr@3"], torch.tensor([1.0, 1 / 3, 0.0]))
    torch.testing.assert_close(metrics["mrr@1"], torch.tensor([1.0, 0.0, 0.0]))


def test_accumulator_means_over_batches():
    accumulator = RankingAccumulator(ks=(3,))
    accumulator.update(torch.tensor([0, 2]))
    accumulator.update(torch.tensor([4]))
    result = accumulator.compute()
    assert set(result) == {"hr@3", "ndcg@3", "mrr@3"}
    assert result["hr@3"] == pytest.approx(2 / 3)
    assert result["ndcg@3"] == pytest.approx((1 + 1 / math.log2(4)) / 3)
    assert result["mrr@3"] == pytest.approx((1 + 1 / 3) / 3)
    assert all(isinstance(v, float) for v in result.values())


def test_empty_accumulator_raises():
    with pytest.raises(ValueError):
        RankingAccumulator().compute()


def test_agrees_with_recbole(monkeypatch):
    # RecBole 1.2.1's metrics use np.float, gone since numpy 1.24; its Config restores the alias
    monkeypatch.setattr(np, "float", float, raising=False)
    ks = (5, 10, 20, 50, 100)
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(300, 400, generator=g)  # continuous scores: no ties
    target = torch.randint(0, 400, (300,), generator=g)
    # the trainer's full-sort path (recbole/evaluator/collector.py): a top-k hit matrix
    _, topk = torch.topk(scores, max(ks), dim=-1)
    pos_index = (topk == target[:, None]).numpy()
    pos_len = np.ones(len(target), dtype=int)
    reference = {"hr": Hit.metric_info(None, pos_index), "mrr": MRR.metric_info(None, pos_index)}
    reference["ndcg"] = NDCG.metric_info(None, pos_index, pos_len)

    accumulator = RankingAccumulator(ks)
    for rows in torch.arange(300).split(128):
        accumulator.update(rank_of_target(scores[rows], target[rows]))
    result = accumulator.compute()
    per_row = ranking_metrics(rank_of_target(scores, target), ks)
    for name, values in reference.items():
        for k in ks:
            np.testing.assert_allclose(per_row[f"{name}@{k}"].numpy(), values[:, k - 1], atol=1e-6)
            assert result[f"{name}@{k}"] == pytest.approx(values[:, k - 1].mean(), abs=1e-9)
    assert 0 < result["hr@10"] < result["hr@100"] < 1
