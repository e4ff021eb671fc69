"""Stage II: adaptive contrastive decoding of the mixed training rows into target domains.

    python decoding.py -m stage=dec gpu_id=0 seed=2025 target_dom=dom1 train_batch_size=32
    python decoding.py target_dom=all                          # every target domain in one pass
    python decoding.py target_dom=dom4 experiment=wo_sde       # Table 3 ablations: wo_sde, wo_gcs, wo_lcs
    torchrun --nproc_per_node=2 decoding.py target_dom=all     # the rows shared by 2 processes (GPUs or CPU)

Loads M and the experts that `pretrain.py` wrote for the same settings, decodes
every `full.train` row with teacher forcing on its original mixed prefix (rule:
`model/contrastive.py`), and writes `NAME.SEED.dom{d}.train.inter` with a
summary, the source -> target mapping and a manifest where
`pipeline.artifacts.regenerated` says. `target_dom=all` encodes each row once per
model and decodes every target domain from those states, writing the same files
as one run per domain. Under torchrun each process decodes a contiguous share of
the rows and rank 0 writes the same files as one process. A finished output is reused while the data and
checkpoints it was made from are unchanged, unless overwrite=true.
"""
from __future__ import annotations

import contextlib
import json
import logging

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from data.files import exclusive_lock
from data.regenerated import merge_training_rows
from model.decoder import TaesarDecoder
from model.regeneration import decode_rows, regenerations
from pipeline.artifacts import (
    ALL_DOMAINS, checkpoint_meta, decoding_inputs, regenerated, stage1_checkpoints, stage1_inputs, stage1_paths,
)
from checkpoints import check_meta, load_checkpoint
from core.distributed import World, barrier, gather_arrays, process_group
from pipeline.runs import seed_everything, user_errors
from pipeline.settings import decoder_config, decoding_rule, stage_settings, variant_name
from pipeline.stage_run import StageRun

log = logging.getLogger(__name__)


def load_stage1(cfg: DictConfig, dataset, device: torch.device, paths=None) -> dict[str, TaesarDecoder]:
    """M and every expert by role, each checked against this dataset, model and its training files
    (`paths`: `stage1_paths(cfg)`, when the caller has it already)."""
    model_config = decoder_config(cfg, dataset.domains.n_items)
    paths = paths or stage1_paths(cfg)
    models = {}
    for role, path in stage1_checkpoints(cfg, dataset, paths).items():
        saved = load_checkpoint(path)
        # The same checks as pretrain.py's before it reuses a checkpoint: an expert adapted from
        # another M, or a model trained on other data, is refused.
        check_meta(saved["meta"], checkpoint_meta(dataset, model_config, role, stage1_inputs(cfg, dataset, paths, role)),
                   path)
        model = TaesarDecoder(model_config)
        model.load_state_dict(saved["state_dict"])
        models[role] = model.to(device).eval()
    return models


def _decode_sharded(cfg: DictConfig, dataset, rows, targets: list[int], rule, world: World, device: torch.device,
                    stage1):
    """The regenerations of `targets` (by domain index) on rank 0, None elsewhere: each rank decodes
    its contiguous share of the rows, and rank 0 joins the decisions in row order. Positions are
    decided independently, so the joined decisions, and the files, are those of one process."""
    domains = dataset.domains
    models = load_stage1(cfg, dataset, device, stage1)
    shard = rows.take(world.shard(len(rows))) if world.size > 1 else rows
    log.info("decoding %d of %d rows of %s into %s (%s) on %s%s", len(shard), len(rows), dataset.name,
             ", ".join(domains.names[t - 1] for t in targets), variant_name(cfg), device,
             f", rank {world.rank} of {world.size}" if world.size > 1 else "")
    decided = decode_rows(
        shard, domains, targets, models["full"], {d: models[f"dom{d}"] for d in range(1, domains.n_domains + 1)},
        rule, max_len=cfg.MAX_ITEM_LIST_LENGTH, batch_size=cfg.decoding.batch_size,
        memory_gb=cfg.decoding.memory_gb, device=device, progress=cfg.progress and world.is_main,
    )
    joined = gather_arrays(world, [array for t in targets for array in decided[t]])
    if joined is None:
        return None
    return regenerations(rows, domains, {t: (joined[2 * i], joined[2 * i + 1]) for i, t in enumerate(targets)})


