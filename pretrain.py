"""Stage I: pretrain the base model and adapt one expert per domain.

    python pretrain.py -m stage=run gpu_id=0 seed=2025
    python pretrain.py trainer.base.epochs=50 trainer.expert.epochs=5
    python pretrain.py experiment=wo_dsa        # Table 3: experts from scratch
    python pretrain.py experiment=dsa_wo_dsp    # Table 3: experts without DSP
    torchrun --nproc_per_node=4 pretrain.py     # data-parallel over 4 processes (GPUs, or CPU with gloo)

The base model M learns next-item prediction on the mixed `full.train` rows
(validation: `full.valid`, all items; `trainer.base`). Each expert E_d starts
from M's best weights (DSA) and learns domain-specific prediction (DSP) on the
same mixed rows, a softmax over domain d's items only (`trainer.expert`).
Checkpoints go where `pipeline.artifacts.stage1_paths` says; a finished model
is reused while the files it was trained from are unchanged, unless overwrite=true.
"""
from __future__ import annotations

import logging

import hydra
import torch
from omegaconf import DictConfig

from checkpoints import load_checkpoint
from core.distributed import World, process_group
from data import SequenceLoader
from evaluation import Evaluation
from model.decoder import TaesarDecoder
from model.objectives import domain_specific_objective, next_item_objective, target_scores
from pipeline.artifacts import checkpoint_meta, stage1_inputs, stage1_paths
from pipeline.runs import user_errors
from pipeline.settings import decoder_config, expert_variant, stage_settings, train_config
from pipeline.stage_run import StageRun
from trainer import fit

log = logging.getLogger(__name__)


def run_pretrain(cfg: DictConfig) -> dict:
    """Train (or reuse) M and every expert; returns their validation metrics by role. Under torchrun
    every model trains data-parallel over the ranks (the batch size is the global one) and rank 0
    writes the checkpoints and run files."""
    with process_group() as world:
        return _run_pretrain(cfg, world)


def _run_pretrain(cfg: DictConfig, world: World) -> dict:
    stage_settings(cfg, "pretrain")
    base_training, expert_training = train_config(cfg, "base"), train_config(cfg, "expert")
    run = StageRun(cfg, world, job="pretrain")
    dataset, device = run.dataset, run.device
    domains = dataset.domains
    model_config = decoder_config(cfg, domains.n_items)
    variant = expert_variant(cfg)
    paths = stage1_paths(cfg)
    run.write_settings(paths.base_dir, paths.base_settings)
    run.write_settings(paths.expert_dir, paths.expert_settings)
    run.open_logger()
    log.info("Stage I on %s (%d items, %d domains), variant %s, device %s%s; checkpoints in %s",
             dataset.name, domains.n_items, domains.n_domains, variant, device,
             f", data-parallel rank {world.rank} of {world.size}" if world.size > 1 else "", paths.expert_dir)

    def loader(split, shuffle, batch_size):
        return SequenceLoader(dataset.rows(split), batch_size, cfg.MAX_ITEM_LIST_LENGTH, shuffle=shuffle, seed=cfg.seed)

    def train(role, init_seed, loss_fn, train_split, item_range, training):
        path = paths.role(role)

        def fit_model():
            torch.manual_seed(init_seed)  # each model's initialisation and dropout draw from its own seed
            model = TaesarDecoder(model_config)
            if role != "full" and cfg.expert.init == "base":
                model.load_state_dict(load_checkpoint(paths.base)["state_dict"])
            valid_split = "full.valid" if role == "full" else f"{role}.valid"
            fit(model.to(device), loss_fn, loader(train_split, True, training.batch_size), training,
                checkpoint=path, meta=meta,
                valid=Evaluation(loader(valid_split, False, cfg.eval_batch_size), target_scores(item_range),
                                 item_range),
                resume=cfg.resume, logger=run.logger, log_prefix=role, progress=cfg.progress, device=device)

        meta = checkpoint_meta(dataset, model_config, role, stage1_inputs(cfg, dataset, paths, role))
        return run.reuse_or_train(path, meta, fit_model, name=role)["valid_metrics"]

    metrics = {"full": train("full", cfg.seed, next_item_objective(), "full.train", (1, domains.n_items + 1),
                             base_training)}
    for d, dom in enumerate(domains.names, start=1):
        item_range = domains.range(dom)
        if cfg.expert.loss == "dsp":
            loss_fn, train_split = domain_specific_objective(item_range), "full.train"
        else:
            loss_fn, train_split = next_item_objective(item_range), f"{dom}.train"
        metrics[dom] = train(dom, cfg.seed + d, loss_fn, train_split, item_range, expert_training)

    summary = {"stage": "pretrain", "variant": variant, "checkpoints": str(paths.expert_dir), "valid": metrics}
    return run.finish(summary, {f"{role}/valid/{k}": v for role, m in metrics.items() for k, v in m.items()})


@hydra.main(version_base="1.3", config_path="config", config_name="pretrain")
def main(cfg: DictConfig) -> None:
    with user_errors():
        run_pretrain(cfg)


if __name__ == "__main__":
    main()
