"""Inference cost of ATMask vs the Mask R-CNN baseline: latency per image (batch 1) and throughput (batch 8).

Runs ``baseline``, ``atmask`` and ``atmask_2paste`` (ATMask with P and T pasted separately and B computed
over the pasted maps: the postprocess before issue 18, which ``predict_with_maps`` still runs) in one
process, interleaved (each iteration runs every variant, in a rotating order), on the same images, and
splits each forward into the stages of torchvision's ``GeneralizedRCNN.forward``:

  transform    normalise, resize, batch (``model.transform``)
  backbone     ResNet + FPN
  rpn          proposals
  box head     box branch + detection post-processing (NMS)
  mask head    mask RoIAlign + mask head (baseline: 4 convs + deconv; ATMask: both paths + fusions)
  postprocess  boxes back to the input size and masks pasted into the image (B = sigmoid(k (P - T)))

"heads" in the summary is rpn + box head + mask head. Every model keeps ``--detections`` detections per
image (``box_detections_per_img`` = D; D = 100 is COCO evaluation's cap, the worst case for the mask head
and pasting). Random weights give no meaningful scores, so the box classifier's bias is set to make one
class score ~1 on every proposal: as with a trained model, few class-boxes pass the 0.05 score threshold
into NMS (with a threshold of 0, NMS over 1000 proposals x 80 classes would dominate both models' time).

    python bench/bench_inference.py                       # R50-FPN, 800x1333, batch 1 and 8 (CUDA if present)
    python bench/bench_inference.py --batches 1 --iters 5 # latency only
    python bench/bench_inference.py --quick               # CPU smoke: resnet18, 320x320, seconds
    python bench/bench_inference.py --json out.json       # also write the numbers as JSON

Random initialisation (no weight files), BatchNorm in eval mode, fp32 unless ``--amp bf16`` (CUDA).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_step import QUICK, r50_paper_sizes

from model import ModelConfig, build_model
from model.data import to_float_image
from model.roi_heads import ATMaskRoIHeads

VARIANTS = ("baseline", "atmask", "atmask_2paste")
STAGES = ("transform", "backbone", "rpn", "box head", "mask head", "postprocess")
NUM_CLASSES = 81  # COCO's 80 categories + background


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class MaskHeadClock:
    """Wall time of the mask branch inside ``roi_heads`` (forward hooks, synchronised on CUDA)."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.device, self.seconds, self._start = device, 0.0, 0.0
        heads = model.roi_heads
        first, last = (
            (heads.atmask_head, heads.atmask_head)
            if isinstance(heads, ATMaskRoIHeads)
            else (heads.mask_roi_pool, heads.mask_predictor)
        )
        first.register_forward_pre_hook(self._begin)
        last.register_forward_hook(self._end)

    def _begin(self, *_: object) -> None:
        sync(self.device)
        self._start = time.perf_counter()

    def _end(self, *_: object) -> None:
        sync(self.device)
        self.seconds += time.perf_counter() - self._start


