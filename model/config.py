"""Typed configuration of the model: the backbone and the ATMask mask head, with the paper's ablations.

Everything a user can get wrong is checked in ``__post_init__``, so a bad config fails when it is built,
with the key and the allowed values in the message, never deep inside a forward pass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")
RT_SOURCES = ("p2", "p2_p5")
THRESHOLD_TARGETS = ("inverted", "border")
FUSION_ORDERS = ("chained", "parallel")
NORMS = ("auto", "frozen_bn", "bn")
ROI_ALIGN = ("torchvision", "separable")  # model/roi_align.py: same numbers; separable is faster on CPU
FREEZABLE = ("backbone", "fpn", "rpn", "box")


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type or out of range."""


def check_choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {', '.join(allowed)}")


def check_positive(key: str, value: Any, *, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}: must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


@dataclass(frozen=True)
class HeadConfig:
    """The mask head: torchvision's (``threshold_branch=False``) or ATMask's (paper §3, Fig. 3)."""

    threshold_branch: bool = True
    p2t_fusion: bool = True  # threshold features see the probability features (concat + conv)
    t2p_fusion: bool = True  # probability features see the threshold features (concat + conv)
    # chained (the paper, §3.3): P2T first, then T2P reads the fused threshold features;
    # parallel: both fusions read the unfused pair (the project's earlier wiring)
    fusion: str = "chained"
    rt_source: str = "p2"  # "p2": RoIAlign 28x28 from P2 + stride-2 conv; "p2_p5": pooled like Rp
    k: float = 2.0  # steepness of the differentiable binarization, Eq. 2
    bin_loss_weight: float = 2.0  # lambda in Eq. 5
    threshold_target: str = "inverted"  # supervision of the threshold map
    threshold_convs: int = 2  # 3x3 convs on Rt before fusion

    def __post_init__(self) -> None:
        for key in ("threshold_branch", "p2t_fusion", "t2p_fusion"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"head.{key}: expected true or false, got {getattr(self, key)!r}")
        check_choice("head.rt_source", self.rt_source, RT_SOURCES)
        check_choice("head.threshold_target", self.threshold_target, THRESHOLD_TARGETS)
        check_choice("head.fusion", self.fusion, FUSION_ORDERS)
        check_positive("head.k", self.k)
        check_positive("head.bin_loss_weight", self.bin_loss_weight, allow_zero=True)
        if not isinstance(self.threshold_convs, int) or self.threshold_convs < 1:
            raise ConfigError(f"head.threshold_convs: must be an integer >= 1, got {self.threshold_convs!r}")
        if not self.threshold_branch and (self.p2t_fusion or self.t2p_fusion):
            raise ConfigError(
                "head: p2t_fusion/t2p_fusion need threshold_branch: true "
                "(fusion exchanges features with the threshold branch); switch them off or enable the branch"
            )


# The paper's Tables 2-5, as named configurations (DESIGN.md §4).
ABLATIONS: dict[str, HeadConfig] = {
    "baseline": HeadConfig(threshold_branch=False, p2t_fusion=False, t2p_fusion=False, rt_source="p2_p5"),
    "thr": HeadConfig(p2t_fusion=False, t2p_fusion=False, rt_source="p2_p5", k=1.0),
    "thr_p2t": HeadConfig(p2t_fusion=True, t2p_fusion=False, rt_source="p2_p5", k=1.0),
    "thr_fusion": HeadConfig(p2t_fusion=True, t2p_fusion=True, rt_source="p2_p5", k=1.0),
    "atmask_k1": HeadConfig(p2t_fusion=True, t2p_fusion=True, rt_source="p2", k=1.0),
    "atmask": HeadConfig(p2t_fusion=True, t2p_fusion=True, rt_source="p2", k=2.0),
    # the DBNet-style reading of the threshold map's supervision (DESIGN.md §4): T learns the borders
    "atmask_border": HeadConfig(
        p2t_fusion=True, t2p_fusion=True, rt_source="p2", k=2.0, threshold_target="border"
    ),
}


def ablation_head(name: str) -> HeadConfig:
    check_choice("ablation", name, tuple(ABLATIONS))
    return ABLATIONS[name]


