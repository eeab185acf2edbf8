"""The whole KFP DAG in the real image (``atmask pipeline run-local --runner docker``, kfp.local.DockerRunner),
logging to the MLflow server exactly as k8s/base/mlflow.yaml deploys it: the ``mlflow`` image, its
wait-for-db init container, then the server with the manifest's command and arguments; a real PostgreSQL
backend store (Debian's package, on 127.0.0.1), artifacts on moto's S3 server, basic auth on. Every
container runs restricted as on Kubernetes (read-only root, uid 10001, no capabilities), on the host
network (``127.0.0.1`` is the host for all of them)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from fixtures_docker import DOCKER, RESTRICTED, docker, pod_dir

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "k8s" / "base" / "mlflow.yaml"
pytestmark = [pytest.mark.container, pytest.mark.integration, pytest.mark.timeout(2400)]


def pod_spec() -> dict[str, Any]:
    (deployment,) = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d and d["kind"] == "Deployment"]
    return deployment["spec"]["template"]["spec"]


def run_container(container: dict[str, Any], image: str, env: dict[str, str], *extra: str) -> list[str]:
    """`docker run` arguments for a manifest container: its command as the entrypoint, its env names."""
    assert {e["name"] for e in container["env"]} == set(env), "every variable the manifest sets, no other"
    flags = [f for name, value in env.items() for f in ("-e", f"{name}={value}")]
    command, *args = container["command"]
    args += container.get("args", [])
    args = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in args]  # Kubernetes expands $(VAR)
    return [*RESTRICTED, "--network", "host", *flags, *extra, "--entrypoint", command, image, *args]


@dataclass(frozen=True)
class Server:
    url: str
    username: str
    password: str
    bucket: str


@pytest.fixture(scope="module")
def deployed_mlflow(
    mlflow_image: str, postgres, s3_server: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    import boto3
    from fixtures_services import S3_CREDENTIALS, free_port

    s3_bucket = f"mlflow-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=s3_bucket)
    spec = pod_spec()
    (init,), (main,) = spec["initContainers"], spec["containers"]
    password = "admin-" + uuid.uuid4().hex[:12]
    auth = pod_dir("atmask-mlflow-auth-")
    ini = auth / "basic_auth.ini"
    ini.write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = {postgres.uri('mlflow_auth')}\nadmin_username = admin\nadmin_password = {password}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    ini.chmod(0o644)
    store = {"HOME": "/tmp", "MLFLOW_BACKEND_STORE_URI": postgres.uri("mlflow")}
    done = docker("run", "--rm", *run_container(init, mlflow_image, store), timeout=300)
    assert "schema up to date" in done.stdout, done.stdout + done.stderr
    port = free_port()
    env = {
        **store,
        "MLFLOW_AUTH_CONFIG_PATH": "/etc/mlflow-auth/basic_auth.ini",
        "MLFLOW_ARTIFACTS_DESTINATION": f"s3://{s3_bucket}/mlflow",
        "AWS_ACCESS_KEY_ID": S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "AWS_SECRET_ACCESS_KEY": S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        "MLFLOW_S3_ENDPOINT_URL": s3_server,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": uuid.uuid4().hex,
    }
    assert {e["name"]: e.get("value") for e in main["env"]}["MLFLOW_AUTH_CONFIG_PATH"] == env[
        "MLFLOW_AUTH_CONFIG_PATH"
    ]
    name = f"atmask-mlflow-{uuid.uuid4().hex[:8]}"
    cmd = run_container(main, mlflow_image, env, "-v", f"{auth}:/etc/mlflow-auth:ro", "--name", name)
    cmd = [c.replace("--port=5000", f"--port={port}") for c in cmd]  # host network: a free port
    docker("run", "-d", *cmd)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, name)
        yield Server(url, "admin", password, s3_bucket)
    finally:
        logs = docker("logs", name, check=False)
        (tmp_path_factory.mktemp("mlflow-server") / "server.log").write_text(logs.stdout + logs.stderr)
        docker("rm", "-f", name, check=False)
        shutil.rmtree(auth, ignore_errors=True)


def _wait_healthy(url: str, name: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        state = docker("inspect", "-f", "{{.State.Running}}", name).stdout.strip()
        if state != "true":
            raise AssertionError(
                f"mlflow server container exited: {docker('logs', name, check=False).stderr[-3000:]}"
            )
        time.sleep(1)
    raise AssertionError(
        f"mlflow server not healthy in {timeout} s: {docker('logs', name, check=False).stderr[-3000:]}"
    )


def test_mlflow_image_without_its_database_stays_unready_naming_the_host(mlflow_image: str) -> None:
    """The init container (the pod is unready until it succeeds) logs the database host, never the password."""
    from fixtures_services import free_port

    (init,) = pod_spec()["initContainers"]
    port, secret = free_port(), "pw-" + uuid.uuid4().hex
    store = {
        "HOME": "/tmp",
        "MLFLOW_BACKEND_STORE_URI": f"postgresql://mlflow:{secret}@127.0.0.1:{port}/mlflow",
    }
    cmd = run_container(init, mlflow_image, store)
    done = subprocess.run(
        [DOCKER, "run", "--rm", *cmd, "--timeout=4", "--interval=1"], capture_output=True, text=True
    )
    assert done.returncode == 1
    lines = (done.stdout + done.stderr).strip().splitlines()
    where = f"postgresql://127.0.0.1:{port}/mlflow"
    assert lines[0].startswith(f"wait-for-db: database {where} not ready (")
    assert lines[-1].startswith(f"wait-for-db: database {where} did not answer within 4 s: ")
    assert lines[-1].endswith(
        "check the database and MLFLOW_BACKEND_STORE_URI in Secret atmask-mlflow-server"
    )
    assert secret not in done.stdout + done.stderr


@pytest.fixture
def workdir() -> Iterator[Path]:
    """run-local's --workdir: the pod user's, as the runs PVC would be; removed afterwards."""
    path = pod_dir("atmask-kfp-")
    yield path
    shutil.rmtree(path, ignore_errors=True)  # as root, or the caller's own files (tasks run as the caller)


def test_pipeline_in_containers_logs_and_registers_on_the_deployed_server(
    atmask_image: str,
    deployed_mlflow: Server,
    dvc_repo,
    workdir: Path,
    postgres,
    s3_server: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The data task pulls dvc.lock's version from the S3 remote inside the image, as a pod does."""
    from fixtures_dvc import tool_env

    server = deployed_mlflow
    creds = {"MLFLOW_TRACKING_USERNAME": server.username, "MLFLOW_TRACKING_PASSWORD": server.password}
    cmd = [sys.executable, "-m", "pipelines.main", "pipeline", "run-local", "--runner", "docker"]
    cmd += ["--image", atmask_image, "--workdir", str(workdir), "--mlflow-tracking-uri", server.url]
    cmd += ["--params", str(dvc_repo.path / "params.yaml")]
    env = {**tool_env(), **creds, "AWS_ENDPOINT_URL": dvc_repo.endpoint}
    with open(tmp_path / "run-local.log", "w") as log:
        done = subprocess.run(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=dvc_repo.path, timeout=1800
        )
    output = (tmp_path / "run-local.log").read_text()
    assert done.returncode == 0, output[-5000:]
    assert f"Found image '{atmask_image}'" in output and "Pulling image" not in output
    # every task ran in a container as the pod user: it wrote its executor output as uid 10001
    run_root = Path(json.loads((workdir / "summary.json").read_text())["pipeline_root"])
    outputs = sorted(run_root.glob("**/executor_output.json"))
    tasks = sorted(p.parent.relative_to(run_root).as_posix() for p in outputs)
    per_item = ("evaluate-op", "resources-op", "train-op")
    loops = [f"for-loop-1-iteration-{i}/{t}" for i in (0, 1) for t in per_item]
    assert tasks == sorted(["config-op", "data-op", "register-op", "report-op", *loops])
    assert {p.stat().st_uid for p in outputs} == {10001 if os.geteuid() == 0 else os.getuid()}
    (pulled,) = [p for p in (workdir / "datasets").iterdir() if p.is_dir()]
    assert pulled.name == dvc_repo.md5.removesuffix(".dir")  # dvc.lock's version, pulled in the image
    summary = json.loads((workdir / "summary.json").read_text())
    assert set(summary["runs"]) == {"baseline/seed0", "atmask/seed0"}
    assert (
        summary["registered"]["model_name"] == "atmask-rcnn"
        and summary["registered"]["decision"] == "champion"
    )

    search = f"{server.url}/api/2.0/mlflow/experiments/search?max_results=10"
    assert requests.get(search, timeout=30).status_code == 401
    assert requests.get(search, auth=(server.username, "wrong"), timeout=30).status_code == 401
    assert requests.get(search, auth=(server.username, server.password), timeout=30).status_code == 200

    for key, value in {"MLFLOW_TRACKING_URI": server.url, **creds}.items():
        monkeypatch.setenv(key, value)
    _check_registry(server, postgres, s3_server, workdir)


