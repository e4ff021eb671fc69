"""The results command: Table 2 layout, means and standard deviations over seeds."""
from __future__ import annotations

import csv
import json

import pytest

from results import collect, headline, main, per_backbone

METRICS = ("hr@10", "hr@20", "ndcg@10", "ndcg@20", "mrr@10", "mrr@20")


def write_config(folder, stage, overrides):
    """The config.yaml a run leaves beside its metrics (the settings results.py groups by)."""
    from omegaconf import OmegaConf

    from pipeline.settings import stage_config

    (folder / "config.yaml").write_text(OmegaConf.to_yaml(stage_config(stage, overrides), resolve=True))


def write_run(folder, model, train_type, dom, seed, value, variant="taesar", settings=(), **extra):
    folder.mkdir(parents=True)
    test = {m: value for m in METRICS} | {"hr@5": value}
    (folder / "metrics.json").write_text(json.dumps({
        "stage": "finetune", "dataset": "X", "model_name": model, "train_type": train_type, "target_dom": dom,
        "seed": seed, "variant": variant if train_type == "new" else None, "valid": {}, "test": test, **extra}))
    write_config(folder, "finetune", [f"model_name={model}", f"train_type={train_type}", f"target_dom={dom}",
                                      f"seed={seed}", *(f"{k}={v}" for k, v in extra.items()), *settings])


def test_table_layout_and_seed_statistics(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs / "a", "SASRec", "new", "dom1", 1, 0.2)
    write_run(runs / "b", "SASRec", "new", "dom1", 2, 0.4)
    write_run(runs / "c", "SASRec", "sim", "dom2", 1, 0.1)
    write_run(runs / "d", "GRU4Rec", "full", "dom1", 1, 0.3)
    (runs / "e").mkdir()
    (runs / "e" / "metrics.json").write_text(json.dumps({"stage": "pretrain", "valid": {}}))  # not a fine-tuning run
    assert len(collect([runs])) == 4
    main([str(runs), "--out", str(tmp_path / "out")])
    lines = (tmp_path / "out" / "table.md").read_text().splitlines()
    assert lines[0].startswith("| dataset | model | train | dom1 HR@10 | dom1 HR@20 | dom1 NDCG@10")
    assert len(lines) == 2 + 3  # header, rule, one row per (model, train type)
    new_row = next(line for line in lines if "new (taesar)" in line)
    assert "0.3000 ± 0.1414" in new_row  # mean and sample std of 0.2 and 0.4
    assert lines[2].split(" | ")[1:3] == ["GRU4Rec", "full"]  # sorted by model, then sim, full, new
    records = list(csv.DictReader((tmp_path / "out" / "table.csv").open()))
    sasrec_new = next(r for r in records if r["train"] == "new (taesar)")
    assert float(sasrec_new["dom1 ndcg@10"]) == pytest.approx(0.3)
    assert sasrec_new["dom1 ndcg@10 seeds"] == "2" and sasrec_new["dom2 ndcg@10"] == ""


def test_no_runs_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no finetune.py or cdsr_baseline/train.py metrics.json"):
        main([str(tmp_path), "--out", str(tmp_path / "out")])


def write_baseline(folder, model, seed, values: dict):
    folder.mkdir(parents=True)
    test = {dom: {m: v for m in METRICS} for dom, v in values.items()}
    (folder / "metrics.json").write_text(json.dumps({
        "stage": "baseline", "dataset": "X", "model_name": model, "seed": seed, "valid": test, "test": test}))
    write_config(folder, "baseline", [f"model={model}", f"seed={seed}"])


def test_cross_domain_rows_come_first_in_the_papers_order(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs / "a", "SASRec", "new", "dom1", 1, 0.2)
    write_run(runs / "b", "SASRec", "full", "dom1", 1, 0.15)  # SASRec on the mixed rows: SASRec4
    write_run(runs / "b2", "SASRec", "full", "dom1", 1, 0.25, eval_history="mixed")  # mixed histories at evaluation: another row
    write_baseline(runs / "c", "SyNCRec", 1, {"dom1": 0.1, "dom2": 0.3})
    write_baseline(runs / "d", "ABXI", 1, {"dom1": 0.2, "dom2": 0.4})
    write_baseline(runs / "e", "ABXI", 2, {"dom1": 0.4, "dom2": 0.4})
    assert len(collect([runs])) == 3 + 2 + 2 * 2  # a baseline run gives one record per domain
    main([str(runs), "--out", str(tmp_path / "out")])
    lines = (tmp_path / "out" / "table.md").read_text().splitlines()[2:]
    assert [line.split(" | ")[1:3] for line in lines] == [["SASRec4", "full"], ["SASRec4", "full (mixed history)"],
                                                          ["ABXI", "mixed"],
                                                          ["SyNCRec", "mixed"], ["SASRec", "new (taesar)"]]
    assert "0.3000 ± 0.1414" in lines[2] and "0.4000 ± 0.0000" in lines[2]  # ABXI over two seeds
    assert "0.2500" in lines[1] and "0.1500" in lines[0]


