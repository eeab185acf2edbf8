"""RoIAlign as two small matrix products: the same numbers as ``torchvision.ops.roi_align``, faster on CPU
for the small feature maps of the CPU recipes.

RoIAlign's bilinear sampling is separable: a sample's weight on feature cell ``(h, w)`` is a weight on row
``h`` times a weight on column ``w``, the out-of-map test is a test on each axis, and the mean over a bin's
``grid_h x grid_w`` samples is a mean over rows times a mean over columns. So one RoI's output is
``Ay @ F @ Ax^T`` with ``Ay`` (pooled rows x H) and ``Ax`` (pooled columns x W) built from its box, and the
backward pass is two more matrix products instead of torchvision's single-threaded scatter kernel on CPU.
The price is ``H x W`` work per pooled row, which is cheap for a 32x32 P2 (128 px images) and ruinous for a
200x336 one (800 px images): ``model.roi_align: separable`` is for the CPU recipes, ``torchvision`` (the
default) for everything else. Boxes get no gradient, as in torchvision.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.poolers import _convert_to_roi_format, _setup_scales


def _axis_weights(start: Tensor, length: Tensor, pooled: int, size: int, sampling_ratio: int) -> Tensor:
    """(K, pooled, size): each pooled row's mean bilinear weight on each feature row, as torchvision's kernel."""
    bin_size = length / pooled
    if sampling_ratio > 0:
        grid = torch.full_like(length, float(sampling_ratio))
    else:
        grid = torch.ceil(length / pooled)
    max_grid = max(int(grid.max().item()) if grid.numel() else 1, 1)
    p = torch.arange(pooled, dtype=start.dtype, device=start.device)[None, :, None]
    i = torch.arange(max_grid, dtype=start.dtype, device=start.device)[None, None, :]
    start, bin_size, grid = start[:, None, None], bin_size[:, None, None], grid[:, None, None]
    coord = start + p * bin_size + (i + 0.5) * bin_size / grid.clamp(min=1.0)  # grid 0: an empty box
    valid = (i < grid) & (coord >= -1.0) & (coord <= size)
    coord = coord.clamp(min=0.0)
    low = coord.floor().long()  # the kernel's (int) cast: coord >= 0 here
    at_edge = low >= size - 1
    low = torch.where(at_edge, torch.full_like(low, size - 1), low)
    high = torch.where(at_edge, low, low + 1)
    frac = torch.where(at_edge, torch.zeros_like(coord), coord - low.to(coord.dtype))
    scale = valid.to(coord.dtype) / grid.clamp(min=1.0)
    weights = coord.new_zeros(start.shape[0], pooled, size)
    weights.scatter_add_(2, low, (1.0 - frac) * scale)
    weights.scatter_add_(2, high, frac * scale)
    return weights


def _roi_weights(
    rois: Tensor,
    output_size: tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
    hw: tuple[int, int],
) -> tuple[Tensor, Tensor]:
    offset = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (rois[:, i] * spatial_scale - offset for i in range(1, 5))
    width, height = x2 - x1, y2 - y1
    if not aligned:
        width, height = width.clamp(min=1.0), height.clamp(min=1.0)
    rows = _axis_weights(y1, height, output_size[0], hw[0], sampling_ratio)
    cols = _axis_weights(x1, width, output_size[1], hw[1], sampling_ratio)
    return rows, cols


def separable_roi_align(
    input: Tensor,
    rois: Tensor,
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> Tensor:
    """``torchvision.ops.roi_align`` for ``rois`` as a (K, 5) tensor of (batch index, x1, y1, x2, y2)."""
    pooled = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    batch, channels, height, width = input.shape
    out = input.new_zeros(rois.shape[0], channels, *pooled)
    if rois.shape[0] == 0:
        return out
    # torchvision's kernel computes in float32 (float64 for float64 input), under autocast too
    dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        boxes = rois.detach().to(dtype)
        rows, cols = _roi_weights(boxes, pooled, spatial_scale, sampling_ratio, aligned, (height, width))
        image_of_roi = boxes[:, 0].long()
    features = input.to(dtype)
    for image in range(batch):
        idx = torch.where(image_of_roi == image)[0]
        if idx.numel():
            out[idx] = _pool_one_image(features[image], rows[idx], cols[idx]).to(out.dtype)
    return out


def _pool_one_image(feature: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """(K, C, PH, PW) = rows (K, PH, H) @ feature (C, H, W) @ cols (K, PW, W)^T, as two GEMMs."""
    k, ph, h = rows.shape
    c, _, w = feature.shape
    by_rows = rows.reshape(k * ph, h) @ feature.permute(1, 0, 2).reshape(h, c * w)  # (K*PH, C*W)
    pooled = by_rows.reshape(k, ph * c, w) @ cols.transpose(1, 2)  # (K, PH*C, PW)
    return pooled.reshape(k, ph, c, -1).permute(0, 2, 1, 3)


class SeparableMultiScaleRoIAlign(MultiScaleRoIAlign):
    """torchvision's ``MultiScaleRoIAlign`` (same levels, scales and outputs) pooling with ``separable_roi_align``."""

    def forward(
        self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> Tensor:
        features = [x[name] for name in self.featmap_names]
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(
                features, image_shapes, self.canonical_scale, self.canonical_level
            )
        rois = _convert_to_roi_format(boxes)
        size, ratio = self.output_size, self.sampling_ratio
        if len(features) == 1:
            return separable_roi_align(features[0], rois, size, self.scales[0], ratio)
        levels = self.map_levels(boxes)
        result = features[0].new_zeros((rois.shape[0], features[0].shape[1], *size))
        for level, (feature, scale) in enumerate(zip(features, self.scales, strict=True)):
            idx = torch.where(levels == level)[0]
            result[idx] = separable_roi_align(feature, rois[idx], size, scale, ratio).to(result.dtype)
        return result


def multiscale_roi_align(
    implementation: str, featmap_names: list[str], output_size: int, sampling_ratio: int
) -> MultiScaleRoIAlign:
    """The RoI pooler of ``model.roi_align``: torchvision's own, or the separable one."""
    cls = SeparableMultiScaleRoIAlign if implementation == "separable" else MultiScaleRoIAlign
    return cls(featmap_names=featmap_names, output_size=output_size, sampling_ratio=sampling_ratio)
