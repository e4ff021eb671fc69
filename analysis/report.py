"""Every claim of the paper with a verdict: one command, resumable, on ACDT or any prepared dataset.

    python -m analysis.report                                   # ACDT, seeds 2025 2026 2027, everything
    python -m analysis.report --parts table2 --backbones SASRec --seeds 2025
    python -m analysis.report --dataset synthetic --out results/report-synthetic -- trainer.base.epochs=50

Parts (`--parts`, all by default):

- `table2`: Table 2, every backbone (`--backbones`) on `sim`, `full` and `new` for every target
  domain (`--domains`), SASRec4 also with mixed histories (`eval_history=mixed`), with the
  cross-domain baselines (`--baselines`), mean ± std over the seeds, and a headline table; and
  for each backbone and domain the paired comparisons of new with sim, full and each baseline: the mean
  difference of test NDCG@10, its 95% interval from a paired bootstrap over test users pooled
  over seeds (analysis/statistics.py), and the verdict (holds / does not hold / undecided).
- `table3`: the six variants of Table 3 for every target domain (SASRec).
- `figures`: Figure 5 (regeneration diagnostics) and Figure 4 (mapping view) of every target
  domain, first seed.
- `selectivity`: how the share of source items decoding converts, and Stage III's NDCG@10 on the
  regenerated rows, depend on how long the base model and the experts train
  (`--base-epochs`, `--expert-epochs`; `es` is early stopping, the default), beside where the
  target expert's own arg-max lies (analysis/selectivity.py).

`--jobs N` makes the runs in N processes at once, each with its share of the cores (its own threads:
one each on two cores, where two one-thread jobs train 13-38% more rows a second than one job of two
threads, benchmarks/README.md). Each run is claimed by one job; a job leaves a run another holds
(or whose Stage I checkpoints another is training) for the end and goes on with the next, and the
report is written once every job is done. Several invocations with `--jobs` may share one OUT.

Every run goes through the stage functions, which reuse every finished artifact (prepared data,
checkpoints, regenerated files) and resume an interrupted training. Each run's record (its metrics,
the resolved config it ran with, its wall time) is a line of the report's store, `OUT/runs/PART.jsonl`
(one file per part: stage1, stage2, table2, baselines, table3, selectivity; pipeline.records.RunStore),
and the stage's own folder (its config.yaml, metrics.json and logs) is `OUT/logs/NAME/`, so the report
can be built up over several invocations. A run already recorded is not repeated when the settings it
recorded are the ones this invocation would run it with (`pipeline.records.result_settings`:
everything its results depend on, not where files lie); when they differ, the report stops and names
the run and the keys, so that runs of other settings are never reused or averaged with these: write to
another `--out`, or pass `--rerun` to run such runs again here, replacing their records. A record that
cannot be used (its metrics cut or empty) is named in the log and run again; a line that is not JSON
stops the report at its file and line. A report written by an earlier version, with a folder per run
in `OUT/runs/`, is moved into the store when first read (the folders go to `OUT/logs/`). The report
can move: where a missing run needs Stage I and II artifacts that are not on this machine, they are
rebuilt, and the Stage I and II records' `rebuilt` says whether the rebuild reproduced the recorded
metrics. `OUT/report.md` and its tables, CSVs and figures are written from whatever runs exist. Hydra
overrides for every stage follow `--`; `STAGE:KEY=VALUE` (pretrain, decoding, finetune, baseline) goes
to one stage only.
"""
from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import sys
from functools import partial
from pathlib import Path

from analysis.report_writer import MIXED_HISTORY, table2_run, write_report
from analysis.run_store import Report
from core.errors import PAUSED_EXIT_CODE
from data.paths import project_path
from pipeline.schemas import TRAIN_TYPES

log = logging.getLogger(__name__)

PARTS = ("table2", "table3", "figures", "selectivity")
BACKBONES = ("SASRec", "GRU4Rec", "CL4SRec", "GCEGNN")
BASELINES = ("ABXI", "CGRec", "SyNCRec")
SEEDS = (2025, 2026, 2027)
LOG_FORMAT = "[%(asctime)s]{job}[%(name)s][%(levelname)s] - %(message)s"  # {job}: which of --jobs logs it


def domains_of(dataset: str, overrides: list[str]) -> list[str]:
    from dataset.prepare import prepare_dataset
    from pipeline.artifacts import open_dataset
    from pipeline.settings import stage_config

    cfg = stage_config("prepare", [f"dataset={dataset}", *[o for o in overrides if o.startswith(("dataset.", "data_path"))]])
    prepare_dataset(cfg.dataset, cfg.data_path, progress=False)
    return open_dataset(cfg).domains.names