def test_headline_has_a_row_per_domain_and_the_best_mean_in_bold(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs / "a", "SASRec", "new", "dom1", 1, 0.2)
    write_run(runs / "b", "SASRec", "new", "dom1", 2, 0.4)
    write_run(runs / "c", "SASRec", "sim", "dom1", 1, 0.35)
    write_run(runs / "d", "SASRec", "sim", "dom2", 1, 0.1)
    write_run(runs / "d2", "SASRec", "sim", "dom2", 2, 0.1)
    write_run(runs / "e", "GRU4Rec", "new", "dom1", 1, 0.9)  # another backbone: not in SASRec's headline
    write_baseline(runs / "f", "ABXI", 1, {"dom1": 0.25, "dom2": 0.3})
    text = headline(collect([runs]), "ndcg@10")
    assert text.splitlines() == [
        "| target | SASRec sim (n=1–2) | ABXI (n=1) | Taesar (new) (n=2) |", "|---|---|---|---|",
        "| dom1 | **0.3500** | 0.2500 | 0.3000 ± 0.1414 |",  # means compared: 0.35 > 0.30
        "| dom2 | 0.1000 ± 0.0000 | **0.3000** | – |"]


def test_per_backbone_table_marks_each_backbones_best_mean(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs / "a", "SASRec", "sim", "dom1", 1, 0.2)
    write_run(runs / "b", "SASRec", "full", "dom1", 1, 0.3)  # SASRec4: one of SASRec's rows
    write_run(runs / "c", "SASRec", "new", "dom1", 1, 0.1)
    write_run(runs / "c2", "SASRec", "new", "dom1", 2, 0.2)
    write_run(runs / "d", "GRU4Rec", "sim", "dom1", 1, 0.05)
    write_run(runs / "e", "GRU4Rec", "new", "dom1", 1, 0.07)
    write_run(runs / "f", "GRU4Rec", "new", "dom2", 1, 0.5)  # alone in its domain: nothing to beat
    write_baseline(runs / "g", "ABXI", 1, {"dom1": 0.9, "dom2": 0.9})  # its own group: not SASRec's best
    assert per_backbone(collect([runs]), "ndcg@10").splitlines() == [
        "| model | train | n | dom1 | dom2 |", "|---|---|---|---|---|",
        "| SASRec4 | full | 1 | **0.3000** | – |",
        "| ABXI | mixed | 1 | 0.9000 | 0.9000 |",
        "| GRU4Rec | sim | 1 | 0.0500 | – |",
        "| GRU4Rec | new (taesar) | 1 | **0.0700** | 0.5000 |",
        "| SASRec | sim | 1 | 0.2000 | – |",
        "| SASRec | new (taesar) | 2 | 0.1500 ± 0.0707 | – |"]


def test_runs_of_other_settings_are_never_one_cell(tmp_path):
    """Seeds of one cell share their settings; a run of other settings gets a row of its own, marked with
    its settings key, and the differences are listed."""
    runs = tmp_path / "runs"
    write_run(runs / "a", "SASRec", "sim", "dom1", 2025, 0.2, settings=["model.hidden_size=16"])
    write_run(runs / "b", "SASRec", "sim", "dom1", 2026, 0.4, settings=["model.hidden_size=32",
                                                                       "trainer.finetune.epochs=6"])
    write_run(runs / "c", "SASRec", "sim", "dom2", 2026, 0.3, settings=["model.hidden_size=32",
                                                                       "trainer.finetune.epochs=6"])
    records = collect([runs])
    assert len({r["settings"] for r in records}) == 2
    assert {r["settings"] for r in records if r["target_dom"] == "dom2"} == {records[1]["settings"]}
    text = main([str(runs), "--out", str(tmp_path / "out")]) or (tmp_path / "out" / "table.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| X | SASRec | sim [")]
    assert len(rows) == 2 and not any("±" in row for row in rows)  # 0.2 and 0.4 never averaged
    assert "model.hidden_size: 16 -> 32" in text or "model.hidden_size: 32 -> 16" in text
    assert "training.epochs" in text
    csv_rows = list(csv.DictReader((tmp_path / "out" / "table.csv").open()))
    assert sorted(r["settings"] for r in csv_rows) == sorted({r["settings"] for r in records})


def test_the_same_seed_and_settings_twice(tmp_path):
    """Counted once when both runs say the same; refused, naming both files, when they do not."""
    runs = tmp_path / "runs"
    write_run(runs / "a", "SASRec", "sim", "dom1", 2025, 0.2)
    write_run(runs / "b", "SASRec", "sim", "dom1", 2025, 0.2)  # the same run again (a reused checkpoint)
    assert len(collect([runs])) == 1
    write_run(runs / "c", "SASRec", "sim", "dom1", 2025, 0.3)  # a quick debug run with the same settings
    with pytest.raises(ValueError, match=r"runs/c/metrics.json: a run of the same seed and settings as .*runs/a/"):
        collect([runs])
    with pytest.raises(SystemExit, match="error: .*runs/c/metrics.json"):
        main([str(runs), "--out", str(tmp_path / "out")])


@pytest.mark.parametrize("text, problem", [("", "not valid JSON"), ("{}", "not a run's metrics"),
                                           ('{"stage": "finetune", "dataset": "X"}', "without model_name"),
                                           ("[1, 2]", "expected a JSON object")])
def test_a_broken_metrics_file_is_named(tmp_path, text, problem):
    runs = tmp_path / "runs"
    write_run(runs / "a", "SASRec", "sim", "dom1", 2025, 0.2)
    (runs / "b").mkdir()
    (runs / "b" / "metrics.json").write_text(text)
    with pytest.raises(SystemExit, match=f"error: {runs / 'b' / 'metrics.json'}: .*{problem}"):
        main([str(runs), "--out", str(tmp_path / "out")])


def test_a_run_without_its_config_is_refused_and_a_missing_folder_is_named(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs / "a", "SASRec", "sim", "dom1", 2025, 0.2)
    (runs / "a" / "config.yaml").unlink()
    with pytest.raises(SystemExit, match="config.yaml: not found, so the settings"):
        main([str(runs), "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="nowhere: no such folder"):
        main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")])
