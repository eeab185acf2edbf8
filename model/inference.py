"""Inference helpers that expose the pasted probability (P) and threshold (T) maps."""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.models.detection import MaskRCNN

from model.roi_heads import ATMaskTransform


@torch.inference_mode()
def predict_with_maps(model: MaskRCNN, images: list[Tensor]) -> list[dict[str, Tensor]]:
    """torchvision-format detections plus ``prob_masks`` (P, pasted) and, for ATMask, ``thr_masks`` (T).

    For the baseline, P is torchvision's soft mask. ``prob_masks >= t`` is the fixed-threshold
    binarization of the paper's Fig. 4; for ATMask, ``masks >= 0.5`` is the adaptive one (P >= T).
    """
    model.eval()
    if isinstance(model.transform, ATMaskTransform):
        with model.transform.returning_maps():
            return model(images)
    outputs = model(images)
    for out in outputs:
        out["prob_masks"] = out["masks"]
    return outputs
