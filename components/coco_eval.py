"""COCO bbox / segm / boundary metrics with pycocotools' COCOeval semantics.

Two evaluators compute the same numbers (the tests prove equality to 1e-4 on hand-built cases and on a
trained model's detections):

- ``faster``: faster-coco-eval's C++ ``COCOeval_faster`` (default); boundary AP runs it in segm mode and
  applies Boundary IoU only where mask IoU >= 0.5 (same numbers as its ``boundary`` mode, much faster);
- ``pycocotools``: the reference ``pycocotools.cocoeval.COCOeval``; boundary AP by a small subclass that
  replaces mask IoU with ``min(mask IoU, Boundary IoU)`` using :mod:`components.boundary`.

Inputs are plain COCO dicts (ground truth) and COCO results lists; neither is modified. As in Detectron2,
segm/boundary evaluation drops the results' ``bbox`` (a detection's area is its mask area) and bbox
evaluation drops ``segmentation``.
"""

from __future__ import annotations

import contextlib
import gc
import io
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from components.boundary import band_iou, rle_band, rle_boundary
from components.rle import areas_and_boxes

IOU_TYPES = ("bbox", "segm", "boundary")
EVALUATORS = ("faster", "pycocotools")
# COCOeval.stats order; maxDets are (1, 10, 100), areas are COCO's small/medium/large.
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


@dataclass(frozen=True)
class EvalResult:
    """One COCOeval run: the 12 summary numbers and the accumulated precision array."""

    iou_type: str
    stats: dict[str, float]  # STAT_NAMES -> value; -1.0 where COCO has nothing to measure
    precision: np.ndarray  # [T, R, K, A, M] as COCOeval.eval["precision"]
    iou_thresholds: np.ndarray  # [T]
    recall_thresholds: np.ndarray  # [R]

    def pr_curves(self) -> dict[float, np.ndarray]:
        """Precision at each recall threshold per IoU threshold (all areas, 100 dets, mean over classes)."""
        curves = {}
        for t, iou in enumerate(self.iou_thresholds):
            p = self.precision[t, :, :, 0, -1]  # [R, K]
            valid = p > -1
            counts = valid.sum(axis=1)
            sums = np.where(valid, p, 0.0).sum(axis=1)
            curves[round(float(iou), 2)] = np.where(counts > 0, sums / np.maximum(counts, 1), 0.0)
        return curves


def _prepare_inputs(gt: dict[str, Any], results: Sequence[dict[str, Any]], iou_type: str):
    drop = "segmentation" if iou_type == "bbox" else "bbox"
    dts = [{k: v for k, v in r.items() if k != drop} for r in results]
    gts = {**gt, "annotations": [dict(a) for a in gt.get("annotations", [])]}
    return gts, dts


def _empty_results(coco_cls: type, gt: Any) -> Any:
    res = coco_cls()
    res.dataset = {"images": list(gt.dataset["images"]), "categories": list(gt.dataset["categories"])}
    res.dataset["annotations"] = []
    with contextlib.redirect_stdout(io.StringIO()):
        res.createIndex()
    return res


# A detection/ground-truth IoU below the lowest COCO threshold (0.5) never matches, and boundary AP uses
# min(mask IoU, boundary IoU): a Boundary IoU changes the result only for pairs whose mask IoU is >= 0.5.
_BAND_IOU_FLOOR = 0.5 - 1e-6


class BandCache:
    """Each annotation's boundary band, computed once per evaluation, on first use."""

    def __init__(self, make_band: Callable[[dict[str, Any]], Any]) -> None:
        self._make_band = make_band
        self._bands: dict[tuple[str, int], Any] = {}

    def __call__(self, kind: str, ann: dict[str, Any]) -> Any:
        key = (kind, ann["id"])
        if key not in self._bands:
            self._bands[key] = self._make_band(ann)
        return self._bands[key]


