"""The runs of a report, each made at most once: their records in the report's store (OUT/runs/*.jsonl,
pipeline.records.RunStore; each stage's own folder, its logs, in OUT/logs/NAME/), whether a record
there may be used for this invocation (the settings its results depend on must be this invocation's:
else SettingsMismatch, or `--rerun`), running a stage when it must (waiting for another process that
trains the same artifact), and rebuilding the Stage I and II artifacts a recorded run needs on a
machine that lacks them, with a note of whether the rebuild reproduced the record. Several jobs may
share one report (`--jobs`): each run is claimed by one of them, and a job leaves what another
holds for the end instead of waiting for it.
analysis/report.py plans the study over these runs, analysis/report_writer.py writes it.
"""
from __future__ import annotations

import contextlib
import logging
import platform
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

from omegaconf import OmegaConf

from core.errors import SettingsMismatch
from core.schema import describe_differences
from data.files import BusyError, exclusive_lock
from pipeline.records import (CONFIG_FILE, RecordError, RunStore, check_config, check_metrics, result_settings,
                              settings_of)
from pipeline.routing import split

log = logging.getLogger(__name__)


class Deferred(Exception):
    """Another job of the same report holds what this run needs now; this job takes it up at the end."""


class Report:
    """The runs of one report: where their metrics go, and running each one at most once.

    `job=(index, count)`: this process is one of `count` jobs sharing the report (`--jobs`). A run is
    then made under its claim, a lock file `OUT/logs/NAME.claim`; while `deferring`, a run whose claim
    another job holds, or whose inputs (a Stage I checkpoint, a regenerated file) another job is
    making, is left in `deferred` and the job goes on with the next run, rather than waiting for it.
    `run_deferred` then takes those up, waiting where they are still held."""

    def __init__(self, dataset: str, out: Path, overrides: list[str], collect_only: bool = False,
                 rerun: bool = False, job: tuple[int, int] | None = None):
        self.dataset, self.out, self.overrides = dataset, Path(out), list(overrides)
        split(self.overrides)  # a key no stage can take as given stops the report before it runs anything
        self.collect_only, self.rerun = collect_only, rerun
        self.job, self.deferring = job, job is not None
        self.deferred: list[tuple[str, Callable[[], object]]] = []  # (name, what takes it up)
        self._depth = 0  # runs in progress in this process: a run's inputs are runs too (Stage I and II)
        self._claimed: set[str] = set()  # the runs whose claims this process holds
        self.built: set[tuple[int, str]] = set()  # (seed, Stage I tag) whose artifacts this process made sure of
        self.store, self.logs = RunStore(self.out / "runs"), self.out / "logs"
        adopted = self.store.adopt_folders(self.logs)
        if adopted:
            log.info("moved %d runs recorded as folders (an earlier layout) into %s/*.jsonl; their folders are in %s",
                     len(adopted), self.store.root, self.logs)

    def run(self, name: str, stage: str, overrides: list[str], needs: Callable[[], None] | None = None) -> dict | None:
        """The metrics of run `name`, running the stage when the store has no usable record of these
        settings (with `collect_only`, None instead); `needs` makes its inputs first (only when it runs).
        One of several jobs returns None for a run it defers (see the class)."""
        recorded = self.recorded(name, stage, overrides)
        if recorded is not None or self.collect_only:
            return recorded
        return self.once(name, lambda: self._run(name, stage, overrides, needs))

    def once(self, name: str, make: Callable[[], object]):
        """make() (which, under jobs, checks the store again: another job may have just recorded it),
        under run `name`'s claim when jobs share the report; None when the run is deferred."""
        if self.job is None:
            return make()
        outermost = self._depth == 0
        self._depth += 1
        try:
            with self._claim(name):
                return make()
        except Deferred as deferred:
            if not outermost:  # the inputs of a run: the run itself waits
                raise
            log.info("%s: left for later (%s)", name, deferred)
            self.deferred.append((name, make))
            return None
        finally:
            self._depth -= 1

    @contextlib.contextmanager
    def _claim(self, name: str) -> Iterator[None]:
        if name in self._claimed:  # a run among its own inputs (Stage II in the selectivity study)
            yield
            return
        held = contextlib.ExitStack()
        try:
            held.enter_context(exclusive_lock(self.logs / f"{name}.claim", wait=not self.deferring,
                                              what="another job of this report runs it"))
        except BusyError as busy:
            raise Deferred(str(busy)) from None
        with held:
            self._claimed.add(name)
            try:
                yield
            finally:
                self._claimed.discard(name)

    def run_deferred(self) -> None:
        """Take up the runs this job deferred, now waiting for whatever another job holds."""
        self.deferring = False
        deferred, self.deferred = self.deferred, []
        for name, make in deferred:
            log.info("%s: taken up again", name)
            self.once(name, make)

    def _run(self, name: str, stage: str, overrides: list[str], needs: Callable[[], None] | None) -> dict | None:
        if self.job is not None:  # another job may have recorded it since run() looked
            recorded = self.recorded(name, stage, overrides)
            if recorded is not None:
                return recorded
        folder = self.logs / name
        if needs is not None:
            needs()
            recorded = self.recorded(name, stage, overrides)
            if recorded is not None:  # what it needed was this run (Stage II of the selectivity study)
                return recorded
        from trainer import resumed_seconds

        started, earlier = time.perf_counter(), resumed_seconds()
        metrics = self.call(stage, overrides, folder)
        # the wall time of what this call ran (nothing was reused by the stage when it trained) and of the
        # earlier pieces of a training it resumed, and where
        timing = {"seconds": time.perf_counter() - started + resumed_seconds() - earlier, "machine": machine()}
        if resumed_seconds() > earlier:
            timing["resumed_seconds"] = resumed_seconds() - earlier
        if self.job is not None:
            timing["job"] = f"{self.job[0] + 1} of {self.job[1]}"
        config = OmegaConf.to_container(OmegaConf.load(folder / CONFIG_FILE), resolve=False)
        self.store.replace(name, metrics=metrics, config=config, seconds=timing)
        return metrics

    def recorded(self, name: str, stage: str, overrides: list[str]) -> dict | None:
        """The recorded metrics of run `name` when they are whole and were made with the settings this
        invocation would run it with; None when it is to be run (no record, or one that cannot be
        read, which is logged). A record of other settings stops the report (SettingsMismatch),
        unless `rerun`."""
        record = self.store.get(name)
        if record is None or "metrics" not in record:
            return None
        where = f"{self.store.file(name)} ({name})"
        try:
            metrics = check_metrics(record["metrics"], where)
        except RecordError as error:
            log.warning("%s; %s", error, "left out" if self.collect_only else "running it again")
            return None
        try:
            differences = describe_differences(settings_of(check_config(record.get("config"), where), stage, where),
                                               result_settings(stage, self.config(stage, overrides, self.logs / name)))
        except RecordError as error:
            differences = str(error)
        if not differences:
            return metrics
        if self.rerun and not self.collect_only:
            log.warning("%s: recorded with other settings (%s); --rerun: running it again, replacing its record",
                        where, differences)
            return None
        raise SettingsMismatch(
            f"{where}: recorded with other settings than this invocation's (recorded -> now: {differences}). "
            "Runs of other settings are neither reused nor averaged together: write this report to another "
            "--out, or pass --rerun to run such runs again here, replacing their records")

    def config(self, stage: str, overrides: list[str], run_dir: Path):
        """The config a stage of this report runs with (composed and checked)."""
        from pipeline.settings import stage_config

        return stage_config(stage, [f"dataset={self.dataset}", *overrides, *self.for_stage(stage), f"run_dir={run_dir}"])

    def call(self, stage: str, overrides: list[str], run_dir: Path) -> dict:
        from cdsr_baseline.train import run_baseline
        from decoding import run_decoding
        from finetune import run_finetune
        from pretrain import run_pretrain

        runner = {"pretrain": run_pretrain, "decoding": run_decoding, "finetune": run_finetune,
                  "baseline": run_baseline}[stage]
        cfg = self.config(stage, overrides, run_dir)
        while True:
            try:
                return runner(cfg)
            except BusyError as busy:
                # Another job (a second report building the same table) trains this artifact now: leave
                # the run for later (--jobs), or wait for it, then call again, which reuses what it made
                # (or resumes it, had it died).
                if self.deferring:
                    raise Deferred(str(busy)) from None
                log.info("%s; waiting for it to finish, then reusing what it made", busy)
                with exclusive_lock(busy.path):
                    pass

    def probe(self, name: str, seed: int, stage1: list[str]) -> dict | None:
        """The selectivity probe of one seed's Stage I (analysis/selectivity.py) for every target
        domain, kept in the store as record NAME (`probe`) with the key of the Stage I settings it probed
        (with `collect_only`, only what is kept); a probe of other Stage I settings is treated like a
        run of other settings (SettingsMismatch, or made again with `rerun`)."""
        from pipeline.artifacts import settings_key

        cfg = self.config("decoding", [f"seed={seed}", "target_dom=all", *stage1], self.logs / name)
        key = settings_key(result_settings("pretrain", cfg))
        kept = self._kept_probe(name, key)
        if kept is not None or self.collect_only:
            return kept

        def make():
            kept = self._kept_probe(name, key)  # another job may have just made it
            return kept if kept is not None else self._make_probe(name, seed, stage1, cfg, key)

        return self.once(name, make)

    def _kept_probe(self, name: str, key: str) -> dict | None:
        """The stored probe `name` of the Stage I settings `key`; None when there is none to use."""
        where = f"{self.store.file(name)} ({name})"
        cached = (self.store.get(name) or {}).get("probe")
        if cached is None:
            return None
        try:
            recorded_key, targets = cached["stage1"], cached["targets"]
        except (KeyError, TypeError) as error:
            log.warning("%s: not a probe record (%s); %s", where, error, "left out" if self.collect_only else "probing again")
            return None
        if recorded_key == key:
            return targets
        if self.collect_only or not self.rerun:
            raise SettingsMismatch(f"{where}: probed Stage I settings {recorded_key}, this invocation's are "
                                   f"{key}; write this report to another --out, or pass --rerun")
        return None

    def _make_probe(self, name: str, seed: int, stage1: list[str], cfg, key: str) -> dict:
        self.pipeline(seed, stage1)
        from analysis.selectivity import expert_argmax_in_target
        from core.distributed import World
        from decoding import load_stage1
        from pipeline.artifacts import open_dataset

        dataset = open_dataset(cfg)
        device = World().device(cfg.gpu_id)
        models = load_stage1(cfg, dataset, device)
        rows = dataset.rows("full.train")
        probe = {dom: expert_argmax_in_target(models[dom], rows, dataset.domains, t, cfg.MAX_ITEM_LIST_LENGTH,
                                              device=device)
                 for t, dom in enumerate(dataset.domains.names, start=1)}
        self.store.replace(name, probe={"stage1": key, "targets": probe})
        return probe

    def trains_as_configured(self, which: str, stage1: list[str]) -> bool:
        """Whether Stage I overrides leave the training of `which` (base, expert) as this report's
        configuration has it, so that the runs without them are the same runs."""
        from pipeline.settings import stage_config

        def training(extra):
            return stage_config("pretrain", [f"dataset={self.dataset}", *self.for_stage("pretrain"), *extra]).trainer[which]

        return training(stage1) == training([])

    def timing(self, name: str) -> dict | None:
        """The recorded wall time of run `name` (`seconds`) and (runs since it was recorded) machine."""
        timing = (self.store.get(name) or {}).get("seconds")
        return timing if isinstance(timing, dict) and isinstance(timing.get("seconds"), (int, float)) else None

    def for_stage(self, stage: str) -> list[str]:
        """The overrides a stage gets: `STAGE:KEY=VALUE` for that stage alone, the others for the stages
        that read their keys (pipeline/routing.py, as run.sh routes them)."""
        return split(self.overrides)[stage]

    def pipeline(self, seed: int, stage1: list[str] = ()) -> None:
        """Make sure the Stage I checkpoints and Stage II files of one seed (and Stage I settings) exist,
        every target domain decoded in one pass.

        A run recorded in the store is no proof that its artifacts are still here (a report continued on
        another machine, a cleaned checkpoint folder), so a recorded stage is called again into a scratch
        folder: the stage reuses what exists and rebuilds the rest. The recorded metrics and wall time
        stay; the record's `rebuilt` keeps the rebuild's metrics and where they differ from the
        recorded ones (another CPU's arithmetic), and a difference is logged."""
        tag = "-".join(o.replace("=", "") for o in stage1) or "default"
        if self.collect_only or (seed, tag) in self.built:
            return
        for name, stage, overrides in ((f"stage1/{tag}/seed{seed}", "pretrain", [f"seed={seed}", *stage1]),
                                       (f"stage2/{tag}/all-seed{seed}", "decoding",
                                        [f"seed={seed}", "target_dom=all", *stage1])):
            recorded = self.recorded(name, stage, overrides)
            if recorded is None:
                self.run(name, stage, overrides)
                continue
            with tempfile.TemporaryDirectory() as scratch:
                rebuilt = self.call(stage, overrides, Path(scratch))
            differences = _differences(recorded, rebuilt)
            if differences:
                log.warning("%s: rebuilt on %s, its metrics differ from the recorded ones at %s (where a "
                            "regenerated file's sha256 differs, the runs made from the recorded artifacts had "
                            "other inputs than those made from now on)", name, machine(), "; ".join(differences))
            self.store.update(name, rebuilt={"matches": not differences, "differences": differences,
                                             "machine": machine(), "metrics": rebuilt})
        self.built.add((seed, tag))


def _differences(recorded, rebuilt, at: str = "") -> list[str]:
    """Where a rebuilt stage's metrics differ from the recorded ones, over the keys both have (a
    newer version may record more) less where the artifacts lie (paths differ between checkouts)."""
    if isinstance(recorded, dict) and isinstance(rebuilt, dict):
        return [difference for key in sorted(recorded.keys() & rebuilt.keys()) if key not in ("checkpoints", "file")
                for difference in _differences(recorded[key], rebuilt[key], f"{at}/{key}")]
    return [] if recorded == rebuilt else [f"{at}: {recorded} recorded, {rebuilt} rebuilt"]


def machine() -> str:
    import os

    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else ""
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__} with {torch.get_num_threads()} threads, {device}"
