"""Real local services for tests: an MLflow tracking server and a moto S3 server, both on 127.0.0.1.

Each is started once per test session (start-up takes seconds) and stopped at the end. Tests isolate
themselves by using their own experiment / bucket names.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests

S3_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


# MLflow 3's server also starts job-queue workers (several processes) that the tests never use: off, so
# they do not take CPU from the tests on a 2-core machine.
MLFLOW_SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _bin(name: str) -> str:
    local = Path(sys.executable).with_name(name)
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise RuntimeError(f"'{name}' is not installed in this environment; run 'make test' to set it up")
    return found


@contextmanager
def _serve(
    cmd: list[str], health_url: str, log: Path, env: dict[str, str], timeout: float = 90
) -> Iterator[None]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if requests.get(health_url, timeout=2).status_code < 500:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{cmd[0]} did not become healthy in {timeout}s:\n{log.read_text()[-3000:]}"
                )
            time.sleep(0.3)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Tracking URI of a real ``mlflow server`` (SQLite backend store, local artifact store)."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    cmd = [
        _bin("mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination",
        str(root / "artifacts"),
        "--workers",
        "1",
    ]
    uri = f"http://127.0.0.1:{port}"
    env = {**os.environ, **MLFLOW_SERVER_ENV}
    with _serve(cmd, f"{uri}/health", root / "server.log", env):
        yield uri


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Endpoint URL of moto's standalone S3 server; AWS test credentials are set in the environment."""
    root = tmp_path_factory.mktemp("s3-server")
    port = free_port()
    env = {**os.environ, **S3_CREDENTIALS}
    url = f"http://127.0.0.1:{port}"
    previous = {k: os.environ.get(k) for k in S3_CREDENTIALS}
    os.environ.update(S3_CREDENTIALS)
    try:
        with _serve(
            [_bin("moto_server"), "-H", "127.0.0.1", "-p", str(port)], f"{url}/", root / "server.log", env
        ):
            yield url
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_server: str) -> str:
    """A fresh, empty bucket on the moto server (its name)."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name
