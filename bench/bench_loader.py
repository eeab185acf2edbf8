"""Data loader throughput: images/s delivered per worker on Penn-Fudan at training resolution.

Builds ``CocoInstances`` over Penn-Fudan's train split with the training transforms (horizontal flip +
resize shortest side 800, longest <= 1333, as in the paper's Mask R-CNN setup) and iterates the
``make_loader`` DataLoader (batch 2, aspect-ratio grouping) with 0 workers (everything in the main
process) and 1 worker. Prints images/s overall and in steady state (after the first batch, i.e. without
worker start-up), and, for the in-process case, where a sample's time goes.

    python bench/bench_loader.py               # one pass over the 100 training images per setting
    python bench/bench_loader.py --quick       # 20 images
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model.data import CocoInstances, make_loader, train_transforms  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "pennfudan-coco"


def dataset(root: Path, limit: int | None) -> CocoInstances:
    ds = CocoInstances(
        root / "train", root / "annotations" / "instances_train.json", transforms=train_transforms(800, 1333)
    )
    if limit:
        ds.ids = ds.ids[:limit]
    return ds


def run_loader(ds: CocoInstances, workers: int, batch_size: int) -> dict[str, float]:
    loader = make_loader(ds, batch_size=batch_size, shuffle=True, workers=workers, seed=0)
    t0 = time.perf_counter()
    first = None
    images = 0
    pixels = 0
    for batch_images, _targets in loader:
        images += len(batch_images)
        pixels += sum(im.shape[-1] * im.shape[-2] for im in batch_images)
        if first is None:
            first = (time.perf_counter(), images)
    end = time.perf_counter()
    steady = (images - first[1]) / (end - first[0]) if images > first[1] else float("nan")
    return {
        "images": images,
        "total_s": end - t0,
        "ips": images / (end - t0),
        "steady_ips": steady,
        "mpix": pixels / images / 1e6,
    }


def breakdown(ds: CocoInstances, n: int) -> dict[str, float]:
    """Per-sample milliseconds of image decode, mask decode and transforms, in this process."""
    parts = {"image decode": 0.0, "mask decode": 0.0, "flip + resize": 0.0}
    gen = torch.Generator().manual_seed(0)
    for index in range(n):
        image_id = ds.ids[index]
        t0 = time.perf_counter()
        image = ds.load_image(image_id)
        t1 = time.perf_counter()
        target = ds.load_target(image_id)
        t2 = time.perf_counter()
        ds.transforms(image, target, gen)
        t3 = time.perf_counter()
        parts["image decode"] += t1 - t0
        parts["mask decode"] += t2 - t1
        parts["flip + resize"] += t3 - t2
    return {k: 1000 * v / n for k, v in parts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="20 images instead of the 100 train images")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="Penn-Fudan in COCO layout")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the main process")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ds = dataset(args.data, 20 if args.quick else None)
    print(
        f"Penn-Fudan train: {len(ds)} images, train transforms (hflip, min 800 / max 1333), "
        f"batch {args.batch_size}, torch threads {args.threads}"
    )
    print(
        f"{'workers':>8}{'images':>8}{'total s':>9}{'img/s':>8}{'img/s/worker':>14}{'steady img/s':>14}{'MPix/img':>10}"
    )
    for workers in (0, 1):
        r = run_loader(ds, workers, args.batch_size)
        per_worker = r["ips"] / max(1, workers)
        print(
            f"{workers:>8}{r['images']:>8}{r['total_s']:>9.2f}{r['ips']:>8.2f}{per_worker:>14.2f}"
            f"{r['steady_ips']:>14.2f}{r['mpix']:>10.2f}"
        )
    parts = breakdown(ds, min(len(ds), 20))
    print("per sample, in process: " + ", ".join(f"{k} {v:.1f} ms" for k, v in parts.items()))


if __name__ == "__main__":
    main()
