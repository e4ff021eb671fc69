"""The report command on tiny data: it runs what it needs, writes the tables, claims and figures,
and a second call repeats nothing."""
from __future__ import annotations

import json

from analysis.report import main
from analysis.run_store import machine
from pipeline.records import RunStore
from tests.conftest import TINY_MODEL, tiny_overrides


def drop_record(store: RunStore, name: str) -> None:
    """Remove a run's line from its store file, as a user deleting it by hand would."""
    path = store.file(name)
    path.write_text("".join(line + "\n" for line in path.read_text().splitlines()
                            if json.loads(line)["name"] != name))


def test_report_on_tiny_data_is_complete_and_resumable(tmp_path):
    overrides = [o for o in tiny_overrides(tmp_path) if not o.startswith(("dataset=", "run_dir"))]
    overrides += ["trainer.base.epochs=2", "trainer.expert.epochs=1", "trainer.finetune.epochs=1",
                  *(f"finetune:{o}" for o in TINY_MODEL)]
    argv = ["--dataset", "tiny", "--seeds", "2025", "--domains", "dom1", "--backbones", "SASRec",
            "--baselines", "--parts", "table2", "selectivity", "--base-epochs", "1", "--expert-epochs", "1",
            "--out", str(tmp_path / "report"), "--", *overrides]
    text = main(argv)
    out = tmp_path / "report"
    assert "## Table 2" in text and "| tiny | SASRec4 | full |" in text and "new (taesar)" in text
    assert ("| target | SASRec sim (n=1) | SASRec4 (full) (n=1) | SASRec4 (full, mixed history) (n=1) | "
            "Taesar (new) (n=1) |") in text  # the headline table
    wall_time = text.split("## Wall time")[1].split("##")[0]
    assert "| seed | Taesar (Stage I + II + SASRec on new, all domains) | machine |" in wall_time
    assert f"| {machine()} |" in wall_time  # the machine each figure was measured on
    backbone_time = text.split("## Wall time of the backbones' Table 2 runs")[1].split("##")[0]
    assert "| seed | SASRec | machine |" in backbone_time
    assert f" | {machine()} |" in backbone_time and "of 3 runs" not in backbone_time  # sim, full, new all timed
    claims = json.loads((out / "claims.json").read_text())
    assert [c["claim"] for c in claims] == ["new > sim", "new > full"]
    for claim in claims:
        assert claim["low"] <= claim["delta"] <= claim["high"] and claim["users"] > 0
        assert claim["verdict"] in ("holds", "does not hold", "undecided") and f"**{claim['verdict']}**" in text
    selectivity = json.loads((out / "selectivity.json").read_text())
    assert {(r["trained"], r["epochs"]) for r in selectivity} == {("base", "1"), ("expert", "1")}
    assert {r["source"] for r in selectivity} == {"dom2", "dom3"}
    assert all(0.0 <= r["converted"] <= 1.0 and 0.0 <= r["expert_argmax_in_target"] <= 1.0 for r in selectivity)
    records = RunStore(out / "runs").records()
    assert len([r for r in records if "probe" in r and r["name"].endswith("probe-seed2025")]) == 2  # one per setting
    # one expert epoch is what these overrides train anyway: that setting's rows are the default runs
    assert sorted(r["name"] for r in records if r["name"].startswith("stage1/")) == [
        "stage1/default/seed2025", "stage1/trainer.base.epochs1-trainer.base.stopping_step0-trainer.base.keeplast/seed2025"]
    assert (out / "selectivity.png").read_bytes().startswith(b"\x89PNG")
    # stage I, stage II (all domains), table 2 (sim, full, new, full with mixed histories); base 1 epoch:
    # I, II, III; expert 1 epoch: III (on the default Stage II); each with its config and wall time
    runs = [r for r in records if "metrics" in r]
    assert len(runs) == 1 + 1 + 4 + (1 + 1 + 1) + 1
    assert all(r["config"]["seed"] == 2025 and r["seconds"]["seconds"] > 0 for r in runs)
    assert sorted(p.name for p in (out / "runs").iterdir()) == [
        ".store.lock", "selectivity.jsonl", "stage1.jsonl", "stage2.jsonl", "table2.jsonl"]  # no folder per run
    assert (out / "logs" / "table2" / "SASRec-new-dom1-seed2025" / "metrics.json").is_file()  # the stage's own
    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*.jsonl")}
    assert main(argv) == text  # nothing run again, the same report
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*.jsonl")} == stamps
    # collect-only with more seeds: the missing seed's runs are not made, the table has what exists
    collected = main([*argv[:3], "2025", "2026", *argv[4:-len(overrides) - 1], "--collect-only", "--",
                      *overrides])
    assert "| tiny | SASRec | new (taesar) |" in collected
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*.jsonl")} == stamps


