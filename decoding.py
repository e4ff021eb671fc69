"""Stage II: adaptive contrastive decoding of the mixed training rows into one target domain.

    python decoding.py -m stage=dec gpu_id=0 seed=2025 target_dom=dom1 train_batch_size=32
    python decoding.py target_dom=dom4 experiment=wo_sde      # Table 3 ablations: wo_sde, wo_gcs, wo_lcs

Loads M and the experts that `pretrain.py` wrote for the same settings, decodes
every `full.train` row with teacher forcing on its original mixed prefix (rule:
`model/contrastive.py`), and writes `NAME.SEED.dom{d}.train.inter` with a
summary, the source -> target mapping and a manifest where
`pipeline.artifacts.regenerated` says. A finished output is reused while the
data and checkpoints it was made from are unchanged, unless overwrite=true.
"""
from __future__ import annotations

import json
import logging

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from data.regenerated import merge_training_rows
from dataset.prepare import prepare_dataset
from model.decoder import TaesarDecoder
from model.regeneration import regenerate
from pipeline.artifacts import (
    checkpoint_meta, decoding_inputs, open_dataset, regenerated, stage1_checkpoints, stage1_inputs, stage1_paths,
)
from pipeline.runs import RunLogger, finish_run, run_folder, seed_everything, user_errors
from pipeline.settings import decoder_config, decoding_rule, stage_settings, variant_name
from trainer import check_meta, load_checkpoint, select_device

log = logging.getLogger(__name__)


def load_stage1(cfg: DictConfig, dataset, device: torch.device) -> dict[str, TaesarDecoder]:
    """M and every expert by role, each checked against this dataset, model and its training files."""
    model_config = decoder_config(cfg, dataset.domains.n_items)
    paths = stage1_paths(cfg)
    models = {}
    for role, path in stage1_checkpoints(cfg, dataset).items():
        saved = load_checkpoint(path)
        # The same checks as pretrain.py's before it reuses a checkpoint: an expert adapted from
        # another M, or a model trained on other data, is refused.
        check_meta(saved["meta"], checkpoint_meta(dataset, model_config, role, stage1_inputs(cfg, dataset, paths, role)),
                   path)
        model = TaesarDecoder(model_config)
        model.load_state_dict(saved["state_dict"])
        models[role] = model.to(device).eval()
    return models


def run_decoding(cfg: DictConfig) -> dict:
    """Write the regenerated training file of `target_dom`; returns its report."""
    stage_settings(cfg, "dec")
    rule = decoding_rule(cfg)
    prepare_dataset(cfg.dataset, cfg.data_path, progress=cfg.progress)  # reused when up to date
    dataset = open_dataset(cfg)
    domains = dataset.domains
    target = domains.index(cfg.target_dom)
    output = regenerated(cfg)
    inputs = decoding_inputs(cfg, dataset, cfg.target_dom)
    if output.inter.is_file() and not cfg.overwrite:
        output.check(inputs)
        log.info("%s is decoded already from these inputs; overwrite=true decodes anew", output.inter)
        report = json.loads(output.summary.read_text(encoding="utf-8"))
        return finish_run(cfg, None, {**report, "seed": cfg.seed, "file": str(output.inter)})

    seed_everything(cfg.seed)
    device = select_device(cfg.gpu_id)
    rows = dataset.rows("full.train")
    original = dataset.rows(f"{cfg.target_dom}.train")
    models = load_stage1(cfg, dataset, device)
    log.info("decoding %d rows of %s into %s (%s) on %s", len(rows), dataset.name, cfg.target_dom,
             variant_name(cfg), device)
    result = regenerate(
        rows, domains, target, models["full"], {d: models[f"dom{d}"] for d in range(1, domains.n_domains + 1)},
        rule, max_len=cfg.MAX_ITEM_LIST_LENGTH, batch_size=cfg.decoding.batch_size,
        positions_per_chunk=cfg.decoding.positions_per_chunk, device=device, progress=cfg.progress,
    )
    training = merge_training_rows(original, result.rows)
    report = {**result.report, "variant": variant_name(cfg), "rows_out": len(training),
              "original_rows": len(original)}
    manifest = {"dataset": dataset.name, "seed": cfg.seed, "target_dom": cfg.target_dom,
                "variant": variant_name(cfg), "inputs": inputs,
                "decoding": OmegaConf.to_container(cfg.decoding, resolve=True),
                "MAX_ITEM_LIST_LENGTH": cfg.MAX_ITEM_LIST_LENGTH}
    path = output.write(training, report, result.mapping, manifest)
    log.info(
        "%s: %d source items seen, %d replaced, %d deleted; %d regenerated rows (mean length %.1f, target-only "
        "%.1f); %d distinct target items introduced; %d training rows -> %s",
        cfg.target_dom, report["source_items_seen"], report["source_items_replaced"],
        report["source_items_deleted"], report["regenerated_rows"], report["mean_length_regenerated"],
        report["mean_length_target_only"], report["distinct_target_items_introduced"], len(training), path,
    )
    logger = RunLogger(cfg, run_folder(cfg), job="decoding")
    # metrics.json names the file and its seed: where later analysis finds them
    return finish_run(cfg, logger, {**report, "seed": cfg.seed, "file": str(path)})


@hydra.main(version_base="1.3", config_path="config", config_name="decoding")
def main(cfg: DictConfig) -> None:
    with user_errors():
        run_decoding(cfg)


if __name__ == "__main__":
    main()
