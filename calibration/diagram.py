"""Reliability diagram with a confidence histogram, written as PNG (matplotlib's Agg canvas, no pyplot state)."""
from __future__ import annotations

from pathlib import Path

import torch

from calibration.metrics import _bin_stats, expected_calibration_error, maximum_calibration_error


def reliability_diagram(confidence, correct, path, title: str = "Reliability diagram", n_bins: int = 15) -> Path:
    """Top: accuracy per equal-width confidence bin against the diagonal, the gap shaded.
    Bottom: how many predictions fall in each bin (log scale). Returns the PNG path."""
    # matplotlib is slow to import and only drawing needs it
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    count, conf_sum, acc_sum = _bin_stats(confidence, correct, n_bins)
    count, conf_sum, acc_sum = (t.cpu() for t in (count, conf_sum, acc_sum))
    ece = expected_calibration_error(confidence, correct, n_bins)
    mce = maximum_calibration_error(confidence, correct, n_bins)
    acc = (acc_sum / count.clamp_min(1)).numpy()
    conf = (conf_sum / count.clamp_min(1)).numpy()
    full, count = (count > 0).numpy(), count.numpy()
    left, width = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)[:-1].numpy(), 1.0 / n_bins

    fig = Figure(figsize=(5, 6.2), dpi=120)
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.bar(left[full], acc[full], width=width, align="edge", color="#4C72B0", edgecolor="black",
            linewidth=0.5, label="accuracy")
    # The gap between each bin's mean confidence and its accuracy, drawn on top of the accuracy bar.
    top.bar(left[full], (conf - acc)[full], bottom=acc[full], width=width, align="edge", color="#DD8452",
            alpha=0.45, edgecolor="#DD8452", hatch="//", linewidth=0.5, label="gap to confidence")
    top.plot([0, 1], [0, 1], "--", color="gray", linewidth=1, label="perfect calibration")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.set_title(title)
    top.legend(loc="upper left", fontsize=8)
    top.text(0.97, 0.05, f"ECE {100 * ece:.2f}%\nMCE {100 * mce:.2f}%\nn = {int(count.sum())}",
             ha="right", va="bottom", transform=top.transAxes, fontsize=9,
             bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.8})
    bottom.bar(left, count, width=width, align="edge", color="gray", edgecolor="black", linewidth=0.5)
    if full.any():
        bottom.set_yscale("log")
    bottom.set_xlabel("confidence")
    bottom.set_ylabel("count")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
