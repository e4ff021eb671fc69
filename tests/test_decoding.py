"""Stage II end to end on tiny synthetic data: the output contract, fast vs plain decoder,
the reports, reuse and bad input."""
from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch

from data import PreparedDataset, read_inter
from data.paths import project_path
from dataset.prepare import prepare_dataset
from decoding import load_stage1, run_decoding
from finetune import run_finetune
from model.contrastive import DecodingRule
from model.regeneration import regenerate
from pipeline.artifacts import decoding_inputs, regenerated, stage1_paths, write_settings
from pipeline.settings import decoding_rule
from pretrain import run_pretrain
from reference.decoder import reference_regenerate
from tests.conftest import stage_config, tiny_overrides
from tests.helpers import fork_dataset

HEADER = "user_id:token\titem_id_list:token_seq\titem_id:token"
# Stage I settings key the checkpoint folders: every stage of a pipeline passes the same ones.
TRAINING = ["seed=2025", "trainer.base.epochs=3", "trainer.expert.epochs=2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny dataset with its Stage I checkpoints (trained briefly)."""
    root = tmp_path_factory.mktemp("stage2")
    run_pretrain(stage_config("pretrain", [*TRAINING, *tiny_overrides(root)]))
    return root


def decoding_config(root, *extra):
    return stage_config("decoding", ["stage=dec", "target_dom=dom2", *TRAINING, *tiny_overrides(root), *extra])


def test_regenerated_file_follows_the_contract(trained):
    cfg = decoding_config(trained)
    report = run_decoding(cfg)
    dataset = PreparedDataset(project_path(cfg.data_path), "tiny")
    lo, hi = dataset.domains.range("dom2")
    output = regenerated(cfg)
    folder, path = output.folder, output.inter
    assert path.read_text().splitlines()[0] == HEADER
    rows = read_inter(path, n_items=dataset.domains.n_items, one_row_per_user=False)
    assert np.all((rows.items >= lo) & (rows.items < hi))  # target items only
    assert np.all(np.diff(rows.users) >= 0) and np.all(rows.lengths >= 2)
    lines = path.read_text().splitlines()[1:]
    assert len(lines) == len(set(lines))  # no exact duplicate rows
    original = set(dataset.path("dom2.train").read_text().splitlines()[1:])
    assert original <= set(lines)  # every row of dom2.train is there
    new_rows = [line for line in lines if line not in original]
    assert len(new_rows) > 0 and report["rows_out"] == len(lines)
    for line in new_rows:  # runs of one item were collapsed
        items = line.replace("\t", " ").split(" ")[1:]
        assert all(a != b for a, b in zip(items, items[1:]))

    summary = json.loads((folder / "tiny.2025.dom2.train.summary.json").read_text())
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert {"stage": "decoding", **summary, "seed": 2025, "file": str(path), "sha256": digest} == report
    for counts in summary["source_items"].values():
        assert counts["seen"] == counts["replaced"] + counts["deleted"] > 0
        assert counts["without_history"] <= counts["deleted"]
    mapping = json.loads((folder / "tiny.2025.dom2.train.mapping.json").read_text())
    assert sum(c for targets in mapping.values() for c in targets.values()) == summary["source_items_replaced"]
    assert all(lo <= int(t) < hi and not lo <= int(s) < hi for s, ts in mapping.items() for t in ts)
    manifest = json.loads((folder / "tiny.2025.dom2.train.manifest.json").read_text())
    assert manifest["variant"] == "taesar"
    assert manifest["inputs"]["checkpoint dom2"]["file"] == "SASRec-tiny-2025.dom2.ckpt"
    assert manifest["checkpoints"]["dom2"].endswith("/SASRec-tiny-2025.dom2.ckpt")
    assert set(manifest["inputs"]) == {"item", "full.train", "dom2.train", "checkpoint full",
                                       *(f"checkpoint dom{d}" for d in (1, 2, 3))}
    assert folder.parent == trained / "regenerated" / "tiny"  # outside the prepared data

    stamp = path.stat().st_mtime_ns
    assert run_decoding(cfg) == report  # reused, not decoded again
    assert path.stat().st_mtime_ns == stamp


def test_decoding_is_deterministic(trained, tmp_path):
    cfg = decoding_config(trained, "overwrite=true")
    run_decoding(cfg)
    first = (regenerated(cfg).inter).read_bytes()
    run_decoding(cfg)
    assert (regenerated(cfg).inter).read_bytes() == first


RULES = {
    "taesar": DecodingRule(),
    "position_weights": DecodingRule(weights="position"),
    "wo_sde": DecodingRule(source_experts=False),
    "wo_gcs": DecodingRule(global_test=False),
    "wo_lcs": DecodingRule(local_scores=False),
    "position_wo_sde": DecodingRule(weights="position", source_experts=False),
    "position_wo_gcs": DecodingRule(weights="position", global_test=False),
    "position_wo_lcs": DecodingRule(weights="position", local_scores=False),
    "reference_shift": DecodingRule(reference_shift=True),
}


@pytest.mark.parametrize("name", sorted(RULES))
def test_fast_decoder_equals_the_plain_one(trained, name):
    cfg = decoding_config(trained)
    dataset = PreparedDataset(project_path(cfg.data_path), "tiny")
    models = load_stage1(cfg, dataset, torch.device("cpu"))
    rows = dataset.rows("full.train").take(range(40))  # the plain decoder is slow
    experts = {d: models[f"dom{d}"] for d in range(1, dataset.domains.n_domains + 1)}
    for target in (1, 3):
        # Small batches and chunks, so that batching and chunking are exercised too.
        fast = regenerate(rows, dataset.domains, target, models["full"], experts, RULES[name], max_len=64,
                          batch_size=7, chunk=13).rows
        plain = reference_regenerate(rows, dataset.domains, target, models["full"], experts, RULES[name])
        assert [(int(u), fast.sequence(r).tolist()) for r, u in enumerate(fast.users)] == plain


def test_ablations_write_to_their_own_folders(trained):
    folders = set()
    for experiment in ("wo_sde", "wo_gcs", "wo_lcs", "position_weights"):
        cfg = decoding_config(trained, f"experiment={experiment}")
        assert decoding_rule(cfg) != DecodingRule()
        report = run_decoding(cfg)
        assert report["variant"] == experiment
        folders.add(regenerated(cfg).folder)
    assert len(folders) == 4
    wo_gcs = json.loads(regenerated(decoding_config(trained, "experiment=wo_gcs")).summary.read_text())
    # Without the global test nothing with a history is deleted.
    for counts in wo_gcs["source_items"].values():
        assert counts["deleted"] == counts["without_history"]


def test_missing_checkpoints_stop_before_writing(tmp_path):
    cfg = decoding_config(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"SASRec-tiny-2025\.full\.ckpt: Stage I checkpoint not found"):
        run_decoding(cfg)
    assert not regenerated(cfg).folder.exists()


def copy_stage1(source_cfg, target_cfg) -> None:
    source, target = stage1_paths(source_cfg), stage1_paths(target_cfg)
    write_settings(target.base_dir, target.base_settings)
    write_settings(target.expert_dir, target.expert_settings)
    for role in ("full", "dom1", "dom2", "dom3"):
        target.role(role).write_bytes(source.role(role).read_bytes())


def test_checkpoints_of_another_vocabulary_are_refused(trained, tmp_path):
    cfg = decoding_config(tmp_path, "dataset.generator.items_per_domain=50")
    copy_stage1(decoding_config(trained), cfg)
    with pytest.raises(ValueError, match=r"checkpoint n_items is \d+ but this run expects \d+"):
        run_decoding(cfg)
    assert not regenerated(cfg).folder.exists()


def test_checkpoints_trained_on_other_data_of_the_same_shape_are_refused(trained, tmp_path):
    """Same sizes, same settings, other rows: only the fingerprints tell the checkpoints apart."""
    fork_dataset(trained / "data" / "tiny", tmp_path / "data" / "tiny")
    cfg = decoding_config(trained, f"data_path={tmp_path / 'data'}", f"checkpoint_dir={tmp_path / 'checkpoint'}",
                          f"regenerated_dir={tmp_path / 'regenerated'}")
    copy_stage1(decoding_config(trained), cfg)
    with pytest.raises(ValueError, match=r"SASRec-tiny-2025\.full\.ckpt: made from inputs that have changed since "
                                         r"\(full\.train was tiny\.full\.train\.inter with sha256 \w+, is now "
                                         r"tiny\.full\.train\.inter with sha256 \w+\)"):
        run_decoding(cfg)
    assert not regenerated(cfg).folder.exists()


def test_output_of_replaced_checkpoints_is_not_reused(trained, tmp_path):
    """A regenerated file records the checkpoints it was decoded with: once one is replaced (here by
    an expert trained for one epoch less), decoding refuses to call the old file decoded, and
    finetune.py refuses to train on it; overwrite=true decodes anew."""
    root = tmp_path / "copy"
    shutil.copytree(trained, root)
    cfg = decoding_config(root, "target_dom=dom3")
    run_decoding(cfg)
    shorter = stage_config("pretrain", [*TRAINING, *tiny_overrides(root), "trainer.expert.epochs=1"])
    run_pretrain(shorter)
    stage1_paths(cfg).expert("dom1").write_bytes(stage1_paths(shorter).expert("dom1").read_bytes())
    stale = r"tiny\.2025\.dom3\.train\.inter: made from inputs that have changed since \(checkpoint dom1 was"
    with pytest.raises(ValueError, match=stale):
        run_decoding(cfg)
    with pytest.raises(ValueError, match=stale):
        run_finetune(stage_config("finetune", ["train_type=new", "target_dom=dom3", *TRAINING, *tiny_overrides(root)]))
    run_decoding(decoding_config(root, "target_dom=dom3", "overwrite=true"))
    regenerated(cfg).check(decoding_inputs(cfg, PreparedDataset(root / "data", "tiny"), "dom3"))


def test_re_preparing_the_dataset_keeps_the_regenerated_files(trained, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(trained, root)
    cfg = decoding_config(root)
    run_decoding(cfg)
    output = regenerated(cfg)
    before = {p.name: p.read_bytes() for p in output.folder.iterdir()}
    prepare_dataset(cfg.dataset, cfg.data_path, overwrite=True, progress=False)
    other = stage_config("prepare", [o for o in tiny_overrides(root) if o.startswith(("dataset", "data_path"))]
                    + ["dataset.item_core=2"])  # another preparation under the same name, and back
    prepare_dataset(other.dataset, other.data_path, progress=False)
    assert {p.name: p.read_bytes() for p in output.folder.iterdir()} == before
    # back to the original settings: the same prepared bytes, so the regenerated file is current again
    assert run_decoding(cfg)["rows_out"] == json.loads(output.summary.read_text())["rows_out"]


def test_unknown_target_domain(trained):
    with pytest.raises(ValueError, match=r"unknown domain 'dom7': this dataset has dom1, dom2, dom3"):
        run_decoding(decoding_config(trained, "target_dom=dom7"))


def test_a_changed_prepared_file_is_prepared_again(trained, tmp_path):
    cfg = decoding_config(trained)
    data = tmp_path / "data"
    shutil.copytree(project_path(cfg.data_path), data)
    train = data / "tiny" / "tiny.full.train.inter"
    original = train.read_text()
    train.write_text(HEADER + "\n")
    run_decoding(decoding_config(trained, f"data_path={data}", f"regenerated_dir={tmp_path}/regenerated"))
    assert train.read_text() == original


def test_decoding_batch_size_does_not_change_which_checkpoints_are_used(trained):
    # The official command decodes with train_batch_size=32 whatever Stage I trained with.
    report = run_decoding(decoding_config(trained, "train_batch_size=5", "target_dom=dom3"))
    assert report["target_dom"] == "dom3"


def test_all_target_domains_in_one_pass_write_the_files_of_one_run_per_domain(trained, tmp_path):
    """target_dom=all encodes each row once per model and decodes every domain from those states;
    its files are, byte for byte, those of decoding.py target_dom=domD run for each D."""
    one_by_one = {}
    for dom in ("dom1", "dom2", "dom3"):
        cfg = decoding_config(trained, f"target_dom={dom}", f"regenerated_dir={tmp_path}/single")
        run_decoding(cfg)
        output = regenerated(cfg)
        one_by_one[dom] = {p.name: p.read_bytes() for p in output.folder.glob(f"tiny.2025.{dom}.train.*")}
    cfg = decoding_config(trained, "target_dom=all", f"regenerated_dir={tmp_path}/all")
    metrics = run_decoding(cfg)
    assert set(metrics["reports"]) == {"dom1", "dom2", "dom3"}
    for dom, files in one_by_one.items():
        output = regenerated(cfg, dom)
        mine = {p.name: p.read_bytes() for p in output.folder.glob(f"tiny.2025.{dom}.train.*")}
        manifest = f"tiny.2025.{dom}.train.manifest.json"
        assert {k: v for k, v in mine.items() if k != manifest} == {k: v for k, v in files.items() if k != manifest}
        # the manifests differ only in where the file was written
        ours, theirs = json.loads(mine[manifest]), json.loads(files[manifest])
        assert ours.pop("output")["sha256"] == theirs.pop("output")["sha256"] and ours == theirs
        assert metrics["reports"][dom]["file"] == str(output.inter)
        assert metrics["reports"][dom]["sha256"] == hashlib.sha256(output.inter.read_bytes()).hexdigest()
    # and a second call reuses every file
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "all").rglob("*.inter")}
    run_decoding(cfg)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "all").rglob("*.inter")} == stamps


