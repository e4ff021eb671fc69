"""What a finished run leaves, read back with checks: in its folder, `metrics.json` (its numbers) and
`config.yaml` (the resolved settings it ran with); in a report's store (`RunStore`), the same two as
one line of a JSON Lines file; and the settings its results depend on.

The report (analysis/report.py) reuses a recorded run only when the settings it would run with
are the recorded ones, and the results table (results.py) puts runs into one cell only when their
settings are the same; both compare `result_settings`, which each side derives from a resolved
config: the recorded `config.yaml`, or the config this invocation composes.
"""
from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from core.errors import RecordError
from data.files import exclusive_lock, write_text_atomic

METRICS_FILE, CONFIG_FILE = "metrics.json", "config.yaml"
STAGES = ("pretrain", "decoding", "finetune", "baseline")
# What each stage's metrics must hold to be a finished run's.
REQUIRED = {"pretrain": ("valid",), "decoding": (),
            "finetune": ("dataset", "model_name", "train_type", "target_dom", "seed", "test"),
            "baseline": ("dataset", "model_name", "seed", "test")}


def read_metrics(path: Path) -> dict:
    """A run's metrics.json, checked (`check_metrics`). Raises RecordError (file named) otherwise."""
    path = Path(path)
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecordError(f"{path}: not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RecordError(f"{path}: not valid JSON ({error}); an interrupted copy or an edit, not a run's "
                          "record") from None
    return check_metrics(metrics, str(path))


def check_metrics(metrics, where: str) -> dict:
    """A run's metrics, checked: an object naming its stage, with the keys that stage's metrics hold.
    Raises RecordError naming `where` otherwise, `{}` included."""
    if not isinstance(metrics, dict):
        raise RecordError(f"{where}: expected a JSON object of a run's metrics, got {type(metrics).__name__}")
    stage = metrics.get("stage")
    if stage is None and "rows_out" in metrics:
        stage = metrics["stage"] = "decoding"  # one target's decoding, as recorded before 2026-12
    if stage not in REQUIRED:
        raise RecordError(f"{where}: not a run's metrics: its 'stage' is {stage!r}, expected one of "
                          f"{', '.join(STAGES)}")
    missing = [key for key in REQUIRED[stage] if key not in metrics]
    if missing:
        raise RecordError(f"{where}: a {stage} run's metrics without {', '.join(missing)}: the run did not finish "
                          "or the file was cut")
    return metrics