def _faster_boundary_cls() -> type:
    from faster_coco_eval import COCOeval_faster

    class BoundaryCOCOevalFaster(COCOeval_faster):
        """faster-coco-eval in segm mode with IoU = min(mask IoU, Boundary IoU) for non-crowd ground truth,
        the Boundary IoU computed only where mask IoU >= 0.5 (elsewhere it cannot change a match).

        Same numbers as faster-coco-eval's own ``boundary`` mode (tested), which computes the band of
        every annotation at full image size; here bands come from :func:`components.boundary.rle_band`
        on the mask's bounding box, for the few annotations that need one.
        """

        def __init__(self, coco_gt: Any, coco_dt: Any, dilation_ratio: float, **kwargs: Any) -> None:
            super().__init__(coco_gt, coco_dt, "segm", **kwargs)
            self._band = BandCache(lambda ann: rle_band(ann["rle"], dilation_ratio))

        def computeIoU(self, imgId: int, catId: int) -> Any:
            ious = super().computeIoU(imgId, catId)
            if len(ious) == 0:
                return ious
            gt = self.gt_dataset.get_instances([imgId], [catId], True)[0][0]
            dt = self.dt_dataset.get_instances([imgId], [catId], True)[0][0]
            order = np.argsort([-d["score"] for d in dt], kind="mergesort")
            dt = [dt[i] for i in order][: self.params.maxDets[-1]]
            ious = np.array(ious, dtype=float).reshape(len(dt), len(gt))
            crowd = np.array([bool(g.get("iscrowd", 0)) for g in gt])
            for i, j in np.argwhere((ious >= _BAND_IOU_FLOOR) & ~crowd):
                ious[i, j] = min(ious[i, j], band_iou(self._band("dt", dt[i]), self._band("gt", gt[j])))
            return ious

    return BoundaryCOCOevalFaster


def _run_faster(gt: dict[str, Any], dts: list[dict[str, Any]], iou_type: str, ratio: float) -> Any:
    from faster_coco_eval import COCO, COCOeval_faster

    def quiet(*_: Any, **__: Any) -> None:
        return None

    with _gc_paused():
        coco_gt = COCO(gt, print_function=quiet)
        if not dts:
            coco_dt = _empty_results(COCO, coco_gt)
        elif iou_type == "bbox":
            coco_dt = coco_gt.loadRes(dts)
        else:
            coco_dt = _mask_results(COCO, coco_gt, dts)
        coco_dt.print_function = quiet
        # One IoU thread: the per-(image, category) tasks are too small for threads to pay off
        # (bench/bench_eval.py: 8 threads 15-20 % slower than 1 on 2 cores, 2 threads as slow).
        options = {"print_function": quiet, "rle_iou_max_workers": 1}
        if iou_type == "boundary":
            ev = _faster_boundary_cls()(coco_gt, coco_dt, ratio, **options)
        else:
            ev = COCOeval_faster(coco_gt, coco_dt, iou_type, **options)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def _mask_results(coco_cls: type, coco_gt: Any, dts: list[dict[str, Any]]) -> Any:
    """``coco_gt.loadRes(dts)`` for mask results (area = mask area), with the masks' areas and boxes
    decoded once for all detections (:func:`components.rle.areas_and_boxes`). Like loadRes, fills in
    ``dts``."""
    if not {d["image_id"] for d in dts} <= set(coco_gt.getImgIds()):
        raise ValueError("Results do not correspond to current coco set")  # as loadRes
    res = coco_cls(print_function=coco_gt.print_function)
    res.dataset["images"] = list(coco_gt.dataset["images"])
    res.dataset["categories"] = [dict(c) for c in coco_gt.dataset["categories"]]
    areas, boxes = areas_and_boxes([d["segmentation"] for d in dts])
    areas, boxes = areas.tolist(), boxes.tolist()
    for i, (d, area, box) in enumerate(zip(dts, areas, boxes, strict=True), start=1):
        d.update(area=area, bbox=box, id=i, iscrowd=0)
    res.dataset["annotations"] = dts
    res.createIndex()
    return res


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector: evaluation allocates a dict per detection and no cycles, and
    the collector's passes over a growing heap cost 10-15 % of a val2017-sized evaluation."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _boundary_cocoeval_cls() -> type:
    from pycocotools import mask as mask_util
    from pycocotools.cocoeval import COCOeval

    class BoundaryCOCOeval(COCOeval):
        """pycocotools' COCOeval with IoU = min(mask IoU, Boundary IoU) for non-crowd ground truth."""

        def __init__(self, coco_gt: Any, coco_dt: Any, dilation_ratio: float) -> None:
            super().__init__(coco_gt, coco_dt, "segm")
            self._band = BandCache(lambda ann: rle_boundary(ann["segmentation"], dilation_ratio))

        def computeIoU(self, imgId: int, catId: int) -> Any:
            ious = super().computeIoU(imgId, catId)
            if len(ious) == 0:
                return ious
            p = self.params
            gt = self._gts[imgId, catId] if p.useCats else [g for c in p.catIds for g in self._gts[imgId, c]]
            dt = self._dts[imgId, catId] if p.useCats else [d for c in p.catIds for d in self._dts[imgId, c]]
            order = np.argsort([-d["score"] for d in dt], kind="mergesort")
            dt = [dt[i] for i in order][: p.maxDets[-1]]
            iscrowd = [int(g["iscrowd"]) for g in gt]
            dt_bands = [self._band("dt", d) for d in dt]
            bands = mask_util.iou(dt_bands, [self._band("gt", g) for g in gt], iscrowd)
            non_crowd = ~np.asarray(iscrowd, dtype=bool)
            ious = np.asarray(ious)
            ious[:, non_crowd] = np.minimum(ious[:, non_crowd], np.asarray(bands)[:, non_crowd])
            return ious

    return BoundaryCOCOeval