def test_decisions_do_not_depend_on_the_chunks_or_the_targets_asked_for(trained):
    from model.regeneration import decode_rows, positions_per_block, positions_per_chunk

    cfg = decoding_config(trained)
    dataset = PreparedDataset(project_path(cfg.data_path), "tiny")
    models = load_stage1(cfg, dataset, torch.device("cpu"))
    experts = {d: models[f"dom{d}"] for d in (1, 2, 3)}
    rows = dataset.rows("full.train").take(range(30))
    together = decode_rows(rows, dataset.domains, [1, 2, 3], models["full"], experts, DecodingRule(), max_len=64,
                           batch_size=8, chunk=50)
    for target in (1, 2, 3):
        alone = decode_rows(rows, dataset.domains, [target], models["full"], experts, DecodingRule(), max_len=64,
                            batch_size=8, chunk=50)[target]
        assert all(np.array_equal(a, b) for a, b in zip(alone, together[target]))
    # nor on how the rule's blocks cut a chunk (one position a block, a ragged 7, the default)
    for chunk, block in ((50, 1), (13, 7), (None, None)):
        cut = decode_rows(rows, dataset.domains, [1, 2, 3], models["full"], experts, DecodingRule(), max_len=64,
                          batch_size=8, chunk=chunk, block=block)
        assert all(np.array_equal(a, b) for t in (1, 2, 3) for a, b in zip(cut[t], together[t]))
    # a memory budget sizes the chunks: 2 GB hold many positions of 110 items, a tiny budget one
    assert positions_per_chunk(2.0, 110, 4) > 10_000 and positions_per_chunk(1e-9, 110, 4) == 1
    # the rule's blocks hold a few positions of the paper's 191,652 items, and many of 110
    assert 1 <= positions_per_block(191_652) <= 8 and positions_per_block(110) > 1000
    assert positions_per_block(10**9) == 1


