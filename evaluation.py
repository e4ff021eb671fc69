"""Full-ranking evaluation and model selection: a model's HR, NDCG and MRR at every cut-off over an
evaluation split (sharded over the ranks under torchrun), and which weights a training keeps (the
best validated epoch, overall or for each domain). trainer.py trains with them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from core.distributed import all_gather, data_parallel
from data import SequenceBatch, SequenceLoader
from model.metrics import KS, RankingAccumulator, rank_of_target

ScoreFn = Callable[[nn.Module, SequenceBatch], torch.Tensor]
METRICS = ("hr", "ndcg", "mrr")
# Names RecBole and the official configs use for the same metrics.
_ALIASES = {"hit": "hr", "hr": "hr", "ndcg": "ndcg", "mrr": "mrr"}


def metric_key(name: str) -> str:
    """`NDCG@10`, `Hit@5`, `mrr@20` -> the trainer's key (`ndcg@10`, `hr@5`, `mrr@20`)."""
    metric, _, k = str(name).lower().partition("@")
    if metric not in _ALIASES or not k.isdigit() or int(k) < 1:
        raise ValueError(f"unknown metric {name!r}: expected HR@k, Hit@k, NDCG@k or MRR@k with k >= 1")
    return f"{_ALIASES[metric]}@{int(k)}"


@dataclass
class Evaluation:
    """Full ranking of each row's target among the candidates `item_range` (half-open ids)."""

    loader: SequenceLoader
    scores: ScoreFn  # (model, batch) -> (B, hi - lo) scores; column j is item lo + j
    item_range: tuple[int, int]


@torch.no_grad()
def evaluate(model: nn.Module, evaluation: Evaluation, topk=KS, device=None, enable_amp=False, progress=False,
             ranks: dict | None = None):
    """HR, NDCG and MRR at every k of `topk`, averaged over the rows of the evaluation loader.

    `ranks`, when given, receives every row's user and 0-based rank (`{"users": [...], "ranks": [...]}`),
    the per-user values that paired comparisons between models resample.
    """
    device = device or next(model.parameters()).device
    lo, hi = evaluation.item_range
    was_training = model.training
    model.eval()
    accumulator = RankingAccumulator(tuple(topk))
    users, row_ranks = [], []
    # Under torchrun each rank ranks a contiguous share of the batches; the sums are then added up
    # (and the per-row ranks joined in rank order, i.e. in loader order): one process's metrics.
    world = data_parallel()
    mine = world.shard(len(evaluation.loader)) if world else range(len(evaluation.loader))
    for at, batch in enumerate(tqdm(evaluation.loader, desc="evaluating", leave=False, disable=not progress)):
        if at not in mine:
            continue
        batch = batch.to(device)
        targets = batch.targets
        if targets.min() < lo or targets.max() >= hi:
            raise ValueError(f"a target item lies outside the candidate items [{lo}, {hi})")
        with autocast(device, enable_amp):
            scores = evaluation.scores(model, batch)
        rank = rank_of_target(scores.float(), targets - lo)
        accumulator.update(rank)
        if ranks is not None:
            users.append(batch.users.cpu())
            row_ranks.append(rank.cpu())
    model.train(was_training)
    if world:
        if accumulator.count == 0:  # more ranks than batches: this rank's totals are zeros
            accumulator.update(torch.zeros(0, dtype=torch.long, device=device))
        accumulator.all_reduce()
    if ranks is not None:
        mine_users = torch.cat(users).tolist() if users else []
        mine_ranks = torch.cat(row_ranks).tolist() if row_ranks else []
        if world:
            every = all_gather(world, (mine_users, mine_ranks))
            mine_users = [u for part, _ in every for u in part]
            mine_ranks = [r for _, part in every for r in part]
        ranks["users"], ranks["ranks"] = mine_users, mine_ranks
    return accumulator.compute()


