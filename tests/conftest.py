"""Shared fixtures: the embedded ACDT dataset, prepared once per test session, and tiny-run overrides."""
from __future__ import annotations

import pytest

from data import PreparedDataset
from dataset.acdt import write_acdt_raw
from dataset.prepare import prepare_files
from pipeline.settings import stage_config  # noqa: F401 (tests import it from here)


@pytest.fixture(scope="session")
def acdt_raw(tmp_path_factory):
    return write_acdt_raw(tmp_path_factory.mktemp("raw") / "ACDT")


@pytest.fixture(scope="session")
def acdt_dataset(acdt_raw, tmp_path_factory) -> PreparedDataset:
    root = tmp_path_factory.mktemp("data")
    prepare_files(acdt_raw, root / "ACDT", "ACDT", domain_names=[p.stem for p in acdt_raw])
    return PreparedDataset(root, "ACDT")


def tiny_overrides(tmp_path, **generator) -> list[str]:
    """Overrides for a small synthetic dataset and short, quiet runs, all under tmp_path; every stage takes them."""
    knobs = {"n_users": 120, "n_domains": 3, "items_per_domain": 40, "n_concepts": 24, "seq_len_min": 24,
             "seq_len_max": 40, **generator}
    return [
        "dataset=synthetic",
        "dataset.name=TINY",
        f"dataset.raw_dir={tmp_path}/raw",
        *(f"dataset.generator.{k}={v}" for k, v in knobs.items()),
        f"data_path={tmp_path}/data",
        f"checkpoint_dir={tmp_path}/checkpoint",
        f"regenerated_dir={tmp_path}/regenerated",
        f"run_dir={tmp_path}/run",
        "logger.mode=disabled",
        "progress=false",
        "decoder.hidden_size=16",
        "decoder.inner_size=16",
        "MAX_ITEM_LIST_LENGTH=64",
        *(f"trainer.{t}.batch_size=32" for t in ("base", "expert", "finetune")),
        "eval_batch_size=64",
    ]


# The SASRec backbone of Stage III at the tiny size (finetune.py only).
TINY_MODEL = ["model.hidden_size=16", "model.inner_size=16"]
