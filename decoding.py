"""Stage II: adaptive contrastive decoding of the mixed training rows into one target domain.

    python decoding.py -m stage=dec gpu_id=0 seed=2025 target_dom=dom1 train_batch_size=32
    python decoding.py target_dom=dom4 experiment=wo_sde      # Table 3 ablations: wo_sde, wo_gcs, wo_lcs

Loads M and the experts that `pretrain.py` wrote for the same settings, decodes
every `full.train` row with teacher forcing on its original mixed prefix (rule:
`model/contrastive.py`), and writes `NAME.SEED.dom{d}.train.inter` with a
summary, the source -> target mapping and a manifest into
`experiment.regenerated_dir`. A finished output is reused unless overwrite=true.
"""
from __future__ import annotations

import json
import logging

import hydra
from omegaconf import DictConfig, OmegaConf

from data.regenerated import merge_training_rows, regenerated_name, write_regenerated
from experiment import (
    RunLogger, check_stage, checkpoint_meta, decoder_config, open_dataset, regenerated_dir, run_dir_of,
    seed_everything, stage1_paths, variant_name, write_run_files,
)
from model.contrastive import DecodingRule
from model.decoder import TaesarDecoder
from model.regeneration import regenerate
from trainer import check_meta, load_checkpoint, select_device

log = logging.getLogger(__name__)


def decoding_rule(cfg: DictConfig) -> DecodingRule:
    d = cfg.decoding
    return DecodingRule(weights=d.weights, source_experts=d.source_experts, global_test=d.global_test,
                        local_scores=d.local_scores, reference_shift=d.reference_shift)


def load_stage1(cfg: DictConfig, dataset, device):
    """M and every expert, checked against this dataset and model before anything is decoded."""
    paths = stage1_paths(cfg)
    model_config = decoder_config(cfg, dataset.domains.n_items)
    models = {}
    for role, path in [("full", paths.base)] + [(dom, paths.expert(dom)) for dom in dataset.domains.names]:
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: Stage I checkpoint not found; run `python pretrain.py` with the same settings "
                f"(dataset={cfg.dataset.name} seed={cfg.seed}, {variant_name(cfg)}) first"
            )
        saved = load_checkpoint(path)
        check_meta(saved["meta"], checkpoint_meta(dataset, model_config, role), path)
        model = TaesarDecoder(model_config)
        model.load_state_dict(saved["state_dict"])
        models[role] = model.to(device).eval()
    return models, {role: str(p) for role, p in
                    [("full", paths.base)] + [(d, paths.expert(d)) for d in dataset.domains.names]}


def run_decoding(cfg: DictConfig) -> dict:
    """Write the regenerated training file of `target_dom`; returns its report."""
    check_stage(cfg, "dec")
    rule = decoding_rule(cfg)
    if cfg.decoding.positions_per_chunk < 1 or cfg.train_batch_size < 1:
        raise ValueError("decoding.positions_per_chunk and train_batch_size must be positive")
    dataset = open_dataset(cfg)
    domains = dataset.domains
    target = domains.index(cfg.target_dom)
    folder = regenerated_dir(cfg)
    stem = regenerated_name(dataset.name, cfg.seed, cfg.target_dom)
    run_dir = run_dir_of(cfg)
    if (folder / f"{stem}.inter").is_file() and not cfg.overwrite:
        log.info("%s is decoded already (%s); overwrite=true decodes anew", stem, folder)
        report = json.loads((folder / f"{stem}.summary.json").read_text())
        write_run_files(run_dir, cfg, {**report, "file": str(folder / f"{stem}.inter")})
        return report

    seed_everything(cfg.seed)
    device = select_device(cfg.gpu_id)
    rows = dataset.rows("full.train")
    original = dataset.rows(f"{cfg.target_dom}.train")
    models, checkpoints = load_stage1(cfg, dataset, device)
    log.info("decoding %d rows of %s into %s (%s) on %s", len(rows), dataset.name, cfg.target_dom,
             variant_name(cfg), device)
    result = regenerate(
        rows, domains, target, models["full"], {d: models[f"dom{d}"] for d in range(1, domains.n_domains + 1)},
        rule, max_len=cfg.MAX_ITEM_LIST_LENGTH, batch_size=cfg.train_batch_size,
        positions_per_chunk=cfg.decoding.positions_per_chunk, device=device, progress=cfg.progress,
    )
    training = merge_training_rows(original, result.rows)
    report = {**result.report, "variant": variant_name(cfg), "rows_out": len(training),
              "original_rows": len(original)}
    manifest = {"dataset": dataset.name, "seed": cfg.seed, "target_dom": cfg.target_dom,
                "variant": variant_name(cfg), "checkpoints": checkpoints,
                "decoding": OmegaConf.to_container(cfg.decoding, resolve=True),
                "MAX_ITEM_LIST_LENGTH": cfg.MAX_ITEM_LIST_LENGTH}
    path = write_regenerated(folder, dataset.name, cfg.seed, cfg.target_dom, training, report, result.mapping,
                             manifest)
    log.info(
        "%s: %d source items seen, %d replaced, %d deleted; %d regenerated rows (mean length %.1f, target-only "
        "%.1f); %d distinct target items introduced; %d training rows -> %s",
        cfg.target_dom, report["source_items_seen"], report["source_items_replaced"],
        report["source_items_deleted"], report["regenerated_rows"], report["mean_length_regenerated"],
        report["mean_length_target_only"], report["distinct_target_items_introduced"], len(training), path,
    )
    logger = RunLogger(cfg, run_dir, job="decoding")
    logger.summary({k: v for k, v in report.items() if isinstance(v, (int, float))})
    logger.finish()
    write_run_files(run_dir, cfg, {**report, "file": str(path)})  # where later analysis finds it
    return report


@hydra.main(version_base="1.3", config_path="config", config_name="decoding")
def main(cfg: DictConfig) -> None:
    run_decoding(cfg)


if __name__ == "__main__":
    main()
