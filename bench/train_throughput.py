"""Training throughput of ``atmask`` vs the Mask R-CNN ``baseline``, measured side by side in one run.

Runs the real training step of ``atmask train`` (components.train_loop.step: autocast, loss, finite check,
backward, SGD, scheduler) through a real DataLoader, alternating the two models in rounds so both see the
same machine state, and prints per ablation: images/s, seconds/step, peak GPU memory and the data
loader's share of step time (time spent waiting for the next batch); then the step-time ratio
atmask/baseline and, on CUDA, the issue's targets (atmask >= 40 img/s, <= 10% slower than baseline).

    python bench/train_throughput.py                    # R50-FPN, 800x1333, batch 3/GPU, bf16 on CUDA
    python bench/train_throughput.py --data ../shared/datasets/pennfudan-coco   # real images instead
    python bench/train_throughput.py --quick            # CPU: resnet18, 128 px, minutes on a laptop

Random initialisation (no weight files needed). Synthetic data: random images with 4 rectangular
instances each, generated in the loader's workers (like decoding, it costs CPU time, not GPU time).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from components import distributed as dist_utils
from components.params import load_params
from components.train_loop import LoopSettings, build_loop, step
from components.train_recipe import amp_dtype, make_loader, to_device
from model.data import CocoInstances, DetectionLoader

ABLATIONS = ("baseline", "atmask")
REPO = Path(__file__).resolve().parents[1]
QUICK_MODEL = dict(
    backbone="resnet18",
    fpn_channels=64,
    mask_head_channels=64,
    box_head_dim=256,
    min_size=128,
    max_size=128,
    anchor_sizes=(8, 16, 32, 64, 128),
    rpn_post_nms_top_n_train=300,
    box_batch_size_per_image=128,
)


class RandomInstances(torch.utils.data.Dataset):
    """Endless random images (``height`` x ``width``) with 4 rectangular instances each."""

    def __init__(self, height: int, width: int, num_classes: int) -> None:
        self.height, self.width, self.num_classes = height, width, num_classes

    def __len__(self) -> int:
        return 1 << 30

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        gen = torch.Generator().manual_seed(index)
        h, w = self.height, self.width
        image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen)  # as the real loader's
        xy = torch.rand(4, 2, generator=gen) * torch.tensor([w * 0.7, h * 0.7])
        wh = (0.1 + 0.2 * torch.rand(4, 2, generator=gen)) * torch.tensor([w, h])
        boxes = torch.cat([xy, xy + wh], 1).round()
        masks = torch.zeros(4, h, w, dtype=torch.uint8)
        for i, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
            masks[i, y0:y1, x0:x1] = 1
        labels = torch.randint(1, self.num_classes, (4,), generator=gen)
        return image, {"boxes": boxes, "labels": labels, "masks": masks, "image_id": index}


def loader_for(args: argparse.Namespace, cfg, tp, info) -> tuple[torch.utils.data.DataLoader, int]:
    if args.data is not None:
        images = args.data / "images" / "train"
        images = images if images.is_dir() else args.data / "train"  # ingested layout, or Penn-Fudan's
        ann = args.data / "annotations" / "instances_train.json"
        dataset = CocoInstances(images, ann, remove_empty=True)
        return make_loader(dataset, tp, info, 0), dataset.categories.num_classes
    data = RandomInstances(cfg.min_size, cfg.max_size, num_classes=3)
    sampler = torch.utils.data.BatchSampler(itertools.count(), tp.batch_size, drop_last=True)
    loader = DetectionLoader(
        data,
        batch_sampler=sampler,
        num_workers=tp.workers,
        pin_memory=info.device.type == "cuda",
        persistent_workers=tp.workers > 0,
    )
    return loader, 3


def settings(args: argparse.Namespace):
    params = load_params(REPO / "params.yaml", {"train.recipe": "r50_fpn_coco"})
    tp = dataclasses.replace(
        params.train,
        batch_size=args.batch,
        base_batch_size=args.batch,
        workers=args.workers,
        amp="bf16" if not args.fp32 else "off",
        warmup_iters=0,
        lr=0.002,  # random init: keep the run finite, the step cost does not depend on the lr
    )
    overrides = dict(QUICK_MODEL) if args.quick else {}
    if args.size:
        overrides.update(min_size=args.size[0], max_size=args.size[1])
    return params, tp, overrides


class Runner:
    """One ablation's model, optimiser and loader; ``run(n)`` times n steps."""

    def __init__(self, ablation: str, args, params, tp, overrides, info) -> None:
        cfg = params.model_config(ablation, num_classes=3)
        cfg = dataclasses.replace(cfg, backbone_weights=None, weights=None, frozen=(), **overrides)
        loader, num_classes = loader_for(args, cfg, tp, info)
        cfg = dataclasses.replace(cfg, num_classes=num_classes)
        self.cfg = cfg
        torch.manual_seed(0)
        dtype = amp_dtype(tp.amp, info.device)
        self.loop = build_loop(cfg, tp, info, dtype, params.source)
        self.batches = iter(loader)
        self.info, self.settings = info, LoopSettings(tp, info, Path("."), dtype)
        self.step_seconds: list[float] = []
        self.data_seconds = 0.0
        self.peak_bytes = 0

    def run(self, steps: int, record: bool) -> None:
        cuda = self.info.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        for _ in range(steps):
            t0 = time.perf_counter()
            images, targets = next(self.batches)
            images, targets = to_device(images, targets, self.info.device)
            t1 = time.perf_counter()
            step(self.loop, images, targets, self.settings)  # syncs once (finite check)
            self.loop.iteration += 1
            if cuda:
                torch.cuda.synchronize()
            if record:
                self.step_seconds.append(time.perf_counter() - t0)
                self.data_seconds += t1 - t0
        if cuda:
            self.peak_bytes = max(self.peak_bytes, torch.cuda.max_memory_allocated())

    def summary(self) -> dict[str, float]:
        total = sum(self.step_seconds)
        return {
            "img_s": len(self.step_seconds) * self.settings.recipe.batch_size / total,
            "step_s": statistics.median(self.step_seconds),
            "data_share": self.data_seconds / total,
            "peak_gib": self.peak_bytes / 2**30,
        }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="resnet18 at 128 px (CPU-sized)")
    parser.add_argument(
        "--data", type=Path, default=None, help="COCO layout (e.g. Penn-Fudan); default random"
    )
    parser.add_argument("--size", type=int, nargs=2, metavar=("MIN", "MAX"), help="override min/max size")
    parser.add_argument("--batch", type=int, default=3, help="images per step (paper: 12 on 4 GPUs = 3)")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per round (default 20, quick 4)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5, quick 1)")
    parser.add_argument("--fp32", action="store_true", help="no autocast on CUDA")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    steps = args.steps or (4 if args.quick else 20)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5)

    info = dist_utils.init_distributed(args.device)
    if info.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    params, tp, overrides = settings(args)
    runners = {a: Runner(a, args, params, tp, overrides, info) for a in ABLATIONS}
    for runner in runners.values():
        runner.run(warmup, record=False)
    for _ in range(args.rounds):
        for runner in runners.values():
            runner.run(steps, record=True)
    report(runners, info, tp, args)


