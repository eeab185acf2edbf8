"""Pictures of an evaluation: threshold sweep (paper Fig. 4), PR curves, mask overlays and P/T/B maps.

Every plot comes as a PNG plus a table for ``dvc plots`` (CSV and JSON with the same rows), so the DVC
plots page and the MLflow UI show the same numbers:

- ``threshold_sweep``: ``binarization`` (``P>=0.3`` ..., ``P>=T``), ``threshold`` (the fixed value, or
  ``adaptive``) and ``segm_AP``: one bar per binarization;
- ``pr_curves``: ``recall`` and one precision column per IoU type and threshold, e.g. ``segm@0.50``.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from PIL import Image, ImageDraw

from components.coco_eval import EvalResult

PALETTE = np.array(
    [[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
     [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 190], [0, 128, 128], [170, 110, 40]],
    dtype=np.float32,
)  # fmt: skip


def write_table(path_stem: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """``<stem>.csv`` and ``<stem>.json`` (a list of row objects) with the same rows."""
    fields = list(rows[0]) if rows else []
    with open(path_stem.with_suffix(".csv"), "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    path_stem.with_suffix(".json").write_text(json.dumps(list(rows), indent=1) + "\n", encoding="utf-8")


def threshold_sweep_plot(out_dir: Path, sweep: Mapping[str, float], title: str) -> None:
    """Mask AP per binarization: fixed thresholds on P as a line, the adaptive P >= T as a level."""
    fixed = sorted((float(k), v) for k, v in sweep.items() if k != "adaptive")
    rows = [
        {"binarization": "P>=T" if k == "adaptive" else f"P>={k}", "threshold": k, "segm_AP": v}
        for k, v in sweep.items()
    ]
    write_table(out_dir / "threshold_sweep", rows)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([t for t, _ in fixed], [100 * v for _, v in fixed], "o-", label="fixed threshold on P")
    if "adaptive" in sweep:
        ax.axhline(100 * sweep["adaptive"], color="C3", linestyle="--", label="adaptive (P >= T)")
    ax.set(xlabel="threshold", ylabel="mask AP (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "threshold_sweep.png", dpi=100)
    plt.close(fig)


def pr_curves_plot(out_dir: Path, results: Mapping[str, EvalResult]) -> None:
    """``pr_curves.{png,csv,json}``: precision-recall per IoU threshold for each IoU type (all areas,
    100 detections, mean over classes), one panel per IoU type."""
    recall = next(iter(results.values())).recall_thresholds
    columns = {
        f"{iou_type}@{iou:.2f}": prec
        for iou_type, result in results.items()
        for iou, prec in result.pr_curves().items()
    }
    rows = [
        {"recall": round(float(r), 2), **{name: float(prec[i]) for name, prec in columns.items()}}
        for i, r in enumerate(recall)
    ]
    write_table(out_dir / "pr_curves", rows)
    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.8), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for ax, (iou_type, result) in zip(axes[0], results.items(), strict=True):
        curves = result.pr_curves()
        for i, (iou, prec) in enumerate(curves.items()):
            ax.plot(
                result.recall_thresholds,
                prec,
                color=cmap(i / max(1, len(curves) - 1)),
                label=f"IoU {iou:.2f}",
            )
        ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title=f"{iou_type} PR")
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out_dir / "pr_curves.png", dpi=100)
    plt.close(fig)


def overlay(
    image: np.ndarray,
    masks: np.ndarray,
    boxes: np.ndarray | None = None,
    captions: Sequence[str] | None = None,
    alpha: float = 0.5,
) -> np.ndarray:
    """``image`` (H, W, 3 uint8) with binary ``masks`` (N, H, W) tinted in, boxes and captions drawn."""
    out = image.astype(np.float32).copy()
    for i, m in enumerate(masks.astype(bool)):
        out[m] = (1 - alpha) * out[m] + alpha * PALETTE[i % len(PALETTE)]
    pil = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for i, box in enumerate([] if boxes is None else boxes):
        color = tuple(int(c) for c in PALETTE[i % len(PALETTE)])
        draw.rectangle([float(v) for v in box], outline=color, width=1)
        if captions is not None:
            draw.text((float(box[0]) + 1, float(box[1]) + 1), captions[i], fill=color)
    return np.asarray(pil)


def maps_figure(path: Path, image: np.ndarray, panels: Sequence[tuple[str, np.ndarray, bool]]) -> None:
    """Side-by-side panels: the image, then each ``(title, array, is_map)``; maps in [0, 1] get a colour bar."""
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(2.6 * (len(panels) + 1), 2.8))
    axes[0].imshow(image)
    axes[0].set_title("image", fontsize=8)
    for ax, (title, array, is_map) in zip(axes[1:], panels, strict=True):
        shown = ax.imshow(array, cmap="magma", vmin=0, vmax=1) if is_map else ax.imshow(array)
        if is_map:
            fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)
        ax.set_title(title, fontsize=8)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
