"""Evaluator speed: our COCO evaluation (faster-coco-eval, incl. boundary AP) vs plain pycocotools.

A synthetic COCO-val2017-sized case: 5,000 images (640x480), 80 categories, ~7 ground-truth instances per
image, 100 detections per image with compressed-RLE masks (jittered copies of the ground truth plus
random false positives, random scores). Prints the wall time of

- plain pycocotools ``COCOeval(iouType="segm")`` (loadRes + evaluate + accumulate + summarize),
- ours: ``components.coco_eval.evaluate_coco(..., "segm")`` and ``(..., "boundary")``,

the speed-up (target >= 3x for segm), boundary/segm time ratio (target < 2x), and the largest difference
of the 12 summary numbers between ours and pycocotools (must be <= 1e-4).

    python bench/bench_eval.py            # 5,000 images x 100 detections
    python bench/bench_eval.py --quick    # 500 images x 100 detections
    python bench/bench_eval.py --quick --check-boundary   # + faster-coco-eval's own boundary mode
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import time

import numpy as np
from pycocotools import mask as mask_util

from components.coco_eval import evaluate_coco

WIDTH, HEIGHT = 640, 480


def _polygon(rng: np.random.Generator, cx: float, cy: float, rx: float, ry: float) -> list[float]:
    """A jagged ellipse as a 24-point polygon, clipped to the image."""
    angles = np.linspace(0, 2 * math.pi, 24, endpoint=False)
    radius = 1 + 0.15 * rng.standard_normal(24)
    xs = np.clip(cx + rx * radius * np.cos(angles), 0, WIDTH - 1)
    ys = np.clip(cy + ry * radius * np.sin(angles), 0, HEIGHT - 1)
    return np.stack([xs, ys], 1).ravel().tolist()


def _rle(poly: list[float]) -> dict:
    rle = mask_util.merge(mask_util.frPyObjects([poly], HEIGHT, WIDTH))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _random_shape(rng: np.random.Generator) -> tuple[float, float, float, float]:
    rx, ry = np.exp(rng.uniform(np.log(4), np.log(150), 2))
    return rng.uniform(rx, WIDTH - rx), rng.uniform(ry, HEIGHT - ry), rx, ry


def make_case(num_images: int, dets_per_image: int, seed: int = 0) -> tuple[dict, list[dict]]:
    rng = np.random.default_rng(seed)
    images, anns, dets = [], [], []
    for image_id in range(1, num_images + 1):
        images.append({"id": image_id, "width": WIDTH, "height": HEIGHT, "file_name": f"{image_id:012d}.jpg"})
        shapes = []
        for _ in range(rng.poisson(7) + 1):
            cx, cy, rx, ry = _random_shape(rng)
            cat = int(rng.integers(1, 81))
            rle = _rle(_polygon(rng, cx, cy, rx, ry))
            bbox = mask_util.toBbox(rle).tolist()
            area = float(mask_util.area(rle))
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat, "segmentation": rle,
                         "area": area, "bbox": bbox, "iscrowd": 0})  # fmt: skip
            shapes.append((cx, cy, rx, ry, cat))
        for d in range(dets_per_image):
            if d < 3 * len(shapes):  # up to three jittered guesses per object
                cx, cy, rx, ry, cat = shapes[d % len(shapes)]
                jitter = 0.05 + 0.2 * rng.random()
                cx, cy = cx + jitter * rx * rng.standard_normal(), cy + jitter * ry * rng.standard_normal()
                rx, ry = rx * (1 + jitter * rng.standard_normal()), ry * (1 + jitter * rng.standard_normal())
                rx, ry = max(rx, 2.0), max(ry, 2.0)
            else:
                cx, cy, rx, ry = _random_shape(rng)
                cat = int(rng.integers(1, 81))
            rle = _rle(_polygon(rng, cx, cy, rx, ry))
            dets.append({"image_id": image_id, "category_id": cat, "segmentation": rle,
                         "bbox": mask_util.toBbox(rle).tolist(), "score": float(rng.random())})  # fmt: skip
    categories = [{"id": i, "name": f"class{i}"} for i in range(1, 81)]
    return {"images": images, "annotations": anns, "categories": categories}, dets


def plain_pycocotools(gt: dict, dets: list[dict]) -> np.ndarray:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes([{k: v for k, v in d.items() if k != "bbox"} for d in dets])
        ev = COCOeval(coco_gt, coco_dt, "segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return np.asarray(ev.stats[:12], dtype=float)


def native_boundary(gt: dict, dets: list[dict]) -> np.ndarray:
    from faster_coco_eval import COCO, COCOeval_faster

    def quiet(*_: object, **__: object) -> None:
        return None

    coco_gt = COCO(gt, print_function=quiet)
    coco_dt = coco_gt.loadRes([{k: v for k, v in d.items() if k != "bbox"} for d in dets])
    ev = COCOeval_faster(coco_gt, coco_dt, "boundary", print_function=quiet)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return np.asarray(ev.stats[:12], dtype=float)


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="500 images instead of 5,000")
    parser.add_argument("--images", type=int, help="number of images (overrides --quick)")
    parser.add_argument("--dets", type=int, default=100, help="detections per image (default 100)")
    parser.add_argument(
        "--check-boundary",
        action="store_true",
        help="also time faster-coco-eval's own boundary mode (every band at full size) and compare numbers",
    )
    args = parser.parse_args()
    num_images = args.images or (500 if args.quick else 5000)

    (gt, dets), t_make = timed(make_case, num_images, args.dets)
    print(f"case: {num_images} images, {len(gt['annotations'])} ground truth, {len(dets)} detections "
          f"(built in {t_make:.1f} s)")  # fmt: skip
    ours_segm, t_segm = timed(evaluate_coco, gt, dets, "segm", evaluator="faster")
    ours_boundary, t_boundary = timed(evaluate_coco, gt, dets, "boundary", evaluator="faster")
    ref, t_ref = timed(plain_pycocotools, gt, dets)

    ours = np.array(list(ours_segm.stats.values()))
    diff = float(np.abs(ours - ref).max())
    print(f"pycocotools segm      {t_ref:8.1f} s   AP {ref[0]:.4f}")
    print(
        f"ours segm (faster)    {t_segm:8.1f} s   AP {ours[0]:.4f}   speed-up {t_ref / t_segm:.2f}x (target >= 3x)"
    )
    print(f"ours boundary         {t_boundary:8.1f} s   AP {ours_boundary.stats['AP']:.4f}   "
          f"{t_boundary / t_segm:.2f}x the segm time (target < 2x)")  # fmt: skip
    print(f"max |ours - pycocotools| over the 12 segm stats: {diff:.2e} (must be <= 1e-4)")
    if args.check_boundary:
        native, t_native = timed(native_boundary, gt, dets)
        ours_b = np.array(list(ours_boundary.stats.values()))
        print(f"faster-coco-eval boundary mode {t_native:8.1f} s   AP {native[0]:.4f}   "
              f"max |ours - it| {np.abs(ours_b - native).max():.2e}")  # fmt: skip
    if diff > 1e-4:
        raise SystemExit("FAIL: our segm metrics differ from pycocotools")


if __name__ == "__main__":
    main()
