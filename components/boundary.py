"""Boundary IoU (Cheng et al., CVPR 2021): a NumPy reference and the compiled band the evaluator uses.

Definitions follow the paper and ``bowenc0221/boundary-iou-api``:

- the boundary band of a mask G is ``G_d ∩ G = G - erode(G, d)``: the mask pixels within distance ``d``
  of its contour, where ``d = max(1, round(dilation_ratio * image_diagonal))`` and the erosion is ``d``
  iterations of a 3x3 square kernel with the outside of the image counted as background (so a mask cut by
  the image border has a boundary there too);
- ``boundary_iou(G, P) = |(G_d ∩ G) ∩ (P_d ∩ P)| / |(G_d ∩ G) ∪ (P_d ∩ P)|``;
- Boundary AP uses, per detection/ground-truth pair, ``min(mask IoU, boundary IoU)`` instead of mask IoU
  (crowd ground truth keeps mask IoU), with COCO's AP protocol otherwise unchanged.

Two implementations of the band, tested equal pixel for pixel:

- :func:`mask_boundary` / :func:`rle_boundary`: the readable NumPy reference on the full image, used by
  ``components.coco_eval`` for ``evaluator: pycocotools``;
- :func:`rle_band`: a compiled (Numba) kernel that decodes the RLE runs straight into the mask's bounding
  box and erodes there, used by the fast evaluator (faster-coco-eval in segm mode plus band IoU where
  mask IoU >= 0.5), which the tests also check against faster-coco-eval's own ``boundary`` mode.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numba
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from pycocotools import mask as mask_util

from components.rle import foreground_box, rle_counts


def dilation_pixels(height: int, width: int, dilation_ratio: float) -> int:
    """Band width ``d`` in pixels for an image of this size."""
    return max(1, round(dilation_ratio * math.sqrt(height**2 + width**2)))


def _min_filter_1d(a: np.ndarray, radius: int, axis: int) -> np.ndarray:
    pad = [(0, 0)] * a.ndim
    pad[axis] = (radius, radius)
    padded = np.pad(a, pad, constant_values=0)
    return sliding_window_view(padded, 2 * radius + 1, axis=axis).min(axis=-1)


def erode(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary erosion by a ``(2r+1)x(2r+1)`` square (= r iterations of 3x3), outside the image = 0."""
    m = mask.astype(np.uint8)
    return _min_filter_1d(_min_filter_1d(m, radius, 0), radius, 1)


def mask_boundary(mask: np.ndarray, dilation_ratio: float = 0.02) -> np.ndarray:
    """The inner boundary band ``G - erode(G, d)`` of a binary ``[H, W]`` mask, as uint8."""
    h, w = mask.shape
    m = (mask > 0).astype(np.uint8)
    return m - erode(m, dilation_pixels(h, w, dilation_ratio))


def boundary_iou(gt: np.ndarray, dt: np.ndarray, dilation_ratio: float = 0.02) -> float:
    """Boundary IoU of two binary masks of the same size (0.0 when both bands are empty)."""
    g = mask_boundary(gt, dilation_ratio).astype(bool)
    d = mask_boundary(dt, dilation_ratio).astype(bool)
    union = np.logical_or(g, d).sum()
    return float(np.logical_and(g, d).sum() / union) if union else 0.0


def rle_boundary(rle: dict[str, Any], dilation_ratio: float = 0.02) -> dict[str, Any]:
    """Compressed RLE of the boundary band of a compressed-RLE mask."""
    band = mask_boundary(mask_util.decode(rle), dilation_ratio)
    return mask_util.encode(np.asfortranarray(band))


# ---------------------------------------------------------------- fast bands for the evaluator


class Band(NamedTuple):
    """A boundary band on its mask's bounding box: image offset, ``[rows, cols]`` pixels, pixel count."""

    x0: int
    y0: int
    pixels: np.ndarray
    area: int


def rle_band(rle: dict[str, Any], dilation_ratio: float = 0.02) -> Band:
    """The boundary band of a compressed RLE over the mask's bounding box.

    Same pixels as :func:`mask_boundary` (outside the box the mask and its band are empty), without
    decoding the full image.
    """
    h, w = (int(v) for v in rle["size"])
    x0, y0, pixels, area = _band_kernel(rle_counts(rle), h, dilation_pixels(h, w, dilation_ratio))
    return Band(int(x0), int(y0), pixels, int(area))


# Compiled once and cached on disk (NUMBA_CACHE_DIR where the package is read-only). Most bands are
# small, so per-call overhead, not pixels, is what a NumPy version paid for (4x slower in all).
@numba.njit(cache=True, nogil=True)
def _band_kernel(counts: np.ndarray, h: int, d: int) -> tuple[int, int, np.ndarray, int]:
    x0, y0, ncols, nrows = foreground_box(counts, h)
    mask = np.zeros((nrows, ncols), dtype=np.bool_)
    vertical = np.zeros((nrows, ncols), dtype=np.bool_)  # mask eroded along columns by d
    start = 0
    for i in range(counts.shape[0]):
        end = start + counts[i]
        if i % 2 == 1:
            s = start
            while s < end:  # split the run at column ends: a column's bottom is not above the next top
                col = s // h
                top, bottom = s - col * h, min(end - col * h, h)
                mask[top - y0 : bottom - y0, col - x0] = True
                if bottom - top > 2 * d:
                    vertical[top + d - y0 : bottom - d - y0, col - x0] = True
                s = (col + 1) * h
        start = end
    # Erosion along rows: a pixel is eroded away (not band) when all 2d+1 columns around it survived
    # vertically. The band is what is left of the mask, cleared in place.
    k = 2 * d + 1
    area = 0
    for r in range(nrows):
        window = 0
        for c in range(min(d, ncols)):
            window += vertical[r, c]
        for c in range(ncols):
            if c + d < ncols:
                window += vertical[r, c + d]
            if c - d - 1 >= 0:
                window -= vertical[r, c - d - 1]
            if mask[r, c]:
                if window == k:
                    mask[r, c] = False
                else:
                    area += 1
    return x0, y0, mask, area


@numba.njit(cache=True, nogil=True)
def _overlap(a: np.ndarray, ax: int, ay: int, b: np.ndarray, bx: int, by: int) -> int:
    """Pixels set in both crops, placed at their image offsets."""
    x0, y0 = max(ax, bx), max(ay, by)
    x1, y1 = min(ax + a.shape[1], bx + b.shape[1]), min(ay + a.shape[0], by + b.shape[0])
    n = 0
    for y in range(y0, y1):
        for x in range(x0, x1):
            if a[y - ay, x - ax] and b[y - by, x - bx]:
                n += 1
    return n


def band_iou(a: Band, b: Band) -> float:
    """IoU of two bands from :func:`rle_band` (0.0 when both are empty)."""
    inter = _overlap(a.pixels, a.x0, a.y0, b.pixels, b.x0, b.y0)
    union = a.area + b.area - inter
    return inter / union if union else 0.0