def read_config(folder: Path) -> DictConfig:
    """The resolved config a run recorded beside its metrics."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise RecordError(f"{path}: not found, so the settings of the run in {folder} are unknown")
    try:
        cfg = OmegaConf.load(path)
    except Exception as error:  # noqa: BLE001 - any YAML or OmegaConf error: the file is not a config
        raise RecordError(f"{path}: not a readable config ({type(error).__name__}: {error})") from None
    return check_config(cfg, str(path))


def check_config(cfg, where: str) -> DictConfig:
    """A recorded config (a mapping, or one read already) as a DictConfig; RecordError naming `where`."""
    if isinstance(cfg, dict):
        cfg = OmegaConf.create(cfg)
    if not isinstance(cfg, DictConfig):
        raise RecordError(f"{where}: expected a mapping of settings")
    return cfg


def result_settings(stage: str, cfg: DictConfig) -> dict:
    """What the metrics of a `stage` run with this resolved config depend on, less its seed: the
    settings of the artifacts it makes or reads (the artifact store's, pipeline/artifacts.py) and
    the evaluation protocol. Left out: where files lie, logging, progress bars and the batch sizes
    that only change speed (evaluation, decoding)."""
    from pipeline.artifacts import (ALL_DOMAINS, baseline_checkpoint, finetune_checkpoint, regenerated,
                                    stage1_paths, training_source)

    protocol = {"topk": sorted(int(k) for k in cfg.topk), "valid_metric": cfg.valid_metric}
    if stage == "pretrain":
        paths = stage1_paths(cfg)
        return {"stage1": {"base": paths.base_settings, "expert": paths.expert_settings}, **protocol}
    if stage == "decoding":
        target = cfg.target_dom or ALL_DOMAINS
        return {**regenerated(cfg, target).settings, "target_dom": target}
    if stage == "finetune":
        settings = finetune_checkpoint(cfg, training_source(cfg))[1]
        if cfg.train_type == "new" and not cfg.get("new_inter_path"):
            # spelled out (the source names only the regenerated file's folder), so that a difference
            # reads as the Stage I or decoding key it is
            settings["regenerated"] = regenerated(cfg).settings
        return {**settings, "eval_history": cfg.get("eval_history", "target_only"), **protocol}
    if stage == "baseline":
        return {**baseline_checkpoint(cfg)[1], **protocol}
    raise ValueError(f"unknown stage {stage!r}: expected one of {', '.join(STAGES)}")


def recorded_settings(folder: Path, stage: str) -> dict:
    """`result_settings` of the run recorded in `folder` (from its config.yaml)."""
    return settings_of(read_config(folder), stage, str(Path(folder) / CONFIG_FILE))


def settings_of(cfg: DictConfig, stage: str, where: str) -> dict:
    """`result_settings` of a recorded config; RecordError naming `where` when it cannot be read."""
    try:
        return result_settings(stage, cfg)
    except Exception as error:  # noqa: BLE001 - a config of an older layout: say which record
        raise RecordError(f"{where}: its settings cannot be read as a {stage} run's "
                          f"({type(error).__name__}: {error})") from None


STORE_SUFFIX = ".jsonl"
# A run's record as an earlier version of the report kept it: a folder of files, OUT/runs/NAME/.
FOLDER_FILES = {"seconds": "seconds.json", "rebuilt": "rebuilt.json"}


class RunStore:
    """The runs of a report, recorded in one folder (OUT/runs/): one JSON Lines file per part of the
    report (the first component of a run's name: `table2/SASRec-new-dom1-seed2025` is a line of
    `table2.jsonl`), one line per run, sorted by name. A line is an object holding the run's `name`
    and what was recorded of it: its `metrics`; `config`, the resolved settings it ran with; `seconds`,
    its wall time and machine; `rebuilt`, what rebuilding its artifacts on another machine gave; or a
    probe's `probe`. A handful of files that git diffs and merges line by line, where a folder of
    files per run made a thousand.

    Every change rewrites its file whole, under the store's lock and through a temporary file, so
    that two reports writing one store lose neither's lines and a reader never sees half a file."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def file(self, name: str) -> Path:
        part, _, rest = name.partition("/")
        if not part or not rest:
            raise ValueError(f"a run's name is PART/NAME, got {name!r}")
        return self.root / f"{part}{STORE_SUFFIX}"

    def get(self, name: str) -> dict | None:
        """The record of run `name`, or None."""
        return self._read(self.file(name)).get(name)

    def update(self, name: str, **fields) -> dict:
        """Set fields of the record of run `name` (creating it); a field set to None is removed."""
        return self._change(name, fields, keep=True)

    def replace(self, name: str, **fields) -> dict:
        """Make the record of run `name` these fields alone (a run made again)."""
        return self._change(name, fields, keep=False)

    def records(self) -> list[dict]:
        """Every record, part by part and by name."""
        return [record for path in sorted(self.root.glob(f"*{STORE_SUFFIX}")) for record in self._read(path).values()]

    def _change(self, name: str, fields: dict, keep: bool) -> dict:
        path = self.file(name)
        with exclusive_lock(self.root / ".store.lock"):
            records = self._read(path)
            record = {**(records.get(name, {}) if keep else {}), **fields, "name": name}
            records[name] = {key: value for key, value in record.items() if value is not None}
            write_text_atomic(path, "".join(json.dumps(records[n], sort_keys=True) + "\n" for n in sorted(records)))
        return records[name]

    @staticmethod
    def _read(path: Path) -> dict[str, dict]:
        if not path.is_file():
            return {}
        records = {}
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise RecordError(f"{path}:{number}: not a JSON object ({error}); an edit or a merge left it so: "
                                  "mend the line, or remove it to run that run again") from None
            if not isinstance(record, dict) or not isinstance(record.get("name"), str):
                raise RecordError(f"{path}:{number}: expected a JSON object with the run's name")
            if record["name"] in records:
                raise RecordError(f"{path}:{number}: a second record of {record['name']}; keep the one that is meant")
            records[record["name"]] = record
        return records

    def adopt_folders(self, logs: Path) -> list[str]:
        """Move the runs an earlier version recorded as folders (OUT/runs/NAME/ with metrics.json,
        config.yaml, seconds.json and rebuilt.json; a probe as OUT/runs/NAME.json) into the store.
        Each folder, with whatever else it holds (the stage's logs), then moves to `logs`/NAME:
        nothing is deleted. Returns the names adopted; a folder whose name the store already holds
        with another record stops it (RecordError), since one of the two is not meant."""
        adopted = []
        for metrics_file in sorted(self.root.glob(f"*/**/{METRICS_FILE}")):
            folder = metrics_file.parent
            name = folder.relative_to(self.root).as_posix()
            fields = {"metrics": read_metrics(metrics_file),
                      "config": OmegaConf.to_container(read_config(folder), resolve=False)}
            for field, file in FOLDER_FILES.items():
                if (folder / file).is_file():
                    fields[field] = json.loads((folder / file).read_text(encoding="utf-8"))
            self._adopt(name, fields, folder, Path(logs) / name)
            adopted.append(name)
        for probe in sorted(self.root.glob("*/**/probe-*.json")):
            name = probe.relative_to(self.root).with_suffix("").as_posix()
            self._adopt(name, {"probe": json.loads(probe.read_text(encoding="utf-8"))}, probe,
                        Path(logs) / probe.relative_to(self.root))
            adopted.append(name)
        for folder in sorted((p for p in self.root.glob("*/**") if p.is_dir()), key=lambda p: -len(p.parts)):
            if not any(folder.iterdir()):
                folder.rmdir()  # the emptied parents of the moved folders
        return adopted

    def _adopt(self, name: str, fields: dict, source: Path, destination: Path) -> None:
        recorded = self.get(name)
        if recorded is not None and recorded != {**fields, "name": name}:
            raise RecordError(f"{source}: run {name} is also recorded in {self.file(name)} with other contents; "
                              "move the one that is not meant out of the way")
        if recorded is None:
            self.replace(name, **fields)
        if destination.exists():
            raise RecordError(f"{source}: moving it to {destination} after recording it in {self.file(name)}, "
                              "but that path exists; move one of them out of the way")
        destination.parent.mkdir(parents=True, exist_ok=True)
        source.rename(destination)
