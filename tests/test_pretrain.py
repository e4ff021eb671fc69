"""Stage I end to end on tiny synthetic data: files, reuse, ablations, determinism, bad input."""
from __future__ import annotations

import contextlib
import shutil

import pytest
import torch

from dataset.prepare import prepare_dataset, raw_domain_files
from pipeline.artifacts import stage1_paths
from pretrain import run_pretrain
from tests.conftest import stage_config, tiny_overrides


def pretrain_config(tmp_path, *extra):
    return stage_config("pretrain", ["stage=run", "seed=2025", "epochs=2", "trainer.expert.epochs=2",
                                *tiny_overrides(tmp_path), *extra])


def test_tiny_pretraining_writes_every_checkpoint(tmp_path):
    cfg = pretrain_config(tmp_path)
    summary = run_pretrain(cfg)
    paths = stage1_paths(cfg)
    assert paths.base.name == "SASRec-tiny-2025.full.ckpt"
    assert [paths.expert(d).name for d in ("dom1", "dom3")] == ["SASRec-tiny-2025.dom1.ckpt", "SASRec-tiny-2025.dom3.ckpt"]
    for role in ("full", "dom1", "dom2", "dom3"):
        path = paths.base if role == "full" else paths.expert(role)
        saved = torch.load(path, weights_only=True)
        assert saved["meta"]["role"] == role and saved["meta"]["dataset"] == "tiny"
        assert saved["epochs_run"] == 2
        assert 0 <= summary["valid"][role]["ndcg@10"] <= 1
        # the fingerprints of what it was trained from
        assert {"item", "full.train"} <= set(saved["meta"]["inputs"])
    assert "checkpoint full" in torch.load(paths.expert("dom1"), weights_only=True)["meta"]["inputs"]
    assert (tmp_path / "run" / "metrics.json").is_file() and (tmp_path / "run" / "config.yaml").is_file()
    assert (paths.base_dir / "settings.json").is_file() and (paths.expert_dir / "settings.json").is_file()

    # A second run reuses the finished checkpoints instead of training again.
    stamp = paths.expert("dom2").stat().st_mtime_ns
    assert run_pretrain(cfg)["valid"] == summary["valid"]
    assert paths.expert("dom2").stat().st_mtime_ns == stamp

    # Experts start from M (DSA): an expert trained 0 epochs would equal M.
    base = torch.load(paths.base, weights_only=True)["state_dict"]
    expert = torch.load(paths.expert("dom1"), weights_only=True)["state_dict"]
    assert not torch.equal(base["item_emb.weight"], expert["item_emb.weight"])


def test_official_keys_set_the_base_training_and_batch_sizes_coexist(tmp_path):
    """`epochs=`, `train_batch_size=` set trainer.base (and the experts' batch); each batch size has its
    own checkpoints, so training with 16 leaves those of 32 as they were."""
    cfg32 = pretrain_config(tmp_path)
    run_pretrain(cfg32)
    assert cfg32.trainer.base.epochs == 2 and cfg32.trainer.expert.epochs == 2 and cfg32.epochs is None
    paths32 = stage1_paths(cfg32)
    stamps = {p: p.stat().st_mtime_ns for p in paths32.base_dir.rglob("*.ckpt")}
    cfg16 = pretrain_config(tmp_path, "train_batch_size=16")
    run_pretrain(cfg16)
    assert (cfg16.trainer.base.batch_size, cfg16.trainer.expert.batch_size) == (16, 16)
    paths16 = stage1_paths(cfg16)
    assert paths16.base_dir != paths32.base_dir and paths16.base.is_file()
    assert {p: p.stat().st_mtime_ns for p in paths32.base_dir.rglob("*.ckpt")} == stamps
    # the explicit spelling names the same folder as the official key
    assert stage1_paths(pretrain_config(tmp_path, "trainer.base.batch_size=16", "trainer.expert.batch_size=16")
                        ).base_dir == paths16.base_dir


def test_ablations_get_their_own_folders_and_share_the_base_model(tmp_path):
    full = pretrain_config(tmp_path)
    run_pretrain(full)
    base_stamp = stage1_paths(full).base.stat().st_mtime_ns
    folders = {stage1_paths(full).expert_dir}
    for experiment in ("wo_dsa", "dsa_wo_dsp"):
        cfg = pretrain_config(tmp_path, f"experiment={experiment}")
        summary = run_pretrain(cfg)
        paths = stage1_paths(cfg)
        assert paths.expert_dir.name.startswith(experiment) and summary["variant"] == experiment
        assert paths.expert("dom1").is_file()
        folders.add(paths.expert_dir)
    assert len(folders) == 3
    assert stage1_paths(full).base.stat().st_mtime_ns == base_stamp  # M was not retrained


