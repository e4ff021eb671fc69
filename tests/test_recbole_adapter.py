"""RecBole models read our batches through the adapter with the contract's item ids."""
from __future__ import annotations

import torch

from backbones.recbole_adapter import ITEM, ITEM_SEQ, ITEM_SEQ_LEN, to_interaction
from data import SequenceLoader, SequenceRows
from model.decoder import TaesarDecoder
from model.objectives import target_scores
from tests.test_decoder import CONFIG, from_recbole, recbole_sasrec


def test_to_interaction_splits_history_and_target():
    rows = SequenceRows.from_lists([1, 2], [[5, 6, 7], [8, 9]])
    batch = next(iter(SequenceLoader(rows, 2, 10)))
    inter = to_interaction(batch)
    assert inter[ITEM_SEQ].tolist() == [[5, 6], [8, 0]]
    assert inter[ITEM_SEQ_LEN].tolist() == [2, 1] and inter[ITEM].tolist() == [7, 9]


def test_recbole_sasrec_on_our_batches_scores_like_the_decoder():
    torch.manual_seed(0)
    reference = recbole_sasrec(CONFIG).eval()
    decoder = TaesarDecoder(CONFIG).eval()
    decoder.load_state_dict(from_recbole(reference.state_dict(), CONFIG.n_layers))
    rows = SequenceRows.from_lists(range(1, 5), [[3, 1, 4], [1, 5, 9, 2, 6], [5, 3], [30, 29, 28, 1]])
    batch = next(iter(SequenceLoader(rows, 4, CONFIG.max_len)))
    with torch.no_grad():
        theirs = reference.full_sort_predict(to_interaction(batch))[:, 1:]  # column 0 is padding
        ours = target_scores()(decoder, batch)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_importing_recbole_models_leaves_anomaly_detection_off():
    """RecBole's SINE module turns autograd anomaly detection on at import (a 2-4x slower backward for
    every model of the process); the adapter, which every RecBole import here goes through, turns it off."""
    import recbole.model.sequential_recommender.sine  # noqa: F401

    import backbones.recbole_adapter  # noqa: F401

    assert not torch.is_anomaly_enabled()
