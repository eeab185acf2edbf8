"""``build_model(config)``: torchvision's Mask R-CNN, with the ATMask head composed in when asked for."""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from model.config import ConfigError, ModelConfig
from model.head import P2_TO_P5, ATMaskHead
from model.roi_align import multiscale_roi_align
from model.roi_heads import ATMaskRoIHeads, ATMaskTransform

ASPECT_RATIOS = (0.5, 1.0, 2.0)
IMAGE_MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics, as torchvision's detection models
IMAGE_STD = (0.229, 0.224, 0.225)
_RESNET_STAGES = ["layer4", "layer3", "layer2", "layer1", "conv1"]


def _is_pretrained(cfg: ModelConfig) -> bool:
    return cfg.backbone_weights is not None or cfg.weights is not None


def build_backbone(cfg: ModelConfig) -> BackboneWithFPN:
    """A torchvision ResNet + FPN (P2-P6), frozen below ``trainable_backbone_layers`` as torchvision does."""
    pretrained = _is_pretrained(cfg)
    frozen_bn = cfg.norm == "frozen_bn" or (cfg.norm == "auto" and pretrained)
    resnet = getattr(torchvision.models, cfg.backbone)(
        weights=None, norm_layer=FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d
    )
    if cfg.backbone_weights is not None:
        load_weights(resnet, cfg.backbone_weights, key="model.backbone_weights", allow_unexpected=("fc.",))

    trainable = cfg.trainable_backbone_layers
    if trainable is None:
        trainable = 3 if pretrained else 5
    stages = _RESNET_STAGES[:trainable] + (["bn1"] if trainable == 5 else [])
    for name, param in resnet.named_parameters():
        if not any(name.startswith(stage) for stage in stages):
            param.requires_grad_(False)

    stage2_channels = resnet.inplanes // 8
    return BackboneWithFPN(
        resnet,
        return_layers={f"layer{i}": str(i - 1) for i in range(1, 5)},
        in_channels_list=[stage2_channels * 2 ** (i - 1) for i in range(1, 5)],
        out_channels=cfg.fpn_channels,
        extra_blocks=LastLevelMaxPool(),
    )


def build_model(cfg: ModelConfig) -> MaskRCNN:
    """The baseline is torchvision's ``MaskRCNN`` itself; ATMask swaps in its RoI heads and transform."""
    channels = cfg.fpn_channels
    anchors = AnchorGenerator(tuple((s,) for s in cfg.anchor_sizes), (ASPECT_RATIOS,) * len(cfg.anchor_sizes))
    model = MaskRCNN(
        build_backbone(cfg),
        num_classes=None,
        min_size=cfg.min_size,
        max_size=cfg.max_size,
        image_mean=list(IMAGE_MEAN),
        image_std=list(IMAGE_STD),
        rpn_anchor_generator=anchors,
        rpn_head=RPNHead(channels, len(ASPECT_RATIOS)),
        rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_top_n_train,
        rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
        rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
        box_roi_pool=multiscale_roi_align(cfg.roi_align, P2_TO_P5, 7, sampling_ratio=2),
        box_head=TwoMLPHead(channels * 7 * 7, cfg.box_head_dim),
        box_predictor=FastRCNNPredictor(cfg.box_head_dim, cfg.num_classes),
        box_detections_per_img=cfg.box_detections_per_img,
        box_score_thresh=cfg.box_score_thresh,
        box_nms_thresh=cfg.box_nms_thresh,
        box_fg_iou_thresh=cfg.box_fg_iou_thresh,
        box_bg_iou_thresh=cfg.box_bg_iou_thresh,
        box_batch_size_per_image=cfg.box_batch_size_per_image,
        box_positive_fraction=cfg.box_positive_fraction,
        mask_roi_pool=multiscale_roi_align(cfg.roi_align, P2_TO_P5, 14, sampling_ratio=2),
        mask_head=MaskRCNNHeads(channels, [cfg.mask_head_channels] * 4, 1),
        mask_predictor=MaskRCNNPredictor(cfg.mask_head_channels, cfg.mask_head_channels, cfg.num_classes),
    )
    if cfg.is_atmask:
        head = ATMaskHead(channels, cfg.mask_head_channels, cfg.num_classes, cfg.head, cfg.roi_align)
        box = model.roi_heads  # torchvision's box branch modules, kept as they are
        model.roi_heads = ATMaskRoIHeads(box.box_roi_pool, box.box_head, box.box_predictor, head, cfg)
        model.transform = ATMaskTransform(cfg, IMAGE_MEAN, IMAGE_STD)
    if cfg.weights is not None:
        load_weights(model, cfg.weights, key="model.weights", allow_missing=_mask_head_prefixes(model))
    freeze(model, cfg.frozen)
    return model


