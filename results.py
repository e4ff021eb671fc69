"""Gather the test metrics of fine-tuning runs into the layout of the paper's Table 2.

    python results.py                          # every outputs/ and multirun/ run of finetune.py
    python results.py DIR [DIR ...] --out results/ACDT

Rows: the cross-domain comparison first, as in the paper (SASRec4, i.e. SASRec
trained on the mixed full.train rows, then the baselines of cdsr_baseline/:
ABXI, CGRec, SyNCRec, trained once on the mixed rows for all domains), then
each backbone by train type; columns: HR, NDCG and MRR at 10 and 20 for each
target domain. With several seeds a cell is `mean ± std` (sample standard
deviation). Writes `table.md` and `table.csv` (one column per metric, mean and
std apart) and prints the Markdown.

Only like with like: a run's settings are read from the config.yaml beside its
metrics.json, or from its line in a report's store (`runs/*.jsonl`)
(`pipeline.records.result_settings`, less the seed and the target domain),
and the seeds of one cell are runs of the same settings. Runs of one
model and train type made with other settings get rows of their own, marked
with the key of their settings, and the differences are listed under the
table. Two runs of the same seed and settings count once when their test
metrics agree; when they disagree the command stops and names both.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import statistics
from collections import defaultdict
from functools import partial
from pathlib import Path

from data.files import write_text_atomic
from data.paths import project_path
from pipeline.records import (STORE_SUFFIX, RecordError, RunStore, check_config, check_metrics, read_metrics,
                              recorded_settings, settings_of)
from core.schema import describe_differences
from pipeline.schemas import TRAIN_TYPES

METRICS = ("hr@10", "hr@20", "ndcg@10", "ndcg@20", "mrr@10", "mrr@20")
METRIC_NAMES = {"hr": "HR", "ndcg": "NDCG", "mrr": "MRR"}
# The cross-domain comparison of Table 2, in its order: SASRec on the mixed rows, then the baselines.
CROSS_DOMAIN = ("SASRec4", "ABXI", "CGRec", "SyNCRec")
MIXED = "mixed"  # the train column of a cross-domain baseline: one model on full.train for all domains


def metric_label(metric: str) -> str:
    """A table's name for a metric key: ndcg@10 -> NDCG@10."""
    name, k = metric.split("@")
    return f"{METRIC_NAMES[name]}@{k}"


def collect(folders: list[Path]) -> list[dict]:
    """One record per (run, target domain) of every fine-tuning and baseline run below the folders: run
    folders (metrics.json beside config.yaml) and the stores of reports (`runs/*.jsonl`); a
    baseline's run holds every domain. Each record carries its settings (`settings`: their key;
    `settings_values`: the settings themselves)."""
    from pipeline.artifacts import settings_key

    records, origin = {}, {}
    for where, metrics, settings_of_stage in recorded_runs(folders):
        if metrics["stage"] == "finetune":
            runs = [metrics]
        elif metrics["stage"] == "baseline":
            runs = [{"dataset": metrics["dataset"], "model_name": metrics["model_name"], "train_type": MIXED,
                     "target_dom": dom, "variant": None, "seed": metrics["seed"], "test": test}
                    for dom, test in metrics["test"].items()]
        else:
            continue
        settings = row_settings(settings_of_stage(metrics["stage"]))
        for run in runs:
            record = {**run, "settings": settings_key(settings), "settings_values": settings}
            key = (record["dataset"], *row_label(record), record["target_dom"], record["seed"], record["settings"])
            if key not in records:
                records[key], origin[key] = record, where
            elif records[key]["test"] != record["test"]:
                raise RecordError(f"{where}: a run of the same seed and settings as {origin[key]} "
                                  f"({record['model_name']} {record['train_type']} {record['target_dom']} seed "
                                  f"{record['seed']}) with other test metrics; keep the one that is meant and move "
                                  "the other out of the folders given")
    return list(records.values())


def recorded_runs(folders: list[Path]):
    """(where, metrics, settings of a stage) of every run recorded below the folders, checked."""
    for folder in folders:
        for path in sorted(Path(folder).rglob("metrics.json")):
            yield str(path), read_metrics(path), partial(recorded_settings, path.parent)
        stores = sorted({p.parent for p in Path(folder).rglob(f"*{STORE_SUFFIX}") if p.parent.name == "runs"})
        for store in map(RunStore, stores):
            for record in store.records():
                if "metrics" in record:  # not a probe
                    where = f"{store.file(record['name'])} ({record['name']})"
                    yield (where, check_metrics(record["metrics"], where),
                           partial(settings_of, check_config(record.get("config"), where), where=where))


