"""Side-by-side pictures of the ablations for ``atmask report``, from the run folders' own plot tables.

- ``threshold_sweep.png``: mask AP per binarisation (P >= 0.3/0.5/0.7, P >= T), one bar per ablation
  (paper Fig. 4);
- ``pr_curves.png``: mask precision-recall at IoU 0.5 and 0.75, one curve per ablation;
- ``loss.png``: the training loss, one curve per ablation;
- ``ablations.png``: mask AP, AP75 and boundary AP per ablation, mean over seeds with a 95% t-interval.

Runs of one ablation (seeds) are averaged point by point. Pictures rather than DVC's vega plots, so that
``dvc plots show`` renders them without fetching vega from a CDN.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from components.io import atomic_path
from components.paired import mean_interval
from components.run_layout import LOSS_CSV

SWEEP_CSV = Path("plots") / "threshold_sweep.csv"
PR_CSV = Path("plots") / "pr_curves.csv"
PR_COLUMNS = ("segm@0.50", "segm@0.75")
PLOTS = ("threshold_sweep.png", "pr_curves.png", "loss.png")


def read_columns(path: Path) -> dict[str, list[str]]:
    """A CSV as ``{column: values}`` (strings); empty when the file is missing."""
    if not path.is_file():
        return {}
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    return {key: [r[key] for r in rows] for key in (rows[0] if rows else {})}


def mean_curve(tables: Sequence[dict[str, list[str]]], x: str, y: str) -> tuple[list[str], np.ndarray] | None:
    """The runs' ``y`` averaged at the ``x`` values they share (None when no run has the column)."""
    tables = [t for t in tables if x in t and y in t]
    if not tables:
        return None
    length = min(len(t[x]) for t in tables)
    values = np.array([[float(v) for v in t[y][:length]] for t in tables])
    return tables[0][x][:length], np.nanmean(values, axis=0)


def render_errorbars(scores: Mapping[str, Mapping[str, Sequence[float]]], out_dir: Path) -> Path:
    """``ablations.png`` from ``{ablation: {metric: [one value per seed]}}``."""
    metrics = list(next(iter(scores.values()), {}))
    fig, ax = plt.subplots(figsize=(7, 3.8))
    width = 0.8 / max(1, len(scores))
    for i, (name, by_metric) in enumerate(scores.items()):
        stats = [mean_interval(list(by_metric[m])) if by_metric[m] else None for m in metrics]
        means = [100 * s.mean if s else np.nan for s in stats]
        errors = [100 * (s.high - s.mean) if s and s.high is not None else 0.0 for s in stats]
        n = max((s.n for s in stats if s), default=0)
        ax.bar(
            np.arange(len(metrics)) + i * width, means, width, yerr=errors, capsize=3, label=f"{name} (n={n})"
        )
    ax.set_xticks(np.arange(len(metrics)) + 0.4 - width / 2, metrics)
    ax.set(ylabel="%", title="Mean over seeds, 95% t-interval")
    _legend(ax, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "ablations.png") as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return out_dir / "ablations.png"


def render(runs: Mapping[str, Sequence[Path]], out_dir: Path) -> list[Path]:
    """Write the three pictures for ``{ablation: [run folders]}`` into ``out_dir``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tables = {
        name: {kind: [read_columns(d / rel) for d in dirs] for kind, rel in _SOURCES.items()}
        for name, dirs in runs.items()
    }
    written = []
    for filename, draw in zip(PLOTS, (_sweep, _pr, _loss), strict=True):
        fig = draw(tables)
        with atomic_path(out_dir / filename) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
        plt.close(fig)
        written.append(out_dir / filename)
    return written


def _legend(ax: plt.Axes, ncol: int = 1) -> None:
    if ax.get_legend_handles_labels()[0]:  # runs without plot tables draw nothing to label
        ax.legend(fontsize=7, ncol=ncol)


_SOURCES = {"sweep": SWEEP_CSV, "pr": PR_CSV, "loss": LOSS_CSV}


def _sweep(tables) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(7, 3.8))
    width = 0.8 / max(1, len(tables))
    labels: list[str] = []
    for i, (name, kinds) in enumerate(tables.items()):
        curve = mean_curve(kinds["sweep"], "binarization", "segm_AP")
        if curve is None:
            continue
        xs, ap = curve
        labels = labels or list(xs)
        positions = [labels.index(x) if x in labels else len(labels) for x in xs]
        ax.bar(np.array(positions) + i * width, 100 * ap, width, label=name)
    ax.set_xticks(np.arange(len(labels)) + 0.4 - width / 2, labels)
    ax.set(ylabel="mask AP (%)", title="Mask AP by binarisation (paper Fig. 4)")
    _legend(ax, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def _pr(tables) -> plt.Figure:
    fig, axes = plt.subplots(1, len(PR_COLUMNS), figsize=(4.2 * len(PR_COLUMNS), 3.8), squeeze=False)
    for ax, column in zip(axes[0], PR_COLUMNS, strict=True):
        for name, kinds in tables.items():
            curve = mean_curve(kinds["pr"], "recall", column)
            if curve is not None:
                ax.plot([float(r) for r in curve[0]], curve[1], label=name)
        ax.set(
            xlabel="recall",
            ylabel="precision",
            xlim=(0, 1),
            ylim=(0, 1.02),
            title=f"mask PR, IoU {column[-4:]}",
        )
        _legend(ax)
    fig.tight_layout()
    return fig


def _loss(tables) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name, kinds in tables.items():
        curve = mean_curve(kinds["loss"], "step", "loss")
        if curve is not None:
            ax.plot([int(s) for s in curve[0]], curve[1], label=name)
    ax.set(xlabel="iteration", ylabel="total loss", title="Training loss", yscale="log")
    _legend(ax)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
