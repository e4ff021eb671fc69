"""Stage II end to end on tiny synthetic data: the output contract, fast vs plain decoder,
the reports, reuse and bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from data import PreparedDataset, read_inter
from data.paths import project_path
from decoding import decoding_rule, load_stage1, run_decoding
from experiment import regenerated_dir, stage1_paths
from model.contrastive import DecodingRule
from model.regeneration import regenerate
from pretrain import run_pretrain
from tests.conftest import compose, tiny_overrides
from tests.reference_decoder import reference_regenerate

HEADER = "user_id:token\titem_id_list:token_seq\titem_id:token"
# Stage I settings key the checkpoint folders: every stage of a pipeline passes the same ones.
TRAINING = ["seed=2025", "epochs=3", "expert.epochs=2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny dataset with its Stage I checkpoints (trained briefly)."""
    root = tmp_path_factory.mktemp("stage2")
    run_pretrain(compose("pretrain", [*TRAINING, *tiny_overrides(root)]))
    return root


def decoding_config(root, *extra):
    return compose("decoding", ["stage=dec", "target_dom=dom2", *TRAINING, *tiny_overrides(root), *extra])


def test_regenerated_file_follows_the_contract(trained):
    cfg = decoding_config(trained)
    report = run_decoding(cfg)
    dataset = PreparedDataset(project_path(cfg.data_path), "TINY")
    lo, hi = dataset.domains.range("dom2")
    folder = regenerated_dir(cfg)
    path = folder / "TINY.2025.dom2.train.inter"
    assert path.read_text().splitlines()[0] == HEADER
    rows = read_inter(path, n_items=dataset.domains.n_items, one_row_per_user=False)
    assert np.all((rows.items >= lo) & (rows.items < hi))  # target items only
    assert np.all(np.diff(rows.users) >= 0) and np.all(rows.lengths >= 2)
    lines = path.read_text().splitlines()[1:]
    assert len(lines) == len(set(lines))  # no exact duplicate rows
    original = set(dataset.path("dom2.train").read_text().splitlines()[1:])
    assert original <= set(lines)  # every row of dom2.train is there
    regenerated = [line for line in lines if line not in original]
    assert len(regenerated) > 0 and report["rows_out"] == len(lines)
    for line in regenerated:  # runs of one item were collapsed
        items = line.replace("\t", " ").split(" ")[1:]
        assert all(a != b for a, b in zip(items, items[1:]))

    summary = json.loads((folder / "TINY.2025.dom2.train.summary.json").read_text())
    assert summary == report
    for counts in summary["source_items"].values():
        assert counts["seen"] == counts["replaced"] + counts["deleted"] > 0
        assert counts["without_history"] <= counts["deleted"]
    mapping = json.loads((folder / "TINY.2025.dom2.train.mapping.json").read_text())
    assert sum(c for targets in mapping.values() for c in targets.values()) == summary["source_items_replaced"]
    assert all(lo <= int(t) < hi and not lo <= int(s) < hi for s, ts in mapping.items() for t in ts)
    manifest = json.loads((folder / "TINY.2025.dom2.train.manifest.json").read_text())
    assert manifest["variant"] == "taesar" and manifest["checkpoints"]["dom2"].endswith("SASRec-TINY-2025.dom2.ckpt")

    stamp = path.stat().st_mtime_ns
    assert run_decoding(cfg) == report  # reused, not decoded again
    assert path.stat().st_mtime_ns == stamp


def test_decoding_is_deterministic(trained, tmp_path):
    cfg = decoding_config(trained, "overwrite=true")
    run_decoding(cfg)
    first = (regenerated_dir(cfg) / "TINY.2025.dom2.train.inter").read_bytes()
    run_decoding(cfg)
    assert (regenerated_dir(cfg) / "TINY.2025.dom2.train.inter").read_bytes() == first