def test_decisions_do_not_depend_on_the_row_order_or_where_the_last_block_runs(trained, monkeypatch):
    """The decoder batches rows longest first and runs a model's last block at its wanted positions
    only where those are few (`STATES_AT_BELOW`): neither may change a decision."""
    from model import regeneration

    cfg = decoding_config(trained)
    dataset = PreparedDataset(project_path(cfg.data_path), "tiny")
    models = load_stage1(cfg, dataset, torch.device("cpu"))
    experts = {d: models[f"dom{d}"] for d in (1, 2, 3)}
    rows = dataset.rows("full.train").take(range(40))
    assert len(set(np.minimum(rows.lengths, 64).tolist())) > 5  # lengths to sort

    def decided(part, targets, threshold):
        monkeypatch.setattr(regeneration, "STATES_AT_BELOW", threshold)
        return regeneration.decode_rows(part, dataset.domains, targets, models["full"], experts, DecodingRule(),
                                        max_len=64, batch_size=8)

    for targets in ([2], [1, 2, 3]):
        whole_blocks, last_block_at = decided(rows, targets, 0.0), decided(rows, targets, 2.0)
        for t in targets:
            assert all(np.array_equal(a, b) for a, b in zip(whole_blocks[t], last_block_at[t]))
            assert whole_blocks[t][1].any()  # some source items were converted
    # reversed rows: each row's decisions are where its items are, the same as in file order
    order = np.arange(len(rows))[::-1]
    backwards = decided(rows.take(order), [2], 0.5)[2]
    forwards = decided(rows, [2], 0.5)[2]
    for r, original in enumerate(order):
        here, there = slice(*rows.take(order).offsets[r:r + 2]), slice(*rows.offsets[original:original + 2])
        assert np.array_equal(backwards[0][here], forwards[0][there])
        assert np.array_equal(backwards[1][here], forwards[1][there])


