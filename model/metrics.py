"""Full-ranking metrics (HR, NDCG, MRR at k) over one held-out target item per row."""

import torch

KS = (5, 10, 20, 50, 100)


def rank_of_target(scores: torch.Tensor, target_index: torch.Tensor) -> torch.Tensor:
    """(B, C) candidate scores, (B,) column of the target -> (B,) 0-based rank of the target.

    The rank counts the candidates scored strictly higher than the target: ties go in the
    target's favour, the deterministic rule of the project's protocol (docs/method.md, Stage III).
    The official code reads a top-100 list from `torch.topk`, whose order among
    ties is unspecified; with the float scores of a trained model ties are rare and the two agree.
    """
    target = scores.gather(1, target_index[:, None])  # (B, 1)
    return (scores > target).sum(1)


def ranking_metrics(ranks: torch.Tensor, ks: tuple[int, ...] = KS) -> dict[str, torch.Tensor]:
    """(B,) 0-based ranks -> {'hr@k', 'ndcg@k', 'mrr@k': (B,) per-row values} for every k.

    With a single relevant item the ideal DCG is 1, so NDCG@k is 1 / log2(rank + 2) inside the top k.
    """
    ranks = ranks.float()
    ndcg = 1.0 / torch.log2(ranks + 2.0)
    mrr = 1.0 / (ranks + 1.0)
    metrics = {}
    for k in ks:
        hit = (ranks < k).float()
        metrics[f"hr@{k}"] = hit
        metrics[f"ndcg@{k}"] = hit * ndcg
        metrics[f"mrr@{k}"] = hit * mrr
    return metrics


class RankingAccumulator:
    """Sums per-row ranking metrics over batches; `compute` gives their means as floats."""

    def __init__(self, ks: tuple[int, ...] = KS):
        self.ks = tuple(ks)
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def update(self, ranks: torch.Tensor):
        for key, values in ranking_metrics(ranks, self.ks).items():
            # summed in float64 on the ranks' device: no sync per batch, no drift over many rows
            total = values.double().sum()
            self.sums[key] = self.sums[key] + total if key in self.sums else total
        self.count += ranks.numel()

    def all_reduce(self) -> None:
        """Sum every rank's totals (torch.distributed), so that `compute` is over all ranks' rows."""
        import torch.distributed as dist

        for key in sorted(self.sums):
            dist.all_reduce(self.sums[key])
        count = torch.tensor(float(self.count), dtype=torch.float64, device=next(iter(self.sums.values())).device)
        dist.all_reduce(count)
        self.count = int(count.item())

    def compute(self) -> dict[str, float]:
        if self.count == 0:
            raise ValueError("no ranks were accumulated")
        return {key: total.item() / self.count for key, total in self.sums.items()}
