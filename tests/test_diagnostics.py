"""Regeneration diagnostics (Figure 5) and the mapping view (Figure 4): numbers by hand, figures, commands."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from analysis import diagnostics  # noqa: E402
from analysis import mapping_view as mapping_command  # noqa: E402
from analysis.diagnostics import (  # noqa: E402
    diagnose, frequency_curve, gini, item_frequencies, length_distribution, plot_diagnostics, popularity_segments,
    segment_shares,
)
from analysis.mapping_view import counterparts, mapping_view, project_2d  # noqa: E402
from data.dataset import PreparedDataset  # noqa: E402
from data.domains import DomainRanges  # noqa: E402
from data.files import SequenceRows  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Ten target items, ids 5..14 (R_T = [5, 15)), with these original counts.
ITEM_RANGE = (5, 15)
ORIGINAL = {5: 0, 6: 3, 7: 9, 8: 1, 9: 1, 10: 5, 11: 2, 12: 7, 13: 4, 14: 1}
# By original count, ties by id: 7(9) | 12(7) 10(5) 13(4) 6(3) | 11(2) 8(1) 9(1) 14(1) 5(0).
TOP, MID, TAIL = {7}, {12, 10, 13, 6}, {11, 8, 9, 14, 5}


def rows_with_counts(counts: dict[int, int], extra=(), row_length: int = 3) -> SequenceRows:
    """Rows whose items occur exactly `counts` times (plus the items `extra`), cut into rows of `row_length`."""
    flat = [i for i, c in counts.items() for _ in range(c)] + list(extra)
    flat = list(np.random.default_rng(0).permutation(flat))
    sequences = [flat[k:k + row_length] for k in range(0, len(flat), row_length)]
    if len(sequences[-1]) < 2:  # every row needs a history and a target
        sequences[-2].extend(sequences.pop())
    return SequenceRows.from_lists(range(1, len(sequences) + 1), sequences)


def as_array(counts: dict[int, int]) -> np.ndarray:
    return np.array([counts.get(i, 0) for i in range(*ITEM_RANGE)])


def png_ok(path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 1024


# --------------------------------------------------------------------------- numbers


def test_item_frequencies_count_target_items_only():
    rows = rows_with_counts(ORIGINAL, extra=[2, 3, 15, 40])  # source items, outside R_T
    assert item_frequencies(rows, ITEM_RANGE).tolist() == [0, 3, 9, 1, 1, 5, 2, 7, 4, 1]
    assert frequency_curve(as_array(ORIGINAL)).tolist() == [9, 7, 5, 4, 3, 2, 1, 1, 1]  # item 5 (0) left out


def test_popularity_segments_by_hand():
    segment = popularity_segments(as_array(ORIGINAL))
    ids = np.arange(*ITEM_RANGE)
    assert set(ids[segment == 0]) == TOP and set(ids[segment == 1]) == MID and set(ids[segment == 2]) == TAIL
    # Ties at an edge go to the smaller id: 20 items, Top = 2 items; items 1 and 2 tie for the second place.
    tie = np.zeros(20, dtype=np.int64)
    tie[[0, 1, 2]] = [5, 3, 3]
    assert popularity_segments(tie)[:3].tolist() == [0, 0, 1]
    # ceil: 11 items -> Top 2 (ceil 1.1), Mid up to 6 (ceil 5.5), Tail 5.
    assert np.bincount(popularity_segments(np.arange(11, 0, -1))).tolist() == [2, 4, 5]
    # Unseen items are Tail even where their rank would put them in Mid.
    sparse = np.array([4, 2, 0, 0, 0, 0, 0, 0, 0, 0])
    assert popularity_segments(sparse).tolist() == [0, 1] + [2] * 8


def test_segment_shares_by_hand():
    original = as_array(ORIGINAL)  # 33 interactions: Top 9, Mid 7+5+4+3 = 19, Tail 2+1+1+1+0 = 5
    assert segment_shares(original, original) == pytest.approx({"top10": 9 / 33, "mid40": 19 / 33, "tail50": 5 / 33})
    # Segments stay those of the original data: item 5 (unseen before) is Tail, 7 stays Top.
    regenerated = as_array({**ORIGINAL, 5: 6, 7: 10, 12: 3})  # 33 + 6 + 1 - 4 = 36 interactions
    # Top: 7 (10); Mid: 12 (3) + 10 (5) + 13 (4) + 6 (3) = 15; Tail: 11 (2) + 8, 9, 14 (1 each) + 5 (6) = 11.
    assert segment_shares(original, regenerated) == pytest.approx(
        {"top10": 10 / 36, "mid40": 15 / 36, "tail50": 11 / 36})
    assert segment_shares(original, np.zeros(10)) == {"top10": 0.0, "mid40": 0.0, "tail50": 0.0}
    with pytest.raises(ValueError, match="counts of"):
        segment_shares(original, original[:5])


def test_length_distribution_and_gini_by_hand():
    values, rows = length_distribution(np.array([3, 2, 5, 3]))
    assert values.tolist() == [2, 3, 5] and rows.tolist() == [1, 2, 1]
    assert gini(np.array([0, 0, 0, 4])) == pytest.approx(0.75)
    assert gini(np.array([2, 2, 2])) == 0.0


def test_diagnose_by_hand():
    original = SequenceRows.from_lists([1, 2], [[7, 7, 12], [6, 7]])
    regenerated = SequenceRows.from_lists([1, 1, 2], [[7, 7, 12], [5, 7, 13, 11, 7], [6, 7]])
    numbers = diagnose(original, regenerated, ITEM_RANGE)
    json.dumps(numbers)  # JSON-able
    o, r = numbers["original"], numbers["regenerated"]
    assert (o["rows"], o["interactions"], o["distinct_items"]) == (2, 5, 3)
    assert (r["rows"], r["interactions"], r["distinct_items"]) == (3, 10, 6)
    assert o["frequency_curve"] == [3, 1, 1] and r["frequency_curve"] == [5, 1, 1, 1, 1, 1]
    # Original popularity: 7 (3) is Top; 6 and 12 (1 each, ties by id) fill Mid up to ceil(50%) = 5 items, so
    # 6, 12 and the unseen 5, 8, 9 by rank, but unseen items go to Tail: Mid = {6, 12}, Tail = the rest.
    assert numbers["segments"]["sizes"] == {"top10": 1, "mid40": 2, "tail50": 7}
    assert o["shares"] == pytest.approx({"top10": 0.6, "mid40": 0.4, "tail50": 0.0})
    assert r["shares"] == pytest.approx({"top10": 0.5, "mid40": 0.2, "tail50": 0.3})
    assert o["length"] == {"mean": 2.5, "median": 2.5, "min": 2, "max": 3}
    assert r["length"] == {"mean": pytest.approx(10 / 3), "median": 3.0, "min": 2, "max": 5}
    assert r["length_histogram"] == {"length": [2, 3, 5], "rows": [1, 1, 1]}
    assert numbers["outside_range"] == {"original": 0, "regenerated": 0}


# --------------------------------------------------------------------------- figures


def test_plot_diagnostics_renders(tmp_path):
    numbers = diagnose(rows_with_counts(ORIGINAL), rows_with_counts({**ORIGINAL, 5: 6}, row_length=5), ITEM_RANGE)
    out = plot_diagnostics(numbers, tmp_path / "sub" / "diag.png", title="hand-made")
    png_ok(out)
    assert [p.name for p in out.parent.iterdir()] == ["diag.png"]  # no temporary file left


@pytest.mark.parametrize("method", ["pca", "tsne"])
def test_mapping_view_renders(tmp_path, method):
    if method == "tsne":
        pytest.importorskip("sklearn")
    torch = pytest.importorskip("torch")
    domains = DomainRanges.from_sizes([12, 10, 8])  # dom1 [1, 13), dom2 [13, 23), dom3 [23, 31)
    embedding = torch.randn(31, 8, generator=torch.Generator().manual_seed(0))
    mapping = {"2": {"14": 3, "15": 1}, "25": {"16": 2, "14": 2}, "3": {}}
    numbers = mapping_view(embedding, domains, "dom2", mapping, method, tmp_path / "m.png", lines=1)
    png_ok(tmp_path / "m.png")
    assert numbers["transformed_source_items"] == 2 and numbers["counterparts"] == 1 and numbers["lines"] == 1
    assert numbers["source_items"] == 20 and numbers["target_items"] == 10
    first = (tmp_path / "m.png").read_bytes()
    mapping_view(embedding, domains, "dom2", mapping, method, tmp_path / "m.png", lines=1)
    assert (tmp_path / "m.png").read_bytes() == first  # deterministic
    with pytest.raises(ValueError, match="mapping pair"):
        mapping_view(embedding, domains, "dom2", {"14": {"15": 1}}, method, tmp_path / "bad.png")


def test_counterparts_and_pca():
    # Most frequent target, ties by smallest id; empty entries dropped.
    assert counterparts({"2": {"14": 3, "15": 1}, "25": {"16": 2, "14": 2}, "3": {}}) == {2: (14, 3), 25: (14, 2)}
    # Points on a line along (1, 1, 0): the first axis carries everything, with a fixed sign.
    points = np.outer(np.arange(5.0), [1.0, 1.0, 0.0])
    xy = project_2d(points)
    assert xy[:, 0] == pytest.approx((np.arange(5) - 2) * np.sqrt(2)) and xy[:, 1] == pytest.approx(0)
    assert project_2d(-points)[:, 0] == pytest.approx(-xy[:, 0])
    with pytest.raises(ValueError, match="unknown projection"):
        project_2d(points, "umap")


# --------------------------------------------------------------------------- commands end to end


@pytest.fixture(scope="module")
def decoded(tmp_path_factory):
    """A tiny synthetic dataset, one epoch of Stage I, and the regenerated file of dom1."""
    from decoding import run_decoding
    from pretrain import run_pretrain
    from tests.conftest import stage_config, tiny_overrides

    root = tmp_path_factory.mktemp("diagnostics")
    training = ["seed=2025", "trainer.base.epochs=1", "trainer.expert.epochs=1", *tiny_overrides(root)]
    run_pretrain(stage_config("pretrain", training))
    run_decoding(stage_config("decoding", ["target_dom=dom1", *training]))
    return root


def run_overrides(root) -> list[str]:
    """What names the decoded run: the same overrides as its stages had."""
    from tests.conftest import tiny_overrides

    return ["seed=2025", "trainer.base.epochs=1", "trainer.expert.epochs=1", *tiny_overrides(root)]


def test_diagnostics_command(decoded, tmp_path):
    numbers = diagnostics.main(["--target", "dom1", "--out", str(tmp_path), *run_overrides(decoded)])
    png_ok(tmp_path / "diagnostics_dom1.png")
    assert json.loads((tmp_path / "diagnostics_dom1.json").read_text()) == numbers
    assert numbers["seed"] == 2025 and numbers["outside_range"] == {"original": 0, "regenerated": 0}
    # The regenerated file holds every original row plus regenerated ones.
    assert numbers["regenerated"]["rows"] > numbers["original"]["rows"]
    assert numbers["regenerated"]["interactions"] > numbers["original"]["interactions"]
    # The explicit path gives the same numbers.
    explicit = diagnostics.main(["--target", "dom1", "--regenerated", numbers["regenerated_file"],
                                 "--out", str(tmp_path / "again"), *run_overrides(decoded)])
    assert explicit == numbers
    with pytest.raises(FileNotFoundError, match=r"tiny\.1\.dom1\.train\.inter: regenerated training file not found; "
                                                r"run `python decoding.py target_dom=dom1 .*seed=1"):
        diagnostics.main(["--target", "dom1", "--out", str(tmp_path), *run_overrides(decoded), "seed=1"])
    with pytest.raises(ValueError, match="target_dom='dom1'"):  # the manifest names another domain
        diagnostics.main(["--target", "dom2", "--regenerated", numbers["regenerated_file"], "--out", str(tmp_path),
                          *run_overrides(decoded)])


def test_mapping_view_command(decoded, tmp_path):
    numbers = mapping_command.main(["--target", "dom1", "--out", str(tmp_path), *run_overrides(decoded)])
    png_ok(tmp_path / "mapping_dom1.png")
    assert json.loads((tmp_path / "mapping_dom1.json").read_text()) == numbers
    assert numbers["checkpoint"].endswith("SASRec-tiny-2025.dom1.ckpt")
    domains = PreparedDataset(decoded / "data", "tiny").domains
    lo, hi = domains.range("dom1")
    assert numbers["target_items"] == hi - lo and numbers["source_items"] == domains.n_items - (hi - lo)
    mapping = json.loads(Path(numbers["regenerated_file"].removesuffix(".inter") + ".mapping.json").read_text())
    assert numbers["transformed_source_items"] == len([s for s, ts in mapping.items() if ts]) > 0
