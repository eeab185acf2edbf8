"""The registered model: an ``mlflow.pyfunc`` wrapper around a weights-only ``model.pt``.

Input: a pandas DataFrame with one column ``image``; each row is one image as a **base64-encoded PNG or
JPEG file** (str). Encoded files keep the payload small and JSON-safe for ``mlflow models serve``, and
carry their own size and channels, so images of different sizes can share a request. Optional param
``score_threshold`` (float, default 0.5) drops weaker detections.

Output: a DataFrame with one row per detection: ``image_index`` (row of the input), ``category_id`` and
``label`` (COCO category id and name), ``score``, ``box`` ([x1, y1, x2, y2] in pixels) and ``mask`` (the
instance mask as a COCO compressed RLE, JSON text: ``{"size": [h, w], "counts": "..."}``; decode it with
``pycocotools.mask.decode(json.loads(mask))``). Masks are the model's final binarization (``B >= 0.5``,
i.e. ``P >= T`` for ATMask; ``P >= 0.5`` for the baseline).

Bad input: each image is checked as ``atmask ingest`` checks it (:mod:`components.images`; the limits come
from the model's ``model_config``: ``max_image_pixels``, ``max_image_side``, ``max_image_bytes``). A bad
row raises :class:`InvalidInput`, which ``mlflow models serve`` answers with HTTP 400 and a one-line
``message`` naming the row and the reason, without a stack trace.

Device: the GPU when one is visible, else the CPU; ``ATMASK_DEVICE=cpu|cuda`` overrides.

Artifacts: ``model_pt`` -> the run's ``model.pt`` (``torch.load(..., weights_only=True)``-safe).
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from PIL import Image

from components.detections import DEFAULT_SCORE_THRESHOLD, detect, image_to_tensor, rle_json
from components.images import BadImage, ImageLimits, decode_rgb

INPUT_COLUMN = "image"
OUTPUT_COLUMNS = ["image_index", "category_id", "label", "score", "box", "mask"]


class InvalidInput(MlflowException, ValueError):
    """Bad model input. The scoring server answers HTTP 400 with :attr:`message` and no stack trace."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()), error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        return self._one_line

    @message.setter
    def message(self, value: str) -> None:
        # The scoring server rewrites the message to "Failed to predict data '<the whole request>'.\nError:
        # ..."; the first value (set in __init__) stays, so the client gets one line, not its payload back.
        if not hasattr(self, "_one_line"):
            self._one_line = value


def decode_image(data: Any, where: str, limits: ImageLimits | None = None) -> torch.Tensor:
    """A base64 PNG/JPEG (str or bytes) -> [3, H, W] float tensor in [0, 1]; InvalidInput naming ``where``."""
    limits = limits or ImageLimits()
    if not isinstance(data, (str, bytes)):
        raise InvalidInput(f"{where}: expected a base64-encoded image file (str), got {type(data).__name__}")
    try:
        limits.check_bytes(len(data) * 3 // 4)  # the decoded size, before decoding
        raw = base64.b64decode(data, validate=True)
        return image_to_tensor(decode_rgb(raw, limits))
    except binascii.Error as err:
        raise InvalidInput(f"{where}: not base64 ({err}); send each image file base64-encoded") from None
    except BadImage as bad:
        raise InvalidInput(f"{where}: {bad}") from None


def encode_image(path_or_array: Any) -> str:
    """Base64 PNG of an image file path or an [H, W, 3] uint8 array (to build inputs)."""
    if isinstance(path_or_array, np.ndarray):
        buf = io.BytesIO()
        Image.fromarray(path_or_array).save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode("ascii")
    with open(path_or_array, "rb") as fh:
        return base64.b64encode(fh.read()).decode("ascii")


def detections_frame(per_image: list[list[dict[str, Any]]]) -> pd.DataFrame:
    rows = [
        {
            **{k: d[k] for k in ("category_id", "label", "score", "box")},
            "image_index": i,
            "mask": rle_json(d["mask"]),
        }
        for i, dets in enumerate(per_image)
        for d in dets
    ]
    return pd.DataFrame(rows, columns=OUTPUT_COLUMNS)


class ATMaskPyfunc(mlflow.pyfunc.PythonModel):
    """pyfunc flavour of a trained ATMask / Mask R-CNN ``model.pt`` (see the module docstring)."""

    def load_context(self, context) -> None:
        from components.checkpoint import load_trained_model
        from components.distributed import resolve_device

        device = resolve_device(os.environ.get("ATMASK_DEVICE", "auto"))
        self.model, self.config, self.categories = load_trained_model(context.artifacts["model_pt"], device)
        self.limits = ImageLimits.from_mapping(getattr(context, "model_config", None) or {})

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        if not isinstance(model_input, pd.DataFrame) or INPUT_COLUMN not in model_input.columns:
            raise InvalidInput(
                f"input must be a DataFrame with a column {INPUT_COLUMN!r} of base64 PNG/JPEG images"
            )
        threshold = float((params or {}).get("score_threshold", DEFAULT_SCORE_THRESHOLD))
        limits = getattr(self, "limits", None)
        images = [decode_image(v, f"row {i}", limits) for i, v in enumerate(model_input[INPUT_COLUMN])]
        return detections_frame(detect(self.model, self.categories, images, threshold))


def input_example(size: int = 32) -> pd.DataFrame:
    """A one-row input (a grey square) for the signature and the registry's input example."""
    image = np.full((size, size, 3), 128, dtype=np.uint8)
    image[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 230
    return pd.DataFrame({INPUT_COLUMN: [encode_image(image)]})
