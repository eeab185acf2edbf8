"""RoI heads and transform for ATMask R-CNN, composed from torchvision's (no torchvision file is forked).

torchvision's ``RoIHeads.forward`` calls module-level ``maskrcnn_loss``/``maskrcnn_inference`` on a single
logits tensor, so a second (threshold) output needs its own ``forward``. The box branch below is the
same sequence of torchvision calls as upstream; the mask branch runs :class:`ATMaskHead`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.roi_heads import (
    RoIHeads,
    expand_boxes,
    fastrcnn_loss,
    paste_masks_in_image,
)
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes

from model.binarize import differentiable_binarization
from model.config import ModelConfig
from model.head import ATMaskHead
from model.losses import atmask_losses


class ATMaskRoIHeads(RoIHeads):
    """torchvision's box branch plus the ATMask mask head.

    Inference returns, per detection, ``masks`` = P (probability, 28x28, for the predicted class) and
    ``thresholds`` = T; :class:`ATMaskTransform` pastes both and binarizes in image space.
    """

    def __init__(
        self,
        box_roi_pool: nn.Module,
        box_head: nn.Module,
        box_predictor: nn.Module,
        mask_head: ATMaskHead,
        cfg: ModelConfig,
    ) -> None:
        super().__init__(
            box_roi_pool=box_roi_pool,
            box_head=box_head,
            box_predictor=box_predictor,
            fg_iou_thresh=cfg.box_fg_iou_thresh,
            bg_iou_thresh=cfg.box_bg_iou_thresh,
            batch_size_per_image=cfg.box_batch_size_per_image,
            positive_fraction=cfg.box_positive_fraction,
            bbox_reg_weights=None,  # torchvision's (10, 10, 5, 5)
            score_thresh=cfg.box_score_thresh,
            nms_thresh=cfg.box_nms_thresh,
            detections_per_img=cfg.box_detections_per_img,
        )
        self.atmask_head = mask_head

    def forward(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        if self.training:
            if targets is None:
                raise ValueError("targets are required in training mode")
            return [], self._training_losses(features, proposals, image_shapes, targets)
        return self._detect(features, proposals, image_shapes), {}

    def _box_logits(
        self, features: dict[str, Tensor], proposals: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> tuple[Tensor, Tensor]:
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        return self.box_predictor(box_features)

    def _training_losses(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]],
    ) -> dict[str, Tensor]:
        proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
        class_logits, box_regression = self._box_logits(features, proposals, image_shapes)
        loss_classifier, loss_box_reg = fastrcnn_loss(
            class_logits, box_regression, labels, regression_targets
        )

        positive = [torch.where(lab > 0)[0] for lab in labels]
        mask_boxes = [p[pos] for p, pos in zip(proposals, positive)]
        mask_matched = [m[pos] for m, pos in zip(matched_idxs, positive)]
        prob_logits, thr_logits = self.atmask_head(features, mask_boxes, image_shapes)
        mask_losses = atmask_losses(
            prob_logits,
            thr_logits,
            mask_boxes,
            [t["masks"] for t in targets],
            [t["labels"] for t in targets],
            mask_matched,
            self.atmask_head.cfg,
        )
        return {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg, **mask_losses}

    def _detect(
        self, features: dict[str, Tensor], proposals: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        class_logits, box_regression = self._box_logits(features, proposals, image_shapes)
        boxes, scores, labels = self.postprocess_detections(
            class_logits, box_regression, proposals, image_shapes
        )
        prob_logits, thr_logits = self.atmask_head(features, boxes, image_shapes)
        rows = torch.arange(prob_logits.shape[0], device=prob_logits.device)
        flat_labels = torch.cat(labels)
        per_image = [len(b) for b in boxes]
        probs = prob_logits[rows, flat_labels].sigmoid()[:, None].split(per_image)
        thrs = thr_logits[rows, flat_labels].sigmoid()[:, None].split(per_image)
        return [
            {"boxes": b, "labels": lab, "scores": s, "masks": p, "thresholds": t}
            for b, lab, s, p, t in zip(boxes, labels, scores, probs, thrs)
        ]


def paste_binarized(
    diff: Tensor, boxes: Tensor, size: tuple[int, int], k: float, dtype: torch.dtype = torch.float32
) -> Tensor:
    """``B = sigmoid(k (P - T))`` in the image, from one paste per detection of ``diff`` = P - T [N, 1, M, M].

    torchvision's ``paste_masks_in_image`` is linear in the map it pastes: pad by one cell, resize to the
    box bilinearly, place in an empty image. Pasting P (pad and outside 0) and T as ``1 - paste(1 - T)``
    (pad and outside 1), then subtracting, is therefore pasting P - T with -1 as pad and outside value, up to
    float rounding. Outside the boxes B is the constant ``sigmoid(-k)``, so the sigmoid runs on box pixels
    only, and every detection is written straight into the output (no per-detection image, no stack).
    The sigmoid is taken in float32; ``dtype`` is the output's.
    """
    n, _, m, _ = diff.shape
    height, width = size
    outside = float(torch.sigmoid(torch.tensor(-k, dtype=torch.float32)))  # B where P = 0 and T = 1
    out = torch.full((n, 1, height, width), outside, dtype=dtype, device=diff.device)
    if n == 0:
        return out
    padded = F.pad(diff.float(), (1, 1, 1, 1), value=-1.0)
    corners = expand_boxes(boxes, (m + 2) / m).to(torch.int64).tolist()  # one host sync for all boxes
    for i, (x0, y0, x1, y1) in enumerate(corners):
        w, h = max(x1 - x0 + 1, 1), max(y1 - y0 + 1, 1)
        cx0, cx1, cy0, cy1 = max(x0, 0), min(x1 + 1, width), max(y0, 0), min(y1 + 1, height)
        if cx0 >= cx1 or cy0 >= cy1:
            continue
        region = F.interpolate(padded[i : i + 1], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        crop = region[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
        out[i, 0, cy0:cy1, cx0:cx1] = torch.sigmoid(crop.mul_(k))
    return out


class ATMaskTransform(GeneralizedRCNNTransform):
    """Pastes P - T into the image once per detection: ``masks = B = sigmoid(k (P - T))`` (:func:`paste_binarized`).

    Binarizing after pasting means ``masks >= 0.5`` is ``P >= T`` at image resolution. T behaves as if
    pasted as ``1 - paste(1 - T)``, so that outside the box T = 1 > P = 0: background, as it must be.
    With ``return_maps`` on, P and T are pasted separately and come back as ``prob_masks`` and ``thr_masks``,
    and ``masks`` is computed from those two maps (so ``masks >= 0.5`` is exactly ``prob_masks >= thr_masks``
    there; the one-paste ``masks`` equal it up to float rounding).
    """

    def __init__(self, cfg: ModelConfig, image_mean: Sequence[float], image_std: Sequence[float]) -> None:
        super().__init__(cfg.min_size, cfg.max_size, list(image_mean), list(image_std))
        self.k = cfg.head.k
        self.return_maps = False

    @contextlib.contextmanager
    def returning_maps(self) -> Iterator[None]:
        previous, self.return_maps = self.return_maps, True
        try:
            yield
        finally:
            self.return_maps = previous

    def postprocess(
        self,
        result: list[dict[str, Tensor]],
        image_shapes: list[tuple[int, int]],
        original_image_sizes: list[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        if self.training:
            return result
        for r, shape, size in zip(result, image_shapes, original_image_sizes):
            prob, thr = r.pop("masks"), r.pop("thresholds")
            r["boxes"] = resize_boxes(r["boxes"], shape, size)
            if self.return_maps:
                r["prob_masks"] = paste_masks_in_image(prob, r["boxes"], size)
                r["thr_masks"] = 1.0 - paste_masks_in_image(1.0 - thr, r["boxes"], size)
                b = differentiable_binarization(r["prob_masks"], r["thr_masks"], self.k)
                r["masks"] = b.to(prob.dtype)
            else:
                diff = prob.float() - thr.float()
                r["masks"] = paste_binarized(diff, r["boxes"], size, self.k, prob.dtype)
        return result
