"""What a stage run leaves in its output folder, and the run-wide state: seeds, wandb, the end of a run."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from data.files import write_text_atomic
from data.paths import project_path
from pipeline.records import CONFIG_FILE, METRICS_FILE

log = logging.getLogger(__name__)


@contextlib.contextmanager
def user_errors(*more: type[Exception]):
    """A command's bad input ends it with `error: MESSAGE` (the message names the file, line or key)
    rather than a traceback; anything else is a bug and keeps its traceback. `more`: a command's
    own errors of that kind."""
    from core.errors import PAUSED_EXIT_CODE, BusyError, TrainingPaused, UserError

    try:
        yield
    except TrainingPaused as pause:  # not an error: the same command continues it
        print(f"paused: {pause}", file=sys.stderr)
        raise SystemExit(PAUSED_EXIT_CODE) from None
    except (UserError, BusyError, FileNotFoundError, *more) as error:
        raise SystemExit(f"error: {error}") from None
    except OSError as error:  # a read-only store, a missing permission, a full disk: the file and the reason
        raise SystemExit(f"error: {describe_os_error(error)}") from None


def describe_os_error(error: OSError) -> str:
    """`PATH: reason` of an operating-system error (both paths of a failed rename)."""
    if error.filename is None:
        return str(error)
    paths = f"{error.filename}" + (f" -> {error.filename2}" if error.filename2 is not None else "")
    return f"{paths}: {error.strerror or error}"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run_folder(cfg: DictConfig) -> Path:
    """The output folder of this run: Hydra's, or `run_dir` (or `outputs/manual`) outside Hydra, e.g. in tests."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return project_path(cfg.run_dir or "outputs/manual")


class RunLogger:
    """wandb when the config asks for it (`logger.mode`: offline by default, online, disabled).

    Offline runs never need a login or a network; they are written under the run's output
    folder and can be uploaded later with `wandb sync`.
    """

    def __init__(self, cfg: DictConfig, run_dir: Path, job: str):
        self.run = None
        if cfg.logger.mode == "disabled":
            return
        if cfg.logger.mode == "offline":
            # wandb's own error reporting is the one part of an offline run that would reach its servers
            # (from the wandb-core process it starts); a user who set the variable keeps their choice.
            # The main process itself makes no name lookup or network connection (tests/test_runs.py).
            os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
        import wandb

        run_dir.mkdir(parents=True, exist_ok=True)  # wandb writes below it
        self.run = wandb.init(
            project=cfg.logger.project,
            entity=cfg.logger.entity,
            group=f"{cfg.dataset.name}-{job}",
            name=f"{job}-{cfg.dataset.name}-{cfg.seed}",
            dir=str(run_dir),
            mode=cfg.logger.mode,
            config=OmegaConf.to_container(cfg, resolve=True),
            settings=wandb.Settings(silent=True, console="off"),
            # A stage that ended with an error in this process (the report waits on a busy checkpoint,
            # then calls the stage again) leaves its run open; this stage must not log into that one.
            reinit="finish_previous",
        )

    def log(self, values: dict) -> None:
        if self.run is not None:
            self.run.log(values)

    def finish(self, summary: dict) -> None:
        """Record the run's final numbers and close it."""
        if self.run is not None:
            self.run.summary.update(summary)
            self.run.finish()


def finish_run(cfg: DictConfig, logger: RunLogger | None, metrics: dict, summary: dict | None = None) -> dict:
    """The end of every stage: the wandb summary (`summary`, default: the numbers of `metrics`), then
    the resolved config and `metrics.json` in the run's output folder. Returns `metrics`."""
    if logger is not None:
        logger.finish(summary if summary is not None else
                      {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    run_dir = run_folder(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / CONFIG_FILE, OmegaConf.to_yaml(cfg, resolve=True))
    write_text_atomic(run_dir / METRICS_FILE, json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    log.info("wrote %s", run_dir / METRICS_FILE)
    return metrics