def test_same_seed_same_bytes(tmp_path):
    cfg = pretrain_config(tmp_path)
    first = run_pretrain(cfg)
    paths = stage1_paths(cfg)
    saved = {role: paths.role(role).read_bytes() for role in ("full", "dom1")}
    again = run_pretrain(pretrain_config(tmp_path, "overwrite=true"))
    assert first["valid"] == again["valid"]
    assert {role: paths.role(role).read_bytes() for role in ("full", "dom1")} == saved


def test_checkpoint_of_another_vocabulary_is_refused(tmp_path):
    run_pretrain(pretrain_config(tmp_path / "a"))
    other = pretrain_config(tmp_path / "b", "dataset.generator.items_per_domain=50")
    source, target = stage1_paths(pretrain_config(tmp_path / "a")).base, stage1_paths(other).base
    target.parent.mkdir(parents=True)
    shutil.copy(source, target)
    with pytest.raises(ValueError, match=r"checkpoint n_items is \d+ but this run expects \d+"):
        run_pretrain(other)


def files_overrides(tmp_path) -> list[str]:
    """The tiny synthetic raw files, as a dataset of raw files the user provides (source: files)."""
    raw_domain_files(stage_config("pretrain", tiny_overrides(tmp_path)).dataset)
    domains = ",".join(f"{{name:S{d},file:S{d}.inter}}" for d in (1, 2, 3))
    shared = [o for o in tiny_overrides(tmp_path) if not o.startswith(("dataset=", "dataset.generator."))]
    return [*shared, "dataset=BEST", "dataset.name=tiny", f"dataset.raw_dir={tmp_path}/raw", f"dataset.domains=[{domains}]"]


def swap_first_and_last_timestamp(path) -> None:
    """Edit a raw file in place: one user's first and last interaction change places in time, so the
    prepared rows change and every count (users, items, interactions) stays the same."""
    header, *lines = path.read_text().splitlines(keepends=True)
    user = lines[0].split("\t")[0]
    mine = [i for i, line in enumerate(lines) if line.split("\t")[0] == user]
    first, last = (lines[i].rstrip("\n").split("\t") for i in (mine[0], mine[-1]))
    first[3], last[3] = last[3], first[3]
    lines[mine[0]], lines[mine[-1]] = "\t".join(first) + "\n", "\t".join(last) + "\n"
    path.write_text(header + "".join(lines))


def test_raw_file_edited_in_place_re_prepares_and_stale_checkpoints_are_refused(tmp_path):
    overrides = ["stage=run", "seed=2025", "epochs=1", "trainer.expert.epochs=1", *files_overrides(tmp_path)]
    cfg = stage_config("pretrain", overrides)
    run_pretrain(cfg)
    train = tmp_path / "data" / "tiny" / "tiny.full.train.inter"
    before = train.read_text()
    swap_first_and_last_timestamp(tmp_path / "raw" / "S1.inter")
    with pytest.raises(ValueError, match=r"SASRec-tiny-2025\.full\.ckpt: made from inputs that have changed since "
                                         r"\(full\.train was .*tiny\.full\.train\.inter with sha256 \w+, is now"):
        run_pretrain(stage_config("pretrain", overrides))
    # the edit re-prepared the data: same sizes, other rows
    assert train.read_text() != before and len(train.read_text()) == len(before)
    # overwrite=true replaces the stale checkpoints, and only those
    run_pretrain(stage_config("pretrain", [*overrides, "overwrite=true"]))
    run_pretrain(stage_config("pretrain", overrides))


def test_moved_raw_files_are_not_prepared_again(tmp_path):
    overrides = files_overrides(tmp_path)
    cfg = stage_config("prepare", [o for o in overrides if o.startswith(("dataset", "data_path"))])
    prepare_dataset(cfg.dataset, cfg.data_path, progress=False)
    manifest = tmp_path / "data" / "tiny" / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    (tmp_path / "raw").rename(tmp_path / "moved")
    moved = stage_config("prepare", [o for o in overrides if o.startswith(("dataset", "data_path"))]
                    + [f"dataset.raw_dir={tmp_path}/moved"])
    prepare_dataset(moved.dataset, moved.data_path, progress=False)
    assert manifest.stat().st_mtime_ns == stamp


