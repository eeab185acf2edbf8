"""Tiny trained runs and a tiny synthetic dataset for the evaluation / report / register / predict tests.

A "run" is what ``atmask train`` leaves behind: ``runs/<name>/model.pt`` written by ``save_model`` after
a few real SGD steps of ``build_model`` on the synthetic training split (seconds on 2 CPU cores).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from components.checkpoint import save_model
from model.builder import build_model
from model.config import ModelConfig
from model.data import CocoInstances, collate, to_float_image
from pipelines.main import main as atmask

TINY_MODEL = {
    "backbone": "resnet18",
    "fpn_channels": 32,
    "mask_head_channels": 32,
    "box_head_dim": 64,
    "min_size": 64,
    "max_size": 64,
    "anchor_sizes": (8, 16, 32, 64, 128),
    "rpn_post_nms_top_n_train": 100,
    "rpn_post_nms_top_n_test": 50,
    "box_batch_size_per_image": 32,
    "box_detections_per_img": 20,
    "box_score_thresh": 0.0,  # an untrained model still returns detections to evaluate
}


@pytest.fixture(scope="session")
def eval_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic COCO folder (8 train, 6 val images of 64 px, 2 categories) written by ``atmask ingest``."""
    out = tmp_path_factory.mktemp("eval-data") / "coco"
    code = atmask(
        ["ingest", "--source", "synthetic", "--out", str(out), "--synthetic-train-images", "8",
         "--synthetic-val-images", "6", "--synthetic-image-size", "64", "--synthetic-num-categories", "2",
         "--synthetic-max-instances", "3", "--seed", "3"]
    )  # fmt: skip
    assert code == 0
    return out


def train_tiny(
    run_dir: Path, data: Path, ablation: str, seed: int, steps: int = 4, split: str = "train"
) -> Path:
    """Train ``steps`` SGD steps of a tiny ``ablation`` model on ``split`` and save ``run_dir/model.pt``."""
    torch.manual_seed(seed)
    dataset = CocoInstances.from_root(data, split, remove_empty=True)
    cats = json.loads((data / "annotations" / "instances_train.json").read_text())["categories"]
    cats = sorted(cats, key=lambda c: c["id"])
    cfg = ModelConfig.for_ablation(ablation, num_classes=len(cats) + 1, **TINY_MODEL)
    model = build_model(cfg).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.02, momentum=0.9)
    for step in range(steps):
        images, targets = collate([dataset[(2 * step + i) % len(dataset)] for i in range(2)])
        images = [to_float_image(im) for im in images]
        loss = sum(model(images, targets).values())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        opt.step()
    save_model(run_dir / "model.pt", model, cfg, cats)
    return run_dir


@pytest.fixture(scope="session")
def make_run(eval_data: Path) -> Callable[..., Path]:
    """``make_run(run_dir, ablation, seed)`` -> a run folder with a freshly trained tiny model."""

    def make(
        run_dir: Path, ablation: str = "atmask", seed: int = 0, steps: int = 4, split: str = "train"
    ) -> Path:
        return train_tiny(Path(run_dir), eval_data, ablation, seed, steps, split)

    return make


@pytest.fixture(scope="session")
def trained_atmask(tmp_path_factory: pytest.TempPathFactory, make_run: Callable[..., Path]) -> Path:
    """One trained ATMask run folder, shared read-only by tests (copy it before writing into it).

    60 steps on the val images themselves (~15 s): it memorises them enough for clearly non-zero mask AP,
    so metric equality is checked on non-trivial numbers.
    """
    return make_run(tmp_path_factory.mktemp("runs") / "atmask", "atmask", 0, steps=60, split="val")
