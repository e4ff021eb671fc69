"""Hydra launchers (requirements-cluster.txt): every stage composes with each, and a joblib sweep
runs its jobs in parallel, each into its own folder."""
from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from data.paths import PROJECT_ROOT
from tests.conftest import tiny_overrides

STAGES = ("prepare", "pretrain", "decoding", "finetune", "baseline")
LAUNCHERS = {
    "joblib": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher",
    "submitit_slurm": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
    "submitit_local": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher",
}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_composes_with_every_launcher(stage, launcher):
    overrides = [f"hydra/launcher={launcher}"]
    if launcher == "submitit_slurm":  # the keys a cluster run sets
        overrides += ["hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=1",
                      "hydra.launcher.cpus_per_task=8", "hydra.launcher.mem_gb=64", "hydra.launcher.timeout_min=720"]
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "config"), version_base="1.3"):
        cfg = compose(config_name=stage, overrides=overrides, return_hydra_config=True)
    assert cfg.hydra.launcher._target_ == LAUNCHERS[launcher]
    if launcher == "submitit_slurm":
        assert (cfg.hydra.launcher.partition, cfg.hydra.launcher.mem_gb, cfg.hydra.launcher.timeout_min) == ("gpu", 64, 720)


def _log_span(log_file) -> tuple[datetime, datetime]:
    stamps = [datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f") for line in log_file.read_text().splitlines()
              if line.startswith("[20")]
    return stamps[0], stamps[-1]


def test_a_joblib_sweep_runs_its_jobs_in_parallel_into_their_own_folders(tmp_path):
    sweep = tmp_path / "sweep"
    command = [sys.executable, "pretrain.py", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
               f"hydra.sweep.dir={sweep}", "seed=1,2", "trainer.base.epochs=6", "trainer.expert.epochs=3",
               *tiny_overrides(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and (p / "metrics.json").is_file())
    assert len(jobs) == 2
    assert {OmegaConf.load(job / "config.yaml").seed for job in jobs} == {1, 2}
    assert len(list((tmp_path / "checkpoint").rglob("*.full.ckpt"))) == 2  # one base model per seed
    (start_a, end_a), (start_b, end_b) = (_log_span(job / "pretrain.log") for job in jobs)
    assert start_a < end_b and start_b < end_a, "the two jobs ran one after the other"
