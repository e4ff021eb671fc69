"""What a finished run leaves in its folder, read back with checks: `metrics.json` (its numbers) and
`config.yaml` (the resolved settings it ran with), and the settings its results depend on.

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

METRICS_FILE, CONFIG_FILE = "metrics.json", "config.yaml"
STAGES = ("pretrain", "decoding", "finetune", "baseline")
# What each stage's metrics must hold to be a finished run's.
REQUIRED = {"pretrain": ("valid",), "decoding": (),
            "finetune": ("dataset", "model_name", "train_type", "target_dom", "seed", "test"),
            "baseline": ("dataset", "model_name", "seed", "test")}


def read_metrics(path: Path) -> dict:
    """A run's metrics.json, checked: valid JSON, an object naming its stage, with the keys that
    stage's metrics hold. Raises RecordError (file named) otherwise, `{}` included."""
    path = Path(path)
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecordError(f"{path}: not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RecordError(f"{path}: not valid JSON ({error}); an interrupted copy or an edit, not a run's "
                          "record") from None
    if not isinstance(metrics, dict):
        raise RecordError(f"{path}: expected a JSON object of a run's metrics, got {type(metrics).__name__}")
    stage = metrics.get("stage")
    if stage is None and "rows_out" in metrics:
        stage = metrics["stage"] = "decoding"  # one target's decoding, as recorded before 2026-12
    if stage not in REQUIRED:
        raise RecordError(f"{path}: not a run's metrics: its 'stage' is {stage!r}, expected one of "
                          f"{', '.join(STAGES)}")
    missing = [key for key in REQUIRED[stage] if key not in metrics]
    if missing:
        raise RecordError(f"{path}: a {stage} run's metrics without {', '.join(missing)}: the run did not finish "
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
    if not isinstance(cfg, DictConfig):
        raise RecordError(f"{path}: expected a mapping of settings")
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
    cfg = read_config(folder)
    try:
        return result_settings(stage, cfg)
    except Exception as error:  # noqa: BLE001 - a config of an older layout: say which file
        raise RecordError(f"{Path(folder) / CONFIG_FILE}: its settings cannot be read as a {stage} run's "
                          f"({type(error).__name__}: {error})") from None
