"""Data loader throughput: images/s delivered with 0, 1 and 2 workers on Penn-Fudan, for 800x1333 training.

Iterates the loader training uses (``components.train_recipe.make_loader``: batch 2, aspect-ratio groups,
per-sample augmentation seeds, persistent workers) over Penn-Fudan's train split for ``--passes`` passes.
Workers decode the image and the masks and flip: samples cross the process boundary as uint8 at the file's
size, each batch packed into one shared-memory buffer (``model/packing.py``). The same loader with torch's
per-tensor transport (one shared-memory segment per tensor: the loader before packing) runs beside it,
interleaved, for the ratio. The resize to 800x1333 (shortest side 800, longest <= 1333) and the float
conversion happen once, on the training device, after the copy: ``to_device`` then the model's
``GeneralizedRCNNTransform``. That device-side cost is measured here too (on the CPU, where it is largest;
on a GPU it is a few kernels per image), next to where a sample's time goes in the workers and how many
bytes each sample moves between processes.

    python bench/bench_loader.py               # 3 passes over the 100 training images per setting
    python bench/bench_loader.py --quick       # 20 images, 2 passes
    python bench/bench_loader.py --workers 0 2 # other worker counts
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torchvision.models.detection.transform import GeneralizedRCNNTransform

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from components.distributed import DistInfo  # noqa: E402
from components.params import TrainParams  # noqa: E402
from components.train_recipe import make_loader, to_device  # noqa: E402
from model.builder import IMAGE_MEAN, IMAGE_STD  # noqa: E402
from model.data import CocoInstances, collate, train_transforms  # noqa: E402

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


def training_loader(ds: CocoInstances, workers: int, batch_size: int, packed: bool):
    tp = TrainParams(batch_size=batch_size, base_batch_size=batch_size, workers=workers, seed=0)
    packed_loader = make_loader(ds, tp, DistInfo(), 0)
    if packed or workers == 0:
        return packed_loader
    return torch.utils.data.DataLoader(  # the same batches, each tensor in its own shared-memory segment
        packed_loader.dataset,
        batch_sampler=packed_loader.batch_sampler,
        num_workers=workers,
        collate_fn=collate,
        persistent_workers=True,
        generator=packed_loader.generator,
    )


def run_loader(ds: CocoInstances, workers: int, batch_size: int, images: int, packed: bool) -> dict:
    """``images`` images through a fresh loader: overall img/s (worker start included) and steady img/s
    (from the first batch on)."""
    batches = iter(training_loader(ds, workers, batch_size, packed))
    t0 = time.perf_counter()
    seen = moved = 0
    first = None
    while seen < images:
        batch_images, targets = next(batches)
        seen += len(batch_images)
        moved += sum(sample_bytes(im, t) for im, t in zip(batch_images, targets, strict=True))
        first = first or (time.perf_counter(), seen)
    end = time.perf_counter()
    del batches  # ends the workers
    return {
        "ips": seen / (end - t0),
        "steady_ips": (seen - first[1]) / (end - first[0]),
        "mb_per_img": moved / seen / 2**20,
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
    parser.add_argument("--quick", action="store_true", help="20 images, 2 passes")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="Penn-Fudan in COCO layout")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--passes", type=int, default=3, help="passes over the images per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats; medians are printed")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the main process")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ds = dataset(args.data, 20 if args.quick else None)
    images = len(ds) * (2 if args.quick else args.passes)
    print(
        f"Penn-Fudan train: {len(ds)} images, {images} per measurement, batch {args.batch_size}, torch "
        f"threads {args.threads}, load average {os.getloadavg()[0]:.2f}; workers decode + flip (uint8), the "
        f"device resizes to {MIN_SIZE}x{MAX_SIZE}"
    )
    settings = [(w, p) for w in args.workers for p in ((True,) if w == 0 else (True, False))]
    runs: dict[tuple[int, bool], list[dict]] = {k: [] for k in settings}
    for _ in range(args.repeats):
        for workers, packed in settings:
            runs[(workers, packed)].append(run_loader(ds, workers, args.batch_size, images, packed))
    med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in runs.items()}
    print(f"{'workers':>8} {'transport':<11}{'img/s':>8}{'steady img/s':>14}{'MB/img moved':>14}")
    for (workers, packed), r in med.items():
        name = "in-process" if workers == 0 else ("packed" if packed else "per-tensor")
        print(f"{workers:>8} {name:<11}{r['ips']:>8.1f}{r['steady_ips']:>14.1f}{r['mb_per_img']:>14.2f}")
    base = med.get((0, True))
    for workers in (w for w in args.workers if w):
        packed, per_tensor = med[(workers, True)], med[(workers, False)]
        vs_w0 = f"{packed['ips'] / base['ips']:.2f}x workers=0, " if base else ""
        print(
            f"workers={workers} packed: {vs_w0}{packed['ips'] / per_tensor['ips']:.2f}x per-tensor "
            f"(steady {packed['steady_ips'] / per_tensor['steady_ips']:.2f}x)"
        )
    parts = breakdown(ds, min(len(ds), 20))
    print("per sample: " + ", ".join(f"{k} {v:.1f} ms" for k, v in parts.items()))
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
