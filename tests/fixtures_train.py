"""A tiny synthetic dataset and params.yaml for training tests (resnet18, FPN 32, 64 px, batch 2)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

TINY_PARAMS = {
    "model": {
        "backbone": "resnet18",
        "fpn_channels": 32,
        "mask_head_channels": 32,
        "box_head_dim": 64,
        "min_size": 64,
        "max_size": 64,
        "anchor_sizes": [8, 16, 32, 64, 128],
        "rpn_post_nms_top_n_train": 100,
        "rpn_post_nms_top_n_test": 50,
        "box_batch_size_per_image": 64,
        "box_detections_per_img": 20,
    },
    "ablations": {
        "baseline": {"threshold_branch": False, "p2t_fusion": False, "t2p_fusion": False},
        "atmask": {
            "threshold_branch": True,
            "p2t_fusion": True,
            "t2p_fusion": True,
            "rt_source": "p2",
            "k": 2.0,
        },
    },
    "train": {"recipe": "tiny"},
    "recipes": {
        "tiny": {
            "lr": 0.01,
            "batch_size": 2,
            "base_batch_size": 2,
            "iterations": 6,
            "warmup_iters": 2,
            "lr_steps": [5],
            "workers": 0,
            "checkpoint_every": 2,
            "log_every": 1,
        }
    },
    "mlflow": {"experiment": "train-tests"},
}


def write_params(path: Path, **recipe: object) -> Path:
    """TINY_PARAMS with the ``tiny`` recipe's keys replaced by ``recipe``."""
    raw = yaml.safe_load(yaml.safe_dump(TINY_PARAMS))
    raw["recipes"]["tiny"].update(recipe)
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_coco(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 train / 4 val synthetic 64x64 images in the layout 'atmask ingest' writes."""
    from pipelines.main import main

    out = tmp_path_factory.mktemp("tiny-coco") / "coco"
    argv = ["ingest", "--source", "synthetic", "--out", str(out), "--synthetic-train-images", "8"]
    argv += ["--synthetic-val-images", "4", "--synthetic-image-size", "64"]
    assert main(argv) == 0
    return out


@pytest.fixture(scope="session")
def _tracking_db(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow-train') / 'mlflow.db'}"


@pytest.fixture
def local_tracking(_tracking_db: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """One SQLite MLflow store for the whole session (creating one costs seconds)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", _tracking_db)
    return _tracking_db