def row_settings(settings: dict) -> dict:
    """A run's settings as they key a row of the table: less the target domain, and less the training
    split, which the train type and the domain already name (a regenerated file's folder, or a given
    path, stays: it says which Stage I and II made it)."""
    settings = {k: v for k, v in settings.items() if k != "target_dom"}
    if settings.get("train_type") in ("sim", "full"):
        settings.pop("source", None)
    return settings


def row_label(run: dict) -> tuple[str, str]:
    """(model, train) of a record in the table: SASRec on the mixed rows is the paper's SASRec4."""
    if run["model_name"] == "SASRec" and run["train_type"] == "full":
        return "SASRec4", "full" if run.get("eval_history", "target_only") == "target_only" else "full (mixed history)"
    if run["train_type"] == "new":
        return run["model_name"], f"new ({run.get('variant') or 'taesar'})"
    return run["model_name"], run["train_type"]


def settings_label(run: dict, keys: dict) -> tuple[str, str]:
    """(model, train) of a record's row: its `row_label`, with the key of its settings when runs of
    other settings share that label."""
    model, train = row_label(run)
    if len(keys[run["dataset"], model, train]) > 1:
        train = f"{train} [{run['settings']}]"
    return model, train


def settings_notes(runs: list[dict]) -> str:
    """Markdown: for each (model, train) with runs of several settings, how each one differs from the
    one with the most runs (the first key on a tie); empty when every row has one setting."""
    by_label, counts = defaultdict(dict), defaultdict(int)
    for run in runs:
        by_label[run["dataset"], *row_label(run)][run.get("settings", "")] = run.get("settings_values", {})
        counts[run.get("settings", "")] += 1
    lines = []
    for (dataset, model, train), settings in sorted(by_label.items()):
        if len(settings) < 2:
            continue
        (first, reference), *others = sorted(settings.items(), key=lambda item: (-counts[item[0]], item[0]))
        lines.append(f"- {dataset} {model} {train}: rows [{first}] and " + "; ".join(
            f"[{key}] ({describe_differences(reference, values)})" for key, values in others))
    if not lines:
        return ""
    return ("\nRuns of other settings are rows of their own, never averaged together (settings keys in brackets; "
            "what differs, the first key's value -> the other's):\n\n" + "\n".join(lines) + "\n")


def table(runs: list[dict]) -> tuple[list[str], list[list[str]], list[dict]]:
    """(header, Markdown rows, CSV records) of Table 2; one row per (dataset, model, train type, variant)."""
    cells = defaultdict(list)  # (row key, domain, metric) -> values over seeds
    rows, domains = [], set()
    keys = defaultdict(set)  # (dataset, model, train) -> the settings of its runs
    for run in runs:
        keys[run["dataset"], *row_label(run)].add(run.get("settings", ""))
    for run in runs:
        row = (run["dataset"], *settings_label(run, keys))
        if row not in rows:
            rows.append(row)
        domains.add(run["target_dom"])
        for metric in METRICS:
            cells[row, run["target_dom"], metric].append(run["test"][metric])
    domains = sorted(domains, key=lambda d: int(d[3:]))
    order = {t: i for i, t in enumerate(TRAIN_TYPES)}
    cross = {m: i for i, m in enumerate(CROSS_DOMAIN)}
    rows.sort(key=lambda r: (r[0], cross.get(r[1], len(cross)), r[1], order.get(r[2].split(" ")[0], 9), r[2]))
    header = ["dataset", "model", "train"] + [f"{d} {metric_label(m)}" for d in domains for m in METRICS]
    markdown, records = [], []
    settings = {(r["dataset"], *settings_label(r, keys)): r.get("settings", "") for r in runs}
    for row in rows:
        line, record = list(row), dict(zip(("dataset", "model", "train"), row))
        record["settings"] = settings[row]
        for d in domains:
            for metric in METRICS:
                values = cells.get((row, d, metric), [])
                mean = statistics.fmean(values) if values else None
                std = statistics.stdev(values) if len(values) > 1 else None
                line.append("–" if mean is None else f"{mean:.4f}" + (f" ± {std:.4f}" if std is not None else ""))
                record[f"{d} {metric}"] = "" if mean is None else f"{mean:.6f}"
                record[f"{d} {metric} std"] = "" if std is None else f"{std:.6f}"
                record[f"{d} {metric} seeds"] = len(values)
        markdown.append(line)
        records.append(record)
    return header, markdown, records


