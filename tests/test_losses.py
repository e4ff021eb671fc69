import torch
import torch.nn.functional as F

from model.decoder import DecoderConfig, TaesarDecoder
from model.losses import domain_specific_loss, domain_specific_targets, next_item_loss, next_item_targets

A, B = (1, 5), (5, 9)  # items 1..4 and 5..8
# one mixed row and one shorter, right-padded row
ITEMS = torch.tensor(
    [
        [1, 5, 2, 6, 7, 3],
        [6, 2, 5, 0, 0, 0],
    ]
)


def make_decoder() -> TaesarDecoder:
    torch.manual_seed(0)
    return TaesarDecoder(DecoderConfig(n_items=8, max_len=8, hidden_size=16, inner_size=16)).eval()


def as_pairs(mask: torch.Tensor, targets: torch.Tensor) -> list[tuple[int, int, int]]:
    """(row, position, target item) for every predicting position."""
    return [(b, t, int(targets[b, t])) for b, t in mask.nonzero().tolist()]


def test_domain_specific_targets_by_hand():
    mask, targets = domain_specific_targets(ITEMS, A)
    # row 0: A items 1, 2, 3 sit at 0, 2, 5; row 1: only one A item (2), so nothing to predict
    assert as_pairs(mask, targets) == [(0, 0, 2), (0, 2, 3)]
    mask, targets = domain_specific_targets(ITEMS, B)
    # row 0: B items 5, 6, 7 at 1, 3, 4; row 1: 6 at 0 skips over item 2 to predict 5 at 2
    assert as_pairs(mask, targets) == [(0, 1, 6), (0, 3, 7), (1, 0, 5)]
    assert torch.all(targets[~mask] == 0)


def test_domain_specific_targets_last_position_and_empty_domain():
    items = torch.tensor([[5, 1, 6]])  # the last item of a full row is in the domain
    mask, targets = domain_specific_targets(items, B)
    assert as_pairs(mask, targets) == [(0, 0, 6)]
    mask, _ = domain_specific_targets(torch.tensor([[1, 2, 0]]), B)
    assert not mask.any()


def test_domain_specific_targets_match_a_loop():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(0, 13, (50,), generator=g)
    items = torch.randint(1, 9, (50, 12), generator=g) * (torch.arange(12) < lengths[:, None])
    expected = []
    for b, row in enumerate(items.tolist()):
        in_b = [t for t, item in enumerate(row) if B[0] <= item < B[1]]
        expected += [(b, t, row[u]) for t, u in zip(in_b, in_b[1:])]
    assert as_pairs(*domain_specific_targets(items, B)) == expected


def test_next_item_targets_by_hand():
    mask, targets = next_item_targets(ITEMS)
    assert as_pairs(mask, targets) == [
        (0, 0, 5), (0, 1, 2), (0, 2, 6), (0, 3, 7), (0, 4, 3),
        (1, 0, 2), (1, 1, 5),
    ]
    mask, targets = next_item_targets(ITEMS, B)
    assert as_pairs(mask, targets) == [(0, 0, 5), (0, 2, 6), (0, 3, 7), (1, 1, 5)]


def test_domain_specific_loss_by_hand():
    decoder = make_decoder()
    with torch.no_grad():
        hidden = decoder.encode(ITEMS)
    embedding = decoder.item_emb.weight
    terms = []
    for b, t, target in [(0, 1, 6), (0, 3, 7), (1, 0, 5)]:
        log_p = torch.log_softmax(hidden[b, t] @ embedding[B[0] : B[1]].T, dim=0)
        terms.append(-log_p[target - B[0]])
    expected = torch.stack(terms).mean()
    torch.testing.assert_close(domain_specific_loss(decoder, hidden, ITEMS, B), expected)


def test_next_item_loss_equals_naive_cross_entropy():
    decoder = make_decoder()
    items = torch.tensor([[3, 1, 8, 2, 7], [4, 6, 0, 0, 0], [2, 5, 5, 1, 0]])
    with torch.no_grad():
        hidden = decoder.encode(items)
    # every (B, L-1, N) score, then torch's ignore_index drops the padding targets (id 0 -> -1)
    logits = hidden[:, :-1] @ decoder.item_emb.weight[1:].T
    expected = F.cross_entropy(logits.reshape(-1, 8), items[:, 1:].reshape(-1) - 1, ignore_index=-1)
    torch.testing.assert_close(next_item_loss(decoder, hidden, items), expected)


def test_next_item_loss_over_range_skips_outside_targets():
    decoder = make_decoder()
    with torch.no_grad():
        hidden = decoder.encode(ITEMS)
    mask, targets = next_item_targets(ITEMS, B)
    logits = decoder.logits(hidden, B)
    expected = F.cross_entropy(logits[mask], targets[mask] - B[0])
    torch.testing.assert_close(next_item_loss(decoder, hidden, ITEMS, B), expected)


def test_loss_without_positions_is_zero_with_graph():
    decoder = make_decoder()
    items = torch.tensor([[1, 2, 0]])
    loss = domain_specific_loss(decoder, decoder.encode(items), items, B)
    assert loss.item() == 0.0
    loss.backward()


def test_losses_backpropagate():
    decoder = make_decoder().train()
    hidden = decoder.encode(ITEMS)
    (next_item_loss(decoder, hidden, ITEMS) + domain_specific_loss(decoder, hidden, ITEMS, A)).backward()
    assert decoder.item_emb.weight.grad.abs().sum() > 0
    assert decoder.blocks[0].qkv.weight.grad.abs().sum() > 0


def test_length_grouped_objective_equals_the_padded_batch_loss():
    """Encoding a batch in length groups changes the cost, not the loss (dropout off)."""
    from data import SequenceLoader, SequenceRows
    from model.objectives import domain_specific_objective, next_item_objective

    torch.manual_seed(0)
    decoder = TaesarDecoder(DecoderConfig(n_items=9, max_len=12, hidden_size=16, inner_size=16)).eval()
    sequences = [[1 + (3 * r + j) % 9 for j in range(2 + r % 7)] for r in range(13)]
    batch = next(iter(SequenceLoader(SequenceRows.from_lists(range(1, 14), sequences), 13, 12)))
    for groups in (2, 4, 13):
        for whole, grouped in (
            (next_item_objective(length_groups=1), next_item_objective(length_groups=groups)),
            (domain_specific_objective((1, 5), length_groups=1), domain_specific_objective((1, 5), length_groups=groups)),
        ):
            torch.testing.assert_close(grouped(decoder, batch), whole(decoder, batch))
    hidden = decoder.encode(batch.items)
    torch.testing.assert_close(next_item_objective(length_groups=1)(decoder, batch),
                               next_item_loss(decoder, hidden, batch.items))
