"""Differentiable binarization (paper Eq. 2): B = 1 / (1 + exp(-k (P - T)))."""

from __future__ import annotations

import torch
from torch import Tensor


def binarization_logits(prob: Tensor, thresh: Tensor, k: float) -> Tensor:
    """``k (P - T)`` in float32, whatever autocast is active: B is ``sigmoid`` of this.

    Working in logits lets the binary loss use ``binary_cross_entropy_with_logits``, which is exact for
    B = sigmoid(z) and stable where B saturates.
    """
    with torch.autocast(device_type=prob.device.type, enabled=False):
        return k * (prob.float() - thresh.float())


def differentiable_binarization(prob: Tensor, thresh: Tensor, k: float) -> Tensor:
    """B in [0, 1], float32; ``B >= 0.5`` exactly where ``P >= T``."""
    return torch.sigmoid(binarization_logits(prob, thresh, k))
