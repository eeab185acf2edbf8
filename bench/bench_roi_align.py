"""``model.roi_align``: torchvision's RoIAlign vs the separable one (model/roi_align.py), side by side.

1. The op at the CPU demo's pool shapes (P2 32x32, 64 channels, batch 4): forward and backward times.
2. One training step's forward + backward of ``baseline`` and ``atmask`` on the ``cpu_demo`` model,
   the same weights and batch under both implementations, interleaved: step times, the speed-up, and the
   largest difference in losses and gradients (float32 rounding only).

    python bench/bench_roi_align.py              # a few minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial
from pathlib import Path

import torch
from model_step import make_batch
from torchvision.ops import roi_align

from components.params import load_params
from model import ModelConfig, build_model
from model.roi_align import separable_roi_align

REPO = Path(__file__).resolve().parents[1]
OPS = {"torchvision": roi_align, "separable": separable_roi_align}
POOLS = {"Rt 28x28 from P2": (45, 28), "mask Rp 14x14": (45, 14), "box 7x7": (256, 7)}  # (RoIs, output)


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def random_rois(count: int, images: int, size: int, gen: torch.Generator) -> torch.Tensor:
    index = torch.randint(0, images, (count,), generator=gen).float()
    xy = torch.rand(count, 2, generator=gen) * size * 0.8
    wh = 4 + torch.rand(count, 2, generator=gen) * size * 0.4
    return torch.cat([index[:, None], xy, xy + wh], dim=1)


def bench_ops(repeats: int) -> None:
    gen = torch.Generator().manual_seed(0)
    print(f"{'pool':<18}{'implementation':<14}{'forward ms':>12}{'backward ms':>13}")
    for name, (count, out) in POOLS.items():
        feature = torch.randn(4, 64, 32, 32, generator=gen, requires_grad=True)
        rois = random_rois(count, 4, 128, gen)
        for impl, op in OPS.items():
            forward = median_ms(partial(op, feature, rois, out, 0.25, 2), repeats)
            pooled = op(feature, rois, out, 0.25, 2)
            grad = partial(torch.autograd.grad, pooled, feature, torch.ones_like(pooled), retain_graph=True)
            backward = median_ms(grad, repeats)
            print(f"{name:<18}{impl:<14}{forward:>12.2f}{backward:>13.2f}")


def demo_sizes() -> dict:
    model = dict(load_params(REPO / "params.yaml").recipes["cpu_demo"].model)
    model["anchor_sizes"] = tuple(model["anchor_sizes"])
    return model


def train_step(model, images, targets) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    losses = model(images, targets)
    total = sum(losses.values())
    total.backward()
    elapsed = time.perf_counter() - start
    return elapsed, {
        "loss": total.detach(),
        **{n: p.grad for n, p in model.named_parameters() if p.grad is not None},
    }


def bench_steps(ablation: str, steps: int) -> None:
    sizes = demo_sizes()
    images, targets = make_batch(4, sizes["min_size"], sizes["max_size"], 4, torch.device("cpu"))
    models = {}
    for impl in OPS:
        torch.manual_seed(0)
        cfg = ModelConfig.for_ablation(ablation, num_classes=4, norm="bn", **{**sizes, "roi_align": impl})
        models[impl] = build_model(cfg).train()
    models["separable"].load_state_dict(models["torchvision"].state_dict())
    times: dict[str, list[float]] = {impl: [] for impl in OPS}
    worst = 0.0
    for i in range(steps + 1):
        results = {}
        for impl, model in models.items():
            torch.manual_seed(i)  # the same RPN/RoI sampling in both
            elapsed, results[impl] = train_step(model, images, targets)
            if i:  # the first step warms up
                times[impl].append(elapsed)
        for key, value in results["torchvision"].items():
            scale = max(value.abs().max().item(), 1e-6)
            worst = max(worst, (value - results["separable"][key]).abs().max().item() / scale)
    med = {impl: statistics.median(ts) for impl, ts in times.items()}
    print(
        f"{ablation:<10} torchvision {med['torchvision']:.3f} s  separable {med['separable']:.3f} s  "
        f"speed-up x{med['torchvision'] / med['separable']:.2f}  "
        f"largest relative difference in loss/gradients {worst:.1e}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=9, help="op timings: median of this many")
    parser.add_argument("--steps", type=int, default=6, help="training steps per model (after one warm-up)")
    args = parser.parse_args()
    print(f"{torch.get_num_threads()} threads; cpu_demo pool shapes (P2 32x32, 64 channels, 4 images)")
    bench_ops(args.repeats)
    print(f"training step, cpu_demo model, batch 4 at 128x128, median of {args.steps}:")
    for ablation in ("baseline", "atmask"):
        bench_steps(ablation, args.steps)


if __name__ == "__main__":
    main()
