"""The ATMask mask head (paper §3.3, Fig. 3): probability and threshold paths with P2T/T2P fusion.

Rp (probability RoI features) is pooled from P2-P5 by box size, as in Mask R-CNN. Rt (threshold RoI
features) is pooled from P2 alone at twice the resolution and brought to Rp's size by a stride-2 3x3 conv;
the "P2~P5" ablation uses Rp for Rt instead. Each fusion concatenates the two paths' features and mixes
them with a 3x3 conv (concatenation, not summation: §3.3 argues P and T have opposite polarity).

Fusion order (``HeadConfig.fusion``): ``chained``, the paper's reading (§3.3: the threshold "needs to use
the probability graph", then "feeds back" to it), runs P2T first and lets T2P read the *fused* threshold
features; ``parallel`` computes both fusions from the unfused pair.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops.misc import Conv2dNormActivation

from model.config import HeadConfig
from model.roi_align import multiscale_roi_align

P2_TO_P5 = ["0", "1", "2", "3"]  # torchvision's FPN names for P2..P5


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Module:
    conv = Conv2dNormActivation(in_channels, out_channels, kernel_size=3, stride=stride, norm_layer=None)
    nn.init.kaiming_normal_(conv[0].weight, mode="fan_out", nonlinearity="relu")
    nn.init.zeros_(conv[0].bias)
    return conv


class ThresholdRoIFeatures(nn.Module):
    """Rt: RoIAlign 28x28 from P2 only, then a stride-2 3x3 conv down to 14x14 ("RoI strategy")."""

    def __init__(self, channels: int, output_size: int = 14, roi_align: str = "torchvision") -> None:
        super().__init__()
        self.pool = multiscale_roi_align(roi_align, ["0"], 2 * output_size, sampling_ratio=2)
        self.down = _conv3x3(channels, channels, stride=2)

    def forward(
        self, features: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> Tensor:
        return self.down(self.pool(features, boxes, image_shapes))


class Fusion(nn.Module):
    """concat(F_P, F_T) -> 3x3 conv -> fused features (one of P2T or T2P)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.mix = _conv3x3(2 * channels, channels)

    def forward(self, f_prob: Tensor, f_thr: Tensor) -> Tensor:
        return self.mix(torch.cat([f_prob, f_thr], dim=1))


class ATMaskHead(nn.Module):
    """RoI features in, per-class probability and threshold logits (28x28) out."""

    def __init__(
        self,
        in_channels: int,
        channels: int,
        num_classes: int,
        cfg: HeadConfig,
        roi_align: str = "torchvision",
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.rp_pool = multiscale_roi_align(roi_align, P2_TO_P5, 14, sampling_ratio=2)
        self.rt_features = (
            ThresholdRoIFeatures(in_channels, roi_align=roi_align) if cfg.rt_source == "p2" else None
        )
        self.prob_convs = MaskRCNNHeads(in_channels, [channels] * 4, dilation=1)
        self.thr_convs = MaskRCNNHeads(in_channels, [channels] * cfg.threshold_convs, dilation=1)
        self.p2t = Fusion(channels) if cfg.p2t_fusion else None
        self.t2p = Fusion(channels) if cfg.t2p_fusion else None
        self.prob_predictor = MaskRCNNPredictor(channels, channels, num_classes)
        self.thr_predictor = MaskRCNNPredictor(channels, channels, num_classes)

    def forward(
        self, features: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> tuple[Tensor, Tensor]:
        rp = self.rp_pool(features, boxes, image_shapes)
        rt = rp if self.rt_features is None else self.rt_features(features, boxes, image_shapes)
        f_prob = self.prob_convs(rp)
        f_thr = self.thr_convs(rt)
        thr_features = f_thr if self.p2t is None else self.p2t(f_prob, f_thr)
        fed_back = thr_features if self.cfg.fusion == "chained" else f_thr
        prob_features = f_prob if self.t2p is None else self.t2p(f_prob, fed_back)
        return self.prob_predictor(prob_features), self.thr_predictor(thr_features)
