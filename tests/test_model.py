"""ATMask R-CNN and the baseline: equivalence with torchvision, losses, gradients, inference format."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torchvision
from torchvision.models.detection import MaskRCNN, maskrcnn_resnet50_fpn
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

from model import ABLATIONS, ConfigError, HeadConfig, ModelConfig, build_model, predict_with_maps
from model.binarize import differentiable_binarization

TINY = dict(
    backbone="resnet18",
    num_classes=3,
    min_size=64,
    max_size=64,
    fpn_channels=32,
    mask_head_channels=32,
    box_head_dim=64,
    anchor_sizes=(8, 16, 32, 64, 128),
    rpn_post_nms_top_n_train=100,
    rpn_post_nms_top_n_test=30,
    box_batch_size_per_image=64,
)
ATMASK_LOSSES = {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"} | {
    "loss_prob",
    "loss_thr",
    "loss_bin",
}


def tiny(ablation: str, **overrides) -> ModelConfig:
    return ModelConfig.for_ablation(ablation, **{**TINY, **overrides})


def ellipse_sample(size: int = 64) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """One image with one ellipse: image, torchvision target, boolean mask."""
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(3, size, size, generator=gen) * 0.2
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    mask = ((yy - 30) ** 2 / 18**2 + (xx - 34) ** 2 / 12**2) <= 1
    image[:, mask] = torch.tensor([0.9, 0.3, 0.2])[:, None]
    ys, xs = torch.where(mask)
    box = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
    target = {"boxes": box, "labels": torch.tensor([1]), "masks": mask[None].to(torch.uint8)}
    return image, target, mask


def losses_with_seed(model: torch.nn.Module, images, targets, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)  # RPN and RoI sampling draw random permutations
    return model(images, targets)


# --- baseline equals torchvision -------------------------------------------------------------------------


def _assert_same_behaviour(ours: MaskRCNN, reference: MaskRCNN) -> None:
    reference.load_state_dict(ours.state_dict(), strict=True)
    image, target, _ = ellipse_sample()
    ours.train()
    reference.train()
    ours_losses = losses_with_seed(ours, [image], [target])
    ref_losses = losses_with_seed(reference, [image], [target])
    assert ours_losses.keys() == ref_losses.keys()
    for key in ref_losses:
        torch.testing.assert_close(ours_losses[key], ref_losses[key], msg=key)

    ours.eval()
    reference.eval()
    with torch.no_grad():
        ours_out, ref_out = ours([image])[0], reference([image])[0]
    assert len(ref_out["boxes"]) > 0
    assert ours_out.keys() == ref_out.keys()
    for key in ref_out:
        torch.testing.assert_close(ours_out[key], ref_out[key], msg=key)


def test_baseline_equals_torchvision_maskrcnn_resnet50_fpn():
    cfg = ModelConfig.for_ablation("baseline", num_classes=3, min_size=64, max_size=64, box_score_thresh=0.0)
    reference = maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=3, min_size=64, max_size=64, box_score_thresh=0.0
    )
    _assert_same_behaviour(build_model(cfg), reference)


def test_baseline_with_small_backbone_equals_torchvision_composition():
    cfg = ModelConfig.for_ablation("baseline", backbone="resnet18", num_classes=3, min_size=64, max_size=64)
    backbone = resnet_fpn_backbone(
        backbone_name="resnet18", weights=None, norm_layer=torch.nn.BatchNorm2d, trainable_layers=5
    )
    reference = MaskRCNN(backbone, num_classes=3, min_size=64, max_size=64)
    _assert_same_behaviour(build_model(cfg), reference)


def test_baseline_is_plain_torchvision_maskrcnn():
    model = build_model(tiny("baseline"))
    assert type(model.roi_heads) is torchvision.models.detection.roi_heads.RoIHeads
    assert type(model.transform) is torchvision.models.detection.transform.GeneralizedRCNNTransform


# --- every ablation: losses and gradients ----------------------------------------------------------------


@pytest.mark.parametrize("ablation", list(ABLATIONS))
def test_training_forward_returns_finite_losses(ablation: str):
    torch.manual_seed(0)
    model = build_model(tiny(ablation)).train()
    image, target, _ = ellipse_sample()
    losses = losses_with_seed(model, [image], [target])
    expected = (
        {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
        if ablation == "baseline"
        else ATMASK_LOSSES
    )
    assert set(losses) == expected
    assert all(torch.isfinite(v) and v.ndim == 0 for v in losses.values())


def _grad_norms(model: torch.nn.Module, loss: torch.Tensor) -> dict[str, float]:
    model.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)
    head = model.roi_heads.atmask_head
    return {
        name: 0.0
        if module.mask_fcn_logits.weight.grad is None
        else module.mask_fcn_logits.weight.grad.norm().item()
        for name, module in (("prob", head.prob_predictor), ("thr", head.thr_predictor))
    }


@pytest.mark.parametrize("ablation", [a for a in ABLATIONS if a != "baseline"])
def test_gradients_reach_both_predictors(ablation: str):
    torch.manual_seed(0)
    model = build_model(tiny(ablation)).train()
    image, target, _ = ellipse_sample()
    losses = losses_with_seed(model, [image], [target])

    through_bin = _grad_norms(model, losses["loss_bin"])
    assert through_bin["prob"] > 0 and through_bin["thr"] > 0

    through_thr = _grad_norms(model, losses["loss_thr"])
    assert through_thr["thr"] > 0
    assert through_thr["prob"] == 0  # the threshold loss does not train the probability predictor

    through_prob = _grad_norms(model, losses["loss_prob"])
    assert through_prob["prob"] > 0 and through_prob["thr"] == 0


def _param_names(cfg: ModelConfig) -> set[str]:
    return {name for name, _ in build_model(cfg).named_parameters()}


@pytest.mark.parametrize(
    ("switch", "removed_prefix"),
    [
        ({"p2t_fusion": False}, "roi_heads.atmask_head.p2t."),
        ({"t2p_fusion": False}, "roi_heads.atmask_head.t2p."),
        ({"rt_source": "p2_p5"}, "roi_heads.atmask_head.rt_features."),
    ],
)
def test_switches_remove_exactly_their_parameters(switch: dict, removed_prefix: str):
    full = tiny("atmask")
    reduced = dataclasses.replace(full, head=dataclasses.replace(full.head, **switch))
    removed = _param_names(full) - _param_names(reduced)
    assert removed and all(name.startswith(removed_prefix) for name in removed)
    assert not _param_names(reduced) - _param_names(full)
    assert not any(name.startswith(removed_prefix) for name in _param_names(reduced))


def test_ablation_table_matches_the_paper():
    rows = {
        name: (h.threshold_branch, h.p2t_fusion, h.t2p_fusion, h.rt_source, h.k)
        for name, h in ABLATIONS.items()
    }
    assert rows["thr"] == (True, False, False, "p2_p5", 1.0)
    assert rows["thr_p2t"] == (True, True, False, "p2_p5", 1.0)
    assert rows["thr_fusion"] == (True, True, True, "p2_p5", 1.0)
    assert rows["atmask_k1"] == (True, True, True, "p2", 1.0)
    assert rows["atmask"] == (True, True, True, "p2", 2.0)
    assert rows["baseline"][0] is False


def test_border_threshold_target_peaks_on_the_boundary_and_decays():
    from model.losses import BORDER_HIGH, BORDER_LOW, threshold_target

    mask = torch.zeros(1, 28, 28)
    mask[:, 8:20, 8:20] = 1.0  # boundary between columns 7|8 and 19|20
    target = threshold_target(mask, "border")[0]
    row = target[14]
    assert row[7].item() == pytest.approx(BORDER_HIGH) and row[8].item() == pytest.approx(BORDER_HIGH)
    assert row[6] < row[7] and row[9] < row[8]  # decays away from the boundary, on both sides
    assert row[0].item() == pytest.approx(BORDER_LOW) and row[14].item() == pytest.approx(BORDER_LOW)
    assert target.min().item() == pytest.approx(BORDER_LOW) and target.max().item() == pytest.approx(
        BORDER_HIGH
    )


def test_border_threshold_target_trains():
    model = build_model(tiny("atmask", head={"threshold_target": "border"})).train()
    image, target, _ = ellipse_sample()
    losses = losses_with_seed(model, [image], [target])
    assert torch.isfinite(losses["loss_thr"])


# --- differentiable binarization -------------------------------------------------------------------------


def test_binarization_matches_equation_2():
    p = torch.tensor([0.9, 0.5, 0.2, 0.7])
    t = torch.tensor([0.1, 0.5, 0.6, 0.7])
    for k in (1.0, 2.0, 50.0):
        expected = 1.0 / (1.0 + torch.exp(-k * (p - t)))
        torch.testing.assert_close(differentiable_binarization(p, t, k), expected)
    assert differentiable_binarization(p, t, 2.0)[1] == 0.5  # P == T sits exactly on the decision boundary


def test_binarization_is_fp32_under_bf16_autocast():
    p = torch.rand(4, 28, 28, dtype=torch.bfloat16)
    t = torch.rand(4, 28, 28, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        b = differentiable_binarization(p, t, 2.0)
    assert b.dtype == torch.float32
    torch.testing.assert_close(b, torch.sigmoid(2.0 * (p.float() - t.float())))


def test_training_step_under_bf16_autocast_is_finite():
    model = build_model(tiny("atmask")).train()
    image, target, _ = ellipse_sample()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = losses_with_seed(model, [image], [target])
    assert losses["loss_bin"].dtype == torch.float32
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())


# --- inference -------------------------------------------------------------------------------------------


def test_inference_output_format_equals_torchvision():
    torch.manual_seed(0)
    image, _, _ = ellipse_sample()
    baseline = build_model(tiny("baseline", box_score_thresh=0.0)).eval()
    atmask = build_model(tiny("atmask", box_score_thresh=0.0)).eval()
    with torch.no_grad():
        ref, out = baseline([image])[0], atmask([image])[0]
    assert out.keys() == ref.keys() == {"boxes", "labels", "scores", "masks"}
    for key in ref:
        assert out[key].dtype == ref[key].dtype, key
        assert out[key].shape[1:] == ref[key].shape[1:], key
    assert out["masks"].shape == (len(out["boxes"]), 1, 64, 64)
    assert out["masks"].min() >= 0 and out["masks"].max() <= 1


def test_maps_are_returned_on_request_only():
    image, _, _ = ellipse_sample()
    model = build_model(tiny("atmask", box_score_thresh=0.0))
    maps = predict_with_maps(model, [image])[0]
    assert {"prob_masks", "thr_masks"} <= maps.keys()
    torch.testing.assert_close(maps["masks"] >= 0.5, maps["prob_masks"] >= maps["thr_masks"])
    with torch.no_grad():
        assert "thr_masks" not in model([image])[0]


def test_adaptive_threshold_decides_the_mask():
    """Hand-built P and T: the mask is where P >= T, not where P >= 0.5, and empty outside the box."""
    transform = build_model(tiny("atmask")).transform.eval()  # k = 2
    prob = torch.full((1, 1, 28, 28), 0.6)
    thr = torch.full((1, 1, 28, 28), 0.4)
    thr[..., 14:, :] = 0.9  # bottom half: the threshold is above P although P > 0.5
    prob[..., :, :7] = 0.3  # left quarter: P < 0.5 but still above a lower threshold
    thr[..., :14, :7] = 0.2
    result = [
        {
            "boxes": torch.tensor([[8.0, 8.0, 36.0, 36.0]]),
            "labels": torch.tensor([1]),
            "scores": torch.tensor([0.9]),
            "masks": prob,
            "thresholds": thr,
        }
    ]
    with transform.returning_maps():
        out = transform.postprocess(result, [(64, 64)], [(64, 64)])[0]
    mask = out["masks"][0, 0] >= 0.5
    torch.testing.assert_close(mask, out["prob_masks"][0, 0] >= out["thr_masks"][0, 0])
    assert mask[12, 20] and mask[12, 9]  # top half: P >= T, including where P = 0.3 < 0.5
    assert not mask[32, 20]  # bottom half: P = 0.6 > 0.5 but below T = 0.9
    assert not mask[:, 40:].any() and not mask[40:, :].any()  # outside the box
    assert mask.sum() > 0


@pytest.mark.slow
@pytest.mark.parametrize("ablation", ["baseline", "atmask"])
def test_overfits_one_image(ablation: str):
    torch.manual_seed(0)
    model = build_model(tiny(ablation, num_classes=2, norm="bn", box_head_dim=128)).train()
    image, target, mask = ellipse_sample()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)
    totals = []
    for _ in range(80):
        loss = sum(model([image], [target]).values())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        optimizer.step()
        totals.append(loss.item())
    assert sum(totals[-5:]) / 5 < 0.3 * sum(totals[:5]) / 5

    out = predict_with_maps(model, [image])[0]
    assert out["scores"][0] > 0.5
    predicted = out["masks"][0, 0] >= 0.5
    iou = (predicted & mask).sum() / (predicted | mask).sum()
    assert iou > 0.8, f"mask IoU {iou:.3f}"


# --- configuration errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "key"),
    [
        (lambda: ModelConfig.for_ablation("atmask", backbone="vgg16"), "model.backbone"),
        (lambda: ModelConfig.for_ablation("atmask_v2"), "ablation"),
        (lambda: HeadConfig(threshold_branch=False), "head"),
        (lambda: HeadConfig(rt_source="p3"), "head.rt_source"),
        (lambda: HeadConfig(k=0), "head.k"),
        (lambda: ModelConfig.for_ablation("atmask", num_classes=1), "model.num_classes"),
        (lambda: ModelConfig.for_ablation("atmask", min_size=900, max_size=800), "model.min_size"),
        (lambda: ModelConfig.for_ablation("atmask", anchor_sizes=(32, 64)), "model.anchor_sizes"),
        (lambda: ModelConfig.for_ablation("atmask", frozen=("head",)), "model.frozen"),
        (lambda: ModelConfig.for_ablation("atmask", bakbone="resnet18"), "model.bakbone"),
        (lambda: ModelConfig.for_ablation("atmask", head={"kk": 2}), "head.kk"),
    ],
)
def test_bad_config_fails_when_built(build, key: str):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build()


def test_unknown_backbone_error_lists_allowed_values():
    with pytest.raises(ConfigError, match="resnet18, resnet34, resnet50, resnet101"):
        ModelConfig.for_ablation("atmask", backbone="vgg16")


def test_config_round_trips_through_dict():
    cfg = tiny("thr_p2t", frozen=("rpn",))
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


# --- weights ---------------------------------------------------------------------------------------------


def test_loads_backbone_and_detector_weights(tmp_path):
    resnet = torchvision.models.resnet18(weights=None)
    torch.save(resnet.state_dict(), tmp_path / "resnet18.pth")
    model = build_model(tiny("atmask", backbone_weights=str(tmp_path / "resnet18.pth")))
    torch.testing.assert_close(model.backbone.body.conv1.weight, resnet.conv1.weight)
    assert isinstance(model.backbone.body.bn1, torchvision.ops.FrozenBatchNorm2d)  # pretrained: frozen BN

    # A detector without a mask head (as a Faster R-CNN checkpoint) initialises everything else.
    detector = build_model(tiny("atmask"))
    state = {k: v for k, v in detector.state_dict().items() if "atmask_head" not in k}
    torch.save(state, tmp_path / "detector.pth")
    loaded = build_model(
        tiny(
            "atmask",
            norm="bn",
            weights=str(tmp_path / "detector.pth"),
            frozen=("backbone", "fpn", "rpn", "box"),
        )
    )
    torch.testing.assert_close(
        loaded.roi_heads.box_predictor.cls_score.weight, detector.roi_heads.box_predictor.cls_score.weight
    )
    trainable = {n for n, p in loaded.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("roi_heads.atmask_head.") for n in trainable)


def test_mismatched_weights_name_the_file_and_key(tmp_path):
    torch.save(build_model(tiny("atmask", num_classes=5)).state_dict(), tmp_path / "other.pth")
    with pytest.raises(ConfigError, match=r"model\.weights: .*other\.pth does not match.*different shape"):
        build_model(tiny("atmask", weights=str(tmp_path / "other.pth")))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(
        ConfigError, match=r"model\.backbone_weights: .*junk\.pth cannot be loaded with torch\.load"
    ):
        build_model(tiny("atmask", backbone_weights=str(tmp_path / "junk.pth")))
    with pytest.raises(ConfigError, match="does not exist"):
        build_model(tiny("atmask", weights=str(tmp_path / "missing.pth")))
