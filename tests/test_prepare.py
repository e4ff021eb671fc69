"""The preparation against docs/data.md: hand-made input with its expected files, the split rules,
a literal reference implementation, determinism and atomic output."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from data import DomainRanges, PreparedDataset, split_names
from dataset.prepare import prepare_files
from dataset.preprocess import Interactions, drop_duplicate_rows
from reference.prepare import reference_prepare
from tests.helpers import read_all, write_raw

# Two domains, thresholds 2/2 and sequences cut to 5, chosen so that every rule
# of docs/data.md changes the result: an exact duplicate (u9 100 @106), an item and
# then a user lost to the k-core (7, u3), a user missing from a domain (u4), a
# second alignment round (w loses u3), timestamp ties across domains (@105,
# @106), the cut to 5 (u10 loses x@99), the second alignment after the cut (x
# is left with one user), "100_A" sorting before "10_A", and "u10" before "u5".
DOM1 = [
    ("u10", "10", 5, 100),
    ("u10", "100", 4, 105),
    ("u9", "10", 3, 101),
    ("u9", "100", 3, 106),
    ("u9", "100", 3, 106),
    ("u3", "10", 2, 102),
    ("u3", "7", 2, 103),
    ("u4", "10", 1, 100),
    ("u4", "100", 1, 101),
    ("u10", "10", 5, 300),
    ("u5", "10", 4, 10),
    ("u5", "100", 4, 11),
]
DOM2 = [
    ("u9", "x", 5, 106),
    ("u10", "x", 5, 99),
    ("u10", "y", 4, 105),
    ("u3", "x", 3, 50),
    ("u3", "y", 3, 51),
    ("u9", "y", 3, 90),
    ("u10", "z", 1, 200),
    ("u9", "z", 1, 201),
    ("u3", "w", 2, 52),
    ("u10", "w", 2, 110),
    ("u5", "y", 1, 1),
    ("u5", "z", 1, 2),
    ("u5", "y", 1, 12),
]
# Worked by hand from docs/data.md. Items: 100_A=1, 10_A=2, y_B=3, z_B=4.
# Users: u10=1, u5=2, u9=3; sequences u10 [2 1 3 4 2], u5 [3 4 2 1 3], u9 [3 2 1 4].
HEADER = "user_id:token\titem_id_list:token_seq\titem_id:token\n"
EXPECTED = {
    "item": "100_A\n10_A\ny_B\nz_B\n",
    "full.train": HEADER + "1\t2 1\t3\n" "2\t3 4\t2\n" "3\t3\t2\n",
    "full.valid": HEADER + "1\t2 1 3\t4\n" "2\t3 4 2\t1\n" "3\t3 2\t1\n",
    "full.test": HEADER + "1\t2 1 3 4\t2\n" "2\t3 4 2 1\t3\n" "3\t3 2 1\t4\n",
    "dom1.train": HEADER + "1\t2\t1\n",
    "dom1.valid": HEADER + "2\t2\t1\n" "3\t2\t1\n",
    "dom1.test": HEADER + "1\t2 1\t2\n",
    "dom2.train": HEADER + "2\t3\t4\n",
    "dom2.valid": HEADER + "1\t3\t4\n",
    "dom2.test": HEADER + "2\t3 4\t3\n" "3\t3\t4\n",
}
SETTINGS = dict(user_core=2, item_core=2, max_seq_len=5)


@pytest.fixture
def tiny_raw(tmp_path):
    return [write_raw(tmp_path / "raw" / "D1.inter", DOM1), write_raw(tmp_path / "raw" / "D2.inter", DOM2)]


def test_hand_made_input_gives_the_expected_files(tiny_raw, tmp_path):
    summary = prepare_files(tiny_raw, tmp_path / "tiny", "tiny", **SETTINGS)
    assert read_all(tmp_path / "tiny", "tiny") == EXPECTED
    assert (summary["users"], summary["items"], summary["interactions"]) == (3, 4, 14)
    assert [d["items"] for d in summary["domains"]] == [2, 2]


def test_reference_implementation_agrees_on_the_hand_made_input(tiny_raw):
    assert reference_prepare(tiny_raw, 2, 2, 5) == EXPECTED


def test_matches_reference_implementation_on_acdt(acdt_raw, tmp_path):
    prepare_files(acdt_raw, tmp_path / "ACDT", "ACDT")
    assert read_all(tmp_path / "ACDT", "ACDT") == reference_prepare(acdt_raw)


def test_matches_reference_implementation_with_cuts_and_several_rounds(acdt_raw, tmp_path):
    # A short maximum length and higher thresholds make the cut and the second
    # alignment drop many rows, so every step matters here.
    prepare_files(acdt_raw, tmp_path / "ACDT", "ACDT", user_core=3, item_core=5, max_seq_len=24)
    assert read_all(tmp_path / "ACDT", "ACDT") == reference_prepare(acdt_raw, 3, 5, 24)


def test_preparation_is_byte_for_byte_deterministic(acdt_raw, tmp_path):
    prepare_files(acdt_raw, tmp_path / "a" / "ACDT", "ACDT")
    prepare_files(acdt_raw, tmp_path / "b" / "ACDT", "ACDT")
    names = sorted(os.listdir(tmp_path / "a" / "ACDT"))
    assert names == sorted(os.listdir(tmp_path / "b" / "ACDT"))
    for name in names:
        assert (tmp_path / "a" / "ACDT" / name).read_bytes() == (tmp_path / "b" / "ACDT" / name).read_bytes(), name


def test_split_rules_hold_on_acdt(acdt_dataset):
    ds = acdt_dataset
    full = {s: ds.rows(f"full.{s}") for s in ("train", "valid", "test")}
    test = {int(u): full["test"].sequence(r) for r, u in enumerate(full["test"].users)}
    # train row a strict prefix of valid, valid of test: x_train = t[:-2], x_valid = t[:-1].
    for split, drop in (("valid", 1), ("train", 2)):
        for r, u in enumerate(full[split].users):
            t = test[int(u)]
            if split == "train" and len(t) == 3:
                drop = 1
            np.testing.assert_array_equal(full[split].sequence(r), t[: len(t) - drop])
    domain_of = ds.domains.domain_of
    for d in range(1, ds.domains.n_domains + 1):
        for split, drop, last in (("test", 0, True), ("valid", 1, True), ("train", 2, False)):
            rows = ds.rows(f"dom{d}.{split}")
            expected = {}
            for u, t in test.items():
                seq = t[: len(t) - drop]
                kept = seq[domain_of(seq) == d]
                if len(kept) >= 2 and (not last or domain_of(seq[-1:])[0] == d):
                    expected[u] = kept.tolist()
            got = {int(u): rows.sequence(r).tolist() for r, u in enumerate(rows.users)}
            assert got == expected, f"dom{d}.{split}"
    # Validation and test histories are target-domain only.
    for d in range(1, ds.domains.n_domains + 1):
        assert set(domain_of(ds.rows(f"dom{d}.test").items)) == {d}


def test_acdt_domains_and_sizes(acdt_dataset):
    manifest = acdt_dataset.manifest
    assert [d["name"] for d in manifest["domains"]] == ["Action", "Comedy", "Drama", "Thriller"]
    sizes = [d["interactions"] for d in manifest["domains"]]
    # Thriller is the sparse target: about a tenth of the interactions.
    assert sizes[3] == min(sizes) and sizes[3] < 0.15 * sum(sizes)
    ranges = acdt_dataset.domains
    assert ranges.n_items == manifest["items"] and ranges.n_domains == 4
    lengths = acdt_dataset.rows("full.test").lengths
    assert lengths.max() <= 128


def test_duplicates_are_exact_rows():
    table = Interactions(
        user=np.array([0, 0, 0, 0]),
        item=np.array([1, 1, 1, 1]),
        time=np.array([5.0, 5.0, 5.0, 6.0]),
        domain=np.zeros(4, dtype=np.int64),
        row=np.arange(4),
    )
    kept = drop_duplicate_rows(table, ratings=np.array([3.0, 3.0, 4.0, 3.0]))
    # Row 1 repeats row 0; row 2 differs in rating, row 3 in timestamp.
    np.testing.assert_array_equal(kept.row, [0, 2, 3])


def test_outputs_are_swapped_in_whole(tiny_raw, tmp_path, monkeypatch):
    out = tmp_path / "tiny"
    prepare_files(tiny_raw, out, "tiny", **SETTINGS)
    before = read_all(out, "tiny")

    import dataset.prepare as prepare_module

    calls = []

    def failing_write(path, rows):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt  # an interruption half-way through the files
        return original(path, rows)

    original = prepare_module.write_inter
    monkeypatch.setattr(prepare_module, "write_inter", failing_write)
    with pytest.raises(KeyboardInterrupt):
        prepare_files(tiny_raw, out, "tiny", **SETTINGS)
    assert read_all(out, "tiny") == before  # the old dataset is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw", "tiny"]  # no temporary leftovers

    monkeypatch.undo()
    fresh = tmp_path / "NEW"
    monkeypatch.setattr(prepare_module, "write_inter", failing_write)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        prepare_files(tiny_raw, fresh, "NEW", **SETTINGS)
    assert not fresh.exists()


def test_prepared_dataset_reads_what_was_written(tiny_raw, tmp_path):
    prepare_files(tiny_raw, tmp_path / "tiny", "tiny", **SETTINGS)
    ds = PreparedDataset(tmp_path, "tiny")
    assert ds.domains == DomainRanges((1, 3, 5))
    assert sorted(p.name for p in ds.root.iterdir()) == sorted(
        ["tiny.item", "manifest.json"] + [f"tiny.{s}.inter" for s in split_names(2)]
    )
    rows = ds.rows("full.test")
    assert rows.users.tolist() == [1, 2, 3]
    assert rows.sequence(0).tolist() == [2, 1, 3, 4, 2]
    assert json.loads((ds.root / "manifest.json").read_text())["rows"]["dom2.test"] == 2