class Selection:
    """Which weights `fit` keeps: the best validated epoch, overall or for each domain.

    The best weights live in the trainer state (and so in the resume file) as plain tensors. Per
    domain, epochs that are best for several domains are stored once (`states`, by epoch).
    """

    def __init__(self, valid, select_on: str, valid_key: str):
        self.valid, self.select_on, self.valid_key = valid, select_on, valid_key
        self.per_domain = isinstance(valid, dict) and select_on == "each"

    def empty(self) -> dict:
        if self.per_domain:
            return {"score": {}, "epoch": {}, "metrics": {}, "states": {}}
        return {"score": -math.inf, "epoch": -1, "metrics": {}, "state_dict": None}

    def evaluate(self, model, config, device) -> dict:
        if isinstance(self.valid, dict):
            return {dom: evaluate(model, e, config.topk, device, config.enable_amp) for dom, e in self.valid.items()}
        return evaluate(model, self.valid, config.topk, device, config.enable_amp)

    def score(self, metrics: dict) -> float:
        if isinstance(self.valid, dict):  # select_on=mean
            return sum(m[self.valid_key] for m in metrics.values()) / len(metrics)
        return metrics[self.valid_key]

    def update(self, best: dict, epoch: int, metrics: dict, model) -> bool:
        """Record this epoch where it is the best so far; returns whether anything improved."""
        if not self.per_domain:
            if self.score(metrics) <= best["score"]:
                return False
            best.update(score=self.score(metrics), epoch=epoch, metrics=metrics, state_dict=cpu_copy(model.state_dict()))
            return True
        improved = [dom for dom, m in metrics.items() if m[self.valid_key] > best["score"].get(dom, -math.inf)]
        for dom in improved:
            best["score"][dom], best["epoch"][dom], best["metrics"][dom] = metrics[dom][self.valid_key], epoch, metrics[dom]
        if improved:
            best["states"][epoch] = cpu_copy(model.state_dict())
            # an epoch no domain keeps any more is dropped
            best["states"] = {e: sd for e, sd in best["states"].items() if e in best["epoch"].values()}
        return bool(improved)

    def describe(self, metrics: dict, best: dict) -> str:
        if self.per_domain:
            return ", ".join(f"{dom} {m[self.valid_key]:.4f} (best {best['score'][dom]:.4f} at epoch "
                             f"{best['epoch'][dom]})" for dom, m in metrics.items())
        return f"{self.valid_key} {self.score(metrics):.4f} (best {best['score']:.4f} at epoch {best['epoch']})"

    def kept(self, state: dict, model, keep: str) -> tuple[dict, dict, int | dict]:
        """(checkpoint tensors, their validation metrics, their epoch(s)); loads the kept weights into
        `model` when there is one set of them."""
        best = state["best"]
        validated = [r["valid"] for r in state["history"] if "valid" in r]
        if self.per_domain:
            if keep == "best" and best["epoch"]:
                return ({"domain_state_dicts": {dom: best["states"][e] for dom, e in best["epoch"].items()}},
                        best["metrics"], dict(best["epoch"]))
            last = state["epoch"] - 1
            weights = cpu_copy(model.state_dict())
            metrics = validated[-1] if validated else {}
            return ({"domain_state_dicts": {dom: weights for dom in self.valid}}, metrics,
                    {dom: last for dom in self.valid})
        if keep == "best" and best["state_dict"] is not None:
            model.load_state_dict(best["state_dict"])
            return {"state_dict": cpu_copy(model.state_dict())}, best["metrics"], best["epoch"]
        return ({"state_dict": cpu_copy(model.state_dict())}, validated[-1] if validated else {},
                state["epoch"] - 1)


def cpu_copy(state_dict: dict) -> dict:
    """A detached copy of every tensor on the CPU (what a checkpoint or the trainer state keeps)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in state_dict.items()}


def autocast(device: torch.device, enabled: bool):
    """bfloat16 autocast on CUDA when enabled; nothing elsewhere."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")
