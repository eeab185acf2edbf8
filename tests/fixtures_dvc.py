"""A real DVC repository whose dataset (``data/coco``, tiny synthetic) is pushed to an S3 remote on moto's
server: what ``atmask pipeline submit`` and ``run-local`` read their data version from (dvc.lock) and what
``atmask pull`` fetches by hash. Built once per test session with the real ``dvc`` and ``atmask`` CLIs."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY_DATA = {"train_images": 8, "val_images": 4, "image_size": 64, "num_categories": 2, "max_instances": 3}
INGEST_STAGE = {
    "stages": {
        "ingest": {"cmd": "atmask ingest --params params.yaml", "params": ["data"], "outs": ["data/coco"]}
    }
}


@dataclass(frozen=True)
class DvcRepo:
    path: Path
    md5: str  # dvc.lock's hash of data/coco
    remote: str  # the default remote's URL (s3://bucket/dvc)
    endpoint: str  # the S3 API server


def tool_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `atmask`, `dvc`
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["DVC_NO_ANALYTICS"] = "1"
    return env


def run_tool(repo: Path, *cmd: str) -> str:
    result = subprocess.run(cmd, cwd=repo, env=tool_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(cmd)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def make_dvc_repo(path: Path, remote: str, endpoint: str | None) -> str:
    """git + DVC repo with the ingest stage run and pushed; returns dvc.lock's md5 of data/coco."""
    path.mkdir(parents=True)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"]["synthetic"].update(TINY_DATA)
    (path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    (path / "dvc.yaml").write_text(yaml.safe_dump(INGEST_STAGE, sort_keys=False))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
    run_tool(path, "git", "init", "-q")
    run_tool(path, "git", "remote", "add", "origin", "https://github.com/atmask-rcnn/atmask.git")
    run_tool(path, "dvc", "init", "-q")
    run_tool(path, "dvc", "remote", "add", "-d", "storage", remote)
    if endpoint:
        run_tool(path, "dvc", "remote", "modify", "storage", "endpointurl", endpoint)
    run_tool(path, "dvc", "repro", "ingest")
    run_tool(path, "dvc", "push")
    run_tool(path, "git", "add", "-A")
    run_tool(path, *git, "commit", "-qm", "data")
    lock = yaml.safe_load((path / "dvc.lock").read_text())
    (out,) = lock["stages"]["ingest"]["outs"]
    assert out["path"] == "data/coco"
    return out["md5"]


@pytest.fixture(scope="session")
def dvc_repo(tmp_path_factory: pytest.TempPathFactory, s3_server: str) -> Iterator[DvcRepo]:
    """The repo, its data version pushed to ``s3://<fresh bucket>/dvc`` on the moto server."""
    import boto3

    bucket = f"dvc-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    path = tmp_path_factory.mktemp("dvc-data") / "repo"
    remote = f"s3://{bucket}/dvc"
    md5 = make_dvc_repo(path, remote, s3_server)
    yield DvcRepo(path, md5, remote, s3_server)