# --------------------------------------------------------------------------- parts


def table2(report: Report, seeds, domains, backbones, baselines) -> dict:
    """Every seed's pipeline and backbones first, then the baselines one model at a time (the most
    expensive runs last, so that an interrupted report already holds whole rows)."""
    runs = {}
    for seed in seeds:
        build = partial(report.pipeline, seed)
        for backbone in backbones:
            for dom in domains:
                for train_type in TRAIN_TYPES:
                    runs[backbone, train_type, dom, seed] = report.run(
                        table2_run(backbone, train_type, dom, seed), "finetune",
                        [f"seed={seed}", f"target_dom={dom}", f"model_name={backbone}", f"train_type={train_type}"],
                        needs=build if train_type == "new" else None)
                if backbone == "SASRec":  # SASRec4 seeing the mixed histories the cross-domain models see
                    runs[backbone, MIXED_HISTORY, dom, seed] = report.run(
                        table2_run(backbone, MIXED_HISTORY, dom, seed), "finetune",
                        [f"seed={seed}", f"target_dom={dom}", "model_name=SASRec", "train_type=full",
                         "eval_history=mixed"])
    for baseline in baselines:
        for seed in seeds:
            metrics = report.run(f"baselines/{baseline}-seed{seed}", "baseline", [f"model={baseline}", f"seed={seed}"])
            if metrics is None:
                continue
            for dom in domains:
                runs[baseline, "mixed", dom, seed] = {**metrics, "test": metrics["test"][dom],
                                                      "test_ranks": metrics["test_ranks"][dom]}
    return {key: run for key, run in runs.items() if run is not None}


def table3(report: Report, seeds, domains) -> dict:
    from analysis.ablation import VARIANTS

    runs = {}
    for dom in domains:
        for variant in VARIANTS:
            experiment = [] if variant == "taesar" else [f"experiment={variant}"]
            for seed in seeds:
                runs[variant, dom, seed] = report.run(
                    f"table3/{variant}-{dom}-seed{seed}", "finetune",
                    [f"seed={seed}", f"target_dom={dom}", "model_name=SASRec", "train_type=new", *experiment],
                    needs=partial(report.pipeline, seed, experiment))
    return {key: run for key, run in runs.items() if run is not None}


def selectivity(report: Report, seeds, domains, base_epochs, expert_epochs) -> list[dict]:
    """Conversion per source domain and Stage III NDCG@10 as functions of the training lengths."""
    settings = [("base", e) for e in base_epochs] + [("expert", e) for e in expert_epochs]
    rows = []
    for which, epochs in settings:
        if epochs == "es":
            stage1 = [] if which == "base" else ["trainer.expert.stopping_step=10", "trainer.expert.keep=best"]
        else:  # a fixed length: no early stopping, the last epoch kept
            stage1 = [f"trainer.{which}.epochs={epochs}", f"trainer.{which}.stopping_step=0",
                      f"trainer.{which}.keep=last"]
        if report.trains_as_configured(which, stage1):  # e.g. the experts' default 20 epochs: the default runs
            stage1 = []
        tag = "-".join(o.replace("=", "") for o in stage1) or "default"
        for seed in seeds:
            build = partial(report.pipeline, seed, stage1)
            decoded = report.run(f"stage2/{tag}/all-seed{seed}", "decoding", [f"seed={seed}", "target_dom=all", *stage1],
                                 needs=build)
            probe = report.probe(f"selectivity/{tag}/probe-seed{seed}", seed, stage1) if decoded else None
            for dom in domains:
                tuned = report.run(f"selectivity/{tag}/{dom}-seed{seed}", "finetune",
                                   [f"seed={seed}", f"target_dom={dom}", "model_name=SASRec", "train_type=new",
                                    *stage1], needs=build)
                if decoded is None or tuned is None:
                    continue
                summary = decoded["reports"][dom]
                for source, counts in summary["source_items"].items():
                    rows.append({"trained": which, "epochs": str(epochs), "seed": seed, "target": dom,
                                 "source": source, "converted": counts["replaced"] / max(counts["seen"], 1),
                                 "ndcg@10": tuned["test"]["ndcg@10"],
                                 "expert_argmax_in_target": _share(probe, dom, source)})
    return rows


def _share(probe: dict | None, target: str, source: str) -> float | None:
    counts = (probe or {}).get(target, {}).get(source)
    return counts["in_target"] / counts["positions"] if counts and counts["positions"] else None


