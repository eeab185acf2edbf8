"""Submitting and running the pipeline: `atmask pipeline submit` against KFP API doubles (the data version
from dvc.lock, the source, the ServiceAccount, the namespace, one-line failures) and `run-local`, the whole
DAG with kfp.local on DVC-versioned data pulled from an S3 remote (moto's server)."""

import http.server
import json
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest
import yaml
from fixtures_dvc import DvcRepo, tool_env

from components.provenance import object_uri
from pipelines.main import main as atmask
from pipelines.names import COMPILED

# ------------------------------------------------------------------ submit


class _Refuse(http.server.BaseHTTPRequestHandler):
    seen: ClassVar[list[str | None]] = []

    def do_GET(self) -> None:
        _Refuse.seen.append(self.headers.get("Authorization"))
        self.send_response(401)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def refusing_host() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refuse)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


class _FakeKfp(http.server.BaseHTTPRequestHandler):
    """The few KFP v2beta1 endpoints kfp.Client uses to start a run; records what it receives."""

    requests: ClassVar[list[tuple[str, str, str | None, dict]]] = []
    multi_user: ClassVar[bool] = False
    refuse_namespace: ClassVar[str] = ""

    def _reply(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        _FakeKfp.requests.append(("GET", self.path, self.headers.get("Authorization"), {}))
        self._reply({"multi_user": _FakeKfp.multi_user} if "healthz" in self.path else {})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _FakeKfp.requests.append(("POST", self.path, self.headers.get("Authorization"), body))
        if _FakeKfp.refuse_namespace and body.get("namespace") == _FakeKfp.refuse_namespace:
            message = (
                f"Failed to authorize with API: namespace {body['namespace']} is not a profile namespace"
            )
            data = json.dumps({"error": message, "code": 7, "message": message}).encode()
            self.send_response(403)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(data)
            return
        ids = {
            "/apis/v2beta1/experiments": {"experiment_id": "exp-1"},
            "/apis/v2beta1/runs": {"run_id": "run-1"},
        }
        self._reply({**ids[self.path], "display_name": body["display_name"]})

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def fake_kfp() -> Iterator[str]:
    _FakeKfp.requests.clear()
    _FakeKfp.multi_user, _FakeKfp.refuse_namespace = False, ""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeKfp)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_submit_starts_a_run_with_the_data_version_source_and_service_account(
    fake_kfp: str, dvc_repo: DvcRepo, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(dvc_repo.path)  # the checkout whose dvc.lock names the data version
    monkeypatch.setenv("KF_PIPELINES_TOKEN", "tok-123")
    argv = ["pipeline", "submit", "--host", fake_kfp, "--experiment", "ablations-x", "--run-name", "r"]
    argv += ["--package", str(COMPILED), "--param", "ablations=baseline,atmask"]
    assert atmask([*argv, "--param", "register_min_improvement=0.01", "--recipe", "r101_fpn_coco"]) == 0
    out = capsys.readouterr().out
    assert "submitted run run-1 (r) in experiment 'ablations-x'" in out
    assert f"data data/coco {dvc_repo.md5} from {dvc_repo.remote}" in out
    posts = {path: body for method, path, _, body in _FakeKfp.requests if method == "POST"}
    assert posts["/apis/v2beta1/experiments"]["display_name"] == "ablations-x"
    run = posts["/apis/v2beta1/runs"]
    assert (run["experiment_id"], run["display_name"]) == ("exp-1", "r")
    assert run["service_account"] == "atmask-pipeline-runner"  # k8s/base/rbac.yaml: exactly what it needs
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=dvc_repo.path, capture_output=True, text=True)
    assert run["runtime_config"]["parameters"] == {
        "ablations": ["baseline", "atmask"],
        "register_min_improvement": 0.01,
        "recipe": "r101_fpn_coco",
        "data_md5": dvc_repo.md5,  # dvc.lock's hash of data/coco
        "data_path": "data/coco",
        "dvc_remote": dvc_repo.remote,
        "git_commit": head.stdout.strip(),
        "git_repo": "https://github.com/atmask-rcnn/atmask.git",
    }
    spec, platform = yaml.safe_load_all(COMPILED.read_text())
    assert run["pipeline_spec"] == {"pipeline_spec": spec, "platform_spec": platform}
    assert {auth for _, _, auth, _ in _FakeKfp.requests} == {"Bearer tok-123"}


