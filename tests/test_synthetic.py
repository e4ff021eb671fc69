"""The synthetic generator: byte-level determinism, the raw-file contract, the
ground-truth file, the knobs, and the planted structure measured on its output."""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

import dataset.synthetic as synthetic
from dataset.prepare import prepare_files
from dataset.synthetic import (
    CORRESPONDENCES_FILE,
    SyntheticConfig,
    domain_names,
    expected_rows,
    generate_raw,
    read_correspondences,
)

SMALL = SyntheticConfig()


def _files_bytes(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _merged(files) -> pd.DataFrame:
    """All domains as one table in each user's time order (ties cannot occur)."""
    frames = [
        pd.read_csv(f, sep="\t", dtype=str, keep_default_na=False).assign(domain=f.stem) for f in files
    ]
    table = pd.concat(frames, ignore_index=True)
    table["timestamp"] = table["timestamp:float"].astype(np.int64)
    return table.sort_values(["user_id:token", "timestamp"], kind="stable", ignore_index=True)


def _concept_ids(folder) -> dict[tuple[str, str], int]:
    """(domain, token) -> concept, numbering concepts by their row in the S1 -> S2 block."""
    corr = read_correspondences(folder / CORRESPONDENCES_FILE)
    first = corr[(corr.source_domain == "S1") & (corr.target_domain == "S2")].reset_index(drop=True)
    ids = {("S1", tok): c for c, tok in enumerate(first.source_item)}
    for _, row in corr[corr.source_domain == "S1"].iterrows():
        ids[(row.target_domain, row.target_item)] = ids[("S1", row.source_item)]
    return ids


def _transitions(folder, config) -> pd.DataFrame:
    """Pairs of adjacent concept items within a user's merged sequence."""
    table = _merged(generate_raw(folder, config))
    ids = _concept_ids(folder)
    table["concept"] = [ids.get(key, -1) for key in zip(table.domain, table["item_id:token"])]
    same_user = table["user_id:token"].values[1:] == table["user_id:token"].values[:-1]
    pairs = pd.DataFrame({
        "a": table.concept.values[:-1], "b": table.concept.values[1:],
        "cross": table.domain.values[:-1] != table.domain.values[1:],
    })[same_user]
    return pairs[(pairs.a >= 0) & (pairs.b >= 0)]


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    generate_raw(tmp_path / "a", SMALL)
    generate_raw(tmp_path / "b", SMALL)
    generate_raw(tmp_path / "c", dataclasses.replace(SMALL, seed=1))
    a, b, c = (_files_bytes(tmp_path / x) for x in "abc")
    assert list(a) == ["S1.inter", "S2.inter", "S3.inter", CORRESPONDENCES_FILE]
    assert a == b
    assert all(a[name] != c[name] for name in a)


def test_chunking_keeps_users_distinct_and_output_deterministic(tmp_path, monkeypatch):
    monkeypatch.setattr(synthetic, "_USERS_PER_CHUNK", 70)
    files = generate_raw(tmp_path / "a", SMALL)
    users = _merged(files)["user_id:token"].unique()
    assert sorted(users) == [f"u{u:06d}" for u in range(SMALL.n_users)]
    generate_raw(tmp_path / "b", SMALL)
    assert _files_bytes(tmp_path / "a") == _files_bytes(tmp_path / "b")


def test_raw_file_format(tmp_path):
    files = generate_raw(tmp_path, SMALL)
    assert files == [tmp_path / f"{name}.inter" for name in domain_names(SMALL)]
    for path in files:
        lines = path.read_text(encoding="utf-8").splitlines()
        assert lines[0] == "user_id:token\titem_id:token\trating:float\ttimestamp:float"
        fields = np.array([line.split("\t") for line in lines[1:]])
        assert fields.shape[1] == 4
        assert all(t.isdigit() and len(t) == 10 for t in fields[:, 3])
        assert set(fields[:, 2]) <= set("12345")
        # Item tokens must not give away the domain or whether an item is a concept.
        assert all(len(tok) == 12 and set(tok) <= set("0123456789abcdef") for tok in fields[:, 1])
    table = _merged(files)
    steps = table.groupby("user_id:token").timestamp.diff().dropna()
    assert (steps > 0).all()
    lengths = table.groupby("user_id:token").size()
    assert lengths.between(SMALL.seq_len_min, SMALL.seq_len_max).all()
    assert len(table) == pytest.approx(expected_rows(SMALL), rel=0.05)
    assert not list(tmp_path.glob(".*"))


def test_correspondences_cover_every_pair_and_exist_in_the_data(tmp_path):
    files = generate_raw(tmp_path, SMALL)
    corr = read_correspondences(tmp_path / CORRESPONDENCES_FILE)
    names = domain_names(SMALL)
    pairs = corr.groupby(["source_domain", "target_domain"]).size()
    assert sorted(pairs.index) == [(a, b) for a in names for b in names if a != b]
    assert (pairs == SMALL.n_concepts).all()
    tokens = {f.stem: set(pd.read_csv(f, sep="\t", dtype=str)["item_id:token"]) for f in files}
    for (source, target), block in corr.groupby(["source_domain", "target_domain"]):
        assert block.source_item.is_unique and block.target_item.is_unique
        assert set(block.source_item) <= tokens[source]
        assert set(block.target_item) <= tokens[target]
        # A -> B and B -> A are the same pairing.
        back = corr[(corr.source_domain == target) & (corr.target_domain == source)]
        assert dict(zip(block.source_item, block.target_item)) == dict(zip(back.target_item, back.source_item))


@pytest.mark.parametrize("p_follow", [0.8, 0.0])
def test_next_concept_is_the_ring_successor(tmp_path, p_follow):
    """The planted signal: the concept after a concept item is (mostly) one fixed
    successor, also when the two items are in different domains; with p_follow=0
    the same statistic falls to about chance, so the check can fail."""
    config = dataclasses.replace(SMALL, p_follow=p_follow)
    pairs = _transitions(tmp_path, config)
    counts = pairs.groupby(["a", "b"]).size()
    successor = counts.groupby(level="a").idxmax().map(lambda ab: ab[1])
    hit = pairs.b.values == successor.reindex(pairs.a).values
    chance = SMALL.n_clusters / SMALL.n_concepts
    assert len(pairs) > 50 * SMALL.n_concepts
    if p_follow:
        # Expected p_follow + (1 - p_follow) * chance = 0.82.
        assert hit.mean() > 0.75
        assert hit[pairs.cross.values].mean() > 0.75
    else:
        assert hit.mean() < 3 * chance


def test_domain_knobs_shape_the_files(tmp_path):
    config = dataclasses.replace(SMALL, domain_participation=(1.0, 0.2, 1.0), domain_weights=(3.0, 1.0, 1.0))
    table = _merged(generate_raw(tmp_path, config))
    users = table.groupby("domain")["user_id:token"].nunique() / config.n_users
    rows = table.domain.value_counts()
    assert users["S1"] > 0.9 and users["S3"] > 0.9
    assert 0.1 < users["S2"] < 0.3
    assert rows["S1"] > 2 * rows["S3"]


def test_heavy_tailed_lengths_match_expected_rows(tmp_path):
    config = dataclasses.replace(SMALL, n_users=2000, seq_len_min=1, seq_len_max=200, seq_len_power=2.0)
    lengths = _merged(generate_raw(tmp_path, config)).groupby("user_id:token").size()
    # Most users are light, a few are heavy: the shape of real logs.
    assert (lengths <= 3).mean() > 0.5 and lengths.max() > 50
    assert lengths.sum() == pytest.approx(expected_rows(config), rel=0.15)


def test_items_per_domain(tmp_path):
    # A list, as Hydra passes it, works like a tuple.
    config = dataclasses.replace(SMALL, items_per_domain=[50, 120, 60], p_noise=0.5, n_users=600)
    assert config.items_per_domain == (50, 120, 60)
    table = _merged(generate_raw(tmp_path, config))
    distinct = table.groupby("domain")["item_id:token"].nunique()
    assert distinct.to_dict() == {"S1": 50, "S2": 120, "S3": 60}


def test_small_default_prepares(tmp_path):
    summary = prepare_files(generate_raw(tmp_path / "raw", SMALL), tmp_path / "SYN", "SYN")
    assert summary["users"] > SMALL.n_users // 3
    assert summary["items"] > SMALL.n_concepts * SMALL.n_domains


def test_failed_generation_leaves_no_files(tmp_path, monkeypatch):
    def boom(*args):
        raise RuntimeError("disk full")

    monkeypatch.setattr(synthetic, "_write_chunk", boom)
    with pytest.raises(RuntimeError):
        generate_raw(tmp_path, SMALL)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "change",
    [
        {"n_domains": 1},
        {"items_per_domain": 40},  # no room for noise items next to 40 concepts
        {"items_per_domain": (60, 60)},  # one count per domain
        {"n_clusters": 41},
        {"seq_len_min": 0},
        {"p_follow": 1.5},
        {"domain_participation": 0.0},
        {"mean_gap_s": 1e9},
    ],
)
def test_bad_config_raises(change):
    with pytest.raises(ValueError):
        dataclasses.replace(SMALL, **change)
