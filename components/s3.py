"""The S3 (or MinIO) client every step uses: credentials from the environment, anonymous when none."""

from __future__ import annotations

from typing import Any


def s3_client(endpoint_url: str | None) -> Any:
    """A boto3 S3 client for ``endpoint_url`` (None: ``$AWS_ENDPOINT_URL`` or AWS), with retries.

    Without credentials the client signs nothing, so public buckets work anonymously.
    """
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    session = boto3.session.Session()
    config = Config(retries={"max_attempts": 3, "mode": "standard"}, max_pool_connections=32)
    if session.get_credentials() is None:
        config = config.merge(Config(signature_version=UNSIGNED))  # public bucket, anonymous access
    return session.client("s3", endpoint_url=endpoint_url, config=config)
