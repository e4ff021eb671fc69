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
import json
import logging
import shlex
import statistics as stats
import sys
from functools import partial
from pathlib import Path

from analysis.run_store import Report, machine
from analysis.statistics import Comparison, aligned, paired_bootstrap
from data.files import write_text_atomic
from data.paths import project_path
from pipeline.schemas import TRAIN_TYPES

log = logging.getLogger(__name__)

PARTS = ("table2", "table3", "figures", "selectivity")
BACKBONES = ("SASRec", "GRU4Rec", "CL4SRec", "GCEGNN")
BASELINES = ("ABXI", "CGRec", "SyNCRec")
SEEDS = (2025, 2026, 2027)
MIXED_HISTORY = "full_mixed_history"  # SASRec4 evaluated with eval_history=mixed (its own row)


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
                        f"table2/{backbone}-{train_type}-{dom}-seed{seed}", "finetune",
                        [f"seed={seed}", f"target_dom={dom}", f"model_name={backbone}", f"train_type={train_type}"],
                        needs=build if train_type == "new" else None)
                if backbone == "SASRec":  # SASRec4 seeing the mixed histories the cross-domain models see
                    runs[backbone, MIXED_HISTORY, dom, seed] = report.run(
                        f"table2/SASRec-full_mixed_history-{dom}-seed{seed}", "finetune",
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


def wall_times(report: Report, seeds, domains, baselines) -> list[list[str]]:
    """Minutes per seed: Taesar's whole pipeline (Stage I, Stage II of every domain, SASRec on the
    regenerated rows of every domain) and each baseline's run, as measured by this report."""
    rows = []
    for seed in seeds:
        taesar = [f"stage1/default/seed{seed}", f"stage2/default/all-seed{seed}",
                  *(f"table2/SASRec-new-{d}-seed{seed}" for d in domains)]
        groups = [taesar, *([f"baselines/{b}-seed{seed}"] for b in baselines)]
        timings = [[report.timing(n) for n in names] for names in groups]
        cells = ["–" if None in group else f"{sum(t['seconds'] for t in group) / 60:.1f}" for group in timings]
        machines = sorted({t.get("machine", "not recorded") for group in timings for t in group if t})
        rows.append([str(seed), *cells, "; ".join(machines) or "–"])
    return rows


def comparisons(runs: dict, backbones, domains, baselines=()) -> list[dict]:
    """new vs sim, new vs full and new vs each cross-domain baseline, for each backbone and domain
    (paired over users, pooled over seeds; a baseline ranks the same test users' targets)."""
    rows = []
    for backbone in backbones:
        for dom in domains:
            def ranked(model, train_type):
                return [{"seed": s, **r["test_ranks"]} for (b, t, d, s), r in runs.items()
                        if (b, t, d) == (model, train_type, dom)]
            others = [(backbone, "sim", "sim"), (backbone, "full", "full")]
            others += [(baseline, "mixed", baseline) for baseline in baselines]
            for model, train_type, name in others:
                new, base = ranked(backbone, "new"), ranked(model, train_type)
                if not new or not base:
                    continue
                c: Comparison = paired_bootstrap(*aligned(new, base))
                rows.append({"backbone": backbone, "domain": dom, "claim": f"new > {name}", "delta": c.mean,
                             "low": c.low, "high": c.high, "seed_std": c.seed_std, "seeds": c.seeds,
                             "users": c.users, "verdict": c.verdict})
    return rows


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


# --------------------------------------------------------------------------- writing


def _mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    mean = stats.fmean(values)
    return f"{mean:.4f}" + (f" ± {stats.stdev(values):.4f}" if len(values) > 1 else "")


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    return ("| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n"
            + "".join("| " + " | ".join(map(str, r)) + " |\n" for r in rows))


def write_report(out: Path, args, parts: dict) -> str:
    """report.md (and CSVs, figures) from the runs collected so far."""
    from results import write_tables

    command = shlex.join(["python", "-m", "analysis.report", *args.argv])
    lines = [f"# Report: {args.dataset}", "",
             f"Seeds {', '.join(map(str, args.seeds))}; command `{command}` (every argument and override as "
             f"given); written on {machine()} (each run's record names the machine that ran it under `seconds`, where it "
             "was recorded).", ""]
    if "table2" in parts:
        from results import headline, metric_label, per_backbone

        runs = parts["table2"]
        records = [{**r, "train_type": "full" if t == MIXED_HISTORY else t, "model_name": b, "target_dom": d,
                    "seed": s, "variant": "taesar" if t == "new" else None} for (b, t, d, s), r in runs.items()]
        table = write_tables(records, out / "table2")
        rows = comparisons(runs, args.backbones, args.domains, args.baselines)
        if records:
            for metric in ("ndcg@10", "hr@10"):
                lines += [f"## Headline: SASRec and the cross-domain methods (test {metric_label(metric)}, mean ± std over seeds)",
                          "", headline(records, metric), ""]
            for metric in ("ndcg@10", "hr@10"):
                lines += [f"## Table 2 at test {metric_label(metric)} (mean ± std over seeds; each backbone's best in bold)", "",
                          per_backbone(records, metric), ""]
        lines += ["## Table 2 (test, mean ± std over seeds)", "", table, "",
                  "## Claims: new vs sim, full and the cross-domain baselines (test NDCG@10)", "",
                  "Paired bootstrap over test users pooled over seeds (10,000 resamples), 95% interval.", "",
                  markdown_table(["backbone", "domain", "claim", "mean difference", "95% interval", "std over seeds",
                                  "seeds", "users", "verdict"],
                                 [[r["backbone"], r["domain"], r["claim"], f"{r['delta']:+.4f}",
                                   f"[{r['low']:+.4f}, {r['high']:+.4f}]",
                                   f"{r['seed_std']:.4f}" if r["seeds"] > 1 else "–", r["seeds"],
                                   r["users"], f"**{r['verdict']}**"] for r in rows]), ""]
        write_text_atomic(out / "claims.json", json.dumps(rows, indent=2) + "\n")
        lines += ["## Wall time (minutes per seed, as run by this report)", "",
                  markdown_table(["seed", "Taesar (Stage I + II + SASRec on new, all domains)", *args.baselines,
                                  "machine"],
                                 wall_times(args.report, args.seeds, args.domains, args.baselines)), ""]
    if "table3" in parts:
        from analysis.ablation import VARIANTS

        header = ["variant", *args.domains]
        body = [[name, *[_mean_std([r["test"]["ndcg@10"] for (v, d, s), r in parts["table3"].items()
                                    if (v, d) == (variant, dom)]) for dom in args.domains]]
                for variant, name in VARIANTS.items()]
        lines += ["## Table 3 (SASRec on the regenerated rows, test NDCG@10)", "", markdown_table(header, body), ""]
    if "selectivity" in parts:
        rows = parts["selectivity"]
        write_text_atomic(out / "selectivity.json", json.dumps(rows, indent=2) + "\n")
        keys = sorted({(r["trained"], r["epochs"]) for r in rows}, key=lambda k: (k[0], _epochs_order(k[1])))
        body = []
        for trained, epochs in keys:
            mine = [r for r in rows if (r["trained"], r["epochs"]) == (trained, epochs)]
            for dom in args.domains:
                here = [r for r in mine if r["target"] == dom]
                per_seed = {r["seed"]: r["ndcg@10"] for r in here}
                body.append([trained, epochs, dom, _mean_std([r["converted"] for r in here]),
                             _mean_std([r["expert_argmax_in_target"] for r in here
                                        if r.get("expert_argmax_in_target") is not None]),
                             _mean_std(list(per_seed.values()))])
        lines += ["## Selectivity: conversion and Stage III NDCG@10 against the training lengths", "",
                  "Means over seeds and source domains (± their std); the probe column is the share of the "
                  "positions decoding decides at which the target expert's own arg-max over all items lies in "
                  "the target domain (analysis/selectivity.py).", "",
                  markdown_table(["trained", "epochs", "target", "converted share of source items",
                                  "target expert's arg-max in the target domain", "NDCG@10"], body),
                  ""]
        if rows:
            lines += [f"![selectivity]({plot_selectivity(rows, out / 'selectivity.png').name})", ""]
    if "figures" in parts:
        lines += ["## Figures 4 and 5", ""] + [f"![{p.stem}]({p.relative_to(out)})" for p in parts["figures"]] + [""]
    text = "\n".join(lines)
    write_text_atomic(out / "report.md", text)
    return text


def _epochs_order(epochs: str) -> float:
    return float("inf") if epochs == "es" else float(epochs)


def plot_selectivity(rows: list[dict], png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from analysis import save_figure

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    # one shared axis of training lengths (base and expert settings), so that every tick is labelled
    labels = [e for _, e in sorted({(_epochs_order(r["epochs"]), r["epochs"]) for r in rows})]
    for ax, key, label in ((axes[0], "converted", "converted share of source items"), (axes[1], "ndcg@10", "NDCG@10")):
        for trained, style in (("base", "-o"), ("expert", "--s")):
            mine = [r for r in rows if r["trained"] == trained]
            for dom in sorted({r["target"] for r in mine}):
                points = sorted({(_epochs_order(r["epochs"]), r["epochs"]) for r in mine if r["target"] == dom})
                xs = [labels.index(e) for _, e in points]
                ys = [stats.fmean([r[key] for r in mine if r["target"] == dom and r["epochs"] == e]) for _, e in points]
                ax.plot(xs, ys, style, label=f"{trained} {dom}", markersize=3)
        ax.set_xticks(range(len(labels)), labels)
        ax.set(xlabel="epochs (es: early stopping)", ylabel=label)
        ax.grid(linewidth=0.3)
    axes[1].legend(fontsize=6, ncol=2)
    probed = [r for r in rows if r.get("expert_argmax_in_target") is not None]
    for trained, marker in (("base", "o"), ("expert", "s")):
        mine = [r for r in probed if r["trained"] == trained]
        axes[2].scatter([r["expert_argmax_in_target"] for r in mine], [r["converted"] for r in mine], s=8,
                        marker=marker, label=f"{trained} length varied", alpha=0.7)
    axes[2].plot([0, 1], [0, 1], color="grey", linewidth=0.6)
    axes[2].set(xlabel="target expert's arg-max in the target domain", ylabel="converted share",
                xlim=(0, 1), ylim=(0, 1))
    axes[2].legend(fontsize=6)
    axes[2].grid(linewidth=0.3)
    fig.tight_layout()
    return save_figure(fig, png, dpi=100)


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
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
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
    out = project_path(args.out)
    args.domains = args.domains or domains_of(args.dataset, args.overrides)
    report = args.report = Report(args.dataset, out, args.overrides, args.collect_only, args.rerun)
    parts = {}
    if "table2" in args.parts:
        parts["table2"] = table2(report, args.seeds, args.domains, args.backbones, args.baselines)
    if "table3" in args.parts:
        parts["table3"] = table3(report, args.seeds, args.domains)
    if "figures" in args.parts:
        if args.collect_only:
            parts["figures"] = sorted((out / "figures").glob("*.png"))
        else:
            report.pipeline(args.seeds[0])
            parts["figures"] = figures(report, args.seeds[0], args.domains)
    if "selectivity" in args.parts:
        parts["selectivity"] = selectivity(report, args.seeds, args.domains, args.base_epochs, args.expert_epochs)
    text = write_report(out, args, parts)
    print(text)
    return text


if __name__ == "__main__":
    main()
