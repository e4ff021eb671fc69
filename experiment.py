"""What every stage script shares: config checks, seeding, the dataset, checkpoint locations,
the wandb logger and the files a run leaves in its output directory."""
from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from data import PreparedDataset, project_path
from data.files import write_text_atomic
from dataset.prepare import prepare_dataset
from model.decoder import DecoderConfig
from trainer import TrainConfig

log = logging.getLogger(__name__)

STAGES = {"run": "pretrain.py", "dec": "decoding.py", "tun": "finetune.py"}


def safe_dirname(overrides: str, limit: int = 120) -> str:
    """A sweep job's folder name from its overrides: no slashes, and short enough for any file system."""
    name = overrides.replace("/", "_") or "defaults"
    if len(name) > limit:
        name = f"{name[: limit - 9]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return name


# Registered on import, before Hydra composes the stage configs that use it.
OmegaConf.register_new_resolver("safe_dirname", safe_dirname, replace=True)
DECODER_MODELS = ("SASRec",)  # Stage I and II models: the Taesar decoder is SASRec-style


def compose(config_name: str, overrides: list[str]) -> DictConfig:
    """A stage config as Hydra composes it for `python STAGE.py OVERRIDES`, for callers outside Hydra."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(project_path("config")), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides)


def check_stage(cfg: DictConfig, expected: str) -> None:
    """The official commands pass `stage=run|dec|tun`; a script only runs its own stage."""
    if cfg.stage != expected:
        owner = STAGES.get(cfg.stage)
        hint = f"; stage={cfg.stage} is run by {owner}" if owner else f"; stages are {', '.join(STAGES)}"
        raise ValueError(f"config key 'stage' is {cfg.stage!r} but {STAGES[expected]} runs stage={expected}{hint}")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def open_dataset(cfg: DictConfig) -> PreparedDataset:
    """The configured dataset, prepared first when needed (ACDT and synthetic data build on first use)."""
    prepare_dataset(cfg.dataset, cfg.data_path, progress=cfg.progress)
    dataset = PreparedDataset(project_path(cfg.data_path), cfg.dataset.name)
    n = dataset.domains.n_domains
    if cfg.get("domains") is not None and int(cfg.domains) != n:
        raise ValueError(f"config key 'domains' is {cfg.domains} but dataset {dataset.name} has {n} domains")
    if cfg.get("target_dom") is not None:
        dataset.domains.index(cfg.target_dom)
    return dataset


def train_config(cfg: DictConfig, **changes) -> TrainConfig:
    """The trainer settings of the official top-level keys, with per-model changes."""
    values = dict(
        epochs=cfg.epochs,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        stopping_step=cfg.stopping_step,
        eval_step=cfg.eval_step,
        valid_metric=cfg.valid_metric,
        topk=tuple(cfg.topk),
        clip_grad_norm=cfg.clip_grad_norm,
        enable_amp=cfg.enable_amp,
    )
    values.update(changes)
    if cfg.learner.lower() != "adam":
        raise ValueError(f"config key 'learner' is {cfg.learner!r}; only adam is supported")
    return TrainConfig(**values)


def decoder_config(cfg: DictConfig, n_items: int) -> DecoderConfig:
    if cfg.model_name not in DECODER_MODELS:
        raise ValueError(
            f"unknown model_name {cfg.model_name!r} for Stages I and II: the Taesar decoder is "
            f"{', '.join(DECODER_MODELS)} (other backbones are trained by finetune.py)"
        )
    return DecoderConfig.from_model_params(n_items, cfg.MAX_ITEM_LIST_LENGTH, cfg.model)


# --------------------------------------------------------------------------- checkpoint locations


def settings_key(settings: dict) -> str:
    """Eight hex digits that name a folder of outputs made with `settings`."""
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]


@dataclass(frozen=True)
class Stage1Paths:
    """Where Stage I checkpoints live: one folder per base-model setting, one sub-folder per expert variant.

    `CHECKPOINT_DIR/NAME/MODEL-h{hidden}-l{layers}-{key}/MODEL-NAME-SEED.full.ckpt` and
    `.../{variant}-{key}/MODEL-NAME-SEED.dom{d}.ckpt`; each folder also holds a
    `settings.json` saying what its key stands for. Runs whose settings differ
    never share a folder, and later stages find the checkpoints from the config alone.
    """

    base_dir: Path
    expert_dir: Path
    stem: str  # MODEL-NAME-SEED

    @property
    def base(self) -> Path:
        return self.base_dir / f"{self.stem}.full.ckpt"

    def expert(self, dom: str) -> Path:
        return self.expert_dir / f"{self.stem}.{dom}.ckpt"


def expert_variant(cfg: DictConfig) -> str:
    """Table 3 name of the configured expert training (`taesar` is the full method)."""
    names = {("base", "dsp"): "taesar", ("scratch", "dsp"): "wo_dsa", ("base", "next_item"): "dsa_wo_dsp",
             ("scratch", "next_item"): "wo_dsa_wo_dsp"}
    key = (cfg.expert.init, cfg.expert.loss)
    if key not in names:
        raise ValueError(
            f"config keys expert.init={key[0]!r}, expert.loss={key[1]!r}: expected init base|scratch, loss dsp|next_item"
        )
    return names[key]


def stage1_paths(cfg: DictConfig, write_settings: bool = False) -> Stage1Paths:
    dataset = OmegaConf.to_container(cfg.dataset, resolve=True)
    base_settings = {
        "dataset": dataset,
        "model_name": cfg.model_name,
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "MAX_ITEM_LIST_LENGTH": cfg.MAX_ITEM_LIST_LENGTH,
        # Not train_batch_size: the official decoding command sets it to its own batch size
        # (train_batch_size=32), and decoding must find the same folder. Pretraining checks it
        # through the checkpoint's meta instead (`checkpoint_meta(..., train_batch_size=...)`).
        "training": {k: OmegaConf.to_container(cfg, resolve=True)[k] for k in (
            "epochs", "learner", "learning_rate", "weight_decay", "eval_step",
            "stopping_step", "clip_grad_norm", "enable_amp", "valid_metric", "topk")},
    }
    expert_settings = {"base": settings_key(base_settings), "expert": OmegaConf.to_container(cfg.expert, resolve=True)}
    m = cfg.model
    base_dir = project_path(cfg.checkpoint_dir) / cfg.dataset.name / (
        f"{cfg.model_name}-h{m.hidden_size}-l{m.n_layers}-{settings_key(base_settings)}"
    )
    expert_dir = base_dir / f"{expert_variant(cfg)}-{settings_key(expert_settings)}"
    if write_settings:
        for folder, settings in ((base_dir, base_settings), (expert_dir, expert_settings)):
            folder.mkdir(parents=True, exist_ok=True)
            write_text_atomic(folder / "settings.json", json.dumps(settings, indent=2, sort_keys=True) + "\n")
    return Stage1Paths(base_dir, expert_dir, f"{cfg.model_name}-{cfg.dataset.name}-{cfg.seed}")


# The decoding options that name a variant when they differ from the full method.
_DECODING_ABLATIONS = {
    ("source_experts", False): "wo_sde",
    ("global_test", False): "wo_gcs",
    ("local_scores", False): "wo_lcs",
    ("weights", "position"): "position_weights",
    ("reference_shift", True): "reference_shift",
}


def variant_name(cfg: DictConfig) -> str:
    """Table 3 name of the whole configured pipeline: `taesar`, `wo_dsa`, `wo_sde`, `wo_dsa+wo_gcs`, ..."""
    parts = [] if expert_variant(cfg) == "taesar" else [expert_variant(cfg)]
    parts += [name for (key, value), name in _DECODING_ABLATIONS.items() if cfg.decoding[key] == value]
    return "+".join(parts) or "taesar"


def regenerated_dir(cfg: DictConfig) -> Path:
    """Folder of the regenerated training files of this configuration.

    `DATA_PATH/NAME/regenerated/VARIANT-KEY/`, keyed by the Stage I checkpoints
    it decodes with and the decoding options (not the chunk size, which only
    changes speed), so ablations and settings never overwrite each other.
    """
    paths = stage1_paths(cfg)
    decoding = OmegaConf.to_container(cfg.decoding, resolve=True)
    decoding.pop("positions_per_chunk")
    key = settings_key({"stage1": str(paths.expert_dir.relative_to(project_path(cfg.checkpoint_dir))),
                "decoding": decoding, "MAX_ITEM_LIST_LENGTH": cfg.MAX_ITEM_LIST_LENGTH})
    return project_path(cfg.data_path) / cfg.dataset.name / "regenerated" / f"{variant_name(cfg)}-{key}"


def checkpoint_meta(dataset: PreparedDataset, model_config: DecoderConfig, role: str,
                    train_batch_size: int | None = None) -> dict:
    """What a checkpoint must agree with to be used: dataset, vocabulary, domain ranges, model, role.

    Pretraining adds its batch size (checked when a finished checkpoint is reused);
    later stages leave it out, and `check_meta` then ignores it.
    """
    meta = {
        "dataset": dataset.name,
        "n_items": dataset.domains.n_items,
        "domain_starts": list(dataset.domains.starts),
        "model_args": asdict(model_config),
        "role": role,
    }
    if train_batch_size is not None:
        meta["train_batch_size"] = int(train_batch_size)
    return meta


# --------------------------------------------------------------------------- run outputs


class RunLogger:
    """wandb when the config asks for it (`logger.mode`: offline by default, online, disabled).

    Offline runs never need a login or a network; they are written under the
    run's output directory and can be synced later with `wandb sync`.
    """

    def __init__(self, cfg: DictConfig, run_dir: Path, job: str):
        self.run = None
        mode = cfg.logger.mode
        if mode not in ("offline", "online", "disabled"):
            raise ValueError(f"config key 'logger.mode' must be offline, online or disabled, got {mode!r}")
        if mode == "disabled":
            return
        import wandb

        self.run = wandb.init(
            project=cfg.logger.project,
            entity=cfg.logger.entity,
            group=f"{cfg.dataset.name}-{job}",
            name=f"{job}-{cfg.dataset.name}-{cfg.seed}",
            dir=str(run_dir),
            mode=mode,
            config=OmegaConf.to_container(cfg, resolve=True),
            settings=wandb.Settings(silent=True, console="off"),
        )

    def log(self, values: dict, step=None) -> None:
        if self.run is not None:
            self.run.log(values)

    def summary(self, values: dict) -> None:
        if self.run is not None:
            self.run.summary.update(values)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()


def run_dir_of(cfg: DictConfig) -> Path:
    """The Hydra output directory of this run (a fresh `outputs/` folder outside Hydra, e.g. in tests)."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return project_path(cfg.get("run_dir") or "outputs/manual")


def write_run_files(run_dir: Path, cfg: DictConfig, metrics: dict) -> None:
    """The resolved config and the metrics of a run, in its output directory."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    write_text_atomic(run_dir / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    log.info("wrote %s", run_dir / "metrics.json")
