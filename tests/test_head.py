"""The ATMask mask head's wiring (paper §3.3, Fig. 3) and its box branch against torchvision's.

Forward hooks record what each fusion reads, so a swapped or rewired fusion fails here even when the
shapes still fit.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torchvision.models.detection.roi_heads import RoIHeads

from model import ModelConfig, build_model
from model.config import ABLATIONS

TINY = dict(
    backbone="resnet18", num_classes=3, min_size=64, max_size=64, fpn_channels=16, mask_head_channels=16,
    box_head_dim=32, anchor_sizes=(8, 16, 32, 64, 128), rpn_post_nms_top_n_train=50,
    rpn_post_nms_top_n_test=20, box_batch_size_per_image=32,
)  # fmt: skip


def _head(fusion: str, **switches):
    cfg = ModelConfig.for_ablation("atmask", head={"fusion": fusion, **switches}, **TINY)
    torch.manual_seed(0)
    return build_model(cfg).roi_heads.atmask_head.eval()


def _record(head) -> dict[str, tuple]:
    """``{module: (inputs, output)}`` of the convs, fusions and predictors on one forward pass."""
    seen: dict[str, tuple] = {}
    for name in ("prob_convs", "thr_convs", "p2t", "t2p", "prob_predictor", "thr_predictor"):
        module = getattr(head, name)
        if module is not None:
            module.register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, (i, o)))
    features = {k: torch.rand(1, 16, s, s) for k, s in zip("0123", (16, 8, 4, 2), strict=True)}
    with torch.no_grad():
        head(features, [torch.tensor([[4.0, 4.0, 40.0, 40.0], [10.0, 12.0, 60.0, 50.0]])], [(64, 64)])
    return seen


def test_chained_fusion_p2t_first_then_t2p_reads_the_fused_threshold_features() -> None:
    seen = _record(_head("chained"))
    f_prob, f_thr = seen["prob_convs"][1], seen["thr_convs"][1]
    p2t_in, p2t_out = seen["p2t"]
    assert torch.equal(p2t_in[0], f_prob) and torch.equal(p2t_in[1], f_thr)  # P2T: concat(F_P, F_T)
    t2p_in, t2p_out = seen["t2p"]
    assert torch.equal(t2p_in[0], f_prob)
    assert torch.equal(t2p_in[1], p2t_out)  # T2P reads F_T' (the fused threshold features), not F_T
    assert not torch.equal(p2t_out, f_thr)
    assert torch.equal(seen["thr_predictor"][0][0], p2t_out)  # T comes from F_T'
    assert torch.equal(seen["prob_predictor"][0][0], t2p_out)  # P comes from F_P'


def test_parallel_fusion_reads_the_unfused_pair_twice() -> None:
    seen = _record(_head("parallel"))
    f_prob, f_thr = seen["prob_convs"][1], seen["thr_convs"][1]
    for name in ("p2t", "t2p"):
        assert torch.equal(seen[name][0][0], f_prob) and torch.equal(seen[name][0][1], f_thr)
    assert torch.equal(seen["thr_predictor"][0][0], seen["p2t"][1])
    assert torch.equal(seen["prob_predictor"][0][0], seen["t2p"][1])


@pytest.mark.parametrize(
    ("switches", "absent", "thr_reads", "prob_reads"),
    [
        ({"p2t_fusion": False}, "p2t", "thr_convs", "t2p"),  # T2P alone reads the unfused F_T
        ({"t2p_fusion": False}, "t2p", "p2t", "prob_convs"),
        ({"p2t_fusion": False, "t2p_fusion": False}, None, "thr_convs", "prob_convs"),
    ],
)
def test_each_switch_removes_its_own_fusion_and_nothing_else(switches, absent, thr_reads, prob_reads) -> None:
    head = _head("chained", **switches)
    assert (head.p2t is None) == (absent == "p2t" or not switches.get("p2t_fusion", True))
    assert (head.t2p is None) == (absent == "t2p" or not switches.get("t2p_fusion", True))
    seen = _record(head)
    assert torch.equal(seen["thr_predictor"][0][0], seen[thr_reads][1])
    assert torch.equal(seen["prob_predictor"][0][0], seen[prob_reads][1])
    if head.t2p is not None:
        assert torch.equal(seen["t2p"][0][1], seen["thr_convs"][1])


def test_the_papers_fusion_ablations_are_chained_and_the_border_ablation_differs_only_in_its_target() -> None:
    for name in ("thr_fusion", "atmask_k1", "atmask", "atmask_border"):
        assert ABLATIONS[name].fusion == "chained"
    border = ABLATIONS["atmask_border"]
    assert border.threshold_target == "border"
    assert dataclasses.replace(border, threshold_target="inverted") == ABLATIONS["atmask"]


def _box_pair(ablation: str):
    torch.manual_seed(0)
    model = build_model(ModelConfig.for_ablation(ablation, **TINY))
    heads = model.roi_heads
    reference = RoIHeads(  # torchvision's own, on the same box modules (hence the same weights)
        heads.box_roi_pool, heads.box_head, heads.box_predictor, 0.5, 0.5, 32, 0.25, None, 0.05, 0.5, 100
    )
    features = {
        k: torch.rand(2, 16, s, s)
        for k, s in zip(["0", "1", "2", "3", "pool"], (16, 8, 4, 2, 1), strict=True)
    }
    proposals = [torch.tensor([[2.0, 2.0, 30.0, 30.0], [8.0, 6.0, 50.0, 44.0], [20.0, 20.0, 60.0, 62.0]])] * 2
    return heads, reference, features, proposals


def test_atmask_box_branch_gives_torchvisions_box_losses() -> None:
    heads, reference, features, proposals = _box_pair("atmask")
    masks = torch.zeros(1, 64, 64, dtype=torch.uint8)
    masks[:, 8:40, 6:44] = 1
    targets = [
        {"boxes": torch.tensor([[6.0, 8.0, 44.0, 40.0]]), "labels": torch.tensor([1]), "masks": masks}
    ] * 2
    heads.train(), reference.train()
    torch.manual_seed(1)
    ours = heads(features, [p.clone() for p in proposals], [(64, 64)] * 2, targets)[1]
    torch.manual_seed(1)
    theirs = reference(features, [p.clone() for p in proposals], [(64, 64)] * 2, targets)[1]
    for key in ("loss_classifier", "loss_box_reg"):
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0)


def test_atmask_box_branch_gives_torchvisions_detections() -> None:
    heads, reference, features, proposals = _box_pair("atmask")
    heads.eval(), reference.eval()
    with torch.no_grad():
        ours = heads(features, proposals, [(64, 64)] * 2)[0]
        theirs = reference(features, proposals, [(64, 64)] * 2)[0]
    assert len(ours) == len(theirs) == 2
    for a, b in zip(ours, theirs, strict=True):
        assert len(b["boxes"]) > 0
        for key in ("boxes", "scores", "labels"):
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_a_stored_config_loads_back_whatever_the_ablation_is_called() -> None:
    cfg = dataclasses.replace(
        ModelConfig.for_ablation("atmask", head={"k": 3.0}, **TINY), ablation="atmask_k3"
    )
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    legacy = cfg.to_dict()
    del legacy["head"]["fusion"]  # written before the fusion order was a setting: the parallel wiring
    assert ModelConfig.from_dict(legacy).head.fusion == "parallel"
