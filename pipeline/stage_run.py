"""The run sequence every stage script follows, written once.

A stage script checks its config against its schema, then opens a `StageRun`, which prepares
(or reuses) the dataset, opens it and picks the device (and, on rank 0, opens the run's logger
when asked); the script resolves its artifacts, gets each checkpoint from `reuse_or_train` (the
finished one when its inputs are provably the same, else trained, resuming an interrupted
training), and ends with `finish`, which writes the run's record on rank 0. What differs
between the stages (which models, which metrics) stays in the scripts.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig

from checkpoints import check_meta, load_checkpoint, resume_file
from core.distributed import World
from dataset.prepare import prepare_dataset
from pipeline.artifacts import open_dataset, write_settings
from pipeline.runs import RunLogger, finish_run, run_folder
from trainer import resumed_seconds

log = logging.getLogger(__name__)


class StageRun:
    """One stage run: its config, ranks, dataset, device and (rank 0) logger and record."""

    def __init__(self, cfg: DictConfig, world: World, job: str):
        self.cfg, self.world, self.job = cfg, world, job
        prepare_dataset(cfg.dataset, cfg.data_path, progress=cfg.progress)  # reused when up to date
        self.dataset = open_dataset(cfg)
        self.device = world.device(cfg.gpu_id)
        self._logger: RunLogger | None = None
        # wall time of the trainings this run did, the earlier pieces of a resumed one included;
        # None while it only reused finished checkpoints
        self.trained_seconds: float | None = None

    def open_logger(self) -> RunLogger | None:
        """Open the run's wandb logger on rank 0 (None elsewhere). A training stage opens it at once;
        a decoding only when it decodes, so that one that reuses its files opens none."""
        if self._logger is None and self.world.is_main:
            self._logger = RunLogger(self.cfg, run_folder(self.cfg), job=self.job)
        return self._logger

    @property
    def logger(self) -> RunLogger | None:
        """The logger `open_logger` opened (None before, and off rank 0)."""
        return self._logger

    def write_settings(self, folder: Path, settings: dict) -> None:
        """An artifact folder's settings.json, by rank 0."""
        if self.world.is_main:
            write_settings(folder, settings)

    def reuse_or_train(self, checkpoint: Path, meta: dict, train: Callable[[], object], name: str = "") -> dict:
        """The finished checkpoint at `checkpoint`: reused when it exists and was made from `meta`'s
        inputs (a mismatch stops the run; `overwrite=true` trains anew), else made by `train()` (which
        resumes an interrupted training from its resume file unless overwrite) and read back."""
        prefix = f"{name}: " if name else ""
        if checkpoint.is_file() and not self.cfg.overwrite:
            saved = load_checkpoint(checkpoint)
            check_meta(saved["meta"], meta, checkpoint)
            log.info("%sreusing the finished checkpoint %s (overwrite=true trains anew)", prefix, checkpoint)
            return saved
        if self.cfg.overwrite:
            resume_file(checkpoint).unlink(missing_ok=True)
        started, earlier = time.perf_counter(), resumed_seconds()
        train()
        seconds = time.perf_counter() - started + resumed_seconds() - earlier
        self.trained_seconds = (self.trained_seconds or 0.0) + seconds
        return load_checkpoint(checkpoint)

    def finish(self, metrics: dict, summary: dict | None = None) -> dict:
        """The run's record (wandb summary, config.yaml, metrics.json) by rank 0; returns `metrics`."""
        if not self.world.is_main:
            return metrics
        return finish_run(self.cfg, self._logger, metrics, summary)
