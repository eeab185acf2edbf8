"""ATMask's one-paste postprocess against the two-paste result it replaces (P and T pasted separately).

``masks`` = B = sigmoid(k (P - T)) at image resolution. The old path pasted P, pasted T as
``1 - paste(1 - T)`` and subtracted; the new one pastes P - T once (pad and outside value -1). Bilinear
pasting is linear, so the two agree up to float rounding: a few float32 ulps in P - T, hence in B. The
binary decision (B >= 0.5, i.e. P >= T) can differ only where the pasted P and T are equal to within that
rounding (|P - T| <= 1e-6); those pixels are counted and checked to be nothing else.
"""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection.roi_heads import expand_boxes, paste_masks_in_image

from components.checkpoint import load_trained_model
from components.eval_inference import load_split, read_image
from model import ModelConfig, build_model, predict_with_maps
from model.binarize import differentiable_binarization
from model.data import to_float_image

TIE = 1e-6  # |P - T| below which float rounding may decide P >= T either way


def two_paste(prob, thr, boxes, size, k):
    """The postprocess before the one-paste change, verbatim: returns (B, P pasted, T pasted)."""
    p = paste_masks_in_image(prob, boxes, size)
    t = 1.0 - paste_masks_in_image(1.0 - thr, boxes, size)
    return differentiable_binarization(p, t, k).to(p.dtype), p, t


def assert_same_masks(
    new: torch.Tensor, old: torch.Tensor, p: torch.Tensor, t: torch.Tensor, k: float
) -> int:
    """B equal within rounding; decisions equal except at ties. Returns the number of tie flips.

    B's slope in P - T is at most k / 4, so a rounding of ~1e-7 in P - T moves B by up to ~k / 4 * 1e-7."""
    assert new.shape == old.shape and new.dtype == old.dtype
    torch.testing.assert_close(new, old, rtol=0, atol=1e-6 * max(1.0, k / 4))
    flips = (new >= 0.5) != (old >= 0.5)
    assert ((p - t).abs()[flips] <= TIE).all(), "a decision differs away from P == T"
    return int(flips.sum())


def random_case(gen: torch.Generator, n: int, size: tuple[int, int]):
    h, w = size
    prob = torch.sigmoid(3 * torch.randn(n, 1, 28, 28, generator=gen))
    thr = torch.sigmoid(3 * torch.randn(n, 1, 28, 28, generator=gen))
    xy = torch.rand(n, 2, generator=gen) * torch.tensor([w, h])
    wh = torch.rand(n, 2, generator=gen) ** 2 * torch.tensor([w, h])  # many small boxes, some large
    boxes = torch.cat([xy, (xy + wh).minimum(torch.tensor([w, h]))], 1)  # clipped, as detections are
    boxes[0] = torch.tensor([0.0, 0.0, w, h])  # the whole image: the expanded box spills over every edge
    boxes[1] = torch.tensor([5.0, 7.0, 5.4, 7.3])  # under one pixel
    return prob, thr, boxes


def beyond_pasted_boxes(boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[N, 1, H, W] True outside each detection's pasted region (its box grown by the one-cell padding)."""
    outside = torch.ones(len(boxes), 1, *size, dtype=torch.bool)
    for i, (x0, y0, x1, y1) in enumerate(expand_boxes(boxes, 30 / 28).to(torch.int64).tolist()):
        outside[i, 0, max(y0, 0) : max(y1 + 1, 0), max(x0, 0) : max(x1 + 1, 0)] = False
    return outside


def postprocess(transform, prob, thr, boxes, size, maps: bool = False):
    result = [{"boxes": boxes, "labels": torch.ones(len(boxes), dtype=torch.int64),
               "scores": torch.ones(len(boxes)), "masks": prob, "thresholds": thr}]  # fmt: skip
    transform.return_maps = maps
    return transform.postprocess(result, [size], [size])[0]


@pytest.mark.parametrize("k", [1.0, 2.0, 50.0])
def test_one_paste_equals_two_pastes_on_random_maps(k: float):
    cfg = ModelConfig.for_ablation("atmask", head={"k": k}, num_classes=3, backbone="resnet18")
    transform = build_model(cfg).transform.eval()
    gen = torch.Generator().manual_seed(int(k))
    flips = 0
    for n, size in ((2, (40, 30)), (17, (123, 201)), (60, (480, 640))):
        prob, thr, boxes = random_case(gen, n, size)
        old, p, t = two_paste(prob, thr, boxes, size, k)
        out = postprocess(transform, prob, thr, boxes, size)
        assert out.keys() == {"boxes", "labels", "scores", "masks"}
        flips += assert_same_masks(out["masks"], old, p, t, k)
        outside = beyond_pasted_boxes(boxes, size)  # P = 0 and T = 1 there, in both paths
        assert outside.any() and (out["masks"][outside] == torch.sigmoid(torch.tensor(-k))).all()
        assert torch.equal(out["masks"][outside], old[outside])
        maps = postprocess(transform, prob, thr, boxes, size, maps=True)
        assert torch.equal(maps["masks"], old)  # with the maps asked for: today's computation exactly
        assert torch.equal(maps["prob_masks"], p) and torch.equal(maps["thr_masks"], t)
    assert flips <= 2  # ties are rare: ~1e-7 of the pixels at most


def test_no_detections_give_an_empty_mask_tensor():
    transform = build_model(ModelConfig.for_ablation("atmask", num_classes=3, backbone="resnet18")).transform
    empty = torch.zeros(0, 1, 28, 28)
    out = postprocess(transform.eval(), empty, empty, torch.zeros(0, 4), (50, 60))
    assert out["masks"].shape == (0, 1, 50, 60) and out["masks"].dtype == torch.float32


@pytest.mark.slow
def test_one_paste_equals_two_pastes_on_a_trained_model(trained_atmask, eval_data):
    model, cfg, _ = load_trained_model(trained_atmask)
    k = cfg.head.k
    split = load_split(eval_data, "val")
    images = [to_float_image(read_image(split.image_dir / im["file_name"])) for im in split.gt["images"]]
    with torch.no_grad():
        served = model(images)
    analysed = predict_with_maps(model, images)
    detections = flips = pixels = 0
    for new, old in zip(served, analysed, strict=True):
        for key in ("boxes", "labels", "scores"):
            assert torch.equal(new[key], old[key]), key
        flips += assert_same_masks(new["masks"], old["masks"], old["prob_masks"], old["thr_masks"], k)
        detections += len(new["boxes"])
        pixels += new["masks"].numel()
    assert detections >= 20 and flips <= 1e-5 * pixels  # ties only (checked above), and rare


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_one_paste_on_cuda_equals_two_pastes():
    cfg = ModelConfig.for_ablation("atmask", num_classes=3, backbone="resnet18")
    transform = build_model(cfg).transform.eval()
    prob, thr, boxes = random_case(torch.Generator().manual_seed(0), 40, (800, 1333))
    old, p, t = two_paste(prob, thr, boxes, (800, 1333), cfg.head.k)
    cuda = [x.cuda() for x in (prob, thr, boxes)]
    out = postprocess(transform, *cuda, (800, 1333))
    assert out["masks"].is_cuda
    assert_same_masks(out["masks"].cpu(), old, p, t, cfg.head.k)