@dataclass(frozen=True)
class ModelConfig:
    """Everything ``build_model`` needs. Defaults are the paper's R50-FPN setting on COCO."""

    ablation: str = "atmask"
    head: HeadConfig = field(default_factory=lambda: ABLATIONS["atmask"])
    backbone: str = "resnet50"
    num_classes: int = 91  # including background
    norm: str = "auto"  # auto: frozen BN with pretrained weights, BN from scratch (as torchvision)
    trainable_backbone_layers: int | None = None  # None: 3 with pretrained weights, 5 from scratch
    fpn_channels: int = 256
    mask_head_channels: int = 256
    box_head_dim: int = 1024
    min_size: int = 800
    max_size: int = 1333
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)
    box_detections_per_img: int = 100
    box_score_thresh: float = 0.05
    box_nms_thresh: float = 0.5
    box_fg_iou_thresh: float = 0.5  # a proposal is foreground at IoU >= this with a ground-truth box
    box_bg_iou_thresh: float = 0.5  # and background below this
    box_positive_fraction: float = 0.25  # of the sampled RoIs per image
    rpn_pre_nms_top_n_train: int = 2000  # per FPN level, as torchvision and Detectron2
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_test: int = 1000
    box_batch_size_per_image: int = 512
    roi_align: str = "torchvision"  # or "separable": same outputs, faster for small maps on CPU
    backbone_weights: str | None = None  # local file with a torchvision ResNet state dict
    weights: str | None = None  # local file with a full detector state dict (e.g. a Faster R-CNN)
    frozen: tuple[str, ...] = ()  # parts to freeze after loading weights, e.g. ("backbone", "rpn", "box")

    def __post_init__(self) -> None:
        check_choice("model.backbone", self.backbone, BACKBONES)
        check_choice("model.norm", self.norm, NORMS)
        check_choice("model.roi_align", self.roi_align, ROI_ALIGN)
        if not isinstance(self.head, HeadConfig):
            raise ConfigError(f"model.head: expected a HeadConfig, got {type(self.head).__name__}")
        if not isinstance(self.num_classes, int) or self.num_classes < 2:
            raise ConfigError(
                f"model.num_classes: must count background plus at least one class (>= 2), "
                f"got {self.num_classes!r}"
            )
        tbl = self.trainable_backbone_layers
        if tbl is not None and (not isinstance(tbl, int) or not 0 <= tbl <= 5):
            raise ConfigError(f"model.trainable_backbone_layers: must be 0..5 or null, got {tbl!r}")
        for key in (
            "fpn_channels",
            "mask_head_channels",
            "box_head_dim",
            "min_size",
            "max_size",
            "box_detections_per_img",
            "rpn_pre_nms_top_n_train",
            "rpn_pre_nms_top_n_test",
            "rpn_post_nms_top_n_train",
            "rpn_post_nms_top_n_test",
            "box_batch_size_per_image",
        ):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"model.{key}: must be a positive integer, got {value!r}")
        if self.min_size > self.max_size:
            raise ConfigError(
                f"model.min_size ({self.min_size}) must not exceed model.max_size ({self.max_size})"
            )
        if len(self.anchor_sizes) != 5 or any(not isinstance(a, int) or a <= 0 for a in self.anchor_sizes):
            raise ConfigError(
                f"model.anchor_sizes: need five positive integers (one per FPN level P2-P6), "
                f"got {list(self.anchor_sizes)!r}"
            )
        for part in self.frozen:
            check_choice("model.frozen", part, FREEZABLE)
        for key in ("box_score_thresh", "box_nms_thresh", "box_fg_iou_thresh", "box_bg_iou_thresh"):
            check_positive(f"model.{key}", getattr(self, key), allow_zero=True)
        if not 0 < self.box_positive_fraction <= 1:
            raise ConfigError(
                f"model.box_positive_fraction: must be in (0, 1], got {self.box_positive_fraction!r}"
            )

    @property
    def is_atmask(self) -> bool:
        return self.head.threshold_branch

    @classmethod
    def for_ablation(cls, name: str, **overrides: Any) -> ModelConfig:
        """The named ablation's head on the default (or overridden) backbone settings."""
        head_overrides = overrides.pop("head", None) or {}
        head = ablation_head(name)
        if head_overrides:
            head = _replace_checked(head, head_overrides, "head")
        return cls(ablation=name, head=head, **_checked_keys(cls, overrides, "model"))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        """Inverse of ``to_dict``; unknown keys are errors that name the key.

        The stored head is used as it is, so a model of a params-defined ablation (not one of the paper's
        names) loads too. A head stored before ``fusion`` existed was wired in parallel: it loads that way.
        """
        data = dict(data)
        ablation = data.pop("ablation", "atmask")
        head = data.pop("head", None)
        if "anchor_sizes" in data:
            data["anchor_sizes"] = tuple(data["anchor_sizes"])
        if "frozen" in data:
            data["frozen"] = tuple(data["frozen"])
        if head is None:
            return cls.for_ablation(ablation, **data)
        head = {"fusion": "parallel", **head}
        return cls(
            ablation=ablation,
            head=HeadConfig(**_checked_keys(HeadConfig, head, "head")),
            **_checked_keys(cls, data, "model"),
        )

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["anchor_sizes"] = list(self.anchor_sizes)
        out["frozen"] = list(self.frozen)
        return out

    def flat(self) -> dict[str, Any]:
        """Flat ``model.x`` / ``model.head.y`` keys, for experiment trackers."""
        out: dict[str, Any] = {}
        for key, value in self.to_dict().items():
            if isinstance(value, dict):
                out.update({f"model.{key}.{k}": v for k, v in value.items()})
            else:
                out[f"model.{key}"] = value
        return out


def _checked_keys(cls: type, values: Mapping[str, Any], section: str) -> dict[str, Any]:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{section}.{unknown[0]}: unknown key; allowed keys are {', '.join(sorted(known))}")
    return dict(values)


def _replace_checked(obj: Any, values: Mapping[str, Any], section: str) -> Any:
    return replace(obj, **_checked_keys(type(obj), values, section))
