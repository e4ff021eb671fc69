"""Stage III backbones by name, each a `backbones.base.Backbone` (the interface fine-tuning
uses, so that it treats them all alike): this project's SASRec, GRU4Rec, CL4SRec and GCE-GNN, and
any RecBole sequential model through an adapter.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.resources

import torch
import yaml
from recbole.data.transform import construct_transform
from torch import nn

from backbones.base import Backbone
from backbones.recbole_adapter import Vocabulary, recbole_config, to_interaction
from core.schema import ConfigError, from_config, unknown_key
from data import SequenceBatch
from model.decoder import DecoderConfig, TaesarDecoder
from model.objectives import next_item_objective, target_scores


class SASRec(Backbone):
    """The Taesar decoder as the SASRec backbone: sequence-to-sequence training."""

    last_position_only = False
    loss_reduces_over_ranks = True  # the decoder's objective (model/objectives.py)

    def __init__(self, n_items: int, max_len: int, **params):
        super().__init__()
        self.decoder = TaesarDecoder(DecoderConfig.from_model_params(n_items, max_len, params))

    def loss(self, batch: SequenceBatch, item_range):
        return next_item_objective(item_range)(self.decoder, batch)

    def scores(self, batch: SequenceBatch, item_range):
        return target_scores(item_range)(self.decoder, batch)


class RecBoleModel(Backbone):
    """Any RecBole sequential model, unchanged, by its class name (NARM, BERT4Rec, Caser, ...).

    Its hyperparameters are RecBole's defaults for the model
    (`recbole/properties/model/NAME.yaml`) updated with `params`. It reads our
    batches through `backbones/recbole_adapter.py`, so item ids stay the contract's.
    RecBole's losses read the last position of a row, hence prefix expansion;
    their softmax runs over every item id, as RecBole computes it.
    """

    last_position_only = True

    def __init__(self, n_items: int, max_len: int, recbole_class: str, n_users: int = 0,
                 device: torch.device = torch.device("cpu"), **params):
        super().__init__()
        model_class = recbole_sequential_class(recbole_class)
        # Our max_len counts the target too; RecBole's MAX_ITEM_LIST_LENGTH is the history's.
        self.history_width = max_len - 1
        config = recbole_config(n_items, self.history_width, {"transform": None, **recbole_defaults(recbole_class),
                                                                **params}, device)
        self.vocabulary = Vocabulary(n_items, n_users)
        # Some models train on batches RecBole's loader transforms first (BERT4Rec masks items);
        # building the transform also names the fields it adds in the config the model reads.
        self.transform = construct_transform(config)
        self.model = model_class(config, self.vocabulary)

    def loss(self, batch: SequenceBatch, item_range):
        interaction = to_interaction(batch, self.history_width)
        return self.model.calculate_loss(self.transform(self.vocabulary, interaction))

    def scores(self, batch: SequenceBatch, item_range):
        lo, hi = item_range
        return self.model.full_sort_predict(to_interaction(batch, self.history_width))[:, lo:hi]  # column i = item i


def recbole_sequential_class(name: str):
    module = importlib.import_module("recbole.model.sequential_recommender")
    model_class = getattr(module, name, None)
    if model_class is None:
        known = sorted(n for n in dir(module) if n[0].isupper())
        raise ValueError(f"unknown model {name!r}: neither a backbone of this project nor a RecBole sequential "
                         f"model ({', '.join(known)})")
    return model_class


def recbole_defaults(name: str) -> dict:
    import recbole

    path = importlib.resources.files(recbole) / "properties" / "model" / f"{name}.yaml"
    if not path.is_file():
        return {}
    values = yaml.safe_load(path.read_text()) or {}
    # YAML 1.1 reads "1e-12" as a string; RecBole's own loader reads it as a number.
    return {k: _number(v) for k, v in values.items()}


def _number(value):
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


# This project's backbones, imported when asked for: the model class and the dataclass of its keys.
BACKBONES = {"SASRec": ("backbones.registry:SASRec", "model.decoder:SASRecConfig"),
             "GRU4Rec": ("backbones.gru4rec:GRU4Rec", "backbones.gru4rec:GRU4RecConfig"),
             "CL4SRec": ("backbones.cl4srec:CL4SRec", "backbones.cl4srec:CL4SRecConfig"),
             "GCEGNN": ("backbones.gcegnn:GCEGNN", "backbones.gcegnn:GCEGNNConfig")}
# Keys of config/model/RecBole.yaml, the paper's uniform setting in RecBole's names.
RECBOLE_UNIFORM = ("hidden_size", "embedding_size", "inner_size", "n_layers", "n_heads", "hidden_dropout_prob",
                   "attn_dropout_prob", "dropout_prob")


def _load(spec: str):
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def check_backbone_params(model_name: str, params: dict) -> None:
    """Refuse a `model.*` key the backbone `model_name` does not read, or a value of the wrong type.

    This project's backbones are checked against the dataclass of their hyperparameters; a RecBole
    model against RecBole's own keys for it plus the uniform keys of config/model/RecBole.yaml.
    """
    params = dict(params)
    name = params.pop("name", None)
    expected = model_name if model_name in BACKBONES else "RecBole"
    if name != expected:
        raise ConfigError(f"config key 'model.name' is {name!r} but model_name={model_name} reads "
                          f"config/model/{expected}.yaml (model.name={expected})")
    if model_name in BACKBONES:
        schema = _load(BACKBONES[model_name][1])
        needs_items = "n_items" in {f.name for f in dataclasses.fields(schema)}
        from_config(schema, params, "model.", exclude=("n_items", "max_len"), fixed={"n_items": 1} if needs_items else None)
        return
    recbole_sequential_class(model_name)
    known = set(RECBOLE_UNIFORM) | set(recbole_defaults(model_name))
    for key in params:
        if key not in known:
            raise unknown_key("model.", key, known)


def uniform_params(model_name: str, params: dict) -> dict:
    """The uniform keys that RecBole's `model_name` has a parameter of (RecBole's own defaults name
    them), with every other key given; the rest of the uniform setting does not apply to that model."""
    defaults = recbole_defaults(model_name)
    return {k: v for k, v in params.items() if k not in RECBOLE_UNIFORM or k in defaults}


def build_backbone(model_name: str, n_items: int, max_len: int, params: dict, n_users: int = 0,
                   device: torch.device = torch.device("cpu")) -> Backbone:
    """This project's implementation of `model_name`, or RecBole's class of that name."""
    check_backbone_params(model_name, params)
    params = {k: v for k, v in params.items() if k != "name"}
    if model_name in BACKBONES:
        return _load(BACKBONES[model_name][0])(n_items, max_len, **params)
    # RecBole models also read the device from their config (to build tensors of their own).
    return RecBoleModel(n_items, max_len, model_name, n_users=n_users, device=device,
                        **uniform_params(model_name, params))
