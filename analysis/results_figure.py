"""Bar chart of test NDCG@10 per target domain for sim, full and new data, from results.py's table.csv.

    python -m analysis.results_figure results/table.csv --out results/ndcg10.png
    python -m analysis.results_figure TABLE_CSV --out PNG --metric hr@20

Grouped bars (one group per target domain, one bar per train type), one subplot per
backbone (and dataset, when the table holds several); error bars are the standard
deviation over seeds where the table has one. `new` is the full method, `new (taesar)`.
"""
from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402

from analysis import save_figure  # noqa: E402

# The train column of table.csv -> bar label, in plotting order.
TRAINS = {"sim": "sim", "full": "full", "new (taesar)": "new"}


def _number(text: str | None) -> float:
    return float(text) if text not in (None, "") else math.nan


def read_table(path: Path, metric: str = "ndcg@10") -> tuple[list[tuple[str, str]], list[str], dict]:
    """(panels as (dataset, model), domains, {(dataset, model, train, domain): (mean, std)}) of `metric`."""
    with open(path, newline="", encoding="utf-8") as f:
        records = list(csv.DictReader(f))
    if not records:
        raise ValueError(f"{path}: no rows")
    domains = [c[: -len(f" {metric}")] for c in records[0] if c.endswith(f" {metric}")]
    if not domains:
        raise ValueError(f"{path}: no '<dom> {metric}' column")
    panels, values = [], {}
    for record in records:
        if record["train"] not in TRAINS:
            continue
        panel = (record["dataset"], record["model"])
        if panel not in panels:
            panels.append(panel)
        for d in domains:
            values[(*panel, record["train"], d)] = (_number(record[f"{d} {metric}"]),
                                                    _number(record.get(f"{d} {metric} std")))
    if not panels:
        raise ValueError(f"{path}: no row with train in {', '.join(TRAINS)}")
    return panels, domains, values


def plot(table_csv: Path, out: Path, metric: str = "ndcg@10") -> Path:
    """Draw the chart of `metric` from `table_csv` into the PNG `out` (written atomically)."""
    panels, domains, values = read_table(table_csv, metric)
    several_datasets = len({dataset for dataset, _ in panels}) > 1
    fig, axes = plt.subplots(1, len(panels), figsize=(max(8.0, 3.0 * len(panels)), 3.0), squeeze=False,
                             sharey=True)
    width = 0.8 / len(TRAINS)
    for ax, (dataset, model) in zip(axes[0], panels):
        for i, (train, label) in enumerate(TRAINS.items()):
            means, stds = zip(*(values.get((dataset, model, train, d), (math.nan, math.nan)) for d in domains))
            positions = [j + (i - (len(TRAINS) - 1) / 2) * width for j in range(len(domains))]
            # NaN draws nothing: no bar without a mean, no error bar without a std (a single seed).
            ax.bar(positions, means, width, yerr=None if all(map(math.isnan, stds)) else stds, capsize=2,
                   label=label if ax is axes[0][0] else None, color=f"C{i}", error_kw={"linewidth": 0.8})
        ax.set_xticks(range(len(domains)), domains)
        ax.set_title(f"{dataset} / {model}" if several_datasets else model, fontsize=10)
        ax.grid(axis="y", linewidth=0.3)
        ax.set_axisbelow(True)
    axes[0][0].set_ylabel(f"test {metric.upper()}")
    fig.legend(loc="upper center", ncol=len(TRAINS), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.92))  # room for the legend above the panels
    out = Path(out)
    save_figure(fig, out, dpi=100)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("table_csv", type=Path, help="table.csv written by results.py")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    parser.add_argument("--metric", default="ndcg@10", help="a metric column of table.csv (default ndcg@10)")
    args = parser.parse_args(argv)
    try:
        print(f"wrote {plot(args.table_csv, args.out, args.metric.lower())}")
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
