"""The data layer: domain vocabulary, contract-file round trip, padding and batches."""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from data import DomainRanges, SequenceLoader, SequenceRows, pad_rows, read_inter
from data.files import format_inter, read_item_tokens, write_inter
from dataset.acdt import ml100k_dir


def test_domain_ranges():
    ranges = DomainRanges.from_sizes([3, 2, 4])
    assert ranges.starts == (1, 4, 6, 10)
    assert ranges.n_items == 9 and ranges.names == ["dom1", "dom2", "dom3"]
    assert ranges.range("dom2") == (4, 6) and ranges.range(3) == (6, 10)
    np.testing.assert_array_equal(ranges.domain_of([0, 1, 3, 4, 5, 6, 9]), [0, 1, 1, 2, 2, 3, 3])


def test_domain_ranges_from_item_file(tmp_path):
    path = tmp_path / "X.item"
    path.write_text("100_A\n10_A\nb_B\nc_C\nd_C\n", encoding="utf-8")
    assert DomainRanges.from_item_file(path) == DomainRanges((1, 3, 4, 6))


def test_inter_round_trip(tmp_path):
    rows = SequenceRows.from_lists([1, 4, 7], [[3, 1], [2, 2, 5, 9], [10, 1, 4]])
    text = format_inter(rows)
    assert text == (
        "user_id:token\titem_id_list:token_seq\titem_id:token\n" "1\t3\t1\n" "4\t2 2 5\t9\n" "7\t10 1\t4\n"
    )
    write_inter(tmp_path / "x.inter", rows)
    back = read_inter(tmp_path / "x.inter", n_items=10)
    for field in ("users", "offsets", "items"):
        np.testing.assert_array_equal(getattr(back, field), getattr(rows, field))
    np.testing.assert_array_equal(back.targets, [1, 9, 4])


def test_pad_rows_keeps_the_most_recent_history():
    rows = SequenceRows.from_lists([1, 2], [[1, 2, 3, 4, 5, 6], [7, 8]])
    items, lengths = pad_rows(rows, max_len=4)
    # The 4 most recent items (history 3..5, target 6); right padding.
    np.testing.assert_array_equal(items, [[3, 4, 5, 6], [7, 8, 0, 0]])
    np.testing.assert_array_equal(lengths, [4, 2])


def test_loader_covers_every_row_once_and_is_reproducible():
    rows = SequenceRows.from_lists(range(1, 11), [[u, u + 1] + [u] * (u % 4) for u in range(1, 11)])
    loader = SequenceLoader(rows, batch_size=4, max_len=8, shuffle=True, seed=3)

    def epoch_users(epoch):
        loader.set_epoch(epoch)
        return [b.users.tolist() for b in loader]

    first = epoch_users(0)
    assert sorted(sum(first, [])) == list(range(1, 11)) and len(first) == len(loader) == 3
    assert epoch_users(0) == first  # same seed and epoch, same order
    assert epoch_users(1) != first  # a new epoch reshuffles
    for batch in SequenceLoader(rows, batch_size=4, max_len=8):
        assert batch.items.shape[1] == int(batch.lengths.max())  # trimmed to the batch
        for b, user in enumerate(batch.users.tolist()):
            r = user - 1
            np.testing.assert_array_equal(batch.items[b, : batch.lengths[b]].numpy(), rows.sequence(r))
            assert batch.targets[b] == rows.targets[r]


def test_batches_keep_the_contract_item_ids(acdt_dataset):
    """Ids reach the model exactly as written in the files (no renumbering), and mean the raw items."""
    rows = acdt_dataset.rows("full.test")
    loader = SequenceLoader(rows, batch_size=64, max_len=128)
    batched = torch.cat([b.items[b.items > 0] for b in loader]).numpy()
    np.testing.assert_array_equal(batched, rows.items)
    text = acdt_dataset.path("full.test").read_text().splitlines()[1:]
    from_text = np.array(" ".join(line.replace("\t", " ").split(" ", 1)[1] for line in text).split(), dtype=np.int64)
    np.testing.assert_array_equal(rows.items, from_text)

    # Every (user, item) pair of the prepared data is a rating of ml-100k.
    tokens = np.array([t.rsplit("_", 1)[0] for t in read_item_tokens(acdt_dataset.item_path)])
    ratings = pd.read_csv(ml100k_dir() / "ml-100k.inter", sep="\t", dtype=str)
    rated = set(zip(ratings["user_id:token"], ratings["item_id:token"]))
    user_tokens = sorted(set(ratings["user_id:token"]) & {u for u, _ in rated})
    assert len(rows) <= len(user_tokens)
    for r in range(0, len(rows), 50):
        seq_tokens = tokens[rows.sequence(r) - 1]
        assert any(all((u, t) in rated for t in seq_tokens) for u in user_tokens)
