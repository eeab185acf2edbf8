"""``atmask predict IMAGE... --model models:/atmask-rcnn@champion | runs/<name>``.

Writes, into ``--out`` (default ``predictions/``): ``<image stem>_overlay.png`` per image (masks tinted
in, boxes and ``label score`` captions) and ``predictions.json`` in COCO format (``images``,
``categories`` and ``annotations`` with ``score``, ``bbox`` [x, y, w, h] and RLE ``segmentation``).
Every image is read before anything is written; each file is written atomically. Images are checked as
``atmask ingest`` checks them (:mod:`components.images`: size and pixel limits before decoding, one line
for a bomb, a truncated file, wrong magic bytes or an unsupported format).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from components import plots
from components.checkpoint import MODEL_FILE, load_trained_model
from components.detections import detect, image_to_tensor, rle_json
from components.distributed import resolve_device
from components.errors import UserError
from components.images import BadImage, ImageLimits, decode_rgb
from components.io import atomic_path, write_json_atomic
from components.params import Params, load_params
from components.tracking import check_reachable, tracking_uri


def resolve_model(spec: str, params: Params | None = None) -> Path:
    """A ``model.pt`` path from ``runs/<name>``, a ``model.pt`` file, or a ``models:/`` registry URI."""
    if not spec.startswith("models:/"):
        path = Path(spec)
        return path / MODEL_FILE if path.is_dir() else path
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = tracking_uri(params)
    check_reachable(uri, "MLflow model registry")
    mlflow.set_registry_uri(uri)
    mlflow.set_tracking_uri(uri)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=spec))
    except MlflowException as err:
        raise UserError(f"{spec}: cannot be fetched from {uri} ({err.message.splitlines()[0]})") from None
    found = sorted(local.rglob(MODEL_FILE))
    if not found:
        raise UserError(f"{spec}: has no {MODEL_FILE} artifact; register it with 'atmask register'")
    return found[0]


def read_images(paths: list[Path], limits: ImageLimits | None = None) -> list[torch.Tensor]:
    """Each file as a [3, H, W] float tensor; the first bad one is a one-line UserError."""
    limits = limits or ImageLimits()
    images = []
    for path in paths:
        try:
            limits.check_bytes(path.stat().st_size)  # before reading it into memory
            images.append(image_to_tensor(decode_rgb(path.read_bytes(), limits)))
        except BadImage as bad:
            raise UserError(f"{path}: cannot read the image ({bad}); give PNG or JPEG files") from None
        except OSError as err:
            raise UserError(
                f"{path}: cannot read the image ({err.strerror or err}); check the path"
            ) from None
    return images


def coco_output(paths: list[Path], images: list[torch.Tensor], found, cats) -> dict[str, Any]:
    annotations = []
    for image_id, dets in enumerate(found, start=1):
        for d in dets:
            x1, y1, x2, y2 = d["box"]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": d["category_id"],
                    "score": d["score"],
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": int(d["mask"].sum()),
                    "segmentation": json.loads(rle_json(d["mask"])),
                    "iscrowd": 0,
                }
            )
    return {
        "images": [
            {"id": i, "file_name": p.name, "height": int(img.shape[1]), "width": int(img.shape[2])}
            for i, (p, img) in enumerate(zip(paths, images, strict=True), start=1)
        ],
        "categories": [dict(c) for c in cats],
        "annotations": annotations,
    }


def predict(
    image_paths: list[str | Path],
    model_spec: str,
    out_dir: str | Path = "predictions",
    score_threshold: float = 0.5,
    params: Params | None = None,
    device: str = "auto",
    image_limits: ImageLimits | None = None,
) -> dict[str, Any]:
    """Run the model on the images; write overlays and ``predictions.json``; return the COCO dict."""
    paths = [Path(p) for p in image_paths]
    if len({p.stem for p in paths}) != len(paths):
        raise UserError("two input images share a file name stem; their overlays would overwrite each other")
    images = read_images(paths, image_limits)
    model, _, cats = load_trained_model(resolve_model(model_spec, params), resolve_device(device))
    found = detect(model, cats, images, score_threshold)
    out = Path(out_dir)
    for path, img, dets in zip(paths, images, found, strict=True):
        pixels = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        masks = np.stack([d["mask"] for d in dets]) if dets else np.zeros((0, *pixels.shape[:2]), bool)
        boxes = np.array([d["box"] for d in dets]).reshape(-1, 4)
        drawn = plots.overlay(pixels, masks, boxes, [f"{d['label']} {d['score']:.2f}" for d in dets])
        with atomic_path(out / f"{path.stem}_overlay.png") as tmp:
            Image.fromarray(drawn).save(tmp, format="PNG")
    result = coco_output(paths, images, found, cats)
    write_json_atomic(out / "predictions.json", result)
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", type=Path, help="PNG/JPEG files")
    parser.add_argument(
        "--model", required=True, help="models:/atmask-rcnn@champion, runs/<name> or a model.pt"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("predictions"), help="output folder (default: predictions)"
    )
    parser.add_argument(
        "--score-threshold", type=float, default=0.5, help="keep detections scoring at least this"
    )
    parser.add_argument(
        "--params",
        type=Path,
        default=Path("params.yaml"),
        help="params file (for mlflow.tracking_uri), if present",
    )
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: the GPU if there is one"
    )


def run(args: argparse.Namespace) -> int:
    if not 0 <= args.score_threshold <= 1:
        raise UserError(f"--score-threshold: must be within [0, 1], got {args.score_threshold}")
    params = load_params(args.params) if args.params.is_file() else None
    limits = ImageLimits.from_mapping(params.data) if params is not None else None
    result = predict(args.images, args.model, args.out, args.score_threshold, params, args.device, limits)
    print(f"{len(result['annotations'])} detections in {len(result['images'])} images; wrote {args.out}")
    return 0
