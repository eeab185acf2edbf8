"""params.yaml -> typed objects: one ablation table, recipes that override the shared model keys."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from components.errors import UserError
from components.params import SYNTHETIC_SHAPES, load_params
from model.config import ABLATIONS

ROOT = Path(__file__).resolve().parents[1]


def _params(tmp_path: Path, **sections):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw.update(sections)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_params(path)


def test_the_committed_ablations_are_the_papers_table() -> None:
    params = load_params(ROOT / "params.yaml")
    assert {name: params.ablations[name] for name in ABLATIONS if name in params.ablations} == {
        name: ABLATIONS[name] for name in params.ablations
    }


def test_a_paper_ablation_entry_states_only_its_differences(tmp_path: Path) -> None:
    params = _params(tmp_path, ablations={"thr": {"k": 2}, "atmask": {}})
    thr = params.ablations["thr"]
    assert (thr.threshold_branch, thr.p2t_fusion, thr.t2p_fusion, thr.rt_source) == (
        True,
        False,
        False,
        "p2_p5",
    )
    assert thr.k == 2.0  # the one difference; before, the unstated switches became the full ATMask head
    assert params.ablations["atmask"] == ABLATIONS["atmask"]


def test_a_new_ablation_starts_from_a_base_or_states_every_switch(tmp_path: Path) -> None:
    params = _params(
        tmp_path,
        ablations={
            "k3": {"base": "atmask", "k": 3.0},
            "custom": {
                "threshold_branch": True,
                "p2t_fusion": False,
                "t2p_fusion": True,
                "rt_source": "p2",
                "k": 1,
            },
        },
    )
    assert params.ablations["k3"] == dataclasses.replace(ABLATIONS["atmask"], k=3.0)
    assert params.ablations["custom"].t2p_fusion and not params.ablations["custom"].p2t_fusion


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"atmsk": {"k": 1.0}}, "ablations.atmsk: unknown ablation; the paper's are baseline, thr"),
        ({"mine": {"base": "atmsk"}}, "ablations.mine.base: 'atmsk' is not one of the paper's ablations"),
        ({"thr": {"kk": 1.0}}, "ablations.thr.kk: unknown key"),
        ({"thr": {"k": "two"}}, "ablations.thr.k: expected a number, got 'two'"),
        ({"baseline": {"p2t_fusion": True}}, "p2t_fusion/t2p_fusion need threshold_branch: true"),
    ],
)
def test_bad_ablation_entries_name_the_key(tmp_path: Path, spec: dict, message: str) -> None:
    with pytest.raises(UserError, match="^" + str(tmp_path / "params.yaml").replace(".", r"\.")) as err:
        _params(tmp_path, ablations=spec)
    assert message in str(err.value)


def test_the_model_section_is_the_papers_and_the_demo_recipe_makes_it_small(tmp_path: Path) -> None:
    params = load_params(ROOT / "params.yaml")
    assert params.recipe == "cpu_demo"
    paper = load_params(ROOT / "params.yaml", {"train.recipe": "r50_fpn_coco"}).model_config("atmask", 81)
    assert (paper.backbone, paper.fpn_channels, paper.min_size, paper.max_size) == (
        "resnet50",
        256,
        800,
        1333,
    )
    demo = params.model_config("atmask", 4)
    assert (demo.backbone, demo.fpn_channels, demo.min_size) == ("resnet18", 64, 128)
    r101 = load_params(ROOT / "params.yaml", {"train.recipe": "r101_fpn_coco"}).model_config("atmask", 81)
    assert r101.backbone == "resnet101" and r101.frozen == ("backbone", "fpn", "rpn", "box")


def test_the_synthetic_limit_follows_the_generators_shapes() -> None:
    from components.synthetic import SHAPES

    assert len(SHAPES) == SYNTHETIC_SHAPES
