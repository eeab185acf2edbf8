"""Shared test set-up. Fixture modules (tests/fixtures_*.py: S3 server, MLflow server, ...) load as plugins."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest_plugins = sorted(p.stem for p in Path(__file__).parent.glob("fixtures_*.py"))

REPO_ROOT = Path(__file__).resolve().parents[1]
PENNFUDAN = REPO_ROOT.parent / "shared" / "datasets" / "pennfudan-coco"

torch.set_num_threads(2)


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture
def pennfudan() -> Path:
    if not (PENNFUDAN / "annotations" / "instances_train.json").is_file():
        pytest.skip(f"Penn-Fudan dataset not found at {PENNFUDAN} (it ships in ../shared/datasets)")
    return PENNFUDAN
