"""The report's store of run records (pipeline.records.RunStore): one JSON Lines file per part, an
earlier layout's folders moved in without loss, bad lines named, concurrent writers both kept."""
from __future__ import annotations

import json
import threading

import pytest

from core.errors import RecordError
from pipeline.records import RunStore
from results import collect
from tests.test_results import write_run


def test_records_are_lines_of_one_file_per_part_sorted_by_name(tmp_path):
    store = RunStore(tmp_path / "runs")
    store.update("table2/b", metrics={"x": 1})
    store.update("table2/a", seconds={"seconds": 2.0})
    store.update("stage1/default/seed1", metrics={"y": 2})
    store.update("table2/b", seconds={"seconds": 3.0})  # merged into b's record
    lines = (tmp_path / "runs" / "table2.jsonl").read_text().splitlines()
    assert [json.loads(line)["name"] for line in lines] == ["table2/a", "table2/b"]
    assert store.get("table2/b") == {"name": "table2/b", "metrics": {"x": 1}, "seconds": {"seconds": 3.0}}
    assert store.replace("table2/b", metrics={"x": 5}) == {"name": "table2/b", "metrics": {"x": 5}}
    assert store.update("table2/b", metrics=None) == {"name": "table2/b"}  # None removes a field
    assert [r["name"] for r in store.records()] == ["stage1/default/seed1", "table2/a", "table2/b"]
    assert store.get("table2/c") is None and store.get("table3/a") is None
    with pytest.raises(ValueError, match="PART/NAME"):
        store.get("lonely")


def test_a_line_that_is_not_a_record_is_named_by_file_and_line(tmp_path):
    store = RunStore(tmp_path)
    store.update("table2/a", metrics={})
    path = tmp_path / "table2.jsonl"
    path.write_text(path.read_text() + '{"name": "table2/b", "metr\n')  # a cut line
    with pytest.raises(RecordError, match=rf"{path}:2: not a JSON object"):
        store.get("table2/a")
    path.write_text('{"name": "table2/a"}\n[1, 2]\n')
    with pytest.raises(RecordError, match=rf"{path}:2: expected a JSON object with the run's name"):
        store.records()
    path.write_text('{"name": "table2/a"}\n{"name": "table2/a", "metrics": {}}\n')
    with pytest.raises(RecordError, match=rf"{path}:2: a second record of table2/a"):
        store.update("table2/c", metrics={})
    assert path.read_text() == '{"name": "table2/a"}\n{"name": "table2/a", "metrics": {}}\n'  # left as it was


def test_two_writers_at_once_keep_each_others_lines(tmp_path):
    store = RunStore(tmp_path)

    def write(prefix):
        for i in range(40):
            RunStore(tmp_path).update(f"table2/{prefix}{i:02d}", metrics={"i": i})

    threads = [threading.Thread(target=write, args=(p,)) for p in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(store.records()) == 80


def test_folders_of_an_earlier_layout_move_into_the_store_without_loss(tmp_path):
    runs, logs = tmp_path / "report" / "runs", tmp_path / "report" / "logs"
    folder = runs / "table2" / "SASRec-new-dom1-seed1"
    write_run(folder, "SASRec", "new", "dom1", 1, 0.2)
    (folder / "seconds.json").write_text('{"seconds": 12.5, "machine": "m"}\n')
    (folder / "wandb").mkdir()
    (folder / "wandb" / "debug.log").write_text("a log\n")
    probe = runs / "selectivity" / "default" / "probe-seed1.json"
    probe.parent.mkdir(parents=True)
    probe.write_text('{"stage1": "k", "targets": {}}')
    metrics = json.loads((folder / "metrics.json").read_text())
    store = RunStore(runs)
    assert store.adopt_folders(logs) == ["table2/SASRec-new-dom1-seed1", "selectivity/default/probe-seed1"]
    record = store.get("table2/SASRec-new-dom1-seed1")
    assert record["metrics"] == metrics and record["seconds"] == {"seconds": 12.5, "machine": "m"}
    assert record["config"]["train_type"] == "new" and "rebuilt" not in record
    assert store.get("selectivity/default/probe-seed1")["probe"] == {"stage1": "k", "targets": {}}
    assert sorted(p.name for p in runs.iterdir()) == [".store.lock", "selectivity.jsonl", "table2.jsonl"]
    moved = logs / "table2" / "SASRec-new-dom1-seed1"  # everything the folder held, kept
    assert json.loads((moved / "metrics.json").read_text()) == metrics
    assert (moved / "wandb" / "debug.log").read_text() == "a log\n"
    assert (logs / "selectivity" / "default" / "probe-seed1.json").is_file()
    assert store.adopt_folders(logs) == []  # nothing left to move
    # the results table reads the store as it read the folders
    [run] = collect([tmp_path / "report" / "runs"])
    assert (run["model_name"], run["train_type"], run["seed"], run["test"]["ndcg@10"]) == ("SASRec", "new", 1, 0.2)
    # a folder copied in again with other metrics than the store's: both named, neither replaced
    write_run(folder, "SASRec", "new", "dom1", 1, 0.3)
    with pytest.raises(RecordError, match=rf"{folder}: run table2/SASRec-new-dom1-seed1 is also recorded in "):
        store.adopt_folders(logs)
    assert store.get("table2/SASRec-new-dom1-seed1")["metrics"] == metrics and folder.is_dir()
