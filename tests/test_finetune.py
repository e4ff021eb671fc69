"""Stage III on tiny synthetic data: which rows each train_type trains on, candidates, backbones."""
from __future__ import annotations

import math

import pytest

from data import PreparedDataset, read_inter
from data.paths import project_path
from decoding import run_decoding
from experiment import regenerated_dir
from finetune import run_finetune, training_rows
from pretrain import run_pretrain
from tests.conftest import compose, tiny_overrides

STAGE1 = ["seed=2025", "epochs=2", "expert.epochs=1"]


@pytest.fixture(scope="module")
def decoded(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage3")
    run_pretrain(compose("pretrain", [*STAGE1, *tiny_overrides(root)]))
    run_decoding(compose("decoding", ["target_dom=dom1", *STAGE1, *tiny_overrides(root)]))
    return root


def finetune_config(root, train_type, *extra):
    return compose("finetune", [f"train_type={train_type}", "target_dom=dom1", *STAGE1, *tiny_overrides(root),
                                *extra])


def test_each_train_type_reads_its_file(decoded):
    dataset = PreparedDataset(project_path(finetune_config(decoded, "sim").data_path), "TINY")
    for train_type, expected in (("sim", dataset.path("dom1.train")), ("full", dataset.path("full.train"))):
        rows, source = training_rows(finetune_config(decoded, train_type), dataset)
        assert source == expected and len(rows) == len(dataset.rows(expected.name.split(".", 1)[1][:-6]))
    cfg = finetune_config(decoded, "new")
    rows, source = training_rows(cfg, dataset)
    decoding_cfg = compose("decoding", ["target_dom=dom1", *STAGE1, *tiny_overrides(decoded)])
    assert source.parent == regenerated_dir(decoding_cfg) and source.name == "TINY.2025.dom1.train.inter"
    regenerated = read_inter(source, dataset.domains.n_items, one_row_per_user=False)
    assert len(rows) == len(regenerated) > len(dataset.rows("dom1.train"))  # the regenerated rows are trained on
    with pytest.raises(ValueError, match="config key 'train_type' is 'mixed'"):
        training_rows(finetune_config(decoded, "mixed"), dataset)


def test_new_without_decoding_names_the_missing_file(decoded):
    cfg = finetune_config(decoded, "new", "target_dom=dom3")
    with pytest.raises(FileNotFoundError, match=r"TINY\.2025\.dom3\.train\.inter: regenerated training file not found"):
        run_finetune(cfg)


@pytest.mark.parametrize("train_type", ["sim", "new", "full"])
def test_candidates_are_the_target_domain(decoded, train_type):
    metrics = run_finetune(finetune_config(decoded, train_type, "epochs=2"))
    n_target = len(range(*PreparedDataset(project_path(f"{decoded}/data"), "TINY").domains.range("dom1")))
    assert n_target <= 50
    # Ranked among the target items only, every target is within the top |R_d| <= 50, in every mode
    # (in full mode too, whose loss ranks all items).
    assert metrics["test"]["hr@50"] == 1.0 and metrics["valid"]["hr@50"] == 1.0
    for value in metrics["test"].values():
        assert 0.0 <= value <= 1.0 and math.isfinite(value)
    assert (decoded / "run" / "metrics.json").is_file()


@pytest.mark.parametrize("model_name", ["SASRec", "GRU4Rec", "CL4SRec", "GCEGNN", "NARM", "Caser", "BERT4Rec"])
def test_every_named_backbone_trains_one_epoch(decoded, model_name):
    overrides = [o for o in tiny_overrides(decoded) if not o.startswith("model.")]
    small = {"GCEGNN": ["model.embedding_size=32"]}.get(model_name, ["model.hidden_size=32"])
    cfg = compose("finetune", ["train_type=new", "target_dom=dom1", *STAGE1, *overrides, f"model_name={model_name}",
                               "epochs=1", *small])
    metrics = run_finetune(cfg)
    assert metrics["model_name"] == model_name
    assert all(0.0 <= v <= 1.0 for v in metrics["test"].values())