def test_the_rule_in_float32_decides_as_in_float64_on_trained_models(trained):
    from model.regeneration import decode_rows

    cfg = decoding_config(trained)
    dataset = PreparedDataset(project_path(cfg.data_path), "tiny")
    models = load_stage1(cfg, dataset, torch.device("cpu"))
    experts = {d: models[f"dom{d}"] for d in (1, 2, 3)}
    rows = dataset.rows("full.train")
    for rule in (DecodingRule(), DecodingRule(local_scores=False), DecodingRule(reference_shift=True)):
        fast, exact = (decode_rows(rows, dataset.domains, [1, 2, 3], models["full"], experts, rule, max_len=64,
                                   certified_float32=certified) for certified in (True, False))
        for target in (1, 2, 3):
            assert all(np.array_equal(a, b) for a, b in zip(fast[target], exact[target]))


def test_torchrun_shards_the_rows_and_writes_the_files_of_one_process(trained, tmp_path):
    """Two gloo processes under torchrun share the rows; rank 0 writes, byte for byte, what one process writes."""
    import os
    import subprocess
    import sys

    from data.paths import PROJECT_ROOT

    single = decoding_config(trained, "target_dom=all", f"regenerated_dir={tmp_path}/single")
    run_decoding(single)
    overrides = ["stage=dec", "target_dom=all", *TRAINING, *tiny_overrides(trained),
                 f"regenerated_dir={tmp_path}/sharded", f"hydra.run.dir={tmp_path}/hydra" + "${rank_suffix:}"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "decoding.py", *overrides], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 1 of 2" in done.stdout and "rank 0 of 2" in done.stdout  # both decoded a share
    # rank 0 alone wrote the run files; rank 1's log has a folder of its own
    assert (tmp_path / "hydra" / "metrics.json").is_file() and not (tmp_path / "hydra-rank1" / "metrics.json").exists()
    assert (tmp_path / "hydra-rank1" / "decoding.log").is_file()
    sharded = decoding_config(trained, "target_dom=all", f"regenerated_dir={tmp_path}/sharded")
    for dom in ("dom1", "dom2", "dom3"):
        ours, theirs = regenerated(sharded, dom), regenerated(single, dom)
        for name in ("inter", "summary", "mapping"):
            assert getattr(ours, name).read_bytes() == getattr(theirs, name).read_bytes()


