"""Stage I end to end on tiny synthetic data: files, reuse, ablations, determinism, bad input."""
from __future__ import annotations

import shutil

import pytest
import torch
from omegaconf import open_dict

from experiment import decoder_config, stage1_paths
from pretrain import run_pretrain
from tests.conftest import compose, tiny_overrides


def pretrain_config(tmp_path, *extra):
    return compose("pretrain", ["stage=run", "seed=2025", "epochs=2", "expert.epochs=2",
                                *tiny_overrides(tmp_path), *extra])


def test_tiny_pretraining_writes_every_checkpoint(tmp_path):
    cfg = pretrain_config(tmp_path)
    summary = run_pretrain(cfg)
    paths = stage1_paths(cfg)
    assert paths.base.name == "SASRec-TINY-2025.full.ckpt"
    assert [paths.expert(d).name for d in ("dom1", "dom3")] == ["SASRec-TINY-2025.dom1.ckpt", "SASRec-TINY-2025.dom3.ckpt"]
    for role in ("full", "dom1", "dom2", "dom3"):
        path = paths.base if role == "full" else paths.expert(role)
        saved = torch.load(path, weights_only=True)
        assert saved["meta"]["role"] == role and saved["meta"]["dataset"] == "TINY"
        assert saved["epochs_run"] == 2
        assert 0 <= summary["valid"][role]["ndcg@10"] <= 1
    assert (tmp_path / "run" / "metrics.json").is_file() and (tmp_path / "run" / "config.yaml").is_file()
    assert (paths.base_dir / "settings.json").is_file() and (paths.expert_dir / "settings.json").is_file()

    # A second run reuses the finished checkpoints instead of training again.
    stamp = paths.expert("dom2").stat().st_mtime_ns
    assert run_pretrain(cfg)["valid"] == summary["valid"]
    assert paths.expert("dom2").stat().st_mtime_ns == stamp

    # Experts start from M (DSA): an expert trained 0 epochs would equal M.
    base = torch.load(paths.base, weights_only=True)["state_dict"]
    expert = torch.load(paths.expert("dom1"), weights_only=True)["state_dict"]
    assert not torch.equal(base["item_emb.weight"], expert["item_emb.weight"])


def test_ablations_get_their_own_folders_and_share_the_base_model(tmp_path):
    full = pretrain_config(tmp_path)
    run_pretrain(full)
    base_stamp = stage1_paths(full).base.stat().st_mtime_ns
    folders = {stage1_paths(full).expert_dir}
    for experiment in ("wo_dsa", "dsa_wo_dsp"):
        cfg = pretrain_config(tmp_path, f"experiment={experiment}")
        summary = run_pretrain(cfg)
        paths = stage1_paths(cfg)
        assert paths.expert_dir.name.startswith(experiment) and summary["variant"] == experiment
        assert paths.expert("dom1").is_file()
        folders.add(paths.expert_dir)
    assert len(folders) == 3
    assert stage1_paths(full).base.stat().st_mtime_ns == base_stamp  # M was not retrained


def test_same_seed_same_metrics(tmp_path):
    a = run_pretrain(pretrain_config(tmp_path / "a"))
    b = run_pretrain(pretrain_config(tmp_path / "b"))
    assert a["valid"] == b["valid"]


def test_checkpoint_of_another_vocabulary_is_refused(tmp_path):
    run_pretrain(pretrain_config(tmp_path / "a"))
    other = pretrain_config(tmp_path / "b", "dataset.generator.items_per_domain=50")
    source, target = stage1_paths(pretrain_config(tmp_path / "a")).base, stage1_paths(other, write_settings=True).base
    shutil.copy(source, target)
    with pytest.raises(ValueError, match=r"checkpoint n_items is \d+ but this run expects \d+"):
        run_pretrain(other)


@pytest.mark.parametrize(
    "override, message",
    [
        ("stage=dec", r"config key 'stage' is 'dec' but pretrain\.py runs stage=run; stage=dec is run by decoding\.py"),
        ("epochs=-3", "epochs must be an integer >= 0"),
        ("topk=[0,10]", "topk must list positive cut-offs"),
        ("target_dom=dom9", r"unknown domain 'dom9': this dataset has dom1, dom2, dom3"),
        ("domains=5", "config key 'domains' is 5 but dataset TINY has 3 domains"),
        ("expert.loss=mse", r"expert\.loss='mse'"),
    ],
)
def test_bad_config_stops_before_training(tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        run_pretrain(pretrain_config(tmp_path, override))
    assert not (tmp_path / "checkpoint").exists() or not any((tmp_path / "checkpoint").rglob("*.ckpt"))


def test_unknown_model_name(tmp_path):
    cfg = pretrain_config(tmp_path)
    with open_dict(cfg):
        cfg.model_name = "NARM"
    with pytest.raises(ValueError, match="unknown model_name 'NARM'"):
        decoder_config(cfg, 10)


def test_reusing_a_checkpoint_of_another_batch_size_is_refused(tmp_path):
    run_pretrain(pretrain_config(tmp_path))
    with pytest.raises(ValueError, match="checkpoint train_batch_size is 32 but this run expects 16"):
        run_pretrain(pretrain_config(tmp_path, "train_batch_size=16"))