@pytest.mark.parametrize(
    "override, message",
    [
        ("stage=dec", r"config key 'stage' is 'dec' but pretrain\.py runs stage=run; stage=dec is run by decoding\.py"),
        ("epochs=-3", "config key 'epochs' must be >= 1, got -3"),
        ("epochs=0", "config key 'epochs' must be >= 1, got 0"),
        ("trainer.expert.epochs=0", "config key 'trainer.expert.epochs' must be >= 1, got 0"),
        ("train_batch_size=0", "config key 'train_batch_size' must be >= 1, got 0"),
        ("seed=abc", "config key 'seed' must be an integer, got 'abc'"),
        ("+epochz=3", r"unknown config key 'epochz'; did you mean 'epochs'\?"),
        ("+trainer.base.patience=3", r"unknown config key 'trainer\.base\.patience'"),
        ("decoder.hidden_act=elu", r"config key 'decoder\.hidden_act' is 'elu'; expected one of gelu, relu"),
        ("decoder.n_heads=3", r"hidden_size 16 is not a multiple of n_heads 3"),
        ("topk=[0,10]", "config key 'topk' must list positive cut-offs"),
        ("target_dom=dom9", r"unknown domain 'dom9': this dataset has dom1, dom2, dom3"),
        ("domains=5", "config key 'domains' is 5 but dataset tiny has 3 domains"),
        ("expert.loss=mse", r"config key 'expert\.loss' is 'mse'; expected one of dsp, next_item"),
        ("decoder.name=GRU4Rec", r"config key 'decoder\.name' is 'GRU4Rec': the Taesar decoder"),
    ],
)
def test_bad_config_stops_before_training(tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        run_pretrain(pretrain_config(tmp_path, override))
    assert not (tmp_path / "checkpoint").exists() or not any((tmp_path / "checkpoint").rglob("*.ckpt"))


def test_other_activation_is_used(tmp_path):
    """decoder.hidden_act is read: relu gives other weights than gelu from the same seed."""
    gelu = run_pretrain(pretrain_config(tmp_path / "gelu", "trainer.expert.epochs=1"))
    relu = run_pretrain(pretrain_config(tmp_path / "relu", "trainer.expert.epochs=1", "decoder.hidden_act=relu"))
    assert gelu["valid"]["full"] != relu["valid"]["full"]


def test_torchrun_trains_data_parallel_and_its_evaluation_is_one_processs(tmp_path):
    """Two gloo processes train Stage I data-parallel; rank 0 alone writes; the validation metrics in
    the checkpoint, computed over both ranks' shares, equal one process's evaluation of its weights."""
    import json
    import os
    import subprocess
    import sys

    from data import PreparedDataset, SequenceLoader
    from data.paths import PROJECT_ROOT
    from model.decoder import TaesarDecoder
    from model.objectives import target_scores
    from pipeline.settings import decoder_config
    from evaluation import Evaluation, evaluate
    from trainer import load_checkpoint

    overrides = ["seed=2025", "trainer.base.epochs=2", "trainer.expert.epochs=1", *tiny_overrides(tmp_path),
                 f"hydra.run.dir={tmp_path}/hydra" + "${rank_suffix:}"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "pretrain.py", *overrides], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "data-parallel rank 1 of 2" in done.stdout
    assert (tmp_path / "hydra" / "metrics.json").is_file() and not (tmp_path / "hydra-rank1" / "metrics.json").exists()
    cfg = stage_config("pretrain", overrides[:-1])
    dataset = PreparedDataset(tmp_path / "data", "tiny")
    checkpoints = json.loads((tmp_path / "hydra" / "metrics.json").read_text())["checkpoints"]
    saved = load_checkpoint(next((tmp_path / "checkpoint").rglob("*.full.ckpt")))
    model = TaesarDecoder(decoder_config(cfg, dataset.domains.n_items))
    model.load_state_dict(saved["state_dict"])
    item_range = (1, dataset.domains.n_items + 1)
    loader = SequenceLoader(dataset.rows("full.valid"), cfg.eval_batch_size, cfg.MAX_ITEM_LIST_LENGTH)
    alone = evaluate(model, Evaluation(loader, target_scores(item_range), item_range))
    assert alone.keys() == saved["valid_metrics"].keys() and checkpoints
    for key, value in alone.items():
        assert abs(value - saved["valid_metrics"][key]) < 1e-12, key


def test_the_same_training_in_another_folder_gives_the_same_bytes(tmp_path):
    """Fingerprints record content, not location: checkpoints trained from the same data and settings in
    two folders are byte-identical, so what was made from one is valid with the other."""
    paths = {}
    for where in ("a", "b c"):
        cfg = pretrain_config(tmp_path / where, "trainer.expert.epochs=1")
        run_pretrain(cfg)
        paths[where] = stage1_paths(cfg)
    for role in ("full", "dom1"):
        assert paths["a"].role(role).read_bytes() == paths["b c"].role(role).read_bytes(), role


def test_an_edit_that_restores_size_and_modification_time_is_seen(tmp_path):
    """`cp -p`, `rsync -t`, `touch -r`: edited content with its old size and mtime. The inode change
    time gives it away, so the preparation is redone and the checkpoints made before are refused."""
    import os

    overrides = ["stage=run", "seed=2025", "epochs=1", "trainer.expert.epochs=1", *files_overrides(tmp_path)]
    run_pretrain(stage_config("pretrain", overrides))
    raw = tmp_path / "raw" / "S1.inter"
    before = raw.stat()
    swap_first_and_last_timestamp(raw)  # the same size
    os.utime(raw, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (raw.stat().st_size, raw.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    with pytest.raises(ValueError, match=r"made from inputs that have changed since"):
        run_pretrain(stage_config("pretrain", overrides))


def store_state(root) -> dict:
    """Every file below `root` with what a write would change (inode: atomic writes replace the file)."""
    return {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_finished_store_is_read_and_never_written(tmp_path):
    """Run again with nothing to do, pretrain.py writes nothing into the checkpoint store or the prepared
    data (settings.json included), so a store archived or shared read-only can be reused."""
    run_pretrain(pretrain_config(tmp_path))
    before = {root: store_state(tmp_path / root) for root in ("checkpoint", "data")}
    run_pretrain(pretrain_config(tmp_path))
    assert {root: store_state(tmp_path / root) for root in ("checkpoint", "data")} == before


@pytest.mark.parametrize("errno_, reason", [(30, "Read-only file system"), (28, "No space left on device"),
                                            (13, "Permission denied")])
def test_a_store_that_cannot_be_written_ends_in_a_named_error(tmp_path, monkeypatch, capsys, errno_, reason):
    """What the operating system refuses (a read-only store, a full disk, a permission) ends in
    `error: PATH: reason` from the command, without a traceback."""
    import os
    import tempfile

    from pipeline.runs import user_errors

    def refuse(*args, dir=None, **kwargs):
        raise OSError(errno_, os.strerror(errno_), str(dir))

    cfg = pretrain_config(tmp_path)
    prepare_dataset(cfg.dataset, cfg.data_path, progress=False)  # the data is there; the store is not
    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(SystemExit) as stopped, user_errors():  # what pretrain.py's main does
        run_pretrain(cfg)
    message = str(stopped.value.code)
    assert message.startswith("error: ") and message.endswith(f": {reason}"), message
    # the file meant (the first the run writes), not the temporary one it was to be written through
    assert message == f"error: {stage1_paths(cfg).base_dir / 'settings.json'}: {reason}"


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (torchrun starts its workers in sessions of their own)."""
    import os

    children = {}
    for stat in os.listdir("/proc"):
        if stat.isdigit():
            try:
                fields = open(f"/proc/{stat}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(stat))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def test_torchrun_killed_and_resumed_ends_with_the_uninterrupted_weights(tmp_path):
    """A 2-process run killed after its first saved epoch and started again ends with weights equal to
    an uninterrupted 2-process run's: each rank's random stream (dropout) is saved and restored."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from data.paths import PROJECT_ROOT
    from trainer import load_checkpoint

    def command(where):
        overrides = ["seed=2025", "trainer.base.epochs=40", "trainer.base.stopping_step=0", "trainer.expert.epochs=2",
                     *tiny_overrides(where),
                     f"hydra.run.dir={where}/hydra" + "${rank_suffix:}"]
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "pretrain.py",
                *overrides]

    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    whole = subprocess.run(command(tmp_path / "whole"), cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
                           timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = tmp_path / "killed"
    job = subprocess.Popen(command(killed), cwd=PROJECT_ROOT, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 600
    while not list((killed / "checkpoint").rglob("*.full.ckpt.resume")) and job.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    for pid in [job.pid, *descendants(job.pid)]:  # the launcher and its workers at once, as a preemption does
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    job.wait()
    assert not list((killed / "checkpoint").rglob("*.full.ckpt")), "killed too late: the base model finished"
    resumed = subprocess.run(command(killed), cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout + resumed.stderr
    for path in sorted((tmp_path / "whole" / "checkpoint").rglob("*.ckpt")):
        other = killed / path.relative_to(tmp_path / "whole")
        a, b = load_checkpoint(path)["state_dict"], load_checkpoint(other)["state_dict"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), path.name
