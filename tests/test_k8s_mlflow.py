"""The MLflow server as deployed by k8s/: the prod replicas migrate their schemas one at a time (the init
container and its script, run for real against SQLite stores), and --allowed-hosts as a real `mlflow server`
reads it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import requests
from test_k8s import K8S, by_kind, infra, spec_of

__all__ = ["infra"]  # the rendered overlays (a fixture)


def test_prod_migrates_the_mlflow_schemas_one_replica_at_a_time(
    infra: dict[str, list[dict[str, Any]]],
) -> None:
    prod = by_kind(infra["prod"], "Deployment")["mlflow"]
    assert (
        prod["spec"]["replicas"] == 2
        and by_kind(infra["dev"], "Deployment")["mlflow"]["spec"]["replicas"] == 1
    )
    (migrate,) = [c for c in spec_of(prod)["initContainers"] if c["name"] == "migrate-once"]
    assert migrate["command"][:2] == ["python3", "/opt/atmask-migrate/mlflow_migrate.py"]
    (config,) = [d for d in infra["prod"] if d["kind"] == "ConfigMap"]
    script = config["data"]["mlflow_migrate.py"]
    assert script == (K8S / "overlays" / "prod" / "mlflow_migrate.py").read_text()
    assert "pg_advisory_lock" in script and "pg_advisory_unlock" in script
    volumes = {v["name"]: v for v in spec_of(prod)["volumes"]}
    assert volumes["migrate"]["configMap"]["name"] == config["metadata"]["name"]


# ------------------------------------------------------------------ MLflow --allowed-hosts, for real


def allowed_hosts_arg(docs: list[dict[str, Any]]) -> str:
    (container,) = spec_of(by_kind(docs, "Deployment")["mlflow"])["containers"]
    (arg,) = [a for a in container["args"] if a.startswith("--allowed-hosts=")]
    return arg


@pytest.mark.integration
def test_mlflow_allowed_hosts_accept_in_cluster_names_and_refuse_others(
    tmp_path: Path, infra: dict[str, list[dict[str, Any]]]
) -> None:
    """MLflow compares the raw Host header, port included: a real `mlflow server` started with the
    rendered prod --allowed-hosts answers the service names clients use (with :5000) and refuses others."""
    from fixtures_services import _bin, _serve, free_port

    arg = allowed_hosts_arg(infra["prod"])
    assert allowed_hosts_arg(infra["dev"]) == arg
    port = free_port()
    cmd = [_bin("mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--backend-store-uri",
           f"sqlite:///{tmp_path / 'mlflow.db'}", "--artifacts-destination", str(tmp_path / "artifacts"),
           "--workers", "1", arg]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_SERVER_")}
    url = f"http://127.0.0.1:{port}"
    with _serve(cmd, f"{url}/health", tmp_path / "server.log", env):

        def status(host: str) -> int:
            search = f"{url}/api/2.0/mlflow/experiments/search?max_results=1"
            return requests.get(search, headers={"Host": host}, timeout=30).status_code

        for host in (
            "mlflow.atmask.svc:5000",
            "mlflow.atmask.svc.cluster.local:5000",
            "mlflow:5000",
            "localhost:5000",
        ):
            assert status(host) == 200, host
        refused = status("evil.example.com:5000")
        assert 400 <= refused < 500, refused


@pytest.mark.integration
def test_the_prod_migration_script_brings_both_schemas_to_head(tmp_path: Path) -> None:
    """k8s/overlays/prod/mlflow_migrate.py for real against SQLite stores (PostgreSQL adds the advisory
    lock around the same calls): the schemas created, a second run (the replica that waited) a no-op. The
    auth schema needs mlflow[auth] (Flask-WTF), which the MLflow image has; without it only the tracking one."""
    import importlib.util
    import sqlite3

    with_auth = importlib.util.find_spec("flask_wtf") is not None

    ini = tmp_path / "basic_auth.ini"
    ini.write_text(
        f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{tmp_path / 'auth.db'}\n"
        "admin_username = admin\nadmin_password = password1234\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    if with_auth:
        env["MLFLOW_AUTH_CONFIG_PATH"] = str(ini)
    script = [sys.executable, str(K8S / "overlays" / "prod" / "mlflow_migrate.py"), "--timeout=10"]
    for _ in range(2):
        result = subprocess.run(script, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stdout.strip().endswith("and the auth store are at the current schema")
    for db, table in (("mlflow.db", "experiments"), ("auth.db", "users"))[: 1 + with_auth]:
        with sqlite3.connect(tmp_path / db) as conn:
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"alembic_version", table} <= tables, db
    result = subprocess.run(
        script, env={**env, "MLFLOW_BACKEND_STORE_URI": ""}, capture_output=True, text=True
    )
    assert result.returncode == 1
    assert (
        result.stderr.strip()
        == "mlflow-migrate: MLFLOW_BACKEND_STORE_URI is not set; add it to Secret atmask-mlflow-server"
    )