def report(runners: dict[str, Runner], info, tp, args) -> None:
    cfg = runners["atmask"].cfg
    size = f"{cfg.min_size}x{cfg.max_size}"
    name = torch.cuda.get_device_name(info.device) if info.device.type == "cuda" else "CPU"
    dtype = str(amp_dtype(tp.amp, info.device) or "fp32").replace("torch.", "")
    print(
        f"device {name}, {torch.get_num_threads()} CPU threads; batch {tp.batch_size}; size {size}; {dtype}"
    )
    print(f"{'ablation':10} {'img/s':>8} {'s/step':>8} {'data share':>11} {'peak GPU GiB':>13}")
    rows = {a: r.summary() for a, r in runners.items()}
    for ablation, row in rows.items():
        peak = f"{row['peak_gib']:.2f}" if info.device.type == "cuda" else "n/a"
        print(
            f"{ablation:10} {row['img_s']:8.2f} {row['step_s']:8.3f} {100 * row['data_share']:10.1f}% {peak:>13}"
        )
    ratio = rows["atmask"]["step_s"] / rows["baseline"]["step_s"]
    print(f"step-time ratio atmask/baseline: {ratio:.3f}")
    if args.json:
        payload = {"device": name, "batch": tp.batch_size, "size": size, "amp": dtype, "workers": tp.workers,
                   "data": str(args.data or "random"), "ablations": rows, "step_ratio": ratio}  # fmt: skip
        args.json.write_text(json.dumps(payload, indent=2), encoding="utf-8")
    if info.device.type == "cuda" and not args.quick:
        ok_speed = rows["atmask"]["img_s"] >= 40
        print(f"target atmask >= 40 img/s: {'met' if ok_speed else 'NOT met'}")
        print(f"target atmask <= 10% slower than baseline: {'met' if ratio <= 1.10 else 'NOT met'}")


if __name__ == "__main__":
    main()
