"""Run-wide state of a stage: the wandb run it logs to."""
from __future__ import annotations

from omegaconf import OmegaConf

from pipeline.runs import RunLogger


def test_a_stage_never_logs_into_the_open_run_of_one_that_failed_before_it(tmp_path):
    """Offline wandb, two stages in one process, the first ended by an error before it finished its
    run (the report calls a busy stage again): the second gets a run of its own, in its own folder."""
    def config(seed):
        return OmegaConf.create({"logger": {"mode": "offline", "project": "taesar-test", "entity": None},
                                 "dataset": {"name": "TINY"}, "seed": seed})

    failed = RunLogger(config(1), tmp_path / "first", job="pretrain")  # never finished
    second = RunLogger(config(2), tmp_path / "second", job="pretrain")
    try:
        assert second.run.id != failed.run.id and second.run.name == "pretrain-TINY-2"
        assert second.run.config["seed"] == 2 and str(tmp_path / "second") in second.run.dir
    finally:
        second.finish({})