def test_a_second_decoding_of_the_same_files_stops_while_the_first_runs(trained, tmp_path):
    """Two identical decodings started together: the one that finds the folder's lock held stops at
    once (BusyError, naming the lock) instead of doing the whole work again; once the first is done,
    a run reuses its files and writes nothing into the store."""
    from data.files import BusyError, exclusive_lock

    cfg = decoding_config(trained, f"regenerated_dir={tmp_path}/regenerated", "target_dom=all")
    lock = regenerated(cfg, "dom1").lock
    with exclusive_lock(lock):  # the first job, decoding now
        with pytest.raises(BusyError, match="another job is decoding these files now"):
            run_decoding(cfg)
    assert not any((tmp_path / "regenerated").rglob("*.inter"))
    run_decoding(cfg)
    files = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (tmp_path / "regenerated").rglob("*") if p.is_file()}
    run_decoding(decoding_config(trained, f"regenerated_dir={tmp_path}/regenerated", "target_dom=dom3"))
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in (tmp_path / "regenerated").rglob("*") if p.is_file()} == files


def test_a_decoding_run_computes_stage1s_paths_once(trained, tmp_path, monkeypatch):
    """Every target's file and the checkpoints are keyed by Stage I's settings: one run over every
    domain works them out once, not once per domain and helper."""
    import decoding
    import pipeline.artifacts as artifacts

    calls = []
    computed = artifacts.stage1_paths

    def counted(cfg):
        calls.append(1)
        return computed(cfg)

    monkeypatch.setattr(artifacts, "stage1_paths", counted)
    monkeypatch.setattr(decoding, "stage1_paths", counted)
    run_decoding(decoding_config(trained, "target_dom=all", f"regenerated_dir={tmp_path}/all"))
    assert len(calls) == 1
