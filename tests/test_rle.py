"""Compiled RLE kernels equal pycocotools: run lengths, areas, boxes."""

from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_util

from components.rle import areas_and_boxes, rle_counts


def _masks() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    h, w = 37, 53
    masks = [np.zeros((h, w), np.uint8), np.ones((h, w), np.uint8)]
    wrap = np.zeros((h, w), np.uint8)
    wrap[30:, 4] = 1
    wrap[:5, 5] = 1  # one run from the bottom of column 4 into the top of column 5
    masks.append(wrap)
    corner = np.zeros((h, w), np.uint8)
    corner[0, 0] = 1  # the mask starts with a foreground run: the first count is 0
    masks.append(corner)
    masks += [(rng.random((h, w)) < p).astype(np.uint8) for p in (0.05, 0.5, 0.95)]
    for _ in range(30):
        m = np.zeros((h, w), np.uint8)
        y, x = rng.integers(-5, h, 2)
        m[max(y, 0) : y + rng.integers(1, h), max(x, 0) : x + rng.integers(1, w)] = 1
        masks.append(m)
    big = np.zeros((1000, 1200), np.uint8)  # counts above 2**15 need several 5-bit groups
    big[100:900, 50:1100] = 1
    big[400:600, 300:800] = 0  # a hole: negative differences between counts two apart
    masks.append(big)
    return masks


def _encode(mask: np.ndarray, as_str: bool) -> dict:
    rle = mask_util.encode(np.asfortranarray(mask))
    if as_str:
        rle["counts"] = rle["counts"].decode("ascii")
    return rle


def test_counts_decode_to_the_mask() -> None:
    for i, m in enumerate(_masks()):
        counts = rle_counts(_encode(m, as_str=i % 2 == 0))
        values = np.arange(len(counts)) % 2
        decoded = np.repeat(values, counts).astype(np.uint8)
        np.testing.assert_array_equal(decoded, m.ravel(order="F"))


def test_areas_and_boxes_equal_pycocotools() -> None:
    masks = _masks()
    rles = [_encode(m, as_str=i % 3 == 0) for i, m in enumerate(masks)]
    areas, boxes = areas_and_boxes(rles)
    reference = [_encode(m, as_str=False) for m in masks]  # pycocotools' own objects
    np.testing.assert_array_equal(areas, mask_util.area(reference))
    np.testing.assert_array_equal(boxes, mask_util.toBbox(reference))
    assert areas.dtype == np.int64 and boxes.shape == (len(masks), 4)


def test_areas_and_boxes_of_nothing() -> None:
    areas, boxes = areas_and_boxes([])
    assert areas.shape == (0,) and boxes.shape == (0, 4)
