"""The configuration of every stage: composition, the schema checked at start-up, the official
top-level keys, and the adapters from config sections to the objects the code runs with.

Every stage script starts with `stage_settings(cfg, stage)`: it refuses a config meant for
another stage, an unknown key (`+epochz=3` included), a value of the wrong type or out of range,
and then applies the official top-level training keys (`epochs=`, `train_batch_size=`, ...) to
the stage being run (`OFFICIAL_KEYS`, pipeline/routing.py, which says which stage reads which key).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import shlex
from dataclasses import dataclass, field
from typing import Literal, Optional

from omegaconf import DictConfig, OmegaConf, open_dict

from data.paths import project_path
from pipeline.routing import OFFICIAL_KEYS, section_key
from core.schema import ConfigError, above, at_least, from_config

STAGES = {"run": "pretrain.py", "dec": "decoding.py", "tun": "finetune.py"}
TRAINERS = ("base", "expert", "finetune")
TRAIN_TYPES = ("sim", "full", "new")  # Stage III's training rows (docs/method.md), in the tables' order
DECODER_MODELS = ("SASRec",)  # Stage I and II: the Taesar decoder is SASRec-style
SASREC4 = "SASRec4"  # the paper's name for model_name=SASRec train_type=full


def safe_dirname(overrides: str, limit: int = 120) -> str:
    """A sweep job's folder name from its overrides: no slashes, and short enough for any file system."""
    name = overrides.replace("/", "_") or "defaults"
    if len(name) > limit:
        name = f"{name[: limit - 9]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return name


# Registered on import, before Hydra composes the stage configs that use it.
OmegaConf.register_new_resolver("safe_dirname", safe_dirname, replace=True)


def rank_suffix() -> str:
    """'' in a single process and on rank 0 of a torchrun launch, '-rankR' on the other ranks: each
    rank's Hydra output (its log, its .hydra/) gets a folder of its own; only rank 0 writes run files."""
    rank = os.environ.get("RANK", "0")
    return "" if rank in ("", "0") else f"-rank{rank}"


OmegaConf.register_new_resolver("rank_suffix", rank_suffix, replace=True)


