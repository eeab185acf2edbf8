"""COCO metrics: hand-built cases with known values, evaluator equality, Boundary IoU reference."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_util

from components import boundary
from components.coco_eval import STAT_NAMES, evaluate_coco

SIZE = 64


def _rle(mask: np.ndarray) -> dict:
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _square(x: int, y: int, side: int, size: int = SIZE) -> np.ndarray:
    m = np.zeros((size, size), np.uint8)
    m[y : y + side, x : x + side] = 1
    return m


def _gt(masks: list[tuple[int, np.ndarray]], size: int = SIZE) -> dict:
    anns = []
    for i, (image_id, m) in enumerate(masks, start=1):
        rle = _rle(m)
        bbox = [float(v) for v in mask_util.toBbox(rle)]
        anns.append(
            {
                "id": i,
                "image_id": image_id,
                "category_id": 1,
                "segmentation": rle,
                "area": float(m.sum()),
                "bbox": bbox,
                "iscrowd": 0,
            }
        )
    images = [
        {"id": i, "width": size, "height": size, "file_name": f"{i}.png"}
        for i in sorted({i for i, _ in masks})
    ]
    return {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "square"}]}


def _dets(masks: list[tuple[int, np.ndarray, float]]) -> list[dict]:
    out = []
    for image_id, m, score in masks:
        rle = _rle(m)
        out.append(
            {
                "image_id": image_id,
                "category_id": 1,
                "score": score,
                "segmentation": rle,
                "bbox": [float(v) for v in mask_util.toBbox(rle)],
            }
        )
    return out


@pytest.mark.parametrize("evaluator", ["faster", "pycocotools"])
def test_perfect_predictions_give_ap_one(evaluator: str) -> None:
    gt_masks = [(1, _square(10, 10, 40)), (2, _square(5, 20, 20))]
    dets = _dets([(i, m, 0.9) for i, m in gt_masks])
    for iou_type in ("bbox", "segm", "boundary"):
        stats = evaluate_coco(_gt(gt_masks), dets, iou_type, evaluator=evaluator).stats
        assert stats["AP"] == pytest.approx(1.0)
        assert stats["AP50"] == pytest.approx(1.0)
        assert stats["AR100"] == pytest.approx(1.0)


@pytest.mark.parametrize("evaluator", ["faster", "pycocotools"])
def test_shifted_mask_gives_known_ap(evaluator: str) -> None:
    # 20x20 square shifted by 4 px: IoU = 16*20 / (800 - 320) = 2/3 -> passes 0.50..0.65 (4 of 10 thresholds)
    gt_masks = [(1, _square(10, 10, 20))]
    dets = _dets([(1, _square(14, 10, 20), 0.8)])
    stats = evaluate_coco(_gt(gt_masks), dets, "segm", evaluator=evaluator).stats
    assert stats["AP"] == pytest.approx(0.4)
    assert stats["AP50"] == pytest.approx(1.0)
    assert stats["AP75"] == pytest.approx(0.0)
    assert stats["APl"] == -1.0  # nothing large in the ground truth: COCO's "not measured"


def test_no_detections_gives_zero() -> None:
    gt_masks = [(1, _square(10, 10, 20))]
    for evaluator in ("faster", "pycocotools"):
        stats = evaluate_coco(_gt(gt_masks), [], "segm", evaluator=evaluator).stats
        assert stats["AP"] == 0.0
        assert stats["AR100"] == 0.0


def _random_case(seed: int, n_images: int = 6) -> tuple[dict, list[dict]]:
    rng = np.random.default_rng(seed)
    gt_masks, dets = [], []
    for image_id in range(1, n_images + 1):
        for _ in range(int(rng.integers(1, 4))):
            x, y = (int(v) for v in rng.integers(0, 30, 2))
            s = int(rng.integers(6, 30))
            gt_masks.append((image_id, _square(x, y, s)))
            for _ in range(int(rng.integers(0, 3))):
                dx, dy, ds = (int(v) for v in rng.integers(-4, 5, 3))
                m = _square(max(0, x + dx), max(0, y + dy), max(3, s + ds))
                dets.append((image_id, m, float(rng.random())))
        dets.append((image_id, _square(*(int(v) for v in rng.integers(0, 50, 2)), 8), float(rng.random())))
    return _gt(gt_masks), _dets(dets)


@pytest.mark.parametrize("iou_type", ["bbox", "segm", "boundary"])
def test_faster_equals_pycocotools_on_random_cases(iou_type: str) -> None:
    for seed in range(3):
        gt, dets = _random_case(seed)
        fast = evaluate_coco(gt, dets, iou_type, evaluator="faster")
        ref = evaluate_coco(gt, dets, iou_type, evaluator="pycocotools")
        for name in STAT_NAMES:
            assert fast.stats[name] == pytest.approx(ref.stats[name], abs=1e-4), (seed, name)
        np.testing.assert_allclose(fast.precision, ref.precision, atol=1e-4)


def test_boundary_iou_reference_matches_faster_coco_eval_bands() -> None:
    from faster_coco_eval.core import mask as fmask

    ring = _square(8, 8, 40)
    ring[20:36, 20:36] = 0
    for m in (_square(10, 10, 40), _square(0, 30, 34), ring):
        ours = mask_util.decode(boundary.rle_boundary(_rle(m), 0.02))
        theirs = mask_util.decode(fmask.rleToBoundary(_rle(m), 0.02))
        np.testing.assert_array_equal(ours, theirs)


def test_boundary_iou_definition_on_small_masks() -> None:
    gt = _square(10, 10, 40)
    assert boundary.dilation_pixels(SIZE, SIZE, 0.02) == 2  # round(0.02 * 90.5)
    band = boundary.mask_boundary(gt)
    assert band.sum() == 40 * 40 - 36 * 36  # a 2-px inner ring
    assert boundary.boundary_iou(gt, gt) == 1.0
    shrunk = _square(12, 12, 36)  # its band is entirely inside gt's erosion -> no overlap
    assert boundary.boundary_iou(gt, shrunk) == 0.0
    cut = _square(0, 0, 20)  # the image border counts as boundary
    assert boundary.mask_boundary(cut)[0].sum() == 20


def test_boundary_ap_is_lower_than_mask_ap_on_blurred_edges() -> None:
    rng = np.random.default_rng(0)
    gt_masks, dets = [], []
    for image_id in range(1, 5):
        gt = _square(8, 8, 48)
        ragged = gt.copy()
        edge = boundary.mask_boundary(gt).astype(bool)
        ragged[edge & (rng.random(gt.shape) < 0.6)] = 0  # a frayed, blurred-looking edge
        gt_masks.append((image_id, gt))
        dets.append((image_id, ragged, 0.9))
    gt, results = _gt(gt_masks), _dets(dets)
    segm = evaluate_coco(gt, results, "segm").stats["AP"]
    bnd = evaluate_coco(gt, results, "boundary").stats["AP"]
    assert segm >= 0.9  # mask IoU ~0.9: most pixels are right
    assert bnd < segm - 0.3
    assert bnd == pytest.approx(evaluate_coco(gt, results, "boundary", evaluator="pycocotools").stats["AP"])