def test_claims_against_the_baselines_pair_the_same_users():
    from analysis.report_writer import comparisons

    def ranks(users, values):
        return {"test_ranks": {"users": users, "ranks": values}}

    users, better = list(range(1, 31)), [0] * 20 + [30] * 10  # 20 of 30 users ranked first, 10 missed
    runs = {("SASRec", "new", "dom1", 1): ranks(users, better),
            ("SASRec", "sim", "dom1", 1): ranks(users, better),
            # another order of the same users: paired by user id (ABXI misses the top 10 for everyone)
            ("ABXI", "mixed", "dom1", 1): ranks(users[::-1], [30] * 10 + [20] * 20)}
    runs[("CGRec", "mixed", "dom1", 2)] = ranks(users, better)  # another seed than new's: nothing to pair
    rows = comparisons(runs, ["SASRec"], ["dom1"], ["ABXI", "CGRec"])  # no full run, no CGRec run of seed 1: no claim
    assert [(r["claim"], r["verdict"]) for r in rows] == [("new > sim", "undecided"), ("new > ABXI", "holds")]
    assert rows[0]["delta"] == 0.0 and abs(rows[1]["delta"] - 2 / 3) < 1e-12  # NDCG 1 against 0 for 20 users


def test_report_continued_elsewhere_rebuilds_the_artifacts_a_missing_run_needs(tmp_path):
    """Recorded Stage I/II runs whose checkpoints and regenerated files are gone (another machine):
    a missing run on the regenerated rows rebuilds them, the recorded metrics stay, and the rebuild
    says that it reproduced them."""
    import hashlib
    import shutil
    from pathlib import Path

    overrides = [o for o in tiny_overrides(tmp_path) if not o.startswith(("dataset=", "run_dir"))]
    overrides += ["trainer.base.epochs=2", "trainer.expert.epochs=1", "trainer.finetune.epochs=1",
                  *(f"finetune:{o}" for o in TINY_MODEL)]
    argv = ["--dataset", "tiny", "--seeds", "2025", "--domains", "dom1", "--backbones", "SASRec",
            "--baselines", "--parts", "table2", "--out", str(tmp_path / "report"), "--", *overrides]
    main(argv)
    store = RunStore(tmp_path / "report" / "runs")
    new = "table2/SASRec-new-dom1-seed2025"
    first = store.get(new)["metrics"]
    # Stage I's record as another machine's arithmetic would have left it
    stage1 = "stage1/default/seed2025"
    recorded = store.get(stage1)["metrics"]
    measured = recorded["valid"]["dom1"]["ndcg@10"]
    recorded["valid"]["dom1"]["ndcg@10"] = measured + 1e-9
    store.update(stage1, metrics=recorded)
    timing = store.get(stage1)["seconds"]
    for folder in ("checkpoint", "regenerated"):
        shutil.rmtree(tmp_path / folder)
    drop_record(store, new)
    main(argv)
    assert store.get(new)["metrics"]["test"] == first["test"]  # the same regenerated rows, deterministically
    assert store.get(stage1)["metrics"] == recorded and store.get(stage1)["seconds"] == timing  # kept
    rebuilt = {stage: store.get(stage)["rebuilt"] for stage in ("stage1/default/seed2025", "stage2/default/all-seed2025")}
    assert rebuilt["stage1/default/seed2025"]["matches"] is False
    assert rebuilt["stage1/default/seed2025"]["differences"] == [
        f"/valid/dom1/ndcg@10: {measured + 1e-9} recorded, {measured} rebuilt"]
    # the same regenerated rows: the decoding records its file's digest, and the rebuild's is the same
    assert rebuilt["stage2/default/all-seed2025"]["matches"] is True
    decoded = rebuilt["stage2/default/all-seed2025"]["metrics"]["reports"]["dom1"]
    assert decoded["sha256"] == hashlib.sha256(Path(decoded["file"]).read_bytes()).hexdigest()
    assert (tmp_path / "checkpoint").is_dir() and any((tmp_path / "regenerated").rglob("*.inter"))


