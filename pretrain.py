"""Stage I: pretrain the base model and adapt one expert per domain.

    python pretrain.py -m stage=run gpu_id=0 seed=2025
    python pretrain.py experiment=wo_dsa        # Table 3: experts from scratch
    python pretrain.py experiment=dsa_wo_dsp    # Table 3: experts without DSP

The base model M learns next-item prediction on the mixed `full.train` rows
(validation: `full.valid`, all items). Each expert E_d starts from M's best
weights (DSA) and learns domain-specific prediction (DSP) on the same mixed
rows, a softmax over domain d's items only. Checkpoints go to the folder of
`experiment.stage1_paths`; a finished model is reused unless overwrite=true.
"""
from __future__ import annotations

import logging

import hydra
import torch
from omegaconf import DictConfig

from data import SequenceLoader
from experiment import (
    RunLogger, check_stage, checkpoint_meta, decoder_config, expert_variant, open_dataset, run_dir_of,
    seed_everything, stage1_paths, train_config, write_run_files,
)
from model.decoder import TaesarDecoder
from model.objectives import domain_specific_objective, next_item_objective, target_scores
from trainer import Evaluation, check_meta, fit, load_checkpoint, resume_file, select_device

log = logging.getLogger(__name__)


def run_pretrain(cfg: DictConfig) -> dict:
    """Train (or reuse) M and every expert; returns their validation metrics by role."""
    check_stage(cfg, "run")
    base_training = train_config(cfg)
    expert_training = train_config(
        cfg, epochs=cfg.expert.epochs, stopping_step=cfg.expert.stopping_step,
        learning_rate=cfg.expert.learning_rate, keep="best" if cfg.expert.stopping_step > 0 else "last",
    )
    dataset = open_dataset(cfg)
    domains = dataset.domains
    model_config = decoder_config(cfg, domains.n_items)
    variant = expert_variant(cfg)
    paths = stage1_paths(cfg, write_settings=True)
    device = select_device(cfg.gpu_id)
    run_dir = run_dir_of(cfg)
    logger = RunLogger(cfg, run_dir, job="pretrain")
    log.info("Stage I on %s (%d items, %d domains), variant %s, device %s; checkpoints in %s",
             dataset.name, domains.n_items, domains.n_domains, variant, device, paths.expert_dir)

    def meta(role):
        return checkpoint_meta(dataset, model_config, role, train_batch_size=cfg.train_batch_size)

    def loader(split, shuffle, batch_size):
        return SequenceLoader(dataset.rows(split), batch_size, cfg.MAX_ITEM_LIST_LENGTH, shuffle=shuffle, seed=cfg.seed)

    def train(role, path, init_seed, init_from, loss_fn, train_split, valid_split, item_range, training):
        if path.is_file() and not cfg.overwrite:
            saved = load_checkpoint(path)
            check_meta(saved["meta"], meta(role), path)
            log.info("%s: reusing the finished checkpoint %s (overwrite=true trains anew)", role, path)
            return saved["valid_metrics"]
        if cfg.overwrite:
            resume_file(path).unlink(missing_ok=True)
        torch.manual_seed(init_seed)  # each model's initialisation and dropout draw from its own seed
        model = TaesarDecoder(model_config)
        if init_from is not None:
            model.load_state_dict(load_checkpoint(init_from)["state_dict"])
        result = fit(
            model.to(device), loss_fn, loader(train_split, True, cfg.train_batch_size), training,
            checkpoint=path, meta=meta(role),
            valid=Evaluation(loader(valid_split, False, cfg.eval_batch_size), target_scores(item_range), item_range),
            resume=cfg.resume, logger=logger, log_prefix=role, progress=cfg.progress, device=device,
        )
        return result.valid_metrics

    metrics = {"full": train("full", paths.base, cfg.seed, None, next_item_objective(), "full.train",
                             "full.valid", (1, domains.n_items + 1), base_training)}
    for d, dom in enumerate(domains.names, start=1):
        item_range = domains.range(dom)
        if cfg.expert.loss == "dsp":
            loss_fn, train_split = domain_specific_objective(item_range), "full.train"
        else:
            loss_fn, train_split = next_item_objective(item_range), f"{dom}.train"
        init_from = paths.base if cfg.expert.init == "base" else None
        metrics[dom] = train(dom, paths.expert(dom), cfg.seed + d, init_from, loss_fn, train_split,
                             f"{dom}.valid", item_range, expert_training)

    summary = {"stage": "pretrain", "variant": variant, "checkpoints": str(paths.expert_dir), "valid": metrics}
    logger.summary({f"{role}/valid/{k}": v for role, m in metrics.items() for k, v in m.items()})
    logger.finish()
    write_run_files(run_dir, cfg, summary)
    return summary


@hydra.main(version_base="1.3", config_path="config", config_name="pretrain")
def main(cfg: DictConfig) -> None:
    run_pretrain(cfg)


if __name__ == "__main__":
    main()
