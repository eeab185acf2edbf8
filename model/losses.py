"""ATMask mask losses (paper Eq. 4-5): BCE on P, on T and on the binarization B, per positive RoI.

Like torchvision's ``maskrcnn_loss``, targets are the ground-truth masks RoIAligned onto each positive
proposal, and each BCE is a mean over pixels (the paper's Eq. 4 writes a sum; the mean keeps the scale of
torchvision's ``loss_mask``, so the baseline and ATMask losses compare directly).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.roi_heads import project_masks_on_boxes

from model.binarize import binarization_logits
from model.config import HeadConfig

BORDER_WIDTH = 2  # pixels of the 28x28 target grid on each side of the boundary
BORDER_LOW, BORDER_HIGH = 0.3, 0.7  # DBNet's threshold-map range


def roi_mask_targets(
    gt_masks: list[Tensor], boxes: list[Tensor], matched_idxs: list[Tensor], size: int
) -> Tensor:
    """Ground-truth masks cropped to each RoI and resized to ``size`` x ``size`` (soft, in [0, 1])."""
    targets = [project_masks_on_boxes(m, b, i, size) for m, b, i in zip(gt_masks, boxes, matched_idxs)]
    return torch.cat(targets, dim=0)


def _border_target(mask: Tensor) -> Tensor:
    """DBNet-style threshold target: BORDER_HIGH on the boundary, decaying to BORDER_LOW over a band."""
    fg = (mask >= 0.5).float()[:, None]
    dilated, eroded = fg, fg
    closeness = torch.zeros_like(fg)
    for step in range(BORDER_WIDTH + 1):
        dilated = F.max_pool2d(dilated, 3, stride=1, padding=1)
        eroded = -F.max_pool2d(-eroded, 3, stride=1, padding=1)
        ring = dilated - eroded  # pixels within `step + 1` of the boundary, on either side
        weight = 1.0 - step / (BORDER_WIDTH + 1)
        closeness = torch.maximum(closeness, ring * weight)
    return (BORDER_LOW + (BORDER_HIGH - BORDER_LOW) * closeness)[:, 0]


def threshold_target(mask_targets: Tensor, kind: str) -> Tensor:
    """``inverted``: 1 - mask (the threshold map is low on the object, high on background, §3.3)."""
    if kind == "inverted":
        return 1.0 - mask_targets
    if kind == "border":
        return _border_target(mask_targets)
    raise ValueError(f"unknown threshold target {kind!r}")


def atmask_losses(
    prob_logits: Tensor,
    thr_logits: Tensor,
    boxes: list[Tensor],
    gt_masks: list[Tensor],
    gt_labels: list[Tensor],
    matched_idxs: list[Tensor],
    cfg: HeadConfig,
) -> dict[str, Tensor]:
    """``loss_prob``, ``loss_thr`` and ``loss_bin`` (already multiplied by lambda)."""
    labels = torch.cat([gl[idx] for gl, idx in zip(gt_labels, matched_idxs)], dim=0)
    targets = roi_mask_targets(gt_masks, boxes, matched_idxs, prob_logits.shape[-1])
    if targets.numel() == 0:
        zero = (prob_logits.sum() + thr_logits.sum()) * 0
        return {"loss_prob": zero, "loss_thr": zero, "loss_bin": zero}

    rows = torch.arange(labels.shape[0], device=labels.device)
    p_logits = prob_logits[rows, labels]
    t_logits = thr_logits[rows, labels]
    loss_prob = F.binary_cross_entropy_with_logits(p_logits, targets)
    loss_thr = F.binary_cross_entropy_with_logits(t_logits, threshold_target(targets, cfg.threshold_target))
    z = binarization_logits(torch.sigmoid(p_logits), torch.sigmoid(t_logits), cfg.k)
    loss_bin = F.binary_cross_entropy_with_logits(z, targets.float())
    return {"loss_prob": loss_prob, "loss_thr": loss_thr, "loss_bin": cfg.bin_loss_weight * loss_bin}
