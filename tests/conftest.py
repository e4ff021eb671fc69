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
    """The tiny preset (config/dataset/tiny.yaml, config/debug/tiny.yaml) with every file under tmp_path;
    `generator` changes the tiny dataset's generator knobs. For the pipeline stages (prepare takes the
    dataset.* and data_path ones)."""
    return [
        "dataset=tiny",
        f"dataset.raw_dir={tmp_path}/raw",
        *(f"dataset.generator.{k}={v}" for k, v in generator.items()),
        f"data_path={tmp_path}/data",
        f"checkpoint_dir={tmp_path}/checkpoint",
        f"regenerated_dir={tmp_path}/regenerated",
        f"run_dir={tmp_path}/run",
        "debug=tiny",
    ]


# The SASRec backbone of Stage III at the tiny size (finetune.py only).
TINY_MODEL = ["model.hidden_size=16", "model.inner_size=16"]