def figures(report: Report, seed: int, domains: list[str]) -> list[Path]:
    from analysis import diagnostics, mapping_view

    out = report.out / "figures"
    paths = []
    for dom in domains:
        common = ["--target", dom, "--out", str(out), f"dataset={report.dataset}", f"seed={seed}",
                  *report.for_stage("decoding")]
        diagnostics.main(common)
        mapping_view.main(common)
        paths += [out / f"diagnostics_{dom}.png", out / f"mapping_{dom}.png"]
    return paths


def main(argv: list[str] | None = None) -> str:
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT.format(job=""))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ACDT")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--domains", nargs="+", default=None, help="target domains (default: all)")
    parser.add_argument("--backbones", nargs="*", default=list(BACKBONES))
    parser.add_argument("--baselines", nargs="*", default=list(BASELINES))
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument("--base-epochs", nargs="*", default=["20", "40", "80", "es"])
    parser.add_argument("--expert-epochs", nargs="*", default=["5", "10", "20", "40"])
    parser.add_argument("--out", type=Path, default=Path("results/report"))
    parser.add_argument("--collect-only", action="store_true",
                        help="write the report from the runs already recorded in OUT/runs, running nothing")
    parser.add_argument("--jobs", type=int, default=1,
                        help="processes making the runs at once, each with its share of the cores (default 1)")
    parser.add_argument("--rerun", action="store_true",
                        help="run again the runs recorded in OUT/runs with other settings than this invocation's, "
                             "replacing their records (without it the report stops at the first such run)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every stage, after `--`")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv
    from pipeline.runs import user_errors

    with user_errors():  # SettingsMismatch and RecordError are user errors too
        return _report(args)


def _report(args) -> str:
    if args.jobs < 1:
        raise SystemExit(f"error: --jobs must be at least 1, got {args.jobs}")
    out = project_path(args.out)
    args.domains = args.domains or domains_of(args.dataset, args.overrides)
    if args.jobs > 1 and not args.collect_only:
        run_jobs(args)  # then every run below is recorded: this process reads them (and makes the figures)
    report = args.report = Report(args.dataset, out, args.overrides, args.collect_only, args.rerun)
    text = write_report(out, args, plan(report, args, args.parts))
    print(text)
    return text


def plan(report: Report, args, parts) -> dict:
    """Every run of `parts`, made or read through `report`: each part's results."""
    results = {}
    if "table2" in parts:
        results["table2"] = table2(report, args.seeds, args.domains, args.backbones, args.baselines)
    if "table3" in parts:
        results["table3"] = table3(report, args.seeds, args.domains)
    if "figures" in parts:
        if args.collect_only:
            results["figures"] = sorted((report.out / "figures").glob("*.png"))
        else:
            report.pipeline(args.seeds[0])
            results["figures"] = figures(report, args.seeds[0], args.domains)
    if "selectivity" in parts:
        results["selectivity"] = selectivity(report, args.seeds, args.domains, args.base_epochs, args.expert_epochs)
    return results


def run_jobs(args) -> None:
    """Every run of the report made by `args.jobs` spawned processes sharing its store (`_job`); exits
    as the first failed job did, or paused (PAUSED_EXIT_CODE) when one paused and none failed."""
    context = multiprocessing.get_context("spawn")
    jobs = [context.Process(target=_job, args=(args, index), name=f"report job {index + 1}")
            for index in range(args.jobs)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join()
    codes = [job.exitcode for job in jobs]
    failed = [f"job {index + 1} (exit code {code})" for index, code in enumerate(codes) if code not in (0, PAUSED_EXIT_CODE)]
    if failed:
        raise SystemExit(f"error: {', '.join(failed)} of {args.jobs} stopped (see above); the runs "
                         "recorded so far are kept: the same command goes on from them")
    if PAUSED_EXIT_CODE in codes:
        print(f"paused: {codes.count(PAUSED_EXIT_CODE)} of {args.jobs} jobs paused; run the same command again to "
              "continue", file=sys.stderr)
        raise SystemExit(PAUSED_EXIT_CODE)


def _job(args, index: int) -> None:
    """Job `index` of `args.jobs`: the report's runs, each claimed from the others
    (analysis.run_store.Report), with the cores shared out unless OMP_NUM_THREADS says otherwise. The
    figures are drawn afterwards by the command's own process."""
    import torch

    from pipeline.runs import user_errors

    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT.format(job=f"[job {index + 1}/{args.jobs}]"))
    if "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // args.jobs))
    with user_errors():
        report = Report(args.dataset, project_path(args.out), args.overrides, rerun=args.rerun,
                        job=(index, args.jobs))
        plan(report, args, [part for part in args.parts if part != "figures"])
        report.run_deferred()


if __name__ == "__main__":
    main()
