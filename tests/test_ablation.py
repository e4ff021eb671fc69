"""Table 3 runner on tiny synthetic data, and the results figure from a hand-written table.csv."""
from __future__ import annotations

import csv
import math

from analysis.ablation import VARIANTS, run_ablation
from analysis.results_figure import plot
from results import METRICS
from tests.conftest import tiny_overrides


def test_ablation_writes_one_row_per_variant(tmp_path):
    overrides = [o for o in tiny_overrides(tmp_path) if not o.startswith(("run_dir", "dataset="))]
    out = tmp_path / "ablation"
    rows = run_ablation("dom2", model="SASRec", dataset="tiny", seeds=[2025], out=out,
                        overrides=[*overrides, "trainer.base.epochs=1", "trainer.expert.epochs=1",
                                   "trainer.finetune.epochs=1"])
    assert [r["variant"] for r in rows] == list(VARIANTS.values())
    # Stage I trained three times: the base model once, experts for taesar, wo_dsa and dsa_wo_dsp.
    assert len(list((tmp_path / "checkpoint" / "tiny").glob("SASRec-h*/*/settings.json"))) == 3
    for variant in VARIANTS:
        assert (out / "runs" / variant / "finetune-seed2025" / "metrics.json").is_file()
    lines = (out / "ablation.md").read_text().splitlines()
    assert lines[0] == "| Variant | HR@10 | HR@20 | NDCG@10 | NDCG@20 | MRR@10 | MRR@20 |"
    assert [line.split(" | ")[0] for line in lines[2:]] == [f"| {name}" for name in VARIANTS.values()]
    with open(out / "ablation.csv", newline="") as f:
        records = list(csv.DictReader(f))
    assert [r["variant"] for r in records] == list(VARIANTS.values())
    for record in records:
        assert record["target"] == "dom2" and record["seeds"] == "1"
        assert all(0.0 <= float(record[m]) <= 1.0 and math.isfinite(float(record[m])) for m in METRICS)
        assert float(record["hr@10"]) <= float(record["hr@20"])


def test_results_figure_renders_png(tmp_path):
    fields = ["dataset", "model", "train"] + [f"{d} {k}" for d in ("dom1", "dom2")
                                              for m in METRICS for k in (m, f"{m} std", f"{m} seeds")]
    table_csv = tmp_path / "table.csv"
    with open(table_csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        for i, (model, train) in enumerate((m, t) for m in ("SASRec", "GRU4Rec")
                                           for t in ("sim", "full", "new (taesar)", "new (wo_sde)")):
            record = {"dataset": "ACDT", "model": model, "train": train}
            for d in ("dom1", "dom2"):
                for m in METRICS:
                    # GRU4Rec has one seed: no std, so no error bars there.
                    record |= {f"{d} {m}": f"{0.05 + 0.01 * i:.6f}",
                               f"{d} {m} std": "0.004000" if model == "SASRec" else "",
                               f"{d} {m} seeds": 2 if model == "SASRec" else 1}
            writer.writerow(record)
    out = tmp_path / "fig" / "ndcg10.png"
    assert plot(table_csv, out) == out
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1024
    assert [p.name for p in out.parent.iterdir()] == ["ndcg10.png"]  # no temporary file left
