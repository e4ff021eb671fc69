"""Table 3: the ablation variants of Taesar for one target domain and one backbone, end to end.

    python -m analysis.ablation --target dom1
    python -m analysis.ablation --target dom4 --model GRU4Rec --dataset ACDT --seeds 2025 2026 --out results/ablation
    python -m analysis.ablation --target dom1 -- trainer.base.epochs=50 trainer.expert.epochs=5   # overrides for every stage

For each variant (w/o DSA, DSA w/o DSP, w/o SDE, w/o GCS, w/o LCS, Taesar) and seed: Stage I
(`pretrain.run_pretrain`), Stage II for the target domain (`decoding.run_decoding`) and Stage III
on the regenerated rows (`finetune.run_finetune`, train_type=new). Stage I checkpoints are keyed by
their settings, so the four variants that differ only in decoding train Stage I once. Every run
writes its config.yaml and metrics.json into `OUT/runs/VARIANT/STAGE-seedSEED/`; the test metrics
of the fine-tunings are gathered with results.py into `OUT/ablation.md` and `OUT/ablation.csv`
(HR, NDCG, MRR at 10 and 20; `mean ± std` over several seeds).
"""
from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path

from data.files import write_text_atomic
from data.paths import project_path
from results import METRICS, collect, metric_label, table

# Table 3 rows in the paper's order: experiment config (none for the full method, `taesar`) -> paper name.
VARIANTS = {
    "wo_dsa": "w/o DSA",
    "dsa_wo_dsp": "DSA w/o DSP",
    "wo_sde": "w/o SDE",
    "wo_gcs": "w/o GCS",
    "wo_lcs": "w/o LCS",
    "taesar": "Taesar",
}


def run_variant(variant: str, target: str, model: str, dataset: str, seed: int, out: Path,
                overrides: list[str]) -> dict:
    """Stage I, II and III of one variant and seed; returns the fine-tuning metrics.

    The extra `overrides` come after this function's own, so on a clash they win.
    """
    # Imported here so that `--help` and the table helpers do not load torch and RecBole.
    from decoding import run_decoding
    from pipeline.settings import stage_config
    from finetune import run_finetune
    from pretrain import run_pretrain

    runs = out / "runs" / variant
    common = ([] if variant == "taesar" else [f"experiment={variant}"]) + [f"dataset={dataset}", f"seed={seed}"]
    run_pretrain(stage_config("pretrain", [*common, *overrides, f"run_dir={runs / f'pretrain-seed{seed}'}"]))
    run_decoding(stage_config("decoding", [*common, f"target_dom={target}", *overrides,
                                      f"run_dir={runs / f'decoding-seed{seed}'}"]))
    return run_finetune(stage_config("finetune", [*common, f"target_dom={target}", f"model_name={model}",
                                             "train_type=new", *overrides,
                                             f"run_dir={runs / f'finetune-seed{seed}'}"]))


def ablation_rows(runs: list[dict], target: str) -> list[dict]:
    """One record per variant in Table 3's order: test metrics of `target` (mean, std, seeds) by results.table."""
    _, _, records = table(runs)
    by_variant = {r["train"][len("new ("):-1]: r for r in records if r["train"].startswith("new (")}
    rows = []
    for variant, name in VARIANTS.items():
        if variant not in by_variant:
            continue
        record = by_variant[variant]
        row = {"variant": name, "dataset": record["dataset"], "model": record["model"], "target": target}
        for metric in METRICS:
            row[metric] = record[f"{target} {metric}"]
            row[f"{metric} std"] = record[f"{target} {metric} std"]
        row["seeds"] = record[f"{target} {METRICS[0]} seeds"]
        rows.append(row)
    return rows


def write_ablation(rows: list[dict], out: Path) -> str:
    """Write ablation.md (Table 3 layout) and ablation.csv into `out`; returns the Markdown."""
    columns = [metric_label(m) for m in METRICS]
    text = "| Variant | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns) + "\n"
    for row in rows:
        cells = [f"{float(row[m]):.4f}" + (f" ± {float(row[m + ' std']):.4f}" if row[m + " std"] else "")
                 if row[m] else "–" for m in METRICS]
        text += f"| {row['variant']} | " + " | ".join(cells) + " |\n"
    write_text_atomic(out / "ablation.md", text)
    buffer = io.StringIO()
    fields = ["variant", "dataset", "model", "target", *(k for m in METRICS for k in (m, f"{m} std")), "seeds"]
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(out / "ablation.csv", buffer.getvalue())
    return text


def run_ablation(target: str, model: str = "SASRec", dataset: str = "ACDT", seeds: list[int] = (2025,),
                 out: Path | str = "results/ablation", overrides: list[str] = (),
                 variants: list[str] = tuple(VARIANTS)) -> list[dict]:
    """Run every variant for every seed, then write OUT/ablation.md and .csv; returns the table's rows."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; expected some of {', '.join(VARIANTS)}")
    out = project_path(out)
    done = []
    for variant in variants:
        for seed in seeds:
            metrics = run_variant(variant, target, model, dataset, seed, out, list(overrides))
            done.append((metrics["dataset"], metrics["model_name"], metrics["target_dom"], metrics["variant"],
                         metrics["seed"]))
    # Only this call's runs: OUT/runs may also hold earlier runs with other seeds or backbones.
    runs = [r for r in collect([out / "runs"])
            if (r["dataset"], r["model_name"], r["target_dom"], r["variant"], r["seed"]) in done]
    rows = ablation_rows(runs, target)
    write_ablation(rows, out)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", required=True, help="target domain, dom1..domk")
    parser.add_argument("--model", default="SASRec", help="Stage III backbone (model_name)")
    parser.add_argument("--dataset", default="ACDT", help="dataset config (config/dataset/NAME.yaml)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[2025], help="one or more seeds")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        help="a subset of the Table 3 rows (default: all, in the paper's order)")
    parser.add_argument("--out", type=Path, default=Path("results/ablation"),
                        help="where runs/, ablation.md and ablation.csv go")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every stage, after `--`")
    args = parser.parse_args(argv)
    rows = run_ablation(args.target, args.model, args.dataset, args.seeds, args.out, args.overrides, args.variants)
    print((project_path(args.out) / "ablation.md").read_text(), end="")
    print(f"{len(rows)} variants -> {project_path(args.out) / 'ablation.md'}, ablation.csv")


if __name__ == "__main__":
    main()