def _write(cfg: DictConfig, dataset, dom: str, result, output, inputs: dict, checkpoints: dict) -> dict:
    """Write one target domain's regenerated training file (its rows merged with the original ones) and
    the records beside it; returns its report."""
    original = dataset.rows(f"{dom}.train")
    training = merge_training_rows(original, result.rows)
    report = {**result.report, "variant": variant_name(cfg), "rows_out": len(training), "original_rows": len(original)}
    manifest = {"dataset": dataset.name, "seed": cfg.seed, "target_dom": dom, "variant": variant_name(cfg),
                "inputs": inputs,
                # where the checkpoints lie (the fingerprints hold content only): for the mapping view
                "checkpoints": {role: str(path) for role, path in checkpoints.items()},
                "decoding": OmegaConf.to_container(cfg.decoding, resolve=True),
                "MAX_ITEM_LIST_LENGTH": cfg.MAX_ITEM_LIST_LENGTH}
    path = output.write(training, report, result.mapping, manifest)
    log.info(
        "%s: %d source items seen, %d replaced, %d deleted; %d regenerated rows (mean length %.1f, "
        "target-only %.1f); %d distinct target items introduced; %d training rows -> %s",
        dom, report["source_items_seen"], report["source_items_replaced"], report["source_items_deleted"],
        report["regenerated_rows"], report["mean_length_regenerated"], report["mean_length_target_only"],
        report["distinct_target_items_introduced"], len(training), path,
    )
    return report


def run_decoding(cfg: DictConfig) -> dict:
    """Write the regenerated training file of `target_dom` (or of every domain); returns its report
    (with `target_dom=all`, the reports by domain). Under torchrun the ranks share the rows and rank 0
    writes; the other ranks return {}."""
    with process_group() as world:
        return _run_decoding(cfg, world)


def _run_decoding(cfg: DictConfig, world: World) -> dict:
    stage_settings(cfg, "decoding")
    rule = decoding_rule(cfg)
    run = StageRun(cfg, world, job="decoding")
    dataset = run.dataset
    domains = dataset.domains
    targets = domains.names if cfg.target_dom == ALL_DOMAINS else [cfg.target_dom]
    stage1 = stage1_paths(cfg)  # once per run: every target's file and the checkpoints are keyed by it
    outputs = {dom: regenerated(cfg, dom, stage1) for dom in targets}
    checkpoints = stage1_checkpoints(cfg, dataset, stage1)
    inputs = {dom: decoding_inputs(cfg, dataset, dom, checkpoints) for dom in targets}
    # One job decodes these files at a time: a second one started with the same settings and seed
    # stops at once (BusyError, as a second training of a checkpoint does) instead of doing the work twice.
    missing = cfg.overwrite or not all(outputs[dom].inter.is_file() for dom in targets)
    lock = (exclusive_lock(outputs[targets[0]].lock, wait=False,
                           what="another job is decoding these files now; run this one again once it is done to "
                                "reuse them") if missing and world.is_main else contextlib.nullcontext())
    with lock:
        barrier(world if world.size > 1 else None)  # the others look for finished files once rank 0 holds the lock
        reports = {}
        for dom in targets:
            if outputs[dom].inter.is_file() and not cfg.overwrite:
                outputs[dom].check(inputs[dom])
                log.info("%s is decoded already from these inputs; overwrite=true decodes anew", outputs[dom].inter)
                reports[dom] = json.loads(outputs[dom].summary.read_text(encoding="utf-8"))
        todo = [dom for dom in targets if dom not in reports]
        if todo:
            seed_everything(cfg.seed)
            rows = dataset.rows("full.train")
            results = _decode_sharded(cfg, dataset, rows, [domains.index(dom) for dom in todo], rule, world,
                                      run.device, stage1)
            if not world.is_main:
                return {}
            for dom in todo:
                reports[dom] = _write(cfg, dataset, dom, results[domains.index(dom)], outputs[dom], inputs[dom],
                                      checkpoints)
            run.open_logger()  # only a run that decoded logs one
    if not world.is_main:
        return {}
    # metrics.json names each file and its seed: where later analysis finds them
    # the file's digest, so that two decodings can be told to have made the same rows wherever they ran
    files = {dom: {**reports[dom], "seed": cfg.seed, "file": str(outputs[dom].inter),
                   "sha256": outputs[dom].read_manifest()["output"]["sha256"]} for dom in targets}
    if cfg.target_dom != ALL_DOMAINS:
        return run.finish({"stage": "decoding", **files[cfg.target_dom]})
    return run.finish({"stage": "decoding", "seed": cfg.seed, "target_dom": ALL_DOMAINS, "reports": files},
                      {f"{dom}/{k}": v for dom, r in reports.items() for k, v in r.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)})


@hydra.main(version_base="1.3", config_path="config", config_name="decoding")
def main(cfg: DictConfig) -> None:
    with user_errors():
        run_decoding(cfg)


if __name__ == "__main__":
    main()
