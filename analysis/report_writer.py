"""The report's text: report.md, with its tables, claims (paired comparisons), wall times, CSVs and
the selectivity figure, from the runs analysis/report.py collected (each a record of the store,
analysis/run_store.py).
"""
from __future__ import annotations

import json
import shlex
import statistics as stats
from pathlib import Path

from analysis.run_store import Report, machine
from analysis.statistics import Comparison, aligned, paired_bootstrap
from data.files import write_text_atomic
from pipeline.schemas import TRAIN_TYPES

MIXED_HISTORY = "full_mixed_history"  # SASRec4 evaluated with eval_history=mixed (its own row)


def table2_run(backbone: str, train_type: str, dom: str, seed: int) -> str:
    """The store name of one Table 2 run (train_type: sim, full, new or MIXED_HISTORY)."""
    return f"table2/{backbone}-{train_type}-{dom}-seed{seed}"


def wall_times(report: Report, seeds, domains, baselines) -> list[list[str]]:
    """Minutes per seed: Taesar's whole pipeline (Stage I, Stage II of every domain, SASRec on the
    regenerated rows of every domain) and each baseline's run, as measured by this report."""
    rows = []
    for seed in seeds:
        taesar = [f"stage1/default/seed{seed}", f"stage2/default/all-seed{seed}",
                  *(table2_run("SASRec", "new", d, seed) for d in domains)]
        groups = [taesar, *([f"baselines/{b}-seed{seed}"] for b in baselines)]
        timings = [[report.timing(n) for n in names] for names in groups]
        cells = ["–" if None in group else f"{sum(t['seconds'] for t in group) / 60:.1f}" for group in timings]
        rows.append([str(seed), *cells, _machines(timings)])
    return rows


def backbone_wall_times(report: Report, seeds, domains, backbones) -> list[list[str]]:
    """Minutes per seed of each backbone's Table 2 runs (sim, full and new of every domain, without
    the Stage I and II they share), summed over the runs with a recorded wall time; "(k of n runs)"
    says when only k of them have one (runs not made yet, or made before wall times were recorded)."""
    rows = []
    for seed in seeds:
        timings = [[report.timing(table2_run(b, t, d, seed)) for d in domains for t in TRAIN_TYPES]
                   for b in backbones]
        cells = []
        for group in timings:
            timed = [t["seconds"] for t in group if t]
            minutes = f"{sum(timed) / 60:.1f}" if timed else "–"
            cells.append(minutes if len(timed) in (0, len(group)) else f"{minutes} ({len(timed)} of {len(group)} runs)")
        rows.append([str(seed), *cells, _machines(timings)])
    return rows


def _machines(timings: list[list[dict | None]]) -> str:
    return "; ".join(sorted({t.get("machine", "not recorded") for group in timings for t in group if t})) or "–"


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
                if not {r["seed"] for r in new} & {r["seed"] for r in base}:
                    continue  # nothing to pair yet (no run, or runs of other seeds only): no claim
                c: Comparison = paired_bootstrap(*aligned(new, base))
                rows.append({"backbone": backbone, "domain": dom, "claim": f"new > {name}", "delta": c.mean,
                             "low": c.low, "high": c.high, "seed_std": c.seed_std, "seeds": c.seeds,
                             "users": c.users, "verdict": c.verdict})
    return rows


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
                                 wall_times(args.report, args.seeds, args.domains, args.baselines)), "",
                  "## Wall time of the backbones' Table 2 runs (minutes per seed: sim, full and new of every "
                  "domain)", "",
                  markdown_table(["seed", *args.backbones, "machine"],
                                 backbone_wall_times(args.report, args.seeds, args.domains, args.backbones)), ""]
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