def build(variant: str, sizes: dict, detections: int, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    ablation = "baseline" if variant == "baseline" else "atmask"
    cfg = ModelConfig.for_ablation(
        ablation, num_classes=NUM_CLASSES, norm="bn", box_detections_per_img=detections, **sizes
    )
    model = build_model(cfg)
    with torch.no_grad():  # class 1 wins every proposal (score ~1), the others stay below 0.05
        model.roi_heads.box_predictor.cls_score.bias.zero_()[1] = 10.0
    model = model.to(device).eval()
    if variant == "atmask_2paste":
        model.transform.return_maps = True  # the two-paste postprocess (and the maps it returns)
    return model


@torch.inference_mode()
def timed_forward(model: torch.nn.Module, images: list[torch.Tensor], clock: MaskHeadClock, amp) -> dict:
    """The steps of ``GeneralizedRCNN.forward`` in eval mode, each timed; returns seconds per stage."""
    device = images[0].device
    sizes = [tuple(im.shape[-2:]) for im in images]
    times: dict[str, float] = {}
    clock.seconds = 0.0
    sync(device)
    t = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal t
        sync(device)
        now = time.perf_counter()
        times[stage] = now - t
        t = now

    with amp():
        batch, _ = model.transform(images)
        lap("transform")
        features = model.backbone(batch.tensors)
        lap("backbone")
        proposals, _ = model.rpn(batch, features)
        lap("rpn")
        detections, _ = model.roi_heads(features, proposals, batch.image_sizes)
        lap("box head")
        out = model.transform.postprocess(detections, batch.image_sizes, sizes)
        lap("postprocess")
    times["mask head"] = clock.seconds
    times["box head"] -= clock.seconds
    times["detections"] = sum(len(o["boxes"]) for o in out) / len(out)
    return times


def measure(args: argparse.Namespace, device: torch.device, sizes: dict, batch: int) -> dict:
    """Median seconds per stage and in total, per variant, for one batch size."""
    gen = torch.Generator().manual_seed(batch)
    height, width = args.size
    images = [
        to_float_image(torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=gen).to(device))
        for _ in range(batch)
    ]
    models = {v: build(v, sizes, args.detections, device) for v in args.variants}
    clocks = {v: MaskHeadClock(m, device) for v, m in models.items()}
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)

    def amp():
        return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()

    runs: dict[str, list[dict]] = {v: [] for v in args.variants}
    order = list(args.variants)
    for i in range(args.warmup + args.iters):
        for v in order:
            times = timed_forward(models[v], images, clocks[v], amp)
            if i >= args.warmup:
                runs[v].append(times)
        order = order[1:] + order[:1]  # rotate: no variant always runs first (cache, clocks)
    del models
    result = {}
    for v, rows in runs.items():
        stages = {s: statistics.median(r[s] for r in rows) for s in STAGES}
        total = statistics.median(sum(r[s] for s in STAGES) for r in rows)
        result[v] = {
            "stages_s": stages,
            "total_s": total,
            "heads_s": stages["rpn"] + stages["box head"] + stages["mask head"],
            "img_s": batch / total,
            "latency_s_per_img": total / batch,
            "postprocess_share": stages["postprocess"] / total,
            "detections_per_img": statistics.mean(r["detections"] for r in rows),
        }
    return result


def report(results: dict[int, dict], args: argparse.Namespace, device: torch.device, label: str) -> None:
    print(f"{label}, input {args.size[0]}x{args.size[1]}, {args.detections} detections/img, {device}, "
          f"{args.amp}, {args.iters} timed iterations (median), {torch.get_num_threads()} CPU threads")  # fmt: skip
    for batch, res in results.items():
        print(f"\nbatch {batch}: seconds per batch (median)")
        print(
            f"{'variant':<15}"
            + "".join(f"{s:>12}" for s in STAGES)
            + f"{'total':>10}{'img/s':>8}{'post %':>8}"
        )
        for v, r in res.items():
            cells = "".join(f"{r['stages_s'][s]:>12.4f}" for s in STAGES)
            print(
                f"{v:<15}{cells}{r['total_s']:>10.4f}{r['img_s']:>8.2f}{100 * r['postprocess_share']:>7.1f}%"
            )
        if "baseline" in res:
            base = res["baseline"]
            for v in (v for v in res if v != "baseline"):
                r = res[v]
                print(
                    f"ratio {v}/baseline: total {r['total_s'] / base['total_s']:.3f}, "
                    f"backbone {r['stages_s']['backbone'] / base['stages_s']['backbone']:.3f}, "
                    f"heads {r['heads_s'] / base['heads_s']:.3f}, "
                    f"postprocess {r['stages_s']['postprocess'] / base['stages_s']['postprocess']:.3f}"
                )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="resnet18 at 320x320, 20 detections (CPU smoke)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="input size (default 800 1333)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="batch sizes (default 1 8)")
    parser.add_argument("--detections", type=int, help="detections per image (default 100, quick 20)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--iters", type=int, help="timed iterations (default 10 on CUDA, 3 on CPU)")
    parser.add_argument("--warmup", type=int, help="untimed iterations first (default 3 on CUDA, 1 on CPU)")
    parser.add_argument("--amp", choices=("off", "bf16", "fp16"), default="off", help="autocast (CUDA)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    sizes = dict(QUICK) if args.quick else r50_paper_sizes()
    args.size = args.size or ((320, 320) if args.quick else (800, 1333))
    args.detections = args.detections or (20 if args.quick else 100)
    args.iters = args.iters or (10 if cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    results = {b: measure(args, device, sizes, b) for b in args.batches}
    label = "resnet18 quick" if args.quick else "R50-FPN"
    report(results, args, device, label)
    payload = {
        "model": label,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "size": list(args.size),
        "detections": args.detections,
        "amp": args.amp,
        "iters": args.iters,
        "batches": {str(b): r for b, r in results.items()},
    }
    if args.json:
        args.json.write_text(json.dumps(payload, indent=2), encoding="utf-8")
    return payload


if __name__ == "__main__":
    main()
