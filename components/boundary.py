"""Reference Boundary IoU (Cheng et al., CVPR 2021), in plain NumPy.

Definitions follow the paper and ``bowenc0221/boundary-iou-api``:

- the boundary band of a mask G is ``G_d ∩ G = G - erode(G, d)``: the mask pixels within distance ``d``
  of its contour, where ``d = max(1, round(dilation_ratio * image_diagonal))`` and the erosion is ``d``
  iterations of a 3x3 square kernel with the outside of the image counted as background (so a mask cut by
  the image border has a boundary there too);
- ``boundary_iou(G, P) = |(G_d ∩ G) ∩ (P_d ∩ P)| / |(G_d ∩ G) ∪ (P_d ∩ P)|``;
- Boundary AP uses, per detection/ground-truth pair, ``min(mask IoU, boundary IoU)`` instead of mask IoU
  (crowd ground truth keeps mask IoU), with COCO's AP protocol otherwise unchanged.

This module is the slow, readable reference: ``components.coco_eval`` uses it for
``evaluator: pycocotools``, and the tests check the fast evaluator (faster-coco-eval in segm mode plus
band IoU where mask IoU >= 0.5) and faster-coco-eval's own ``boundary`` mode against it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from pycocotools import mask as mask_util


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


def rle_counts(rle: dict[str, Any]) -> np.ndarray:
    """Run lengths of a compressed COCO RLE (pycocotools' LEB128-like string, str or bytes), vectorised."""
    data = rle["counts"].encode("ascii") if isinstance(rle["counts"], str) else rle["counts"]
    c = np.frombuffer(data, dtype=np.uint8).astype(np.int64) - 48
    last = (c & 0x20) == 0  # the last 5-bit group of each number
    if len(c) == 0:
        return np.zeros(0, dtype=np.int64)
    first = np.flatnonzero(np.concatenate(([True], last[:-1])))
    k = np.arange(len(c)) - np.repeat(first, np.diff(np.append(first, len(c))))
    values = np.add.reduceat((c & 0x1F) << (5 * k), first)
    ends = np.flatnonzero(last)
    negative = (c[ends] & 0x10) != 0
    values[negative] -= np.left_shift(1, 5 * (k[ends][negative] + 1))
    # counts after the first two are stored as differences to the count two places back
    values[1::2] = np.cumsum(values[1::2])
    values[2::2] = np.cumsum(values[2::2])
    return values


def rle_band(
    rle: dict[str, Any], dilation_ratio: float = 0.02, counts: np.ndarray | None = None
) -> tuple[int, int, np.ndarray]:
    """The boundary band of a compressed RLE as ``(x0, y0, bool crop)`` over the mask's bounding box.

    Same pixels as :func:`mask_boundary` (outside the box the mask and its band are empty), without
    decoding the full image: the erosion runs on the box. Vertically it shrinks each column run by ``d``
    at both ends; horizontally it is a sliding-window minimum over columns (by a cumulative sum).
    ``counts``: the RLE's run lengths if already decoded (e.g. by faster-coco-eval's C++).
    """
    h, w = (int(v) for v in rle["size"])
    runs = _column_runs(rle_counts(rle) if counts is None else counts, h)
    if runs is None:
        return 0, 0, np.zeros((0, 0), dtype=bool)
    cols, top, bottom = runs
    d = dilation_pixels(h, w, dilation_ratio)
    x0, y0 = int(cols.min()), int(top.min())
    ncols, nrows = int(cols.max()) - x0 + 1, int(bottom.max()) - y0
    inner = bottom - top > 2 * d
    delta = np.zeros((2, ncols, nrows + 1), dtype=np.int8)  # [mask, vertically eroded mask]
    # Run starts and ends never share a cell (runs in a column are separated by background).
    delta[0, cols - x0, top - y0] = 1
    delta[0, cols - x0, bottom - y0] = -1
    delta[1, cols[inner] - x0, top[inner] + d - y0] = 1
    delta[1, cols[inner] - x0, bottom[inner] - d - y0] = -1
    both = np.cumsum(delta, axis=2, dtype=np.int8)[:, :, :nrows].astype(bool)
    mask, vertical = both[0], both[1]
    k = 2 * d + 1
    window = np.zeros((ncols + k, nrows), dtype=np.int16)  # zero columns outside the box
    np.cumsum(vertical, axis=0, out=window[d + 1 : d + 1 + ncols])
    window[d + 1 + ncols :] = window[d + ncols]
    eroded = (window[k:] - window[:-k]) == k
    return x0, y0, (mask & ~eroded).T


def _column_runs(counts: np.ndarray, h: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Foreground runs of column-major run lengths as (column, top row, bottom row exclusive), split at
    column ends; None for an empty mask."""
    ends = np.cumsum(counts)
    starts, ends = (ends - counts)[1::2], ends[1::2]
    keep = ends > starts
    starts, ends = starts[keep], ends[keep]
    if len(starts) == 0:
        return None
    cols, last = starts // h, (ends - 1) // h
    if np.any(cols != last):  # a run wraps into the next column: split it at column ends
        pieces = [np.arange(c, e + 1) for c, e in zip(cols, last)]
        lo = np.concatenate([np.maximum(s, p * h) for s, p in zip(starts, pieces)])
        hi = np.concatenate([np.minimum(e, (p + 1) * h) for e, p in zip(ends, pieces)])
        cols = np.concatenate(pieces)
        starts, ends = lo, hi
    return cols, starts - cols * h, ends - cols * h


def band_iou(a: tuple[int, int, np.ndarray], b: tuple[int, int, np.ndarray]) -> float:
    """IoU of two bands from :func:`rle_band` (0.0 when both are empty)."""
    (ax, ay, am), (bx, by, bm) = a, b
    x0, y0 = max(ax, bx), max(ay, by)
    x1, y1 = min(ax + am.shape[1], bx + bm.shape[1]), min(ay + am.shape[0], by + bm.shape[0])
    inter = 0
    if x1 > x0 and y1 > y0:
        inter = int(
            np.count_nonzero(
                am[y0 - ay : y1 - ay, x0 - ax : x1 - ax] & bm[y0 - by : y1 - by, x0 - bx : x1 - bx]
            )
        )
    union = int(np.count_nonzero(am)) + int(np.count_nonzero(bm)) - inter
    return inter / union if union else 0.0
