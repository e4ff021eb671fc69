"""Which stage reads which configuration key: the one table behind every place that sends overrides
to several stages (run.sh, through `python -m pipeline.routing`; the report's trailing overrides) and
behind the commands a stage prints for a missing input (which leave out the keys only it reads).

An override given to every stage (`KEY=VALUE`) goes to the stages that read its key; `STAGE:KEY=VALUE`
goes to that stage alone. A key is matched by its longest dotted prefix in ROUTES; any other key is
one of the shared keys of config/overall.yaml (decoder.*, trainer.base.*, expert.*, decoding.*,
experiment, seed, ...), which the three pipeline stages read: Stage III reads the Stage I and II keys
too, to find the checkpoints and the regenerated file it trains on.

    python -m pipeline.routing trainer.base.epochs=5 model_name=GRU4Rec finetune:eval_batch_size=512
    # prints one line per (stage, override): "pretrain<TAB>trainer.base.epochs=5", ...
"""
from __future__ import annotations

import sys

from core.errors import RoutingError

STAGES = ("prepare", "pretrain", "decoding", "finetune", "baseline")
PIPELINE = ("pretrain", "decoding", "finetune")
TRAINING = PIPELINE + ("baseline",)

ROUTES: dict[str, tuple[str, ...]] = {
    # the data: every stage, preparation and the cross-domain baselines included
    "dataset": STAGES,
    "data_path": STAGES,
    "progress": STAGES,
    # where runs keep checkpoints and logs, and their device: every stage that trains or decodes
    "logger": TRAINING,
    "checkpoint_dir": TRAINING,
    "gpu_id": TRAINING,
    # the backbone, its training rows and its training: Stage III alone
    "model_name": ("finetune",),
    "model": ("finetune",),
    "train_type": ("finetune",),
    "eval_history": ("finetune",),
    "new_inter_path": ("finetune",),
    "trainer.finetune": ("finetune",),
    # the cross-domain baselines' own keys (config/baseline.yaml; `model=` there is Stage III's above,
    # so a baseline's model goes with the `baseline:` prefix)
    "baseline_fidelity": ("baseline",),
    "select_on": ("baseline",),
    "recompute_activations": ("baseline",),
    "trainer.baseline": ("baseline",),
}
# The official top-level training keys (the names the official commands pass) and the section(s) they
# set within each stage (pipeline/settings.py, apply_official_keys; None: the stage trains nothing, so
# the key is an error there). Given to every stage at once they would set three trainings.
OFFICIAL_KEYS = {
    "epochs": {"pretrain": ["trainer.base"], "decoding": None, "finetune": ["trainer.finetune"]},
    "stopping_step": {"pretrain": ["trainer.base"], "decoding": None, "finetune": ["trainer.finetune"]},
    "eval_step": {"pretrain": ["trainer.base"], "decoding": None, "finetune": ["trainer.finetune"]},
    "train_batch_size": {"pretrain": ["trainer.base", "trainer.expert"], "decoding": ["decoding"], "finetune": ["trainer.finetune"]},
    "learning_rate": {"pretrain": ["trainer.base", "trainer.expert"], "decoding": None, "finetune": ["trainer.finetune"]},
    "weight_decay": {"pretrain": ["trainer.base", "trainer.expert"], "decoding": None, "finetune": ["trainer.finetune"]},
}
OFFICIAL_TRAINING_KEYS = tuple(OFFICIAL_KEYS)


def section_key(official: str) -> str:
    """An official key's name inside a trainer section: train_batch_size -> batch_size."""
    return "batch_size" if official == "train_batch_size" else official


def key_of(override: str) -> str:
    """The dotted key an override sets: `+model.x=1` -> model.x, `~logger` -> logger."""
    return override.split("=", 1)[0].lstrip("+~")


def readers(key: str) -> tuple[str, ...]:
    """The stages that read `key` (its longest dotted prefix in ROUTES; else the pipeline stages)."""
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        route = ROUTES.get(".".join(parts[:n]))
        if route is not None:
            return route
    return PIPELINE


def route(override: str) -> tuple[str, ...]:
    """The stages an override goes to: its own with a `STAGE:` prefix, else the readers of its key."""
    stage, sep, rest = override.partition(":")
    if sep and stage in STAGES:
        return (stage,)
    if "=" not in override and not override.startswith("~"):
        raise RoutingError(f"'{override}' is not a Hydra override KEY=VALUE (or STAGE:KEY=VALUE)")
    key = key_of(override)
    if key in OFFICIAL_TRAINING_KEYS:
        inner = section_key(key)
        raise RoutingError(f"'{override}' would mean another training in each stage; name the one you mean: "
                           f"trainer.base.{inner}=... (Stage I, base model), trainer.expert.{inner}=... "
                           f"(experts), trainer.finetune.{inner}=... (Stage III), or pretrain:{override} / "
                           f"finetune:{override}")
    return readers(key)


def split(overrides: list[str]) -> dict[str, list[str]]:
    """`overrides` (each given to every stage, or to one with its prefix) by the stage they go to."""
    by_stage: dict[str, list[str]] = {stage: [] for stage in STAGES}
    for override in overrides:
        prefix, sep, rest = override.partition(":")
        own = rest if sep and prefix in STAGES else override
        for stage in route(override):
            by_stage[stage].append(own)
    return by_stage


def main(arguments: list[str]) -> int:
    """run.sh's router: one `STAGE<TAB>OVERRIDE` line per stage an override goes to; exit 2 on a bad one."""
    try:
        by_stage = split(arguments)
    except RoutingError as error:
        print(f"run.sh: {error}", file=sys.stderr)
        return 2
    print("\n".join(f"{stage}\t{override}" for stage, overrides in by_stage.items() for override in overrides))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
