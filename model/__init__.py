"""Taesar's decoder, its Stage I losses and the full-ranking metrics."""

from model.decoder import DecoderConfig, TaesarDecoder, gather_states, target_states
from model.losses import domain_specific_loss, next_item_loss
from model.metrics import RankingAccumulator, rank_of_target, ranking_metrics

__all__ = [
    "DecoderConfig",
    "TaesarDecoder",
    "gather_states",
    "target_states",
    "next_item_loss",
    "domain_specific_loss",
    "RankingAccumulator",
    "rank_of_target",
    "ranking_metrics",
]