def compose(config_name: str, overrides: list[str]) -> DictConfig:
    """A stage config as `python STAGE.py OVERRIDES` runs with it, for callers outside Hydra: composed,
    checked and with the official keys applied (`stage_settings`), so that the artifact locations
    computed from it are the stage's own."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(project_path("config")), version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, overrides=overrides)
    if config_name == "prepare":
        return prepare_settings(cfg)
    if config_name == "baseline":
        return baseline_settings(cfg)
    return stage_settings(cfg, _STAGE_OF[config_name]) if config_name in _STAGE_OF else cfg


_STAGE_OF = {"pretrain": "run", "decoding": "dec", "finetune": "tun"}


# --------------------------------------------------------------------------- the schema


@dataclass(kw_only=True)
class DomainFile:
    name: str  # display name
    file: str  # raw file in raw_dir


@dataclass(kw_only=True)
class DatasetSettings:
    """config/dataset/*.yaml."""

    name: str
    source: Literal["files", "acdt", "synthetic"]
    raw_dir: str
    domains: Optional[list[DomainFile]]
    user_core: int = field(metadata=at_least(1))
    item_core: int = field(metadata=at_least(1))
    max_seq_len: int = field(metadata=at_least(1))
    generator: Optional[dict] = None  # source synthetic: the keys of dataset.synthetic.SyntheticConfig

    def __post_init__(self):
        if self.source == "synthetic":
            from dataset.synthetic import SyntheticConfig

            from_config(SyntheticConfig, self.generator or {}, "dataset.generator.")
        elif self.generator is not None:
            raise ConfigError(f"config key 'dataset.generator' is only read with dataset.source=synthetic, "
                              f"not {self.source}")
        if self.source != "synthetic" and not self.domains:
            raise ConfigError(f"config key 'dataset.domains' must list the domains of dataset {self.name}")


@dataclass(kw_only=True)
class TrainerSections:
    """config/trainer/*.yaml, one section per training of the pipeline."""

    base: dict  # Stage I, the base model M
    expert: dict  # Stage I, each domain expert E_d
    finetune: dict  # Stage III, the backbone


@dataclass(kw_only=True)
class ExpertSettings:
    init: Literal["base", "scratch"]
    loss: Literal["dsp", "next_item"]


@dataclass(kw_only=True)
class DecodingSettings:
    weights: Literal["elementwise", "position"]
    source_experts: bool
    global_test: bool
    local_scores: bool
    reference_shift: bool
    batch_size: int = field(metadata=at_least(1))
    memory_gb: float = field(metadata=above(0))


@dataclass(kw_only=True)
class LoggerSettings:
    mode: Literal["offline", "online", "disabled"]
    project: str
    entity: Optional[str]


@dataclass(kw_only=True)
class RunSettings:
    """The keys of every training run, Taesar's stages and the cross-domain baselines alike."""

    dataset: DatasetSettings
    logger: LoggerSettings
    gpu_id: int
    seed: int = field(metadata=at_least(0))
    data_path: str
    checkpoint_dir: str
    run_dir: Optional[str]
    topk: list[int]
    valid_metric: str
    eval_batch_size: int = field(metadata=at_least(1))
    MAX_ITEM_LIST_LENGTH: int = field(metadata=at_least(2))
    resume: bool
    overwrite: bool
    progress: bool


@dataclass(kw_only=True)
class PipelineSettings(RunSettings):
    """config/overall.yaml: the keys every stage shares."""

    decoder: dict  # the Taesar decoder, checked as model.decoder.SASRecParams
    trainer: TrainerSections
    expert: ExpertSettings
    decoding: DecodingSettings
    stage: Literal["run", "dec", "tun"]
    regenerated_dir: str
    domains: Optional[int] = field(metadata=at_least(2))
    target_dom: Optional[str]
    # The official top-level training keys: null unless given (see OFFICIAL_KEYS).
    epochs: Optional[int] = field(metadata=at_least(1))
    train_batch_size: Optional[int] = field(metadata=at_least(1))
    learning_rate: Optional[float] = field(metadata=above(0))
    weight_decay: Optional[float] = field(metadata=at_least(0))
    stopping_step: Optional[int] = field(metadata=at_least(0))
    eval_step: Optional[int] = field(metadata=at_least(1))


@dataclass(kw_only=True)
class FinetuneSettings(PipelineSettings):
    """config/finetune.yaml: the shared keys and the backbone's."""

    model_name: str
    model: dict  # checked by model.backbones.check_backbone_params
    train_type: Literal[TRAIN_TYPES]
    eval_history: Literal["target_only", "mixed"]
    new_inter_path: Optional[str]


@dataclass(kw_only=True)
class PrepareSettings:
    """config/prepare.yaml."""

    dataset: DatasetSettings
    data_path: str
    overwrite: bool
    progress: bool


@dataclass(kw_only=True)
class BaselineTrainer:
    baseline: dict  # the cross-domain baseline's training (config/trainer/<model>.yaml)


@dataclass(kw_only=True)
class BaselineSettings(RunSettings):
    """config/baseline.yaml: the cross-domain baselines (cdsr_baseline/train.py)."""

    model: dict  # checked by cdsr_baseline.models.resolve_fidelity
    trainer: BaselineTrainer
    baseline_fidelity: Literal["official", "corrected"]
    select_on: Literal["each", "mean"]
    recompute_activations: bool = False  # memory only: the same values (part of no key)


SCHEMAS = {"run": PipelineSettings, "dec": PipelineSettings, "tun": FinetuneSettings}



def check_stage(cfg: DictConfig, expected: str) -> None:
    """The official commands pass `stage=run|dec|tun`; a script only runs its own stage."""
    if cfg.stage != expected:
        owner = STAGES.get(cfg.stage)
        hint = f"; stage={cfg.stage} is run by {owner}" if owner else f"; stages are {', '.join(STAGES)}"
        raise ConfigError(f"config key 'stage' is {cfg.stage!r} but {STAGES[expected]} runs stage={expected}{hint}")


def stage_settings(cfg: DictConfig, stage: str) -> DictConfig:
    """Check a stage's config against its schema and apply the official keys; returns the same config.

    After this, `cfg.trainer.*`, `cfg.decoding.batch_size` hold the values the stage runs with, and
    the official keys are null again (they said nothing more).
    """
    check_stage(cfg, stage)
    values = OmegaConf.to_container(cfg, resolve=True)
    from_config(SCHEMAS[stage], values)
    _check_trainers(values)
    decoder_params(values["decoder"])
    if stage == "tun":
        from model.backbones import check_backbone_params

        if values["model_name"] == SASREC4:
            if values["train_type"] != "full":
                raise ConfigError(f"config key 'model_name' is SASRec4, SASRec on the mixed rows, which trains "
                                  f"with train_type=full, not {values['train_type']}")
            with open_dict(cfg):
                cfg.model_name = values["model_name"] = "SASRec"  # the same run, checkpoint and table row
        if values["eval_history"] == "mixed" and values["train_type"] != "full":
            raise ConfigError(f"config key 'eval_history' is mixed, which evaluates a model trained on the mixed "
                              f"rows (train_type=full) with mixed histories; train_type={values['train_type']} "
                              f"trains on target items only, so keep eval_history=target_only")
        check_backbone_params(values["model_name"], values["model"])
    apply_official_keys(cfg, stage)
    return cfg


def baseline_settings(cfg: DictConfig) -> DictConfig:
    """Check `cdsr_baseline/train.py`'s config (the model's keys, once its quirks are resolved from
    `baseline_fidelity`: `cdsr_baseline.models.resolve_fidelity`)."""
    from cdsr_baseline.models import resolve_fidelity
    from trainer import TrainConfig

    values = OmegaConf.to_container(cfg, resolve=True)
    from_config(BaselineSettings, values)
    from_config(TrainConfig, values["trainer"]["baseline"], "trainer.baseline.", exclude=TrainConfig.SECTION_EXCLUDES)
    train_config_of(values, "baseline")
    resolve_fidelity(cfg)
    return cfg


def prepare_settings(cfg: DictConfig) -> DictConfig:
    """Check `python -m dataset.prepare`'s config."""
    from_config(PrepareSettings, OmegaConf.to_container(cfg, resolve=True))
    return cfg


def _check_trainers(values: dict) -> None:
    from trainer import TrainConfig

    for name in TRAINERS:
        from_config(TrainConfig, values["trainer"][name], f"trainer.{name}.", exclude=TrainConfig.SECTION_EXCLUDES)
    train_config_of(values, "base")  # valid_metric and topk, checked together


def apply_official_keys(cfg: DictConfig, stage: str) -> None:
    """Move each given official key into the section(s) it sets for `stage` (OFFICIAL_KEYS)."""
    with open_dict(cfg):
        for key, targets in OFFICIAL_KEYS.items():
            value = cfg[key]
            if value is None:
                continue
            sections = targets[stage]
            if sections is None:
                raise ConfigError(
                    f"config key '{key}' sets a training of the stage being run, and {STAGES[stage]} trains "
                    f"nothing; to name the Stage I training it decodes with, use "
                    f"trainer.base.{section_key(key)}={value} (or trainer.expert.*)"
                )
            for section in sections:
                OmegaConf.update(cfg, f"{section}.{section_key(key)}", value, merge=False)
            cfg[key] = None


# --------------------------------------------------------------------------- adapters


def train_config(cfg: DictConfig, section: str):
    """The TrainConfig of `trainer.<section>` with the shared evaluation protocol."""
    return train_config_of(OmegaConf.to_container(cfg, resolve=True), section)


def train_config_of(values: dict, section: str):
    from trainer import TrainConfig

    return TrainConfig(**values["trainer"][section], valid_metric=values["valid_metric"], topk=tuple(values["topk"]))


def decoder_params(values: dict) -> dict:
    """The decoder section checked (`decoder.*` keys, config/model/SASRec.yaml's names)."""
    from model.decoder import SASRecParams

    values = dict(values)
    name = values.pop("name", None)
    if name not in DECODER_MODELS:
        raise ConfigError(f"config key 'decoder.name' is {name!r}: the Taesar decoder of Stages I and II is "
                          f"{', '.join(DECODER_MODELS)} (other backbones are trained by finetune.py)")
    return dataclasses.asdict(from_config(SASRecParams, values, "decoder."))


def decoder_config(cfg: DictConfig, n_items: int):
    from model.decoder import DecoderConfig

    return DecoderConfig.from_model_params(n_items, cfg.MAX_ITEM_LIST_LENGTH, decoder_params(cfg.decoder), "decoder.")


def decoding_rule(cfg: DictConfig):
    from model.contrastive import DecodingRule

    d = cfg.decoding
    return DecodingRule(weights=d.weights, source_experts=d.source_experts, global_test=d.global_test,
                        local_scores=d.local_scores, reference_shift=d.reference_shift)


# --------------------------------------------------------------------------- variant names


def expert_variant(cfg: DictConfig) -> str:
    """Table 3 name of the configured expert training (`taesar` is the full method)."""
    names = {("base", "dsp"): "taesar", ("scratch", "dsp"): "wo_dsa", ("base", "next_item"): "dsa_wo_dsp",
             ("scratch", "next_item"): "wo_dsa_wo_dsp"}
    key = (cfg.expert.init, cfg.expert.loss)
    if key not in names:
        raise ConfigError(
            f"config keys expert.init={key[0]!r}, expert.loss={key[1]!r}: expected init base|scratch, loss dsp|next_item"
        )
    return names[key]


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


# --------------------------------------------------------------------------- hints


def rerun_command(script: str, stage: str, first: list[str]) -> str:
    """The command that makes a missing input: `python SCRIPT FIRST...` and this run's own overrides
    (under Hydra) whose keys `stage` (SCRIPT's) reads (pipeline/routing.py), less `stage=` and the
    official training keys, which set this run's own training."""
    from hydra.core.hydra_config import HydraConfig

    from pipeline.routing import OFFICIAL_TRAINING_KEYS, key_of, readers

    given = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    named = {o.split("=", 1)[0] for o in first}
    kept = []
    for override in given:
        key = key_of(override)
        if key in named or key == "stage" or key in OFFICIAL_TRAINING_KEYS or stage not in readers(key):
            continue
        kept.append(override)
    return shlex.join(["python", script, *first, *kept])  # pastes into a shell: paths with spaces stay one word
