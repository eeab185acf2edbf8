"""Initialisation weights from S3 (a real S3 API server on 127.0.0.1): downloaded once, verified, reused."""

from __future__ import annotations

import io
from pathlib import Path

import boto3
import pytest
import torch
import torchvision

from components.errors import UserError
from components.weights import fetch_weights
from model import ModelConfig, build_model

pytestmark = pytest.mark.integration


def _upload(endpoint: str, bucket: str, key: str, state: dict[str, torch.Tensor]) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    boto3.client("s3", endpoint_url=endpoint).put_object(Bucket=bucket, Key=key, Body=buf.getvalue())


def _config(**weights: str) -> ModelConfig:
    return ModelConfig.for_ablation(
        "atmask", backbone="resnet18", num_classes=3, fpn_channels=16, mask_head_channels=16, **weights
    )


def test_backbone_weights_from_s3_are_cached_and_refreshed(s3_server: str, s3_bucket: str, tmp_path: Path):
    resnet = torchvision.models.resnet18(weights=None)
    _upload(s3_server, s3_bucket, "init/resnet18.pth", resnet.state_dict())
    url = f"s3://{s3_bucket}/init/resnet18.pth"

    local_cfg = fetch_weights(_config(backbone_weights=url), s3_server, cache=tmp_path)
    local = Path(local_cfg.backbone_weights)
    assert local == tmp_path / s3_bucket / "init" / "resnet18.pth"
    model = build_model(local_cfg)
    torch.testing.assert_close(model.backbone.body.conv1.weight, resnet.conv1.weight)

    first_mtime = local.stat().st_mtime_ns
    assert fetch_weights(_config(backbone_weights=url), s3_server, cache=tmp_path) == local_cfg
    assert local.stat().st_mtime_ns == first_mtime  # unchanged object: not downloaded again

    other = torchvision.models.resnet18(weights=None)
    _upload(s3_server, s3_bucket, "init/resnet18.pth", other.state_dict())
    refreshed = build_model(fetch_weights(_config(backbone_weights=url), s3_server, cache=tmp_path))
    torch.testing.assert_close(refreshed.backbone.body.conv1.weight, other.conv1.weight)
    assert not list(tmp_path.rglob("*.tmp"))


def test_local_paths_are_left_alone(tmp_path: Path):
    cfg = _config(weights=str(tmp_path / "detector.pth"))
    assert fetch_weights(cfg, cache=tmp_path) is cfg


def test_missing_s3_object_names_the_key_and_url(s3_server: str, s3_bucket: str, tmp_path: Path):
    url = f"s3://{s3_bucket}/nope/detector.pth"
    with pytest.raises(UserError, match=rf"model\.weights: cannot fetch {url}"):
        fetch_weights(_config(weights=url), s3_server, cache=tmp_path)
    with pytest.raises(UserError, match=r"model\.backbone_weights: s3://bucket-only is not an S3 object URL"):
        fetch_weights(_config(backbone_weights="s3://bucket-only"), s3_server, cache=tmp_path)
    assert not any(p.is_file() for p in tmp_path.rglob("*"))
