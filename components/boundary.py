"""Reference Boundary IoU (Cheng et al., CVPR 2021), in plain NumPy.

Definitions follow the paper and ``bowenc0221/boundary-iou-api``:

- the boundary band of a mask G is ``G_d ∩ G = G - erode(G, d)``: the mask pixels within distance ``d``
  of its contour, where ``d = max(1, round(dilation_ratio * image_diagonal))`` and the erosion is ``d``
  iterations of a 3x3 square kernel with the outside of the image counted as background (so a mask cut by
  the image border has a boundary there too);
- ``boundary_iou(G, P) = |(G_d ∩ G) ∩ (P_d ∩ P)| / |(G_d ∩ G) ∪ (P_d ∩ P)|``;
- Boundary AP uses, per detection/ground-truth pair, ``min(mask IoU, boundary IoU)`` instead of mask IoU
  (crowd ground truth keeps mask IoU), with COCO's AP protocol otherwise unchanged.

This module is the slow, readable reference that the fast evaluator (faster-coco-eval's ``boundary``
mode) is checked against in the tests; ``components.coco_eval`` uses it for ``evaluator: pycocotools``.
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