def _mask_head_prefixes(model: MaskRCNN) -> tuple[str, ...]:
    # A detector checkpoint may lack the mask head (a Faster R-CNN, as the paper's R101 recipe uses).
    return (
        ("roi_heads.atmask_head.",) if isinstance(model.roi_heads, ATMaskRoIHeads) else ("roi_heads.mask_",)
    )


def freeze(model: MaskRCNN, parts: tuple[str, ...]) -> None:
    modules = {
        "backbone": [model.backbone.body],
        "fpn": [model.backbone.fpn],
        "rpn": [model.rpn],
        "box": [model.roi_heads.box_head, model.roi_heads.box_predictor],
    }
    for part in parts:
        for module in modules[part]:
            module.requires_grad_(False)


def load_file(path: Path, *, key: str) -> object:
    """``torch.load(path, weights_only=True)`` on the CPU; a missing or unreadable file is a ``ConfigError``
    that names ``key`` (the setting or file role the path came from)."""
    if not path.is_file():
        raise ConfigError(f"{key}: {path} does not exist; give the path to a local .pt/.pth file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConfigError(
            f"{key}: {path} cannot be loaded with torch.load(weights_only=True) ({err})"
        ) from None


def read_state_dict(path: str | Path, *, key: str) -> dict[str, torch.Tensor]:
    """A state dict from a local file (``torch.load(weights_only=True)``), or our ``model.pt`` format."""
    path = Path(path)
    state = load_file(path, key=key)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # our model.pt / checkpoint layout
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{key}: {path} holds no state dict (a mapping of parameter names to tensors)")
    return state


def load_weights(
    module: nn.Module,
    path: str | Path,
    *,
    key: str,
    allow_missing: tuple[str, ...] = (),
    allow_unexpected: tuple[str, ...] = (),
) -> None:
    """Load weights strictly, except for the named key prefixes; a mismatch names the file and the keys."""
    state = read_state_dict(path, key=key)
    expected = module.state_dict()
    # BatchNorm counters mean nothing to FrozenBatchNorm2d (and vice versa): not a mismatch.
    state = {n: t for n, t in state.items() if n in expected or not n.endswith("num_batches_tracked")}
    expected = {n: t for n, t in expected.items() if n in state or not n.endswith("num_batches_tracked")}
    wrong_shape = [n for n, t in state.items() if n in expected and expected[n].shape != t.shape]
    missing = [n for n in expected if n not in state and not n.startswith(allow_missing)]
    unexpected = [n for n in state if n not in expected and not n.startswith(allow_unexpected)]
    problems = []
    if wrong_shape:
        n = wrong_shape[0]
        problems.append(
            f"{len(wrong_shape)} with a different shape (e.g. {n}: file {tuple(state[n].shape)}, "
            f"model {tuple(expected[n].shape)})"
        )
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    if problems:
        raise ConfigError(
            f"{key}: {path} does not match the configured model ({'; '.join(problems)}); check "
            "model.backbone, model.num_classes and the head settings against the ones the weights were trained with"
        )
    module.load_state_dict({n: t for n, t in state.items() if n in expected}, strict=False)
