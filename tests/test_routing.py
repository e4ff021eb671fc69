"""Which stage reads which key (pipeline/routing.py): the table agrees with the stages' own configs,
and run.sh, the report and the commands a stage prints all route through it."""
from __future__ import annotations

import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from data.paths import PROJECT_ROOT
from pipeline.routing import PIPELINE, ROUTES, STAGES, RoutingError, readers, route, split
from pipeline.settings import stage_config

CONFIGS = {"prepare": "prepare", "pretrain": "pretrain", "decoding": "decoding", "finetune": "finetune",
           "baseline": "baseline"}


@pytest.fixture(scope="module")
def configs():
    overrides = {"pretrain": ["stage=run"], "decoding": ["stage=dec"], "finetune": ["stage=tun", "train_type=sim"]}
    return {stage: OmegaConf.to_container(stage_config(name, overrides.get(stage, [])), resolve=False)
            for stage, name in CONFIGS.items()}


def has_key(config: dict, key: str) -> bool:
    for part in key.split("."):
        if not isinstance(config, dict) or part not in config:
            return False
        config = config[part]
    return True


def test_each_key_goes_to_the_stages_whose_config_has_it(configs):
    for key, stages in ROUTES.items():
        for stage in STAGES:
            if stage in stages:
                assert has_key(configs[stage], key), f"{key} is routed to {stage}, whose config has no such key"
    # and every other key of the pipeline's shared config is read by the three pipeline stages
    for key in configs["pretrain"]:
        if readers(key) == PIPELINE:
            assert all(has_key(configs[stage], key) for stage in PIPELINE), key


def test_keys_of_one_stage_are_not_in_the_pipelines_other_configs(configs):
    for key, stages in ROUTES.items():
        if len(stages) == 1 and not key.startswith("trainer."):
            others = [stage for stage in ("prepare", "pretrain", "decoding", "finetune") if stage not in stages]
            assert not any(has_key(configs[stage], key) for stage in others), key
    assert split(["recompute_activations=true"])["baseline"] == ["recompute_activations=true"]


def test_overrides_are_split_by_stage_with_prefixes_removed():
    by_stage = split(["trainer.base.epochs=5", "model_name=GRU4Rec", "+model.dropout=0.1", "finetune:eval_batch_size=7",
                      "dataset=synthetic", "logger.mode=disabled", "baseline:select_on=mean", "~logger.entity",
                      "trainer.finetune.epochs=3"])
    assert by_stage["prepare"] == ["dataset=synthetic"]
    assert by_stage["pretrain"] == by_stage["decoding"] == ["trainer.base.epochs=5", "dataset=synthetic",
                                                             "logger.mode=disabled", "~logger.entity"]
    assert by_stage["finetune"] == ["trainer.base.epochs=5", "model_name=GRU4Rec", "+model.dropout=0.1",
                                    "eval_batch_size=7", "dataset=synthetic", "logger.mode=disabled",
                                    "~logger.entity", "trainer.finetune.epochs=3"]
    assert by_stage["baseline"] == ["dataset=synthetic", "logger.mode=disabled", "select_on=mean", "~logger.entity"]


def test_an_official_key_given_to_every_stage_is_refused_with_the_keys_to_write():
    with pytest.raises(RoutingError, match=r"trainer\.base\.batch_size=\.\.\. \(Stage I, base model\)"):
        route("train_batch_size=64")
    assert route("finetune:epochs=5") == ("finetune",)  # to one stage, it sets that stage's training
    with pytest.raises(RoutingError, match="not a Hydra override"):
        route("SASRec")


def test_run_sh_reads_the_table_through_the_command_line():
    done = subprocess.run([sys.executable, "-m", "pipeline.routing", "model_name=GRU4Rec", "dataset=synthetic"],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "finetune\tmodel_name=GRU4Rec" in lines and "pretrain\tmodel_name=GRU4Rec" not in lines
    assert {line.split("\t")[0] for line in lines if line.endswith("dataset=synthetic")} == set(STAGES)
    refused = subprocess.run([sys.executable, "-m", "pipeline.routing", "epochs=5"], cwd=PROJECT_ROOT,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "trainer.finetune.epochs=..." in refused.stderr


def test_the_report_routes_its_overrides_through_the_table(tmp_path):
    from analysis.run_store import Report

    report = Report("ACDT", tmp_path, ["model_name=GRU4Rec", "decoding:decoding.memory_gb=1", "gpu_id=1"])
    assert report.for_stage("pretrain") == ["gpu_id=1"]
    assert report.for_stage("decoding") == ["decoding.memory_gb=1", "gpu_id=1"]
    assert report.for_stage("finetune") == ["model_name=GRU4Rec", "gpu_id=1"]
    assert report.for_stage("baseline") == ["gpu_id=1"]
    with pytest.raises(RoutingError):
        Report("ACDT", tmp_path, ["epochs=3"])


def test_a_missing_regenerated_file_names_the_decoding_command_without_stage_iii_keys(monkeypatch):
    import pipeline.settings as settings

    class Overrides:
        task = ["stage=tun", "model_name=GRU4Rec", "train_type=new", "trainer.base.epochs=5", "epochs=3",
                "+model.dropout=0.1", "trainer.finetune.epochs=2", "decoder.hidden_size=16", "target_dom=dom2"]

    class Hydra:
        overrides = Overrides

    from hydra.core.hydra_config import HydraConfig

    monkeypatch.setattr(HydraConfig, "initialized", staticmethod(lambda: True))
    monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda: Hydra))
    command = settings.rerun_command("decoding.py", "decoding", ["target_dom=dom2", "seed=2025"])
    assert command == "python decoding.py target_dom=dom2 seed=2025 trainer.base.epochs=5 decoder.hidden_size=16"