def _check_registry(server: Server, postgres, s3_server: str, workdir: Path) -> None:
    import boto3
    import mlflow
    import pandas as pd

    from components.pyfunc_model import OUTPUT_COLUMNS, encode_image

    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("atmask-ablations")
    runs = client.search_runs([experiment.experiment_id])
    trained = {r.data.tags.get("ablation") for r in runs if "segm_AP" in r.data.metrics}
    assert {"baseline", "atmask"} <= trained
    version = client.get_model_version_by_alias("atmask-rcnn", "champion")
    assert version.version == "1" and version.tags["ablation"] in trained
    # the server's stores: PostgreSQL holds the runs and the registry, S3 the artifacts
    assert int(postgres.psql("mlflow", "SELECT count(*) FROM runs")) == len(runs)
    assert postgres.psql("mlflow", "SELECT name FROM registered_models") == "atmask-rcnn"
    assert postgres.psql("mlflow_auth", "SELECT username FROM users") == "admin"
    s3 = boto3.client("s3", endpoint_url=s3_server)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=server.bucket, Prefix="mlflow/")["Contents"]]
    assert any(k.endswith("/MLmodel") for k in keys) and any(k.endswith("model.pt") for k in keys), keys[:20]

    loaded = mlflow.pyfunc.load_model("models:/atmask-rcnn@champion")
    images = sorted(workdir.glob("datasets/*/images/val/*"))[:2]
    assert images, "the data task's dataset"
    frame = loaded.predict(
        pd.DataFrame({"image": [encode_image(p) for p in images]}), params={"score_threshold": 0.0}
    )
    assert list(frame.columns) == OUTPUT_COLUMNS
    assert set(frame["image_index"]) <= {0, 1}
