"""Stage III on tiny synthetic data: which rows each train_type trains on, candidates, backbones."""
from __future__ import annotations

import math

import pytest

from data import PreparedDataset, read_inter
from data.fingerprints import file_digest
from data.paths import project_path
from decoding import run_decoding
from finetune import run_finetune, training_rows
from pipeline.artifacts import regenerated
from pretrain import run_pretrain
from tests.conftest import TINY_MODEL, stage_config, tiny_overrides
from tests.helpers import fork_dataset

STAGE1 = ["seed=2025", "trainer.base.epochs=2", "trainer.expert.epochs=1"]


@pytest.fixture(scope="module")
def decoded(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage3")
    run_pretrain(stage_config("pretrain", [*STAGE1, *tiny_overrides(root)]))
    run_decoding(stage_config("decoding", ["target_dom=dom1", *STAGE1, *tiny_overrides(root)]))
    return root


def finetune_config(root, train_type, *extra):
    return stage_config("finetune", [f"train_type={train_type}", "target_dom=dom1", *STAGE1, *tiny_overrides(root),
                                *TINY_MODEL, *extra])


def test_each_train_type_reads_its_file(decoded):
    dataset = PreparedDataset(project_path(finetune_config(decoded, "sim").data_path), "tiny")
    for train_type, split in (("sim", "dom1.train"), ("full", "full.train")):
        rows, record, source = training_rows(finetune_config(decoded, train_type), dataset)
        assert record == dataset.fingerprint(split) and source == split and len(rows) == len(dataset.rows(split))
    cfg = finetune_config(decoded, "new")
    rows, record, source = training_rows(cfg, dataset)
    # the exact file decoding.py wrote, computed from finetune.py's own config
    output = regenerated(stage_config("decoding", ["target_dom=dom1", *STAGE1, *tiny_overrides(decoded)]))
    assert record == {"file": output.inter.name, "sha256": file_digest(output.inter)}
    assert source == output.folder.name
    new_rows = read_inter(output.inter, dataset.domains.n_items, one_row_per_user=False)
    assert len(rows) == len(new_rows) > len(dataset.rows("dom1.train"))  # the regenerated rows are trained on
    with pytest.raises(ValueError, match="config key 'train_type' is 'mixed'"):
        training_rows(finetune_config(decoded, "mixed"), dataset)


def test_new_without_decoding_names_the_missing_file(decoded):
    cfg = finetune_config(decoded, "new", "target_dom=dom3")
    with pytest.raises(FileNotFoundError, match=r"tiny\.2025\.dom3\.train\.inter: regenerated training file not found; "
                                                r"run `python decoding.py target_dom=dom3 seed=2025` first"):
        run_finetune(cfg)
    # decoded for other Stage I settings: the message says which key differs
    with pytest.raises(FileNotFoundError, match=r"made with other settings \(this run's value -> theirs\): .*"
                                                r"stage1\.base\.training\.epochs: 3 -> 2"):
        run_finetune(finetune_config(decoded, "new", "trainer.base.epochs=3"))


def test_the_official_keys_set_the_finetuning_alone(decoded):
    """`epochs=1` on finetune.py is trainer.finetune.epochs: Stage II's file is still found."""
    cfg = finetune_config(decoded, "new", "epochs=1", "train_batch_size=16", "learning_rate=1e-3")
    assert (cfg.trainer.finetune.epochs, cfg.trainer.finetune.batch_size) == (1, 16)
    assert cfg.trainer.base.epochs == 2 and cfg.trainer.finetune.learning_rate == 1e-3
    assert run_finetune(cfg)["checkpoint"].endswith("SASRec-tiny-2025.tune.ckpt")


def test_a_finished_checkpoint_of_other_training_rows_is_refused(decoded, tmp_path):
    cfg = finetune_config(decoded, "sim", "epochs=1")
    metrics = run_finetune(cfg)
    assert run_finetune(cfg) == metrics  # reused
    fork_dataset(decoded / "data" / "tiny", tmp_path / "data" / "tiny", split="dom1.train")
    other = finetune_config(decoded, "sim", "epochs=1", f"data_path={tmp_path / 'data'}")
    with pytest.raises(ValueError, match=r"SASRec-tiny-2025\.tune\.ckpt: made from inputs that have changed since "
                                         r"\(train was"):
        run_finetune(other)


def test_sasrec4_with_mixed_histories_is_selected_and_tested_on_the_full_rows(decoded, monkeypatch):
    """eval_history=mixed (SASRec4 is trained on mixed rows but, as in the authors' code, evaluated with
    target-only histories by default; this switch gives it the mixed ones): the same users and targets,
    their full.* histories."""
    import finetune

    dataset = PreparedDataset(project_path(f"{decoded}/data"), "tiny")
    seen, evaluation = [], finetune.Evaluation

    def recording(loader, scores, item_range):
        seen.append(loader.lengths.clone())
        return evaluation(loader, scores, item_range)

    monkeypatch.setattr(finetune, "Evaluation", recording)
    own = run_finetune(finetune_config(decoded, "full", "epochs=1"))
    assert own["eval_history"] == "target_only"
    mixed = run_finetune(finetune_config(decoded, "full", "epochs=1", "eval_history=mixed"))
    assert mixed["eval_history"] == "mixed" and mixed["checkpoint"] != own["checkpoint"]  # another selection
    assert mixed["test_ranks"].keys() == own["test_ranks"].keys()
    valid_own, test_own, valid_mixed, test_mixed = seen
    for lengths, split in ((valid_own, "dom1.valid"), (test_own, "dom1.test")):
        assert lengths.tolist() == dataset.rows(split).lengths.clip(max=lengths.max()).tolist()
    for lengths, split in ((valid_mixed, "valid"), (test_mixed, "test")):
        full_rows = dataset.mixed_history_rows(split, "dom1")
        assert lengths.tolist() == full_rows.lengths.clip(max=lengths.max()).tolist()
        assert (full_rows.lengths > dataset.rows(f"dom1.{split}").lengths).any()
    with pytest.raises(ValueError, match="config key 'eval_history' is mixed.*train_type=sim"):
        run_finetune(finetune_config(decoded, "sim", "eval_history=mixed"))


@pytest.mark.parametrize("train_type", ["sim", "new", "full"])
def test_candidates_are_the_target_domain(decoded, train_type):
    metrics = run_finetune(finetune_config(decoded, train_type, "epochs=2"))
    n_target = len(range(*PreparedDataset(project_path(f"{decoded}/data"), "tiny").domains.range("dom1")))
    assert n_target <= 50
    # Ranked among the target items only, every target is within the top |R_d| <= 50, in every mode
    # (in full mode too, whose loss ranks all items).
    assert metrics["test"]["hr@50"] == 1.0 and metrics["valid"]["hr@50"] == 1.0
    for value in metrics["test"].values():
        assert 0.0 <= value <= 1.0 and math.isfinite(value)
    assert (decoded / "run" / "metrics.json").is_file()


@pytest.mark.parametrize("model_name", ["SASRec", "GRU4Rec", "CL4SRec", "GCEGNN", "NARM", "Caser", "BERT4Rec"])
def test_every_named_backbone_trains_one_epoch(decoded, model_name):
    small = {"GCEGNN": ["model.embedding_size=32"]}.get(model_name, ["model.hidden_size=32"])
    # RecBole's models learn from every prefix: short windows keep their one epoch short (and train on
    # the single-domain rows, whose location does not depend on the window as Stage II's does)
    window = [] if model_name in ("SASRec", "GRU4Rec", "CL4SRec", "GCEGNN") else ["train_type=sim",
                                                                                   "MAX_ITEM_LIST_LENGTH=16"]
    cfg = stage_config("finetune", ["train_type=new", "target_dom=dom1", *STAGE1, *tiny_overrides(decoded),
                               f"model_name={model_name}", "epochs=1", *small, *window])
    metrics = run_finetune(cfg)
    assert metrics["model_name"] == model_name
    assert all(0.0 <= v <= 1.0 for v in metrics["test"].values())


def test_torchrun_fine_tunes_data_parallel_and_tests_like_one_process(tmp_path):
    """Two gloo processes fine-tune SASRec data-parallel; rank 0 writes; the test metrics and per-user
    ranks, computed over both ranks' shares, are one process's evaluation of the same weights."""
    import json
    import os
    import subprocess
    import sys

    import torch

    from data.paths import PROJECT_ROOT

    overrides = ["train_type=sim", "target_dom=dom1", "trainer.finetune.epochs=2", *tiny_overrides(tmp_path),
                 *TINY_MODEL, f"hydra.run.dir={tmp_path}/hydra" + "${rank_suffix:}"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "finetune.py", *overrides], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (tmp_path / "hydra-rank1" / "metrics.json").exists()
    parallel = json.loads((tmp_path / "hydra" / "metrics.json").read_text())
    # one process, reusing the checkpoint the two wrote: it only evaluates
    alone = run_finetune(stage_config("finetune", overrides[:-1]))
    assert torch.load(parallel["checkpoint"], weights_only=True)["epochs_run"] == 2
    assert alone["test_ranks"] == parallel["test_ranks"]
    for key, value in alone["test"].items():
        assert abs(value - parallel["test"][key]) < 1e-12, key


def test_torchrun_resumes_the_training_one_process_left(tmp_path, monkeypatch):
    """One process is killed after epoch 1 of 3; a torchrun launch of the same run picks up its resume
    file (rank 0 reads it, every rank gets its weights) and finishes the remaining epochs."""
    import os
    import subprocess
    import sys

    import torch

    import trainer
    from data.paths import PROJECT_ROOT

    overrides = ["train_type=sim", "target_dom=dom1", "trainer.finetune.epochs=3", "trainer.finetune.stopping_step=0",
                 *tiny_overrides(tmp_path), *TINY_MODEL]
    save = trainer._save_resume_state

    def killed_after_epoch_one(path, model, optimizer, state, *rest):
        save(path, model, optimizer, state, *rest)
        if state["epoch"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "_save_resume_state", killed_after_epoch_one)
    with pytest.raises(KeyboardInterrupt):
        run_finetune(stage_config("finetune", overrides))
    resume = next((tmp_path / "checkpoint").rglob("*.resume"))
    first_epoch = torch.load(resume, weights_only=True)["trainer"]["history"][0]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "finetune.py", *overrides, f"hydra.run.dir={tmp_path}/hydra" + "${rank_suffix:}"],
                          cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming from {resume} after epoch 0" in done.stderr + done.stdout  # the first epoch logs as 0
    saved = torch.load(resume.with_suffix(""), weights_only=True)
    assert saved["epochs_run"] == 3 and saved["history"][0] == first_epoch and not resume.exists()


