"""Training-step cost of ATMask vs the Mask R-CNN baseline: same backbone, same inputs, one process.

Times forward + backward + SGD step of ``baseline`` and ``atmask`` (interleaved, so both see the same
machine state) and prints per-step times, the atmask/baseline time ratio and the peak memory ratio.

    python bench/model_step.py                       # R50-FPN, 800x1333, batch 2 (GPU: bf16 autocast)
    python bench/model_step.py --quick               # resnet18, 320x320: minutes on a laptop CPU

Peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the peak RSS growth of a child process
that runs the same steps (CPU tensors are not tracked by an allocator API).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import statistics
import time
from pathlib import Path

import torch

from components.params import load_params
from components.train_recipe import amp_dtype
from model import ModelConfig, build_model

ABLATIONS = ("baseline", "atmask")
REPO = Path(__file__).resolve().parents[1]
WEIGHT_KEYS = ("backbone_weights", "weights", "frozen")  # the bench times random-init models


def r50_paper_sizes() -> dict:
    """The model block of params.yaml's ``r50_fpn_coco`` recipe (the paper's R50-FPN setting)."""
    model = load_params(REPO / "params.yaml").recipes["r50_fpn_coco"].model
    return {k: v for k, v in model.items() if k not in WEIGHT_KEYS}


QUICK = dict(
    backbone="resnet18",
    fpn_channels=64,
    mask_head_channels=64,
    box_head_dim=256,
    min_size=320,
    max_size=320,
    anchor_sizes=(16, 32, 64, 128, 256),
    rpn_post_nms_top_n_train=500,
    box_batch_size_per_image=128,
)


def make_batch(batch: int, height: int, width: int, instances: int, device: torch.device, seed: int = 0):
    """Random images with ``instances`` rectangular-ish objects each (boxes, labels, masks)."""
    gen = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(batch):
        images.append(torch.rand(3, height, width, generator=gen).to(device))
        boxes = []
        masks = torch.zeros(instances, height, width, dtype=torch.uint8)
        for i in range(instances):
            w, h = (torch.randint(32, max(33, width // 3), (1,), generator=gen).item() for _ in range(2))
            x0 = torch.randint(0, width - w, (1,), generator=gen).item()
            y0 = torch.randint(0, height - h, (1,), generator=gen).item()
            masks[i, y0 : y0 + h, x0 : x0 + w] = 1
            boxes.append([x0, y0, x0 + w, y0 + h])
        targets.append(
            {
                "boxes": torch.tensor(boxes, dtype=torch.float32, device=device),
                "labels": torch.randint(1, 3, (instances,), generator=gen).to(device),
                "masks": masks.to(device),
            }
        )
    return images, targets


def build(ablation: str, sizes: dict, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig.for_ablation(ablation, num_classes=3, norm="bn", **sizes)
    return build_model(cfg).to(device).train()


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def step(model, optimizer, images, targets, device, dtype) -> None:
    with autocast(device, dtype):
        losses = model(images, targets)
    sum(losses.values()).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _vm_kib(field: str) -> int:
    """A /proc/self/status value in KiB (VmHWM: peak RSS of this process image; ru_maxrss survives exec)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def _cpu_peak_child(ablation, sizes, batch_args, steps, queue) -> None:
    device = torch.device("cpu")
    images, targets = make_batch(*batch_args, device)
    before = _vm_kib("VmHWM")
    model = build(ablation, sizes, device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    for _ in range(steps):
        step(model, opt, images, targets, device, None)
    queue.put((_vm_kib("VmHWM") - before) / 1024)


def cpu_peak_mib(ablation, sizes, batch_args, steps) -> float:
    ctx = mp.get_context("spawn")  # fork after OpenMP use can deadlock
    queue = ctx.Queue()
    proc = ctx.Process(target=_cpu_peak_child, args=(ablation, sizes, batch_args, steps, queue))
    proc.start()
    value = queue.get()
    proc.join()
    return value


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="resnet18 at 320x320 (CPU-friendly)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--instances", type=int, default=8, help="objects per image")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--amp", choices=("auto", "bf16", "fp16", "off"), default="auto", help="CUDA only, as in training"
    )
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = amp_dtype(args.amp, device)  # as training: bf16 where supported, else fp16; off on CPU
    amp = str(dtype).removeprefix("torch.") if dtype else "fp32"
    sizes = QUICK if args.quick else r50_paper_sizes()
    height, width = (sizes["min_size"], sizes["max_size"])
    batch_args = (args.batch, height, width, args.instances)
    images, targets = make_batch(*batch_args, device)

    models = {name: build(name, sizes, device) for name in ABLATIONS}
    optims = {n: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for n, m in models.items()}
    times: dict[str, list[float]] = {name: [] for name in ABLATIONS}
    for i in range(args.warmup + args.steps):
        for name in ABLATIONS:  # interleaved: both models see the same thermal / load conditions
            sync(device)
            start = time.perf_counter()
            step(models[name], optims[name], images, targets, device, dtype)
            sync(device)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)

    peaks = {}
    for name in ABLATIONS:
        if device.type == "cuda":
            del optims[name]
            models[name] = None
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            model = build(name, sizes, device)
            opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
            for _ in range(2):
                step(model, opt, images, targets, device, dtype)
            peaks[name] = torch.cuda.max_memory_allocated() / 2**20
            del model, opt
        else:
            peaks[name] = cpu_peak_mib(name, sizes, batch_args, 2)

    med = {name: statistics.median(ts) for name, ts in times.items()}
    label = "resnet18 quick" if args.quick else "R50-FPN"
    print(f"{label}, {height}x{width}, batch {args.batch}, {device} ({amp}), {args.steps} timed steps")
    print(f"{'model':<10}{'step s (median)':>17}{'img/s':>10}{'peak MiB':>11}")
    for name in ABLATIONS:
        print(f"{name:<10}{med[name]:>17.4f}{args.batch / med[name]:>10.2f}{peaks[name]:>11.0f}")
    print(f"time ratio atmask/baseline:   {med['atmask'] / med['baseline']:.3f}")
    print(f"memory ratio atmask/baseline: {peaks['atmask'] / peaks['baseline']:.3f}")
    if args.json:
        rows = {n: {"step_s": med[n], "img_s": args.batch / med[n], "peak_mib": peaks[n]} for n in ABLATIONS}
        payload = {
            "model": label, "size": [height, width], "batch": args.batch, "device": str(device), "amp": amp,
            "steps": args.steps, "ablations": rows,
            "time_ratio": med["atmask"] / med["baseline"], "memory_ratio": peaks["atmask"] / peaks["baseline"],
        }  # fmt: skip
        args.json.write_text(json.dumps(payload, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
