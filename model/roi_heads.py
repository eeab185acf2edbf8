"""RoI heads and transform for ATMask R-CNN, composed from torchvision's (no torchvision file is forked).

torchvision's ``RoIHeads.forward`` calls module-level ``maskrcnn_loss``/``maskrcnn_inference`` on a single
logits tensor, so a second (threshold) output needs its own ``forward``. The box branch below is the
same sequence of torchvision calls as upstream; the mask branch runs :class:`ATMaskHead`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss, paste_masks_in_image
from torchvision.models.detection.transform import GeneralizedRCNNTransform

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


class ATMaskTransform(GeneralizedRCNNTransform):
    """Pastes P and T into the image separately, then ``masks = B = sigmoid(k (P - T))``.

    Binarizing after pasting means ``masks >= 0.5`` is exactly ``P >= T`` at image resolution. T is
    pasted as ``1 - paste(1 - T)`` so that outside the box T = 1 > P = 0: background, as it must be.
    With ``return_maps`` on, the pasted maps come back as ``prob_masks`` and ``thr_masks`` too.
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
        thresholds = [r.pop("thresholds") for r in result]
        result = super().postprocess(result, image_shapes, original_image_sizes)  # pastes P as "masks"
        for r, thr, size in zip(result, thresholds, original_image_sizes):
            prob = r["masks"]
            thr = 1.0 - paste_masks_in_image(1.0 - thr, r["boxes"], size)
            r["masks"] = differentiable_binarization(prob, thr, self.k).to(prob.dtype)
            if self.return_maps:
                r["prob_masks"], r["thr_masks"] = prob, thr
        return result
