"""The cross-domain baselines by name, with their hyperparameters and the quirks of the official copies.

Every quirk with a switch has an official and a corrected behaviour (the `QUIRKS` of each model's
module). Its `model.*` key is null by default, which follows `baseline_fidelity` (official or
corrected); a value given sets that quirk alone. `resolve_fidelity` writes the effective choices
into the config, so that the run's config.yaml, log and metrics say which were used.
"""
from __future__ import annotations

import importlib

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from core.schema import ConfigError, from_config

# name -> (its module, the model class, the config it is built from: the keys of config/model/NAME.yaml);
# each module also holds QUIRKS. Imported when used, so that naming a baseline loads only its own code.
BASELINES = {"ABXI": ("cdsr_baseline.abxi", "ABXI", "ABXIConfig"),
             "CGRec": ("cdsr_baseline.cgrec", "CGRec", "CGRecConfig"),
             "SyNCRec": ("cdsr_baseline.syncrec", "SyNCRec", "SyNCRecConfig")}


def _module(name: str):
    if name not in BASELINES:
        raise ConfigError(f"config key 'model.name' is {name!r}; the cross-domain baselines are "
                          f"{', '.join(BASELINES)} (SASRec4 is finetune.py model_name=SASRec4)")
    return importlib.import_module(BASELINES[name][0])


def resolve_fidelity(cfg: DictConfig) -> dict:
    """Fill every quirk key left null from `baseline_fidelity`, check the model keys, and return the
    effective choice of each quirk."""
    module = _module(cfg.model.name)
    corrected = cfg.baseline_fidelity == "corrected"
    with open_dict(cfg):
        for key, (official, fixed) in module.QUIRKS.items():
            if cfg.model.get(key) is None:
                cfg.model[key] = fixed if corrected else official
    params = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k != "name"}
    from_config(getattr(module, BASELINES[cfg.model.name][2]), params, "model.")
    return {key: cfg.model[key] for key in module.QUIRKS}


def build_baseline(name: str, dataset, params, sequences: torch.Tensor):
    """The baseline `name` over the dataset's vocabulary and domains; `sequences` are the users'
    whole sequences (for the models whose negatives avoid them)."""
    module = _module(name)
    values = {k: v for k, v in OmegaConf.to_container(params, resolve=True).items() if k != "name"}
    model_class = getattr(module, BASELINES[name][1])
    starts = list(dataset.domains.starts)
    if name == "ABXI":
        return model_class(dataset.domains.n_items, starts, **values)
    return model_class(dataset.domains.n_items, starts, sequences, **values)
