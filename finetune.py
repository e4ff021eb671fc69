"""Stage III: train a backbone on original, mixed or regenerated data of a target domain.

    python finetune.py -m stage=tun gpu_id=0 seed=2025 train_type=new target_dom=dom1
    python finetune.py train_type=sim target_dom=dom1 model_name=GRU4Rec
    python finetune.py -m train_type=sim,new,full target_dom=dom1,dom2,dom3,dom4 model_name=SASRec,CL4SRec

Training rows by `train_type` (algorithm.md, Stage III): `sim` dom{d}.train,
`new` the regenerated file that decoding.py wrote with the same settings,
`full` full.train (mixed; the loss then ranks all items). Validation and test
always use dom{d}.valid / dom{d}.test, ranked over the target domain's items;
the best epoch on validation NDCG@10 is tested. `model_name` is SASRec,
GRU4Rec, CL4SRec, GCEGNN or any RecBole sequential model.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from data import SequenceLoader, read_inter
from data.regenerated import regenerated_name
from experiment import (
    RunLogger, check_stage, open_dataset, run_dir_of, seed_everything, train_config,
    settings_key, variant_name, write_run_files,
)
from model.backbones import build_backbone
from data.paths import project_path
from trainer import Evaluation, evaluate, fit, load_checkpoint, resume_file, select_device

log = logging.getLogger(__name__)
TRAIN_TYPES = ("sim", "new", "full")


def regenerated_file(cfg: DictConfig, dataset) -> Path:
    """The training file of train_type=new: `new_inter_path`, or the one decoding.py wrote for this
    dataset, seed, target domain and variant.

    Stage III does not know Stage I's training settings (its own `epochs` or `model` differ), so the
    variant folders `regenerated/VARIANT-KEY/` are searched; their manifests say which decoding
    options made them. More than one match asks for an explicit `new_inter_path`.
    """
    if cfg.new_inter_path:
        path = project_path(cfg.new_inter_path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: new_inter_path names no file")
        return path
    stem = regenerated_name(dataset.name, cfg.seed, cfg.target_dom)
    decoding = OmegaConf.to_container(cfg.decoding, resolve=True)
    decoding.pop("positions_per_chunk")
    matches = []
    for path in sorted((dataset.root / "regenerated").glob(f"{variant_name(cfg)}-*/{stem}.inter")):
        manifest = json.loads(path.with_name(f"{stem}.manifest.json").read_text())
        options = {k: v for k, v in manifest["decoding"].items() if k != "positions_per_chunk"}
        if manifest["variant"] == variant_name(cfg) and options == decoding:
            matches.append(path)
    if not matches:
        raise FileNotFoundError(
            f"{dataset.root / 'regenerated'}/{variant_name(cfg)}-*/{stem}.inter: regenerated training file not found; "
            f"run `python decoding.py target_dom={cfg.target_dom} seed={cfg.seed}` ({variant_name(cfg)}) first"
        )
    if len(matches) > 1:
        raise ValueError(f"several regenerated files fit ({', '.join(map(str, matches))}); choose one with "
                         "new_inter_path=PATH")
    return matches[0]


def training_rows(cfg: DictConfig, dataset):
    """The training rows a `train_type` names, and where they come from."""
    if cfg.train_type not in TRAIN_TYPES:
        raise ValueError(f"config key 'train_type' is {cfg.train_type!r}; expected one of {', '.join(TRAIN_TYPES)}")
    if cfg.train_type == "sim":
        return dataset.rows(f"{cfg.target_dom}.train"), dataset.path(f"{cfg.target_dom}.train")
    if cfg.train_type == "full":
        return dataset.rows("full.train"), dataset.path("full.train")
    path = regenerated_file(cfg, dataset)
    return read_inter(path, dataset.domains.n_items, one_row_per_user=False), path


def run_finetune(cfg: DictConfig) -> dict:
    """Train, select on validation, test; returns the validation and test metrics."""
    check_stage(cfg, "tun")
    training = train_config(cfg)
    dataset = open_dataset(cfg)
    target_range = dataset.domains.range(cfg.target_dom)
    rows, source = training_rows(cfg, dataset)
    seed_everything(cfg.seed)
    device = select_device(cfg.gpu_id)
    params = OmegaConf.to_container(cfg.model, resolve=True)
    n_users = int(dataset.rows("full.test").users.max())  # every user has a test row
    model = build_backbone(cfg.model_name, dataset.domains.n_items, cfg.MAX_ITEM_LIST_LENGTH, params,
                           n_users=n_users, device=device).to(device)
    if hasattr(model, "build_global_graph"):
        model.build_global_graph(rows)
    if model.last_position_only:
        rows = rows.prefixes()
    # sim and new hold target items only: their softmax runs over the target domain; full
    # mixes every domain, so its loss ranks all items (prediction stays on the target domain).
    loss_range = None if cfg.train_type == "full" else target_range

    settings = {"dataset": OmegaConf.to_container(cfg.dataset, resolve=True), "model": params,
                "train_type": cfg.train_type, "target_dom": cfg.target_dom, "source": str(source),
                "training": {k: v for k, v in vars(training).items()}, "batch": cfg.train_batch_size,
                "MAX_ITEM_LIST_LENGTH": cfg.MAX_ITEM_LIST_LENGTH}
    folder = (project_path(cfg.checkpoint_dir) / dataset.name / "finetune"
              / f"{cfg.model_name}-{cfg.train_type}-{cfg.target_dom}-{settings_key(settings)}")
    checkpoint = folder / f"{cfg.model_name}-{dataset.name}-{cfg.seed}.tune.ckpt"
    meta = {"dataset": dataset.name, "n_items": dataset.domains.n_items, "model_name": cfg.model_name,
            "train_type": cfg.train_type, "target_dom": cfg.target_dom}
    run_dir = run_dir_of(cfg)
    logger = RunLogger(cfg, run_dir, job=f"finetune-{cfg.model_name}-{cfg.train_type}-{cfg.target_dom}")
    log.info("Stage III: %s on %s %s rows (%d, from %s), %s, device %s", cfg.model_name, cfg.train_type,
             cfg.target_dom, len(rows), source, variant_name(cfg), device)

    def loader(rows_, shuffle, batch_size):
        return SequenceLoader(rows_, batch_size, cfg.MAX_ITEM_LIST_LENGTH, shuffle=shuffle, seed=cfg.seed)

    def evaluation(split):
        return Evaluation(loader(dataset.rows(f"{cfg.target_dom}.{split}"), False, cfg.eval_batch_size),
                          lambda m, b: m.scores(b, target_range), target_range)

    if checkpoint.is_file() and not cfg.overwrite:
        saved = load_checkpoint(checkpoint)
        model.load_state_dict(saved["state_dict"])
        valid = saved["valid_metrics"]
        log.info("reusing the finished checkpoint %s (overwrite=true trains anew)", checkpoint)
    else:
        if cfg.overwrite:
            resume_file(checkpoint).unlink(missing_ok=True)
        valid = fit(model, lambda m, b: m.loss(b, loss_range), loader(rows, True, cfg.train_batch_size), training,
                    checkpoint=checkpoint, meta=meta, valid=evaluation("valid"), resume=cfg.resume, logger=logger,
                    log_prefix=f"{cfg.model_name}/{cfg.train_type}/{cfg.target_dom}", progress=cfg.progress,
                    device=device).valid_metrics
    test = evaluate(model, evaluation("test"), training.topk, device, training.enable_amp)
    log.info("test %s", " ".join(f"{k} {v:.4f}" for k, v in test.items() if k.endswith(("@10", "@20"))))
    metrics = {"stage": "finetune", "dataset": dataset.name, "model_name": cfg.model_name,
               "train_type": cfg.train_type, "target_dom": cfg.target_dom, "seed": cfg.seed,
               "variant": variant_name(cfg) if cfg.train_type == "new" else None,
               "valid": valid, "test": test, "checkpoint": str(checkpoint)}
    logger.summary({f"test/{k}": v for k, v in test.items()})
    logger.finish()
    write_run_files(run_dir, cfg, metrics)
    return metrics


@hydra.main(version_base="1.3", config_path="config", config_name="finetune")
def main(cfg: DictConfig) -> None:
    run_finetune(cfg)


if __name__ == "__main__":
    main()