def test_report_waits_for_another_job_training_the_same_checkpoint(tmp_path, caplog):
    """Two reports building one table on two cores: the second one to reach a checkpoint another
    job is training waits for it and goes on (here the holder dies without a checkpoint, so the
    waiting one trains it), instead of stopping with BusyError."""
    import logging
    import threading

    from analysis.run_store import Report
    from data.files import exclusive_lock
    from pipeline.artifacts import stage1_paths
    from pipeline.settings import stage_config
    from trainer import lock_file

    overrides = [o for o in tiny_overrides(tmp_path) if not o.startswith(("dataset=", "run_dir"))]
    overrides += ["trainer.base.epochs=1", "trainer.expert.epochs=1"]
    base = stage1_paths(stage_config("pretrain", ["dataset=tiny", *overrides, "seed=2025"])).base
    held, waiting = threading.Event(), threading.Event()

    class Watch(logging.Handler):
        def emit(self, record):
            if "waiting for it to finish" in record.getMessage():
                waiting.set()

    def other_job():
        with exclusive_lock(lock_file(base)):
            held.set()
            assert waiting.wait(timeout=120), "the report never waited on the held lock"

    holder = threading.Thread(target=other_job)
    watch = Watch()
    logging.getLogger("analysis.run_store").addHandler(watch)
    try:
        with caplog.at_level(logging.INFO, logger="analysis.run_store"):
            holder.start()
            held.wait(timeout=60)  # the other job holds the lock before the report starts
            metrics = Report("tiny", tmp_path / "report", overrides).call("pretrain", ["seed=2025"],
                                                                             tmp_path / "run")
        holder.join()
    finally:
        logging.getLogger("analysis.run_store").removeHandler(watch)
    assert waiting.is_set() and base.is_file()
    assert metrics["stage"] == "pretrain" and "full" in metrics["valid"]
    assert (tmp_path / "run" / "metrics.json").is_file()


def test_a_recorded_run_is_reused_only_with_the_settings_it_was_made_with(tmp_path, caplog):
    """The report reuses a run only when its recorded settings are this invocation's: other settings
    stop it, naming the run and the keys, unless --rerun; a broken record is run again; the header
    holds every argument and override."""
    import logging
    import shlex

    import pytest

    overrides = [o for o in tiny_overrides(tmp_path) if not o.startswith(("dataset=", "run_dir"))]
    overrides += ["trainer.base.epochs=2", "trainer.expert.epochs=1", "trainer.finetune.epochs=1",
                  *(f"finetune:{o}" for o in TINY_MODEL)]
    argv = ["--dataset", "tiny", "--seeds", "2025", "--domains", "dom1", "--backbones", "SASRec",
            "--baselines", "--parts", "table2", "--out", str(tmp_path / "report"), "--", *overrides]
    text = main(argv)
    assert f"command `{shlex.join(['python', '-m', 'analysis.report', *argv])}`" in text
    store = RunStore(tmp_path / "report" / "runs")
    sim = "table2/SASRec-sim-dom1-seed2025"
    recorded = store.get(sim)

    longer = [*argv, "finetune:trainer.finetune.epochs=2"]
    with pytest.raises(SystemExit, match=rf"error: {store.file(sim)} \({sim}\): recorded with other settings "
                                         r".*training\.epochs: 1 -> 2.*another --out, or pass --rerun"):
        main(longer)
    with pytest.raises(SystemExit, match="training.epochs: 1 -> 2"):
        main([*longer[:-len(overrides) - 2], "--collect-only", *longer[-len(overrides) - 2:]])  # nor collected
    assert store.get(sim) == recorded  # nothing was replaced

    store.update(sim, metrics={})  # a cut record: run again, not taken as done
    with caplog.at_level(logging.WARNING, logger="analysis.report"):
        main(argv)
    assert "not a run's metrics" in caplog.text and "running it again" in caplog.text
    assert store.get(sim)["metrics"]["test"] == recorded["metrics"]["test"]

    text = main(["--rerun", *longer])  # the runs of other settings made again, replacing their records
    assert "trainer.finetune.epochs=2" in text.split("\n")[2]
    assert store.get(sim)["config"]["trainer"]["finetune"]["epochs"] == 2
    again = main(longer)  # now recorded with these settings: reused, the same tables
    assert again.split("\n")[3:] == text.split("\n")[3:] and "--rerun" not in again.split("\n")[2]


def test_backbone_wall_times_sum_the_timed_runs_and_say_how_many():
    from analysis.report_writer import backbone_wall_times, table2_run

    class Timings:  # the one method of analysis.run_store.Report the table reads
        def __init__(self, seconds: dict):
            self.seconds = seconds

        def timing(self, name):
            return self.seconds.get(name)

    report = Timings({table2_run("GCEGNN", t, d, 1): {"seconds": 60.0 * minutes, "machine": "box A"}
                      for (t, d), minutes in {("sim", "dom1"): 2, ("full", "dom1"): 30, ("new", "dom1"): 7,
                                              ("sim", "dom2"): 1, ("full", "dom2"): 20, ("new", "dom2"): 5}.items()})
    report.seconds[table2_run("SASRec", "sim", "dom1", 1)] = {"seconds": 90.0}  # from before machines were recorded
    rows = backbone_wall_times(report, [1, 2], ["dom1", "dom2"], ["GCEGNN", "SASRec"])
    assert rows == [["1", "65.0", "1.5 (1 of 6 runs)", "box A; not recorded"],
                    ["2", "–", "–", "–"]]
