"""Analyses of a pipeline's outputs: ablations (Table 3), diagnostics (Fig. 5), mapping view (Fig. 4), figures."""
from __future__ import annotations

from pathlib import Path

from data.files import atomic_path


def save_figure(fig, out_png, **savefig) -> Path:
    """Write a matplotlib figure as PNG atomically (no half-written file), then close it."""
    import matplotlib.pyplot as plt

    out_png = Path(out_png)
    try:
        with atomic_path(out_png) as tmp:
            fig.savefig(tmp, format="png", **savefig)
    finally:
        plt.close(fig)
    return out_png