def test_a_finished_run_writes_nothing_into_the_store(decoded, tmp_path):
    from tests.test_pretrain import store_state

    cfg = finetune_config(decoded, "sim", f"checkpoint_dir={tmp_path}/checkpoint", "trainer.finetune.epochs=1")
    first = run_finetune(cfg)
    before = store_state(tmp_path / "checkpoint"), store_state(decoded / "data")
    again = run_finetune(finetune_config(decoded, "sim", f"checkpoint_dir={tmp_path}/checkpoint",
                                         "trainer.finetune.epochs=1"))
    assert again["test"] == first["test"]
    assert (store_state(tmp_path / "checkpoint"), store_state(decoded / "data")) == before


def test_the_command_to_run_first_survives_a_path_with_a_space(tmp_path):
    """The decoding command a missing regenerated file asks for is shell-quoted: pasted into a shell,
    a path with a space stays one argument."""
    import os
    import re
    import shlex
    import subprocess
    import sys

    from data.paths import PROJECT_ROOT

    root = tmp_path / "with space"
    overrides = ["train_type=new", "target_dom=dom2", *STAGE1, *tiny_overrides(root), *TINY_MODEL,
                 f"hydra.run.dir={root}/hydra"]
    done = subprocess.run([sys.executable, "finetune.py", *overrides], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode != 0 and "Traceback" not in done.stderr
    command = shlex.split(re.search(r"run `([^`]*)` first", done.stderr).group(1))
    assert command[:2] == ["python", "decoding.py"] and f"data_path={root}/data" in command


def test_a_time_limit_pauses_the_command_and_the_same_command_continues_it(tmp_path):
    """`TAESAR_TIME_LIMIT=0 python finetune.py ...` trains one epoch, says `paused:` and exits with
    code 75; the same command without the limit continues from the resume file and finishes."""
    import os
    import subprocess
    import sys

    from data.paths import PROJECT_ROOT

    overrides = ["train_type=sim", "target_dom=dom1", "epochs=3", "stopping_step=0", *tiny_overrides(tmp_path),
                 *TINY_MODEL, f"hydra.run.dir={tmp_path}/hydra"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    paused = subprocess.run([sys.executable, "finetune.py", *overrides], cwd=PROJECT_ROOT, capture_output=True,
                            text=True, timeout=300, env={**env, "TAESAR_TIME_LIMIT": "0"})
    assert paused.returncode == 75 and "paused: " in paused.stderr and "Traceback" not in paused.stderr
    assert "paused after epoch 0 of at most 3" in paused.stderr
    assert list((tmp_path / "checkpoint").rglob("*.resume"))
    done = subprocess.run([sys.executable, "finetune.py", *overrides], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming from" in done.stderr + done.stdout
    assert not list((tmp_path / "checkpoint").rglob("*.resume"))
