"""Detections as plain Python: what ``atmask predict`` and the registered pyfunc model both return.

No MLflow here, so the CLI stays light; :mod:`components.pyfunc_model` wraps these for the registry.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_util
from torchvision.transforms.functional import pil_to_tensor

from model.data import to_float_image

DEFAULT_SCORE_THRESHOLD = 0.5


def image_to_tensor(image: Any) -> torch.Tensor:
    return pil_to_tensor(image.convert("RGB")).float() / 255.0


def rle_json(binary: np.ndarray) -> str:
    rle = mask_util.encode(np.asfortranarray(binary.astype(np.uint8)))
    return json.dumps({"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")})


@torch.inference_mode()
def detect(
    model: torch.nn.Module,
    categories: list[dict[str, Any]],
    images: list[torch.Tensor],
    score_threshold: float = DEFAULT_SCORE_THRESHOLD,
    batch_size: int = 4,
) -> list[list[dict[str, Any]]]:
    """Per image, its detections above ``score_threshold``: category_id, label, score, box, binary mask.

    Images are [3, H, W], uint8 (0..255) or float in [0, 1]; uint8 ones become float on the model's device.
    """
    model.eval()
    device = next(model.parameters()).device
    found = []
    for start in range(0, len(images), batch_size):
        batch = [to_float_image(img.to(device)) for img in images[start : start + batch_size]]
        for out in model(batch):
            out = {k: v.cpu() for k, v in out.items() if k in ("boxes", "labels", "scores")} | {
                "masks": out["masks"]
            }
            keep = out["scores"] >= score_threshold
            masks = (out["masks"][keep, 0] >= 0.5).cpu().numpy()
            found.append(
                [
                    {
                        "category_id": int(categories[int(lab) - 1]["id"]),
                        "label": str(categories[int(lab) - 1]["name"]),
                        "score": float(score),
                        "box": [float(v) for v in box],
                        "mask": mask,
                    }
                    for lab, score, box, mask in zip(
                        out["labels"][keep],
                        out["scores"][keep],
                        out["boxes"][keep].tolist(),
                        masks,
                        strict=True,
                    )
                ]
            )
    return found