def headline(runs: list[dict], metric: str = "ndcg@10", backbone: str = "SASRec") -> str:
    """Markdown: one row per target domain, one column per method of the comparison (`backbone` on
    sim, SASRec4, the baselines, Taesar: `backbone` on new), `mean ± std` over seeds (n: how many),
    the best mean in bold; columns without runs are left out."""
    if len({r["dataset"] for r in runs}) != 1:
        raise ValueError("headline: the runs are of more than one dataset")
    _, _, records = table(runs)
    by_label = {(r["model"], r["train"]): r for r in records}
    columns = [((backbone, "sim"), f"{backbone} sim"), (("SASRec4", "full"), "SASRec4 (full)"),
               (("SASRec4", "full (mixed history)"), "SASRec4 (full, mixed history)"),
               *(((m, MIXED), m) for m in CROSS_DOMAIN[1:]), ((backbone, "new (taesar)"), "Taesar (new)")]
    columns = [(key, name) for key, name in columns if key in by_label]
    domains = sorted({r["target_dom"] for r in runs}, key=lambda d: int(d[3:]))
    def seeds(key):
        counts = sorted({by_label[key][f"{dom} {metric} seeds"] for dom in domains} - {0})
        return f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"

    lines = ["| target | " + " | ".join(f"{name} (n={seeds(key)})" for key, name in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for dom in domains:
        means = [by_label[key][f"{dom} {metric}"] for key, _ in columns]
        best = max((float(m) for m in means if m), default=None)
        cells = []
        for key, _ in columns:
            mean, std = by_label[key][f"{dom} {metric}"], by_label[key][f"{dom} {metric} std"]
            cell = "–" if not mean else f"{float(mean):.4f}" + (f" ± {float(std):.4f}" if std else "")
            cells.append(f"**{cell}**" if mean and float(mean) == best else cell)
        lines.append(f"| {dom} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def per_backbone(runs: list[dict], metric: str = "ndcg@10") -> str:
    """Markdown: Table 2 at one metric, one column per target domain, `mean ± std` over seeds (n: how
    many); the best mean of each domain among one backbone's rows (SASRec's with SASRec4) in bold."""
    _, _, records = table(runs)
    domains = sorted({r["target_dom"] for r in runs}, key=lambda d: int(d[3:]))
    def group(record):
        return "SASRec" if record["model"] == "SASRec4" else record["model"]
    means = defaultdict(list)  # (backbone, domain) -> the means of its rows
    for record in records:
        for dom in domains:
            if record[f"{dom} {metric}"]:
                means[group(record), dom].append(float(record[f"{dom} {metric}"]))
    lines = ["| model | train | n | " + " | ".join(domains) + " |", "|---|---|---|" + "---|" * len(domains)]
    for record in records:
        counts = sorted({record[f"{dom} {metric} seeds"] for dom in domains} - {0})
        cells = []
        for dom in domains:
            mean, std = record[f"{dom} {metric}"], record[f"{dom} {metric} std"]
            cell = "–" if not mean else f"{float(mean):.4f}" + (f" ± {float(std):.4f}" if std else "")
            rivals = means[group(record), dom]
            cells.append(f"**{cell}**" if mean and len(rivals) > 1 and float(mean) == max(rivals) else cell)
        n = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
        lines.append(f"| {record['model']} | {record['train']} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_tables(runs: list[dict], out: Path) -> str:
    """Write table.md and table.csv into `out`; returns the Markdown."""
    header, lines, records = table(runs)
    text = "| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n"
    text += "".join("| " + " | ".join(line) + " |\n" for line in lines) + settings_notes(runs)
    write_text_atomic(out / "table.md", text)
    buffer = io.StringIO()
    if records:
        writer = csv.DictWriter(buffer, fieldnames=list(records[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(records)
    write_text_atomic(out / "table.csv", buffer.getvalue())
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="*", type=Path,
                        help="run folders of finetune.py and cdsr_baseline/train.py (default: outputs/ multirun/)")
    parser.add_argument("--out", type=Path, default=Path("results"), help="where table.md and table.csv go")
    args = parser.parse_args(argv)
    if args.folders:
        missing = [str(f) for f in args.folders if not Path(f).is_dir()]
        if missing:
            raise SystemExit(f"error: {', '.join(missing)}: no such folder (expected run folders of finetune.py "
                             "or cdsr_baseline/train.py)")
    folders = args.folders or [project_path("outputs"), project_path("multirun")]
    from pipeline.runs import user_errors

    with user_errors():
        runs = collect([f for f in folders if Path(f).exists()])
    if not runs:
        raise SystemExit(f"error: no finetune.py or cdsr_baseline/train.py metrics.json below "
                         f"{', '.join(map(str, folders))}")
    print(write_tables(runs, project_path(args.out)), end="")
    print(f"{len(runs)} runs -> {project_path(args.out) / 'table.md'}, table.csv")


if __name__ == "__main__":
    main()
