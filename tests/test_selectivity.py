"""The selectivity probe: where the target expert's own arg-max lies at the positions decoding decides."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from analysis.selectivity import expert_argmax_in_target
from model.decoder import DecoderConfig, TaesarDecoder


@pytest.mark.parametrize("target", [1, 2, 4])  # R_T at the start, in the middle and at the end of the ids
def test_counts_match_a_position_by_position_arg_max(acdt_dataset, target):
    domains = acdt_dataset.domains
    rows = acdt_dataset.rows("full.train").take(np.arange(12))
    torch.manual_seed(target)
    expert = TaesarDecoder(DecoderConfig(n_items=domains.n_items, max_len=32, hidden_size=16, inner_size=16))
    with torch.no_grad():  # a sharper random model, so that both outcomes occur
        expert.item_emb.weight.mul_(40)
    counts = expert_argmax_in_target(expert, rows, domains, target, max_len=32, batch_size=5)

    lo, hi = domains.range(target)
    expected = {name: {"positions": 0, "in_target": 0} for i, name in enumerate(domains.names) if i + 1 != target}
    expert.eval()
    with torch.no_grad():
        for r in range(len(rows)):
            window = torch.from_numpy(rows.sequence(r)[-32:])
            scores = expert.logits(expert.encode(window[None]))[0]  # (L, N), column j is item j + 1
            for t in range(len(window) - 1):
                source = int(domains.domain_of(np.array([int(window[t + 1])]))[0])
                if source == target:
                    continue
                name = domains.names[source - 1]
                expected[name]["positions"] += 1
                expected[name]["in_target"] += int(lo <= int(scores[t].argmax()) + 1 < hi)
    assert counts == expected
    shares = [c["in_target"] / c["positions"] for c in counts.values()]
    assert any(0 < s < 1 for s in shares)  # the case is not trivial
