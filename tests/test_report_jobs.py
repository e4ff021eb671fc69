"""`analysis.report --jobs N`: the runs shared out among N processes, each made once; a job leaves a
run another holds for the end instead of waiting for it."""
from __future__ import annotations

import os
import threading

import pytest

from analysis.report import main
from analysis.run_store import Report
from data.files import exclusive_lock
from pipeline.records import RunStore
from tests.conftest import TINY_MODEL, tiny_overrides


def job_report(tmp_path, index: int = 0) -> Report:
    return Report("tiny", tmp_path / "report", [], job=(index, 2))


class OtherJob:
    """Another process's claim on a run, held from a thread (flock locks of two open files exclude each
    other within one process too)."""

    def __init__(self, path):
        self.path, self.held, self.release = path, threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._hold)

    def _hold(self):
        with exclusive_lock(self.path):
            self.held.set()
            self.release.wait(timeout=60)

    def __enter__(self):
        self.thread.start()
        assert self.held.wait(timeout=10)
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.thread.join()


def test_a_run_another_job_holds_is_left_for_the_end_then_taken_up(tmp_path):
    report = job_report(tmp_path)
    made = []
    with OtherJob(tmp_path / "report" / "logs" / "table2" / "A.claim"):
        assert report.once("table2/A", lambda: made.append("A") or "a") is None  # not waited for
        assert report.once("table2/B", lambda: made.append("B") or "b") == "b"  # the next run goes on
        assert made == ["B"] and [name for name, _ in report.deferred] == ["table2/A"]
    report.run_deferred()  # the claim is free now: A is made, by this job
    assert made == ["B", "A"] and report.deferred == [] and not report.deferring


def test_a_run_whose_inputs_another_job_makes_is_deferred_whole(tmp_path):
    """Stage I of a seed claimed by another job: the fine-tuning that needs it is left for later, and its
    own claim released, rather than held while waiting."""
    report = job_report(tmp_path)
    made = []

    def fine_tuning():
        report.once("stage1/default/seed2025", lambda: made.append("stage1"))
        made.append("finetune")
        return "done"

    with OtherJob(tmp_path / "report" / "logs" / "stage1" / "default" / "seed2025.claim"):
        assert report.once("table2/new", fine_tuning) is None
        assert made == [] and [name for name, _ in report.deferred] == ["table2/new"]
        # its claim was released: another job could take it now
        with exclusive_lock(tmp_path / "report" / "logs" / "table2" / "new.claim", wait=False):
            pass
    report.run_deferred()
    assert made == ["stage1", "finetune"]


def test_a_run_among_its_own_inputs_does_not_wait_for_itself(tmp_path):
    """The selectivity study's Stage II run needs the seed's pipeline, which runs that same Stage II."""
    report = job_report(tmp_path)
    report.deferring = False  # a wait on its own claim would never end
    inner = threading.Thread(target=lambda: report.once(
        "stage2/x", lambda: report.once("stage2/x", lambda: "inner") and "outer"))
    inner.start()
    inner.join(timeout=10)
    assert not inner.is_alive()


def test_jobs_share_the_runs_of_a_report_each_made_once(tmp_path):
    """Two jobs on tiny data: every run recorded once, by one of them, both jobs having made runs; the
    report is written after both (the same command again runs nothing)."""
    overrides = [o for o in tiny_overrides(tmp_path) if not o.startswith(("dataset=", "run_dir"))]
    overrides += ["trainer.base.epochs=1", "trainer.expert.epochs=1", "trainer.finetune.epochs=1",
                  *(f"finetune:{o}" for o in TINY_MODEL)]
    argv = ["--dataset", "tiny", "--seeds", "2025", "--domains", "dom1", "dom2", "--backbones", "SASRec",
            "--baselines", "--parts", "table2", "--out", str(tmp_path / "report"), "--", *overrides]
    text = main(["--jobs", "2", *argv])
    assert "## Table 2" in text and "| tiny | SASRec4 | full |" in text
    store = RunStore(tmp_path / "report" / "runs")
    runs = [r for r in store.records() if "metrics" in r]
    # Stage I, Stage II, and sim, full, new, full with mixed histories for two domains
    assert len(runs) == 2 + 4 * 2 and len({r["name"] for r in runs}) == len(runs)
    assert {r["seconds"]["job"] for r in runs} == {"1 of 2", "2 of 2"}
    threads = os.environ.get("OMP_NUM_THREADS") or max(1, len(os.sched_getaffinity(0)) // 2)
    assert all(f"with {threads} threads" in r["seconds"]["machine"] for r in runs)  # the cores shared out
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "report" / "runs").glob("*.jsonl")}
    assert main(argv) == text.replace("--jobs 2 ", "")
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "report" / "runs").glob("*.jsonl")} == stamps


def test_jobs_must_be_positive(tmp_path):
    with pytest.raises(SystemExit, match="--jobs must be at least 1, got 0"):
        main(["--jobs", "0", "--dataset", "tiny", "--out", str(tmp_path / "report")])


def test_jobs_pause_alike_under_a_time_limit_and_the_same_command_goes_on(tmp_path, monkeypatch, capfd):
    """TAESAR_TIME_LIMIT=0: each job pauses its training after one epoch; the report exits with 75
    once both have stopped, and the same command, without the limit, finishes every run."""
    from core.errors import PAUSED_EXIT_CODE

    overrides = [o for o in tiny_overrides(tmp_path) if not o.startswith(("dataset=", "run_dir"))]
    overrides += ["trainer.base.epochs=1", "trainer.expert.epochs=1", "trainer.finetune.epochs=2",
                  "trainer.finetune.stopping_step=0", *(f"finetune:{o}" for o in TINY_MODEL)]
    argv = ["--jobs", "2", "--dataset", "tiny", "--seeds", "2025", "--domains", "dom1", "--backbones", "SASRec",
            "--baselines", "--parts", "table2", "--out", str(tmp_path / "report"), "--", *overrides]
    monkeypatch.setenv("TAESAR_TIME_LIMIT", "0")
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == PAUSED_EXIT_CODE
    err = capfd.readouterr().err
    assert "paused after epoch 0 of at most 2" in err and "of 2 jobs paused; run the same command again" in err
    store = RunStore(tmp_path / "report" / "runs")
    assert not [r for r in store.records() if r["name"].startswith("table2/")]  # each job paused its first
    monkeypatch.delenv("TAESAR_TIME_LIMIT")
    main(argv)
    # sim, full, new and full with mixed histories, each trained in two parts
    assert len([r for r in store.records() if r["name"].startswith("table2/")]) == 4