RULES = {
    "taesar": DecodingRule(),
    "position_weights": DecodingRule(weights="position"),
    "wo_sde": DecodingRule(source_experts=False),
    "wo_gcs": DecodingRule(global_test=False),
    "wo_lcs": DecodingRule(local_scores=False),
    "position_wo_sde": DecodingRule(weights="position", source_experts=False),
    "position_wo_gcs": DecodingRule(weights="position", global_test=False),
    "position_wo_lcs": DecodingRule(weights="position", local_scores=False),
    "reference_shift": DecodingRule(reference_shift=True),
}


@pytest.mark.parametrize("name", sorted(RULES))
def test_fast_decoder_equals_the_plain_one(trained, name):
    cfg = decoding_config(trained)
    dataset = PreparedDataset(project_path(cfg.data_path), "TINY")
    models, _ = load_stage1(cfg, dataset, torch.device("cpu"))
    rows = dataset.rows("full.train").take(range(40))  # the plain decoder is slow
    experts = {d: models[f"dom{d}"] for d in range(1, dataset.domains.n_domains + 1)}
    for target in (1, 3):
        # Small batches and chunks, so that batching and chunking are exercised too.
        fast = regenerate(rows, dataset.domains, target, models["full"], experts, RULES[name], max_len=64,
                          batch_size=7, positions_per_chunk=13).rows
        plain = reference_regenerate(rows, dataset.domains, target, models["full"], experts, RULES[name])
        assert [(int(u), fast.sequence(r).tolist()) for r, u in enumerate(fast.users)] == plain


def test_ablations_write_to_their_own_folders(trained):
    folders = set()
    for experiment in ("wo_sde", "wo_gcs", "wo_lcs", "position_weights"):
        cfg = decoding_config(trained, f"experiment={experiment}")
        assert decoding_rule(cfg) != DecodingRule()
        report = run_decoding(cfg)
        assert report["variant"] == experiment
        folders.add(regenerated_dir(cfg))
    assert len(folders) == 4
    wo_gcs = json.loads((regenerated_dir(decoding_config(trained, "experiment=wo_gcs"))
                         / "TINY.2025.dom2.train.summary.json").read_text())
    # Without the global test nothing with a history is deleted.
    for counts in wo_gcs["source_items"].values():
        assert counts["deleted"] == counts["without_history"]


def test_missing_checkpoints_stop_before_writing(tmp_path):
    cfg = decoding_config(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"SASRec-TINY-2025\.full\.ckpt: Stage I checkpoint not found"):
        run_decoding(cfg)
    assert not regenerated_dir(cfg).exists()


def test_checkpoints_of_another_vocabulary_are_refused(trained, tmp_path):
    cfg = decoding_config(tmp_path, "dataset.generator.items_per_domain=50")
    source = stage1_paths(decoding_config(trained))
    target = stage1_paths(cfg, write_settings=True)
    target.base.write_bytes(source.base.read_bytes())
    with pytest.raises(ValueError, match=r"checkpoint n_items is \d+ but this run expects \d+"):
        run_decoding(cfg)
    assert not regenerated_dir(cfg).exists()


def test_unknown_target_domain(trained):
    with pytest.raises(ValueError, match=r"unknown domain 'dom7': this dataset has dom1, dom2, dom3"):
        run_decoding(decoding_config(trained, "target_dom=dom7"))


def test_empty_training_split(trained, tmp_path):
    import shutil

    cfg = decoding_config(trained)
    data = tmp_path / "data"
    shutil.copytree(project_path(cfg.data_path), data)
    (data / "TINY" / "TINY.full.train.inter").write_text(HEADER + "\n")
    from data import DataError

    with pytest.raises(DataError, match=r"TINY\.full\.train\.inter: the split has no rows"):
        run_decoding(decoding_config(trained, f"data_path={data}", "overwrite=true"))


def test_decoding_batch_size_does_not_change_which_checkpoints_are_used(trained):
    # The official command decodes with train_batch_size=32 whatever Stage I trained with.
    report = run_decoding(decoding_config(trained, "train_batch_size=5", "target_dom=dom3"))
    assert report["target_dom"] == "dom3"