def test_submit_takes_the_namespace_from_the_kube_context(
    fake_kfp: str, dvc_repo: DvcRepo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    _FakeKfp.multi_user = True
    monkeypatch.chdir(dvc_repo.path)
    argv = ["pipeline", "submit", "--host", fake_kfp, "--package", str(COMPILED)]
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "none"))
    assert atmask(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.endswith("multi-user Kubeflow Pipelines needs a profile namespace; pass --namespace (e.g. "
                        "atmask-pipelines, the Profile in k8s/profile) or set one in your kube context")  # fmt: skip
    kubeconfig = {
        "apiVersion": "v1", "kind": "Config", "current-context": "team",
        "contexts": [{"name": "team", "context": {"cluster": "c", "user": "u", "namespace": "team-a"}}],
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:6443"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
    }  # fmt: skip
    (tmp_path / "kubeconfig").write_text(yaml.safe_dump(kubeconfig))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kubeconfig"))
    assert atmask(argv) == 0
    posts = {path: body for method, path, _, body in _FakeKfp.requests if method == "POST"}
    assert posts["/apis/v2beta1/experiments"]["namespace"] == "team-a"


def test_submit_to_a_namespace_kfp_does_not_manage_is_one_line(
    fake_kfp: str, dvc_repo: DvcRepo, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    _FakeKfp.multi_user = True
    _FakeKfp.refuse_namespace = "elsewhere"
    monkeypatch.chdir(dvc_repo.path)
    argv = ["pipeline", "submit", "--host", fake_kfp, "--package", str(COMPILED), "--namespace", "elsewhere"]
    assert atmask(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith(
        "atmask pipeline: error: --namespace elsewhere: Kubeflow Pipelines does not manage it"
    )
    assert err.endswith(
        "create the Profile (kubectl apply -k k8s/profile) or pass the namespace of a profile you belong to"
    )


def test_submit_refuses_data_a_cluster_cannot_read(
    fake_kfp: str, dvc_repo: DvcRepo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(dvc_repo.path, repo, ignore=shutil.ignore_patterns("cache", "tmp"))
    monkeypatch.chdir(repo)
    argv = ["pipeline", "submit", "--host", fake_kfp, "--package", str(COMPILED)]
    subprocess.run(
        ["dvc", "remote", "add", "-d", "-f", "mine", str(tmp_path / "store")], check=True, env=tool_env()
    )
    assert atmask(argv) == 1
    assert "DVC remote 'mine' is " in capsys.readouterr().err  # a folder on this machine
    assert atmask([*argv, "--dvc-remote", "storage", "--data-rev", "no-such-rev"]) == 1
    assert "--data-rev no-such-rev: no dvc.lock at that revision" in capsys.readouterr().err
    (repo / "dvc.lock").unlink()
    assert atmask([*argv, "--dvc-remote", "storage"]) == 1
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith(
            "dvc.lock: not found; the data version comes from dvc.lock: run 'dvc repro ingest && dvc push' and "
            "commit dvc.lock"
        )
    )
    assert atmask([*argv, "--dvc-remote", "storage", "--data-rev", "HEAD"]) == 0  # the committed dvc.lock


def test_submit_unreachable_host_fails_fast(
    dvc_repo: DvcRepo, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(dvc_repo.path)
    start = time.monotonic()
    assert atmask(["pipeline", "submit", "--host", "http://127.0.0.1:9", "--package", str(COMPILED)]) == 1
    assert time.monotonic() - start < 5
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith(
        "atmask pipeline: error: --host http://127.0.0.1:9: cannot reach the Kubeflow Pipelines API"
    )


def test_submit_refused_token(
    refusing_host: str, dvc_repo: DvcRepo, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(dvc_repo.path)
    monkeypatch.setenv("KF_PIPELINES_TOKEN", "not-a-valid-token")
    assert atmask(["pipeline", "submit", "--host", refusing_host, "--package", str(COMPILED)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        f"atmask pipeline: error: --host {refusing_host}: token refused (HTTP 401); set a valid bearer "
        "token in $KF_PIPELINES_TOKEN (or the variable named by --token-env)"
    )
    assert _Refuse.seen[-1] == "Bearer not-a-valid-token"


def test_submit_bad_param_fails_before_contacting_host(
    dvc_repo: DvcRepo, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(dvc_repo.path)
    argv = ["pipeline", "submit", "--host", "http://127.0.0.1:9", "--package", str(COMPILED)]
    assert atmask([*argv, "--param", "epochs=3"]) == 1
    assert "--param epochs: not a pipeline parameter" in capsys.readouterr().err


# ------------------------------------------------------------------ kfp.local


@pytest.mark.slow
@pytest.mark.integration
def test_run_local_executes_whole_dag_on_dvc_versioned_data(
    tmp_path: Path, dvc_repo: DvcRepo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole DAG with kfp.local's subprocess runner: the data task pulls dvc.lock's version from the S3
    remote (moto), and every MLflow training run records that version and this checkout as its source."""
    monkeypatch.chdir(dvc_repo.path)
    monkeypatch.setenv("AWS_ENDPOINT_URL", dvc_repo.endpoint)
    work = tmp_path / "work"
    argv = ["pipeline", "run-local", "--workdir", str(work), "--params", str(dvc_repo.path / "params.yaml")]
    assert atmask(argv) == 0
    for ablation in ("baseline", "atmask"):
        metrics = json.loads((work / "runs" / ablation / "seed0" / "metrics.json").read_text())
        for key in ("segm/AP", "bbox/AP", "boundary/AP", "threshold_sweep/0.5/segm_AP"):
            assert 0.0 <= metrics[key] <= 1.0 or metrics[key] == -1.0
        assert (work / "runs" / ablation / "seed0" / "model.pt").is_file()
    atmask_metrics = json.loads((work / "runs/atmask/seed0/metrics.json").read_text())
    assert "threshold_sweep/adaptive/segm_AP" in atmask_metrics
    table = (work / "reports" / "ablations.md").read_text()
    assert "| baseline |" in table and "| atmask |" in table
    decision = json.loads((work / "reports" / "registry.json").read_text())
    assert decision["version"] in (1, "1")
    assert decision["decision"] in ("champion", "challenger")
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    versions = client.search_model_versions("name = 'atmask-rcnn'")
    assert [str(v.version) for v in versions] == ["1"]
    assert str(client.get_model_version_by_alias("atmask-rcnn", decision["decision"]).version) == "1"
    experiment = client.get_experiment_by_name("atmask-ablations")
    runs = client.search_runs([experiment.experiment_id], "tags.ablation != ''")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=dvc_repo.path, capture_output=True, text=True)
    assert len(runs) == 2
    for run in runs:
        (data,) = run.inputs.dataset_inputs
        assert (data.dataset.name, data.dataset.digest) == ("data/coco", dvc_repo.md5)  # what dvc.lock holds
        assert json.loads(data.dataset.source) == {"uri": object_uri(dvc_repo.remote, dvc_repo.md5)}
        assert {t.key: t.value for t in data.tags} == {"mlflow.data.context": "training"}
        assert run.data.tags["mlflow.source.git.commit"] == head.stdout.strip()
        assert run.data.tags["mlflow.source.name"] == "https://github.com/atmask-rcnn/atmask.git"
        assert run.data.tags["mlflow.source.type"] == "JOB"
    (run_dir,) = (work / "checkpoints").iterdir()  # one pipeline run: <run id>/<ablation>/seed<k>
    assert sorted(p.name for p in run_dir.iterdir()) == ["atmask", "baseline"]
    assert (run_dir / "atmask" / "seed0" / "checkpoints").is_dir()  # training ran resumable there
    (pulled,) = [p for p in (work / "datasets").iterdir() if p.is_dir()]
    assert pulled.name == dvc_repo.md5.removesuffix(".dir")
    summary = json.loads((work / "summary.json").read_text())
    assert set(summary["runs"]) == {"baseline/seed0", "atmask/seed0"}


def test_run_local_with_a_data_version_not_in_the_remote_is_one_line(
    tmp_path: Path, dvc_repo: DvcRepo, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(dvc_repo.path, repo, ignore=shutil.ignore_patterns("cache", "tmp", "data"))
    lock = (repo / "dvc.lock").read_text().replace(dvc_repo.md5, "0" * 32 + ".dir")
    (repo / "dvc.lock").write_text(lock)
    monkeypatch.chdir(repo)
    monkeypatch.setenv("AWS_ENDPOINT_URL", dvc_repo.endpoint)
    start = time.monotonic()
    argv = [
        "pipeline",
        "run-local",
        "--workdir",
        str(tmp_path / "work"),
        "--params",
        str(repo / "params.yaml"),
    ]
    assert atmask(argv) == 1
    assert time.monotonic() - start < 60  # the cluster's retry back-off (minutes) is not used locally
    out, err = capfd.readouterr()  # the tasks run in subprocesses
    last = err.strip().splitlines()[-1].strip()
    assert last.startswith("atmask pipeline: error: local pipeline run failed (Pipeline 'atmask-ablation'")
    assert "'data-op'" in last and "\x1b" not in last  # the first task that reads the data
    expected = f"atmask pull: error: DVC remote {dvc_repo.remote}: data version {'0' * 32}.dir is not there"
    assert expected in out + err
    assert not (tmp_path / "work" / "runs").exists() and not (tmp_path / "work" / "summary.json").exists()
