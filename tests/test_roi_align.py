"""``model.roi_align: separable`` (model/roi_align.py) gives torchvision's RoIAlign numbers: the op, the
multi-scale pooler and whole models (losses and gradients), in float64 where rounding cannot hide a bug."""

from __future__ import annotations

import pytest
import torch
from test_model import TINY, ellipse_sample, losses_with_seed
from torchvision.ops import MultiScaleRoIAlign, roi_align

from model import ConfigError, ModelConfig, build_model
from model.roi_align import SeparableMultiScaleRoIAlign, separable_roi_align

TOL = 1e-10


def _rois(count: int, images: int, height: int, width: int, scale: float, seed: int = 0) -> torch.Tensor:
    """Boxes of every kind: inside, partly or wholly off the map, thinner than a cell, degenerate."""
    gen = torch.Generator().manual_seed(seed)
    xy = (torch.rand(count, 2, generator=gen) * 1.3 - 0.15) * torch.tensor([width, height]) / scale
    wh = torch.rand(count, 2, generator=gen) * torch.tensor([width, height]) / scale * 0.6
    wh[: count // 8] *= 0.01  # sub-cell boxes
    wh[count // 8 : count // 6] = 0.0  # zero-size boxes
    index = torch.randint(0, images, (count, 1), generator=gen).double()
    return torch.cat([index, xy.double(), (xy + wh).double()], dim=1)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [2, 1, 3, 0, -1])
@pytest.mark.parametrize(
    ("shape", "scale", "output_size"),
    [((3, 4, 32, 32), 0.25, 7), ((2, 5, 17, 23), 0.125, (14, 9)), ((2, 3, 4, 5), 1 / 32, 28)],
)
def test_separable_roi_align_equals_torchvision_forward_and_gradient(
    aligned: bool, sampling_ratio: int, shape: tuple[int, ...], scale: float, output_size
) -> None:
    gen = torch.Generator().manual_seed(1)
    feature = torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)
    rois = _rois(48, shape[0], shape[2], shape[3], scale)
    expected = roi_align(feature, rois, output_size, scale, sampling_ratio, aligned)
    got = separable_roi_align(feature, rois, output_size, scale, sampling_ratio, aligned)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    assert torch.allclose(got, expected, rtol=0, atol=TOL)
    upstream = torch.randn(expected.shape, generator=gen, dtype=torch.float64)
    (grad_expected,) = torch.autograd.grad(expected, feature, upstream)
    (grad_got,) = torch.autograd.grad(got, feature, upstream)
    assert torch.allclose(grad_got, grad_expected, rtol=0, atol=TOL)


def test_separable_roi_align_float32_and_no_rois() -> None:
    feature = torch.randn(2, 8, 16, 16)
    rois = _rois(20, 2, 16, 16, 0.5).float()
    expected = roi_align(feature, rois, 7, 0.5, 2)
    got = separable_roi_align(feature, rois, 7, 0.5, 2)
    assert got.dtype == torch.float32 and torch.allclose(got, expected, atol=1e-5)
    assert separable_roi_align(feature, rois[:0], 7, 0.5, 2).shape == (0, 8, 7, 7)


def test_boxes_get_no_gradient_as_in_torchvision() -> None:
    feature = torch.randn(1, 2, 8, 8, requires_grad=True)
    rois = torch.tensor([[0.0, 1.0, 1.0, 6.0, 5.0]], requires_grad=True)
    separable_roi_align(feature, rois, 4, 1.0, 2).sum().backward()
    assert rois.grad is None and feature.grad is not None


@pytest.mark.parametrize(("names", "output_size"), [(["0", "1", "2", "3"], 7), (["0"], 28)])
def test_separable_pooler_equals_torchvision_multiscale_roi_align(names: list[str], output_size: int) -> None:
    """Same level assignment (box size), scales and outputs: the box and mask poolers and Rt (P2 only)."""
    gen = torch.Generator().manual_seed(2)
    sizes = {"0": 128, "1": 64, "2": 32, "3": 16}  # P2-P5 of a 512 px image
    features = {
        n: torch.randn(2, 3, s, s, generator=gen, dtype=torch.float64, requires_grad=True)
        for n, s in sizes.items()
    }
    boxes = []
    for _ in range(2):
        xy = torch.rand(40, 2, generator=gen, dtype=torch.float64) * 300
        wh = 2 + torch.rand(40, 2, generator=gen, dtype=torch.float64) ** 2 * 500  # small to large
        large = torch.tensor([[0.0, 0.0, 500.0, 480.0]], dtype=torch.float64)  # P5
        boxes.append(torch.cat([torch.cat([xy, (xy + wh).clamp(max=512)], dim=1), large]))
    shapes = [(512, 512), (512, 512)]
    reference = MultiScaleRoIAlign(names, output_size, 2)
    expected = reference(features, boxes, shapes)
    if len(names) > 1:  # every level pools some boxes
        assert set(reference.map_levels(boxes).tolist()) == {0, 1, 2, 3}
    got = SeparableMultiScaleRoIAlign(names, output_size, 2)(features, boxes, shapes)
    assert torch.allclose(got, expected, rtol=0, atol=TOL)
    upstream = torch.randn(expected.shape, generator=gen, dtype=torch.float64)
    inputs = [features[n] for n in names]
    for a, b in zip(
        torch.autograd.grad(expected, inputs, upstream),
        torch.autograd.grad(got, inputs, upstream),
        strict=True,
    ):
        assert torch.allclose(a, b, rtol=0, atol=TOL)


@pytest.mark.parametrize("ablation", ["baseline", "atmask"])
def test_models_with_separable_roi_align_match_torchvision_losses_and_gradients(ablation: str) -> None:
    image, target, _ = ellipse_sample()
    grads, losses, reference_state = {}, {}, {}
    for impl in ("torchvision", "separable"):
        torch.manual_seed(0)
        model = (
            build_model(ModelConfig.for_ablation(ablation, **{**TINY, "roi_align": impl})).double().train()
        )
        if reference_state:
            model.load_state_dict(reference_state)
        reference_state = model.state_dict()
        images = [image.double()]
        targets = [{**target, "boxes": target["boxes"].double()}]
        out = losses_with_seed(model, images, targets)
        sum(out.values()).backward()
        losses[impl] = {k: v.item() for k, v in out.items()}
        grads[impl] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert losses["separable"] == pytest.approx(losses["torchvision"], rel=1e-9, abs=1e-12)
    assert grads["separable"].keys() == grads["torchvision"].keys()
    for name, grad in grads["torchvision"].items():
        assert torch.allclose(grads["separable"][name], grad, rtol=1e-7, atol=1e-10), name


def test_roi_align_choice_is_checked_and_defaults_to_torchvision() -> None:
    assert ModelConfig().roi_align == "torchvision"
    assert type(build_model(ModelConfig.for_ablation("baseline", **TINY)).roi_heads.box_roi_pool) is (
        MultiScaleRoIAlign
    )
    with pytest.raises(
        ConfigError, match=r"model\.roi_align: 'fast' is not allowed; choose one of torchvision"
    ):
        ModelConfig.for_ablation("atmask", **{**TINY, "roi_align": "fast"})
