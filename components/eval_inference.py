"""Inference for ``atmask evaluate``: the split's images in batches, detections as COCO results (RLE), the
mask under every binarisation of the threshold sweep, and the samples kept for pictures."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_util
from torchvision.transforms.functional import pil_to_tensor
from tqdm import tqdm

from components.errors import UserError
from components.params import Params
from components.run_layout import MANIFEST_FILE
from model.config import ModelConfig
from model.data import to_float_image
from model.inference import predict_with_maps

# ------------------------------------------------------------------ data


@dataclass(frozen=True)
class Split:
    gt: dict[str, Any]
    image_dir: Path
    annotations: Path
    checksum: str | None


def load_split(data_dir: Path, split: str) -> Split:
    """Ground truth and image folder of ``DIR/annotations/instances_<split>.json`` + ``DIR/images/<split>``."""
    ann_path = data_dir / "annotations" / f"instances_{split}.json"
    if not ann_path.is_file():
        raise UserError(
            f"{ann_path}: no annotations for split {split!r}; run 'atmask ingest' or pick --split"
        )
    try:
        gt = json.loads(ann_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{ann_path}: not valid JSON ({err}); re-run 'atmask ingest'") from None
    if not gt.get("images"):
        raise UserError(f"{ann_path}: the {split!r} split has no images; nothing to evaluate")
    gt.setdefault("annotations", [])
    manifest = data_dir / MANIFEST_FILE
    checksum = (
        json.loads(manifest.read_text(encoding="utf-8")).get("checksum") if manifest.is_file() else None
    )
    return Split(gt, data_dir / "images" / split, ann_path, checksum)


def check_categories(
    model_cats: list[dict[str, Any]], gt: dict[str, Any], model_path: Path, ann: Path
) -> None:
    ours = sorted((c["id"], c["name"]) for c in model_cats)
    theirs = sorted((c["id"], c["name"]) for c in gt.get("categories", []))
    if ours != theirs:
        raise UserError(
            f"{model_path} was trained on categories {ours[:5]}, but {ann} has {theirs[:5]}; "
            "evaluate on the dataset the run was trained on"
        )


def read_image(path: Path) -> torch.Tensor:
    """uint8 [3, H, W], as the training loader gives them; converted to float on the model's device."""
    try:
        with Image.open(path) as img:
            return pil_to_tensor(img.convert("RGB"))
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: cannot read the image ({err}); re-run 'atmask ingest'") from None


def batches(split: Split, batch_size: int) -> Iterator[list[tuple[dict[str, Any], torch.Tensor]]]:
    images = sorted(split.gt["images"], key=lambda im: im["id"])
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        yield [(im, read_image(split.image_dir / im["file_name"])) for im in chunk]


# ------------------------------------------------------------------ inference


def encode_masks(binary: torch.Tensor) -> list[dict[str, Any]]:
    """[N, H, W] bool -> compressed RLEs with str counts (JSON-ready)."""
    if binary.shape[0] == 0:
        return []
    arr = np.asfortranarray(binary.permute(1, 2, 0).cpu().numpy().astype(np.uint8))
    rles = mask_util.encode(arr)
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def to_results(
    image_id: int, out: dict[str, torch.Tensor], label_to_cat: list[int], rles: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    boxes = out["boxes"].cpu().numpy()
    return [
        {
            "image_id": image_id,
            "category_id": label_to_cat[int(label) - 1],
            "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
            "score": float(score),
            "segmentation": rle,
        }
        for (x1, y1, x2, y2), label, score, rle in zip(boxes, out["labels"], out["scores"], rles, strict=True)
    ]


def binarizations(
    out: dict[str, torch.Tensor], thresholds: list[float], atmask: bool
) -> dict[str, torch.Tensor]:
    """Final masks (``masks >= 0.5``) and the sweep's: P >= t for each t, and P >= T for ATMask."""
    prob = out["prob_masks"][:, 0]
    variants = {"final": out["masks"][:, 0] >= 0.5}
    variants.update({f"{t:g}": prob >= t for t in thresholds})
    if atmask:
        variants["adaptive"] = prob >= out["thr_masks"][:, 0]
    return variants


@dataclass
class Inference:
    results: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # variant -> COCO results
    samples: dict[int, dict[str, Any]] = field(default_factory=dict)  # image id -> image + outputs
    seconds: float = 0.0


def sample_ids(gt: dict[str, Any], count: int) -> list[int]:
    """A fixed, evenly spaced sample of image ids (the same for every run on this split)."""
    ids = sorted(im["id"] for im in gt["images"])
    if count <= 0:
        return []
    picks = np.unique(np.linspace(0, len(ids) - 1, min(count, len(ids))).round().astype(int))
    return [ids[i] for i in picks]


def run_inference(
    model: torch.nn.Module,
    cfg: ModelConfig,
    cats: list[dict[str, Any]],
    split: Split,
    params: Params,
    device: torch.device | None = None,
) -> Inference:
    ev = params.evaluate
    label_to_cat = [c["id"] for c in cats]
    keep = set(sample_ids(split.gt, ev.num_samples))
    inf = Inference()
    start = time.perf_counter()
    total = -(-len(split.gt["images"]) // ev.batch_size)
    for batch in tqdm(
        batches(split, ev.batch_size),
        total=total,
        desc="evaluate",
        unit="batch",
        file=sys.stderr,
        disable=None,  # no bar when stderr is not a terminal (DVC, KFP and CI logs)
    ):
        images = [to_float_image(img.to(device or "cpu", non_blocking=True)) for _, img in batch]
        outputs = predict_with_maps(model, images)
        for (im, img), out in zip(batch, outputs, strict=True):
            out = {
                **out,
                "boxes": out["boxes"].cpu(),
                "labels": out["labels"].cpu(),
                "scores": out["scores"].cpu(),
            }
            for name, binary in binarizations(out, ev.fixed_thresholds, cfg.is_atmask).items():
                inf.results.setdefault(name, []).extend(
                    to_results(im["id"], out, label_to_cat, encode_masks(binary))
                )
            if im["id"] in keep:
                inf.samples[im["id"]] = {"image": to_float_image(img), **{k: v.cpu() for k, v in out.items()}}
    inf.seconds = time.perf_counter() - start
    return inf
