"""Every config composes, and the official command lines run as Hydra multiruns."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from data.paths import PROJECT_ROOT
from tests.conftest import stage_config, tiny_overrides

EXPERIMENTS = sorted(p.stem for p in (PROJECT_ROOT / "config" / "experiment").glob("*.yaml"))
DATASETS = sorted(p.stem for p in (PROJECT_ROOT / "config" / "dataset").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment):
    cfg = stage_config("pretrain", [f"experiment={experiment}"])
    assert cfg.stage == "run" and cfg.expert.init in ("base", "scratch")


@pytest.mark.parametrize("dataset", DATASETS)
def test_every_dataset_composes(dataset):
    for config_name in ("prepare", "pretrain"):
        assert stage_config(config_name, [f"dataset={dataset}"]).dataset.name == dataset


MODEL_NAMES = sorted(p.stem for p in (PROJECT_ROOT / "config" / "model_name").glob("*.yaml"))


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_every_backbone_config_passes_the_schema(model_name):
    train_type = "full" if model_name == "SASRec4" else "sim"  # SASRec4 is SASRec on the mixed rows
    cfg = stage_config("finetune", [f"train_type={train_type}", "target_dom=dom1", f"model_name={model_name}"])
    assert cfg.model_name == ("SASRec" if model_name == "SASRec4" else model_name)


def test_every_declared_key_is_read():
    """Each key of config/overall.yaml and of the stage configs is a field of the schema (so the schema
    refuses what no code reads), and each schema field is in the configs."""
    from pipeline.schemas import FinetuneSettings

    declared = set(stage_config("finetune", ["train_type=sim", "target_dom=dom1"]))
    fields = {f.name for f in dataclasses.fields(FinetuneSettings)}
    assert declared == fields


def test_official_pretrain_command_as_a_multirun(tmp_path):
    overrides = [o for o in tiny_overrides(tmp_path) if not o.startswith("run_dir")]
    result = subprocess.run(
        [sys.executable, "pretrain.py", "-m", "stage=run", "gpu_id=0", "seed=2025,2026", "epochs=1",
         "trainer.expert.epochs=1", *overrides, f"hydra.sweep.dir={tmp_path}/multirun"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p.parent.name for p in (tmp_path / "multirun").glob("*/metrics.json"))
    assert len(jobs) == 2 and all(len(job) <= 130 and "/" not in job for job in jobs)
    for seed in (2025, 2026):
        assert list((tmp_path / "checkpoint").rglob(f"SASRec-tiny-{seed}.dom3.ckpt"))
    metrics = json.loads(next((tmp_path / "multirun").glob("*/metrics.json")).read_text())
    assert set(metrics["valid"]) == {"full", "dom1", "dom2", "dom3"}


def test_official_decoding_command_after_pretraining(tmp_path):
    """`pretrain.py -m stage=run ...`, then the official decoding command for two target domains at once."""
    overrides = [o for o in tiny_overrides(tmp_path) if not o.startswith("run_dir")] + [
        "trainer.base.epochs=1", "trainer.expert.epochs=1"]
    for script, args in (("pretrain.py", ["stage=run"]),
                         ("decoding.py", ["stage=dec", "target_dom=dom1,dom3", "train_batch_size=32"])):
        result = subprocess.run(
            [sys.executable, script, "-m", *args, "gpu_id=0", "seed=2025", *overrides,
             f"hydra.sweep.dir={tmp_path}/{script}"],
            cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]
    for dom in ("dom1", "dom3"):
        assert len(list((tmp_path / "regenerated" / "tiny").glob(f"taesar-*/tiny.2025.{dom}.train.inter"))) == 1
    assert len(list((tmp_path / "decoding.py").rglob("metrics.json"))) == 2
    # dom2 was not decoded: finetune.py says which command makes its file, with the user's own
    # overrides except the ones only Stage III reads
    result = subprocess.run(
        [sys.executable, "finetune.py", "stage=tun", "train_type=new", "target_dom=dom2", "seed=2025", "epochs=1",
         "model.hidden_size=16", *overrides, f"hydra.run.dir={tmp_path}/finetune"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    command = result.stderr.split("run `", 1)[1].split("`", 1)[0]
    assert command.startswith("python decoding.py target_dom=dom2 seed=2025 ")
    tokens = command.split()
    assert "trainer.base.epochs=1" in tokens and {"dataset=tiny", "debug=tiny"} <= set(tokens)
    assert not any(t.startswith(("train_type=", "model.", "epochs=", "stage=")) for t in tokens)