def _run_pycocotools(gt: dict[str, Any], dts: list[dict[str, Any]], iou_type: str, ratio: float) -> Any:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(dts) if dts else _empty_results(COCO, coco_gt)
        if iou_type == "boundary":
            ev = _boundary_cocoeval_cls()(coco_gt, coco_dt, ratio)
        else:
            ev = COCOeval(coco_gt, coco_dt, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def evaluate_coco(
    gt: dict[str, Any],
    results: Sequence[dict[str, Any]],
    iou_type: str,
    *,
    evaluator: str = "faster",
    boundary_dilation_ratio: float = 0.02,
) -> EvalResult:
    """COCO metrics of ``results`` (COCO results format) against the ground-truth dataset dict ``gt``."""
    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type must be one of {IOU_TYPES}, got {iou_type!r}")
    if evaluator not in EVALUATORS:
        raise ValueError(f"evaluator must be one of {EVALUATORS}, got {evaluator!r}")
    gts, dts = _prepare_inputs(gt, results, iou_type)
    run = _run_faster if evaluator == "faster" else _run_pycocotools
    ev = run(gts, dts, iou_type, boundary_dilation_ratio)
    stats = np.asarray(ev.stats, dtype=float)[: len(STAT_NAMES)]
    return EvalResult(
        iou_type=iou_type,
        stats={name: float(v) for name, v in zip(STAT_NAMES, stats, strict=True)},
        precision=np.asarray(ev.eval["precision"], dtype=float),
        iou_thresholds=np.asarray(ev.params.iouThrs, dtype=float),
        recall_thresholds=np.asarray(ev.params.recThrs, dtype=float),
    )


def check_results_match(gt: dict[str, Any], results: Sequence[dict[str, Any]], source: str) -> None:
    """Refuse results whose image or category ids are not in ``gt`` (e.g. a file for another dataset)."""
    from components.errors import UserError

    image_ids = {img["id"] for img in gt.get("images", [])}
    cat_ids = {cat["id"] for cat in gt.get("categories", [])}
    bad_images = sorted({r.get("image_id") for r in results} - image_ids, key=str)
    bad_cats = sorted({r.get("category_id") for r in results} - cat_ids, key=str)
    if bad_images or bad_cats:
        what = f"image ids {bad_images[:5]}" if bad_images else f"category ids {bad_cats[:5]}"
        raise UserError(
            f"{source}: results refer to {what} that are not in the ground truth; "
            "they were computed on another dataset or split - re-run 'atmask evaluate' without --results"
        )
