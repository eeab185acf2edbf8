"""Data loader throughput: images/s delivered with 0, 1 and 2 workers on Penn-Fudan, for 800x1333 training.

Builds ``CocoInstances`` over Penn-Fudan's train split with the training transforms and iterates the
``make_loader`` DataLoader (batch 2, aspect-ratio grouping). Workers decode the image and the masks and
flip: samples cross the process boundary as uint8 at the file's size. The resize to 800x1333 (shortest
side 800, longest <= 1333) and the float conversion happen once, on the training device, after the copy:
``to_device`` then the model's ``GeneralizedRCNNTransform``. That device-side cost is measured here too
(on the CPU, where it is largest; on a GPU it is a few kernels per image), next to where a sample's time
goes in the workers and how many bytes each sample moves between processes.

    python bench/bench_loader.py               # one pass over the 100 training images per setting
    python bench/bench_loader.py --quick       # 20 images
    python bench/bench_loader.py --workers 0 2 # other worker counts
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from torchvision.models.detection.transform import GeneralizedRCNNTransform

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from components.train_recipe import to_device  # noqa: E402
from model.builder import IMAGE_MEAN, IMAGE_STD  # noqa: E402
from model.data import CocoInstances, make_loader, train_transforms  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "pennfudan-coco"
MIN_SIZE, MAX_SIZE = 800, 1333


def dataset(root: Path, limit: int | None) -> CocoInstances:
    ds = CocoInstances(
        root / "train", root / "annotations" / "instances_train.json", transforms=train_transforms()
    )
    if limit:
        ds.ids = ds.ids[:limit]
    return ds


def sample_bytes(image: torch.Tensor, target: dict) -> int:
    return sum(t.numel() * t.element_size() for t in (image, target["masks"], target["boxes"]))


def run_loader(ds: CocoInstances, workers: int, batch_size: int) -> dict[str, float]:
    loader = make_loader(ds, batch_size=batch_size, shuffle=True, workers=workers, seed=0)
    t0 = time.perf_counter()
    first = None
    images = 0
    moved = 0
    for batch_images, targets in loader:
        images += len(batch_images)
        moved += sum(sample_bytes(im, t) for im, t in zip(batch_images, targets, strict=True))
        if first is None:
            first = (time.perf_counter(), images)
    end = time.perf_counter()
    steady = (images - first[1]) / (end - first[0]) if images > first[1] else float("nan")
    return {
        "images": images,
        "total_s": end - t0,
        "ips": images / (end - t0),
        "steady_ips": steady,
        "mb_per_img": moved / images / 2**20,
    }


def breakdown(ds: CocoInstances, n: int) -> dict[str, float]:
    """Per-sample milliseconds: in a worker (decode, masks, flip), then on the device (to_device + the
    model transform's normalise and resize to 800x1333), here on the CPU."""
    parts = {
        "image decode": 0.0,
        "mask decode": 0.0,
        "flip": 0.0,
        "device: to float + normalise + resize": 0.0,
    }
    gen = torch.Generator().manual_seed(0)
    transform = GeneralizedRCNNTransform(MIN_SIZE, MAX_SIZE, list(IMAGE_MEAN), list(IMAGE_STD)).train()
    cpu = torch.device("cpu")
    for index in range(n):
        image_id = ds.ids[index]
        t0 = time.perf_counter()
        image = ds.load_image(image_id)
        t1 = time.perf_counter()
        target = ds.load_target(image_id)
        t2 = time.perf_counter()
        image, target = ds.transforms(image, target, gen)
        t3 = time.perf_counter()
        transform(*to_device([image], [target], cpu))
        t4 = time.perf_counter()
        for key, seconds in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            parts[key] += seconds
    return {k: 1000 * v / n for k, v in parts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="20 images instead of the 100 train images")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="Penn-Fudan in COCO layout")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the main process")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ds = dataset(args.data, 20 if args.quick else None)
    print(
        f"Penn-Fudan train: {len(ds)} images, batch {args.batch_size}, torch threads {args.threads}, "
        f"load average {os.getloadavg()[0]:.2f}; workers decode + flip (uint8), the device resizes to "
        f"{MIN_SIZE}x{MAX_SIZE}"
    )
    print(f"{'workers':>8}{'images':>8}{'total s':>9}{'img/s':>8}{'steady img/s':>14}{'MB/img moved':>14}")
    ips = {}
    for workers in args.workers:
        r = run_loader(ds, workers, args.batch_size)
        ips[workers] = r["ips"]
        print(
            f"{workers:>8}{r['images']:>8}{r['total_s']:>9.2f}{r['ips']:>8.2f}"
            f"{r['steady_ips']:>14.2f}{r['mb_per_img']:>14.2f}"
        )
    if 0 in ips:
        print("speed-up over workers=0: " + ", ".join(f"{w}: {v / ips[0]:.2f}x" for w, v in ips.items() if w))
    parts = breakdown(ds, min(len(ds), 20))
    print("per sample: " + ", ".join(f"{k} {v:.1f} ms" for k, v in parts.items()))
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
