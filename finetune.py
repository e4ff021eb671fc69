"""Stage III: train a backbone on original, mixed or regenerated data of a target domain.

    python finetune.py -m stage=tun gpu_id=0 seed=2025 train_type=new target_dom=dom1
    python finetune.py train_type=sim target_dom=dom1 model_name=GRU4Rec trainer.finetune.epochs=50
    python finetune.py -m train_type=sim,new,full target_dom=dom1,dom2,dom3,dom4 model_name=SASRec,CL4SRec
    torchrun --nproc_per_node=4 finetune.py train_type=new target_dom=dom1    # data-parallel over 4 processes

Training rows by `train_type`: `sim` dom{d}.train, `new` the regenerated file
that decoding.py wrote for the same settings (its location is computed from
this config), `full` full.train (mixed; the loss then ranks all items).
Validation and test use dom{d}.valid / dom{d}.test, ranked over the target
domain's items (with `train_type=full`, `eval_history=mixed` gives the same
users and targets their mixed history instead, as the cross-domain baselines
have it); the best epoch on validation NDCG@10 is tested
(`trainer.finetune`). `model_name` is SASRec, GRU4Rec, CL4SRec, GCEGNN or any
RecBole sequential model.
"""
from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig, OmegaConf

from backbones.registry import build_backbone
from core.distributed import World, process_group
from data import SequenceLoader, read_inter
from data.fingerprints import fingerprint
from data.paths import project_path
from evaluation import Evaluation, evaluate
from pipeline.artifacts import decoding_inputs, finetune_checkpoint, missing_regenerated, regenerated, training_source
from pipeline.runs import seed_everything, user_errors
from pipeline.settings import rerun_command, stage_settings, train_config, variant_name
from pipeline.stage_run import StageRun
from trainer import fit

log = logging.getLogger(__name__)


def training_rows(cfg: DictConfig, dataset):
    """The training rows a `train_type` names, the record of their file, and what names them in the
    checkpoint's key (a split, the regenerated file's folder, or the explicit path)."""
    source = training_source(cfg)
    if cfg.train_type in ("sim", "full"):
        return dataset.rows(source), dataset.fingerprint(source), source
    if cfg.new_inter_path:
        path = project_path(cfg.new_inter_path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: new_inter_path names no file")
    else:
        output = regenerated(cfg)
        if not output.inter.is_file():
            command = rerun_command("decoding.py", "decoding", [f"target_dom={cfg.target_dom}", f"seed={cfg.seed}"])
            raise missing_regenerated(cfg, output, command)
        output.check(decoding_inputs(cfg, dataset, cfg.target_dom))  # decoded from today's data and checkpoints
        path = output.inter
    return read_inter(path, dataset.domains.n_items, one_row_per_user=False), fingerprint(path), source


def run_finetune(cfg: DictConfig) -> dict:
    """Train, select on validation, test; returns the validation and test metrics. Under torchrun the
    backbone trains data-parallel over the ranks (the batch size is the global one), validation and
    test are computed over every rank's share, and rank 0 writes the checkpoint and run files."""
    with process_group() as world:
        return _run_finetune(cfg, world)


def _run_finetune(cfg: DictConfig, world: World) -> dict:
    stage_settings(cfg, "finetune")
    training = train_config(cfg, "finetune")
    run = StageRun(cfg, world, job=f"finetune-{cfg.model_name}-{cfg.train_type}-{cfg.target_dom}")
    dataset, device = run.dataset, run.device
    target_range = dataset.domains.range(cfg.target_dom)
    rows, source_record, source = training_rows(cfg, dataset)
    seed_everything(cfg.seed)
    params = OmegaConf.to_container(cfg.model, resolve=True)
    n_users = int(dataset.rows("full.test").users.max())  # every user has a test row
    model = build_backbone(cfg.model_name, dataset.domains.n_items, cfg.MAX_ITEM_LIST_LENGTH, params,
                           n_users=n_users, device=device).to(device)
    model.see_training_rows(rows)
    if model.last_position_only:
        rows = rows.prefixes()
    # sim and new hold target items only: their softmax runs over the target domain; full
    # mixes every domain, so its loss ranks all items (prediction stays on the target domain).
    loss_range = None if cfg.train_type == "full" else target_range

    checkpoint, settings = finetune_checkpoint(cfg, source)
    run.write_settings(checkpoint.parent, settings)
    mixed_history = cfg.eval_history == "mixed"
    meta = {"dataset": dataset.name, "n_items": dataset.domains.n_items, "model_name": cfg.model_name,
            "train_type": cfg.train_type, "target_dom": cfg.target_dom,
            "inputs": {"train": source_record, "valid": dataset.fingerprint(f"{cfg.target_dom}.valid"),
                       "item": dataset.fingerprint("item")}}
    if mixed_history:  # selection read full.valid too
        meta["inputs"]["valid_history"] = dataset.fingerprint("full.valid")
    run.open_logger()
    log.info("Stage III: %s on %s %s rows (%d, from %s), %s, device %s", cfg.model_name, cfg.train_type,
             cfg.target_dom, len(rows), source_record["file"], variant_name(cfg), device)

    def loader(rows_, shuffle, batch_size):
        return SequenceLoader(rows_, batch_size, cfg.MAX_ITEM_LIST_LENGTH, shuffle=shuffle, seed=cfg.seed)

    def evaluation(split):
        rows_ = (dataset.mixed_history_rows(split, cfg.target_dom) if mixed_history
                 else dataset.rows(f"{cfg.target_dom}.{split}"))
        return Evaluation(loader(rows_, False, cfg.eval_batch_size), lambda m, b: m.scores(b, target_range),
                          target_range)

    saved = run.reuse_or_train(checkpoint, meta, lambda: fit(
        model, lambda m, b: m.loss(b, loss_range), loader(rows, True, training.batch_size), training,
        checkpoint=checkpoint, meta=meta, valid=evaluation("valid"), resume=cfg.resume, logger=run.logger,
        log_prefix=f"{cfg.model_name}/{cfg.train_type}/{cfg.target_dom}", progress=cfg.progress, device=device))
    model.load_state_dict(saved["state_dict"])  # the kept weights (fit leaves them in the model too)
    valid = saved["valid_metrics"]
    test_ranks: dict = {}
    test = evaluate(model, evaluation("test"), training.topk, device, training.enable_amp, ranks=test_ranks)
    log.info("test %s", " ".join(f"{k} {v:.4f}" for k, v in test.items() if k.endswith(("@10", "@20"))))
    metrics = {"stage": "finetune", "dataset": dataset.name, "model_name": cfg.model_name,
               "train_type": cfg.train_type, "eval_history": cfg.eval_history, "target_dom": cfg.target_dom,
               "seed": cfg.seed, "variant": variant_name(cfg) if cfg.train_type == "new" else None,
               "valid": valid, "test": test, "checkpoint": str(checkpoint),
               "test_ranks": test_ranks}  # each test user's rank: what paired comparisons resample
    return run.finish(metrics, {f"test/{k}": v for k, v in test.items()})


@hydra.main(version_base="1.3", config_path="config", config_name="finetune")
def main(cfg: DictConfig) -> None:
    with user_errors():
        run_finetune(cfg)


if __name__ == "__main__":
    main()
