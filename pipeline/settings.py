"""The configuration of every stage: composition (`compose`, Hydra's alone), the check against its
schema (pipeline/schemas.py) at start-up, the official top-level keys, and the adapters from config
sections to the objects the code runs with. `stage_config` is both steps for callers outside Hydra.

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
from functools import partial

from omegaconf import DictConfig, OmegaConf, open_dict

from core.schema import ConfigError, from_config
from data.paths import project_path
from pipeline.routing import OFFICIAL_KEYS, section_key
from pipeline.schemas import SCHEMAS, BaselineSettings, PrepareSettings

# The pipeline's stages by the name of their script, and the value of the official `stage=` key each
# one is run with (the official commands' vocabulary, kept only for that key).
OFFICIAL_STAGE = {"pretrain": "run", "decoding": "dec", "finetune": "tun"}
TRAINERS = ("base", "expert", "finetune")
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
    """config/CONFIG_NAME.yaml with these overrides, as Hydra composes it for the script of that name;
    nothing checked (`stage_config` is the config a stage runs with)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    with initialize_config_dir(config_dir=str(project_path("config")), version_base="1.3"):
        try:
            return hydra_compose(config_name=config_name, overrides=overrides)
        except HydraException as error:  # an unknown key or group option, a malformed override
            raise ConfigError(f"config/{config_name}.yaml: {str(error).strip()}") from None


def stage_config(stage: str, overrides: list[str]) -> DictConfig:
    """The config `python STAGE.py OVERRIDES` runs with, for callers outside Hydra (the report, the
    analyses, benchmarks, tests): composed, then checked as the stage's script checks it
    (`STAGE_CHECKS`), so that the artifact locations computed from it are the stage's own."""
    return STAGE_CHECKS[stage](compose(stage, overrides))


def check_stage(cfg: DictConfig, stage: str) -> None:
    """The official commands pass `stage=run|dec|tun`; a script only runs its own stage."""
    if cfg.stage != OFFICIAL_STAGE[stage]:
        owner = {official: script for script, official in OFFICIAL_STAGE.items()}.get(cfg.stage)
        hint = (f"; stage={cfg.stage} is run by {owner}.py" if owner
                else f"; stages are {', '.join(OFFICIAL_STAGE.values())}")
        raise ConfigError(f"config key 'stage' is {cfg.stage!r} but {stage}.py runs stage={OFFICIAL_STAGE[stage]}{hint}")


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
    if stage == "finetune":
        from backbones.registry import check_backbone_params

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
                    f"config key '{key}' sets a training of the stage being run, and {stage}.py trains "
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
    from model.decoder import SASRecConfig

    values = dict(values)
    name = values.pop("name", None)
    if name not in DECODER_MODELS:
        raise ConfigError(f"config key 'decoder.name' is {name!r}: the Taesar decoder of Stages I and II is "
                          f"{', '.join(DECODER_MODELS)} (other backbones are trained by finetune.py)")
    return dataclasses.asdict(from_config(SASRecConfig, values, "decoder."))


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


# Each stage's check of its composed config (what its script calls first): stage name -> check.
STAGE_CHECKS = {"prepare": prepare_settings, "baseline": baseline_settings,
                **{stage: partial(stage_settings, stage=stage) for stage in OFFICIAL_STAGE}}
