"""Initialisation weights named in params.yaml (``model.backbone_weights``, ``model.weights``).

A value is a local path or an ``s3://bucket/key`` URL (AWS S3 or MinIO: the endpoint comes from params
``data.s3_endpoint_url`` or ``$AWS_ENDPOINT_URL``, credentials from the usual AWS variables). S3 objects are
downloaded once into ``$ATMASK_CACHE_DIR/weights`` (default ``~/.cache/atmask/weights``) and reused while
the object's ETag is unchanged. Nothing is ever fetched from a model hub.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from urllib.parse import urlparse

from components.errors import UserError
from components.io import atomic_path, write_text_atomic
from model.config import ModelConfig

WEIGHT_KEYS = ("backbone_weights", "weights")


def cache_root() -> Path:
    return Path(os.environ.get("ATMASK_CACHE_DIR") or Path.home() / ".cache" / "atmask") / "weights"


def fetch_weights(
    cfg: ModelConfig, endpoint_url: str | None = None, cache: Path | None = None
) -> ModelConfig:
    """``cfg`` with every ``s3://`` weights URL replaced by the path of a local, verified copy."""
    changes = {
        key: str(download_s3_object(value, cache or cache_root(), endpoint_url, where=f"model.{key}"))
        for key in WEIGHT_KEYS
        if isinstance(value := getattr(cfg, key), str) and value.startswith("s3://")
    }
    return dataclasses.replace(cfg, **changes) if changes else cfg


def download_s3_object(url: str, cache: Path, endpoint_url: str | None, *, where: str) -> Path:
    """The local copy of ``s3://bucket/key`` under ``cache/bucket/key``, downloaded when its ETag changed."""
    from botocore.exceptions import BotoCoreError, ClientError

    from components.s3 import s3_client

    parsed = urlparse(url)
    bucket, key = parsed.netloc, parsed.path.lstrip("/")
    if not bucket or not key or key.endswith("/"):
        raise UserError(f"{where}: {url} is not an S3 object URL; expected s3://bucket/path/to/weights.pth")
    client = s3_client(endpoint_url)
    local = cache / bucket / key
    stamp = local.with_name(local.name + ".etag")
    try:
        etag = client.head_object(Bucket=bucket, Key=key)["ETag"].strip('"')
        if local.is_file() and stamp.is_file() and stamp.read_text(encoding="utf-8") == etag:
            return local
        with atomic_path(local) as tmp:
            client.download_file(bucket, key, str(tmp))
    except (BotoCoreError, ClientError) as err:
        at = f" at endpoint {endpoint_url}" if endpoint_url else ""
        raise UserError(
            f"{where}: cannot fetch {url}{at} ({err}); check the URL, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
            "and data.s3_endpoint_url (or AWS_ENDPOINT_URL)"
        ) from None
    write_text_atomic(stamp, etag)
    return local
