"""The cross-domain baselines of the paper's Table 2 on the shared data, trainer and evaluator.

    python cdsr_baseline/train.py model=ABXI seed=2025
    python cdsr_baseline/train.py model=CGRec baseline_fidelity=corrected
    python cdsr_baseline/train.py -m model=ABXI,CGRec,SyNCRec seed=2025,2026,2027
    python cdsr_baseline/train.py -m model=SyNCRec search=SyNCRec     # the paper's search space
    torchrun --nproc_per_node=4 cdsr_baseline/train.py model=ABXI     # data-parallel over 4 processes

A cross-domain model is trained once for all domains on the mixed `full.train` rows, with the one
training loop of the project (`trainer.fit`): validation NDCG@10 of every domain after every epoch
(full ranking over the domain's items, `full.valid` histories of the users of `dom{d}.valid`), and,
by default (`select_on=each`), each domain's own best epoch kept and tested on `dom{d}.test`'s
users; `select_on=mean` keeps one epoch, the best on the mean over domains. Early stopping: no domain
improved for `trainer.baseline.stopping_step` evaluations. The run writes per-domain validation and
test metrics to `metrics.json`; results.py puts them into the Table 2 layout.
"""
from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from cdsr_baseline.inputs import user_sequences
from cdsr_baseline.models import build_baseline, resolve_fidelity
from core.distributed import World, process_group
from core.schema import ConfigError
from data import SequenceLoader
from evaluation import Evaluation, evaluate
from pipeline.artifacts import baseline_checkpoint, baseline_inputs
from pipeline.runs import seed_everything, user_errors
from pipeline.settings import baseline_settings, train_config
from pipeline.stage_run import StageRun
from trainer import fit

log = logging.getLogger(__name__)


def run_baseline(cfg: DictConfig) -> dict:
    """Train (or reuse) one cross-domain baseline; returns its per-domain validation and test metrics.
    Under torchrun it trains data-parallel over the ranks and rank 0 writes the checkpoint and run files."""
    with process_group() as world:
        return _run_baseline(cfg, world)


def _run_baseline(cfg: DictConfig, world: World) -> dict:
    baseline_settings(cfg)
    quirks = resolve_fidelity(cfg)
    training = train_config(cfg, "baseline")
    run = StageRun(cfg, world, job=f"baseline-{cfg.model.name}")
    dataset, device = run.dataset, run.device
    domains = dataset.domains
    seed_everything(cfg.seed)
    model = build_baseline(cfg.model.name, dataset, cfg.model,
                           sequences=user_sequences(dataset, cfg.MAX_ITEM_LIST_LENGTH)).to(device)
    if cfg.get("recompute_activations"):
        if not hasattr(model, "recompute_activations"):
            raise ConfigError(f"config key 'recompute_activations' is true; only SyNCRec has activations to "
                              f"recompute, not {cfg.model.name}")
        model.recompute_activations = True
    checkpoint, settings = baseline_checkpoint(cfg)
    run.write_settings(checkpoint.parent, settings)
    meta = {"dataset": dataset.name, "n_items": domains.n_items, "domain_starts": list(domains.starts),
            "model_name": cfg.model.name, "inputs": baseline_inputs(dataset)}
    log.info("%s on %s (%d items, %d domains), %s fidelity %s, selection on %s, device %s", cfg.model.name,
             dataset.name, domains.n_items, domains.n_domains, cfg.baseline_fidelity, quirks, cfg.select_on, device)

    def loader(rows, shuffle, batch_size):
        return SequenceLoader(rows, batch_size, cfg.MAX_ITEM_LIST_LENGTH, shuffle=shuffle, seed=cfg.seed)

    def evaluations(split):
        return {dom: Evaluation(loader(dataset.mixed_history_rows(split, dom), False, cfg.eval_batch_size),
                                lambda m, b, r=domains.range(dom): m.scores(b, r), domains.range(dom))
                for dom in domains.names}

    run.open_logger()
    saved = run.reuse_or_train(checkpoint, meta, lambda: fit(
        model, lambda m, b: m.loss(b), loader(dataset.rows("full.train"), True, training.batch_size), training,
        checkpoint=checkpoint, meta=meta, valid=evaluations("valid"), select_on=cfg.select_on,
        resume=cfg.resume, logger=run.logger, log_prefix=cfg.model.name, progress=cfg.progress, device=device))
    valid, test, test_ranks = {}, {}, {}
    for dom, evaluation in evaluations("test").items():
        weights = saved["domain_state_dicts"][dom] if "domain_state_dicts" in saved else saved["state_dict"]
        model.load_state_dict(weights)
        valid[dom] = saved["valid_metrics"][dom]
        test_ranks[dom] = {}
        test[dom] = evaluate(model, evaluation, training.topk, device, training.enable_amp, ranks=test_ranks[dom])
        log.info("%s test %s", dom, " ".join(f"{k} {v:.4f}" for k, v in test[dom].items() if k.endswith("@10")))
    metrics = {"stage": "baseline", "dataset": dataset.name, "model_name": cfg.model.name, "seed": cfg.seed,
               "fidelity": cfg.baseline_fidelity, "quirks": quirks, "select_on": cfg.select_on,
               "best_epoch": saved["best_epoch"], "epochs_run": saved["epochs_run"],
               "train_seconds": run.trained_seconds,  # none when reused; a resumed training's every piece
               "valid": valid, "test": test, "checkpoint": str(checkpoint), "test_ranks": test_ranks}
    return run.finish(metrics, {f"{dom}/test/{k}": v for dom, m in test.items() for k, v in m.items()})


@hydra.main(version_base="1.3", config_path="../config", config_name="baseline")
def main(cfg: DictConfig) -> None:
    with user_errors():
        run_baseline(cfg)


if __name__ == "__main__":
    main()
