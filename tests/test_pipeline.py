"""The Kubeflow pipeline: compiled YAML (fresh, GPU/secrets/retries), submit errors, kfp.local run."""

import http.server
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest
import yaml

from components.errors import UserError
from pipelines import pipeline as pl
from pipelines import runtime
from pipelines.cli import parse_params
from pipelines.main import main as atmask
from pipelines.names import COMPILED

GPU_TASKS = ("exec-train-op", "exec-evaluate-op")


def load_spec(path: Path) -> tuple[dict, dict]:
    docs = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
    assert len(docs) == 2, "pipeline spec + kubernetes platform spec"
    return docs[0], docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


@pytest.fixture(scope="module")
def compiled() -> tuple[dict, dict]:
    return load_spec(COMPILED)


def test_committed_pipeline_is_up_to_date(tmp_path: Path, repo_root: Path) -> None:
    out = tmp_path / "fresh.yaml"
    image = pl.compiled_image(COMPILED)
    assert atmask(["pipeline", "compile", "--out", str(out), "--params", str(repo_root / "params.yaml")]) == 0
    assert out.read_text() == COMPILED.read_text(), (
        "pipelines/atmask_pipeline.yaml is stale: run 'atmask pipeline compile' and commit it"
    )
    assert pl.compiled_image(out) == image


def test_dag_shape(compiled: tuple[dict, dict]) -> None:
    spec, _ = compiled
    assert spec["pipelineInfo"]["name"] == "atmask-ablation"
    root = spec["root"]["dag"]["tasks"]
    assert set(root) == {"config-op", "fingerprint-op", "ingest-op", "for-loop-1", "report-op", "register-op"}
    assert root["ingest-op"]["dependentTasks"] == ["fingerprint-op"]
    fingerprint = root["ingest-op"]["inputs"]["parameters"]["source_fingerprint"]["taskOutputParameter"]
    assert fingerprint == {"outputParameterKey": "Output", "producerTask": "fingerprint-op"}
    # one loop item per (ablation, seed), listed by the config task from ablations x train.seeds
    items = root["for-loop-1"]["parameterIterator"]["items"]["inputParameter"]
    assert items == "pipelinechannel--config-op-Output"
    loop = spec["components"]["comp-for-loop-1"]["dag"]["tasks"]
    assert set(loop) == {"train-op", "evaluate-op"}
    assert loop["evaluate-op"]["dependentTasks"] == ["train-op"]
    assert set(root["register-op"]["dependentTasks"]) == {"config-op", "for-loop-1", "report-op"}
    assert set(root["for-loop-1"]["dependentTasks"]) == {"config-op", "ingest-op"}
    # report and register receive the collected (fanned-in) evaluated runs as a list of Models
    runs = spec["components"]["comp-report-op"]["inputDefinitions"]["artifacts"]["runs"]
    assert runs == {
        "artifactType": {"schemaTitle": "system.Model", "schemaVersion": "0.0.1"},
        "isArtifactList": True,
    }
    metrics = spec["components"]["comp-evaluate-op"]["outputDefinitions"]["artifacts"]["metrics"]
    assert metrics["artifactType"]["schemaTitle"] == "system.Metrics"
    report = spec["components"]["comp-report-op"]["outputDefinitions"]["artifacts"]["report"]
    assert report["artifactType"]["schemaTitle"] == "system.Markdown"


def test_parameter_defaults_come_from_params_yaml(compiled: tuple[dict, dict], repo_root: Path) -> None:
    spec, _ = compiled
    params = {k: v["defaultValue"] for k, v in spec["root"]["inputDefinitions"]["parameters"].items()}
    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    assert json.loads(params.pop("params_json")) == raw
    assert params == {
        "ablations": list(raw["ablations"]),
        "seeds": raw["train"]["seeds"],
        "data_source": raw["data"]["source"],
        "recipe": raw["train"]["recipe"],
        "mlflow_tracking_uri": "",
        "register_candidate": raw["register"]["candidate"],
        "register_min_improvement": raw["register"]["min_improvement"],
        "overrides": "{}",
        "checkpoint_root": "/mnt/atmask-runs/checkpoints",
    }


def test_other_params_file_and_image_change_defaults(tmp_path: Path, repo_root: Path) -> None:
    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    raw["data"]["source"] = "s3://bucket/coco"
    raw["train"]["recipe"] = "r50_fpn_coco"
    raw["mlflow"]["tracking_uri"] = "http://mlflow.atmask:5000"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    out = tmp_path / "p.yaml"
    image = "registry.example.com/atmask@sha256:" + "a" * 64
    argv = ["pipeline", "compile", "--out", str(out), "--params", str(tmp_path / "params.yaml")]
    assert atmask([*argv, "--image", image, "--gpus", "4"]) == 0
    spec, _ = load_spec(out)
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["data_source"]["defaultValue"] == "s3://bucket/coco"
    assert params["recipe"]["defaultValue"] == "r50_fpn_coco"
    assert params["mlflow_tracking_uri"]["defaultValue"] == "http://mlflow.atmask:5000"
    executors = spec["deploymentSpec"]["executors"]
    assert {e["container"]["image"] for e in executors.values()} == {image}
    assert executors["exec-train-op"]["container"]["resources"]["accelerator"]["resourceCount"] == "4"
    assert pl.compiled_image(out) == image


def test_gpu_tasks_request_gpus_shm_tolerations_and_retry(compiled: tuple[dict, dict]) -> None:
    spec, platform = compiled
    executors = spec["deploymentSpec"]["executors"]
    for name in GPU_TASKS:
        res = executors[name]["container"]["resources"]
        assert res["accelerator"]["resourceType"] == "nvidia.com/gpu"
        assert res["accelerator"]["resourceCount"] == "1"
        assert (res["resourceCpuRequest"], res["resourceCpuLimit"]) == ("8", "16")
        assert (res["resourceMemoryRequest"], res["resourceMemoryLimit"]) == ("48G", "64G")
        k8s = platform[name]
        assert k8s["emptyDirMounts"] == [
            {"medium": "Memory", "mountPath": "/dev/shm", "sizeLimit": "16Gi", "volumeName": "dshm"}
        ]
        assert k8s["nodeSelector"] == {"labels": {"nvidia.com/gpu.present": "true"}}
        assert k8s["tolerations"] == [{"effect": "NoSchedule", "key": "nvidia.com/gpu", "operator": "Exists"}]
    loop = spec["components"]["comp-for-loop-1"]["dag"]["tasks"]
    for task in ("train-op", "evaluate-op"):
        assert loop[task]["retryPolicy"] == {
            "backoffDuration": "60s",
            "backoffFactor": 2.0,
            "backoffMaxDuration": "3600s",
            "maxRetryCount": 3,
        }
    for name in (
        "exec-config-op",
        "exec-fingerprint-op",
        "exec-ingest-op",
        "exec-report-op",
        "exec-register-op",
    ):
        assert "accelerator" not in executors[name]["container"]["resources"]
    # training keeps its checkpoints on the runs PVC (k8s/base/storage.yaml), so a retry resumes
    (mount,) = platform["exec-train-op"]["pvcMount"]
    assert (mount["constant"], mount["mountPath"]) == ("atmask-runs", "/mnt/atmask-runs")
    train_inputs = loop["train-op"]["inputs"]["parameters"]
    assert train_inputs["checkpoint_root"] == {"componentInputParameter": "pipelinechannel--checkpoint_root"}
    assert "PIPELINE_JOB_ID" not in json.dumps(train_inputs)  # a per-run value would defeat caching


def test_secrets_are_env_from_secret_refs(compiled: tuple[dict, dict]) -> None:
    _, platform = compiled
    expected = {
        "exec-fingerprint-op": {"atmask-s3"},
        "exec-ingest-op": {"atmask-s3"},
        "exec-train-op": {"atmask-s3", "atmask-mlflow-client"},
        "exec-evaluate-op": {"atmask-s3", "atmask-mlflow-client"},
        "exec-register-op": {"atmask-s3", "atmask-mlflow-client"},
        "exec-report-op": {"atmask-mlflow-client"},  # logs the study run
    }
    for name, secrets in expected.items():
        refs = {s["secretName"]: s for s in platform[name]["secretAsEnv"]}
        assert set(refs) == secrets
        for ref in refs.values():
            assert {e["envVar"] for e in ref["keyToEnv"]} <= set(pl.S3_KEYS + pl.MLFLOW_KEYS)
    assert "secretAsEnv" not in platform.get("exec-config-op", {})


def test_no_runtime_installs_and_one_image(compiled: tuple[dict, dict]) -> None:
    spec, _ = compiled
    executors = spec["deploymentSpec"]["executors"]
    assert set(executors) == {
        f"exec-{n}-op" for n in ("config", "fingerprint", "ingest", "train", "evaluate", "report", "register")
    }
    for executor in executors.values():
        command = " ".join(executor["container"]["command"])
        assert "pip install" not in command and "pip3" not in command
        assert "from pipelines import runtime" in command
    assert len({e["container"]["image"] for e in executors.values()}) == 1


def test_caching_off_only_for_register_and_the_source_fingerprint(compiled: tuple[dict, dict]) -> None:
    spec, _ = compiled
    root = spec["root"]["dag"]["tasks"]
    loop = spec["components"]["comp-for-loop-1"]["dag"]["tasks"]
    assert root["register-op"]["cachingOptions"] == {}
    assert root["fingerprint-op"]["cachingOptions"] == {}
    for task in (
        root["config-op"],
        root["ingest-op"],
        root["report-op"],
        loop["train-op"],
        loop["evaluate-op"],
    ):
        assert task["cachingOptions"] == {"enableCache": True}
    # a cache key sees exactly what a task depends on: the dataset does not depend on the recipe or the
    # registry gate (changing them reuses the ingested data), the params file does depend on the recipe
    assert set(root["ingest-op"]["inputs"]["parameters"]) == {
        "params_json",
        "overrides",
        "data_source",
        "source_fingerprint",
    }
    assert set(root["config-op"]["inputs"]["parameters"]) == {
        "params_json",
        "overrides",
        "data_source",
        "recipe",
        "ablations",
        "seeds",
    }
    register_inputs = set(root["register-op"]["inputs"]["parameters"])
    assert {"register_candidate", "register_min_improvement", "mlflow_tracking_uri"} <= register_inputs


# ------------------------------------------------------------------ runtime helpers


def test_write_params_applies_overrides_and_validates(tmp_path: Path, repo_root: Path) -> None:
    raw = json.dumps(yaml.safe_load((repo_root / "params.yaml").read_text()))
    keys = runtime.pipeline_overrides(
        '{"recipes.cpu_demo.iterations": 7}',
        {"data.source": "s3://b/p", "register.candidate": "atmask", "register.min_improvement": 0.5},
    )
    path = runtime.write_params(raw, keys, tmp_path)
    from components.params import load_params

    params = load_params(path)
    assert (params.data.source, params.register.candidate, params.register.min_improvement) == (
        "s3://b/p",
        "atmask",
        0.5,
    )
    assert params.train.iterations == 7
    assert params.mlflow.tracking_uri is None
    with pytest.raises(UserError, match=r"recipes.cpu_demo.itrations: unknown key"):
        runtime.write_params(raw, {"recipes.cpu_demo.itrations": 7}, tmp_path / "bad")
    with pytest.raises(UserError, match="overrides: not valid JSON"):
        runtime.pipeline_overrides("{nope", {})


def test_checkpoint_dir_is_keyed_by_inputs(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("a: 1\n")
    root = tmp_path / "ckpt"
    assert runtime.checkpoint_dir("", params, "atmask", 0, "c1") is None
    assert runtime.checkpoint_dir(str(root), params, "atmask", 0, "c1") is None  # volume not mounted
    root.mkdir()
    first = runtime.checkpoint_dir(str(root), params, "atmask", 0, "c1")
    assert first == runtime.checkpoint_dir(str(root), params, "atmask", 0, "c1")
    assert first.parent == root and first.name.startswith("atmask-seed0-")
    others = {
        runtime.checkpoint_dir(str(root), params, "baseline", 0, "c1"),
        runtime.checkpoint_dir(str(root), params, "atmask", 1, "c1"),
        runtime.checkpoint_dir(str(root), params, "atmask", 0, "c2"),
    }
    params.write_text("a: 2\n")
    others.add(runtime.checkpoint_dir(str(root), params, "atmask", 0, "c1"))
    assert len(others) == 4 and first not in others


def test_train_step_with_work_dir_resumes_there_and_copies_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def train(params: Path, ablation: str, seed: int, data: Path, out: Path) -> None:
        calls.append(out)
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        (out / "checkpoints" / f"step{len(calls)}.pt").write_text("ckpt")
        (out / "model.pt").write_text(f"model after attempt {len(calls)}")

    monkeypatch.setattr(runtime, "_train", train)
    work, out = tmp_path / "work", tmp_path / "out"
    runtime.train_step(tmp_path / "p.yaml", "atmask", 0, tmp_path / "data", out, work)
    runtime.train_step(tmp_path / "p.yaml", "atmask", 0, tmp_path / "data", out, work)  # the retried pod
    assert calls == [work, work]
    assert sorted(p.name for p in (work / "checkpoints").iterdir()) == ["step1.pt", "step2.pt"]
    assert sorted(p.name for p in out.iterdir()) == ["model.pt"]
    assert (out / "model.pt").read_text() == "model after attempt 2"


def test_parse_params_checks_names_and_types() -> None:
    declared = {"ablations": "LIST", "data_source": "STRING", "register_min_improvement": "NUMBER_DOUBLE"}
    assert parse_params(
        ["ablations=baseline,atmask", "data_source=s3://b/x", "register_min_improvement=0.5"], declared
    ) == {
        "ablations": ["baseline", "atmask"],
        "data_source": "s3://b/x",
        "register_min_improvement": 0.5,
    }
    assert parse_params(["ablations=[thr]"], declared) == {"ablations": ["thr"]}
    with pytest.raises(UserError, match="--param nope: not a pipeline parameter"):
        parse_params(["nope=1"], declared)
    with pytest.raises(UserError, match="expected number double"):
        parse_params(["register_min_improvement=high"], declared)
    with pytest.raises(UserError, match="expected KEY=VALUE"):
        parse_params(["ablations"], declared)


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

    def _reply(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        _FakeKfp.requests.append(("GET", self.path, self.headers.get("Authorization"), {}))
        self._reply({"multi_user": False} if "healthz" in self.path else {})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _FakeKfp.requests.append(("POST", self.path, self.headers.get("Authorization"), body))
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
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeKfp)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_submit_starts_a_run_with_the_compiled_spec(
    fake_kfp: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KF_PIPELINES_TOKEN", "tok-123")
    argv = ["pipeline", "submit", "--host", fake_kfp, "--experiment", "ablations-x", "--run-name", "r"]
    argv += ["--param", "ablations=baseline,atmask", "--param", "register_min_improvement=0.01"]
    assert atmask(argv) == 0
    out = capsys.readouterr().out
    assert "submitted run run-1 (r) in experiment 'ablations-x'" in out
    posts = {path: body for method, path, _, body in _FakeKfp.requests if method == "POST"}
    assert posts["/apis/v2beta1/experiments"]["display_name"] == "ablations-x"
    run = posts["/apis/v2beta1/runs"]
    assert (run["experiment_id"], run["display_name"]) == ("exp-1", "r")
    assert run["runtime_config"]["parameters"] == {
        "ablations": ["baseline", "atmask"],
        "register_min_improvement": 0.01,
    }
    spec, platform = yaml.safe_load_all(COMPILED.read_text())
    assert run["pipeline_spec"] == {
        "pipeline_spec": spec,
        "platform_spec": platform,
    }  # GPU/secrets config too
    assert {auth for _, _, auth, _ in _FakeKfp.requests} == {"Bearer tok-123"}


def test_submit_unreachable_host_fails_fast(capsys: pytest.CaptureFixture[str]) -> None:
    start = time.monotonic()
    assert atmask(["pipeline", "submit", "--host", "http://127.0.0.1:9"]) == 1
    assert time.monotonic() - start < 5
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith(
        "atmask pipeline: error: --host http://127.0.0.1:9: cannot reach the Kubeflow Pipelines API"
    )


def test_submit_refused_token(
    refusing_host: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KF_PIPELINES_TOKEN", "not-a-valid-token")
    assert atmask(["pipeline", "submit", "--host", refusing_host]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        f"atmask pipeline: error: --host {refusing_host}: token refused (HTTP 401); set a valid bearer "
        "token in $KF_PIPELINES_TOKEN (or the variable named by --token-env)"
    )
    assert _Refuse.seen[-1] == "Bearer not-a-valid-token"


def test_submit_bad_param_fails_before_contacting_host(capsys: pytest.CaptureFixture[str]) -> None:
    assert atmask(["pipeline", "submit", "--host", "http://127.0.0.1:9", "--param", "epochs=3"]) == 1
    assert "--param epochs: not a pipeline parameter" in capsys.readouterr().err


# ------------------------------------------------------------------ kfp.local


@pytest.mark.slow
def test_run_local_executes_whole_dag(
    tmp_path: Path, repo_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    work = tmp_path / "work"
    assert (
        atmask(["pipeline", "run-local", "--workdir", str(work), "--params", str(repo_root / "params.yaml")])
        == 0
    )
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
    trained = sorted(p.name.split("-")[0] for p in (work / "checkpoints").iterdir())
    assert trained == ["atmask", "baseline"]  # training ran in the resumable checkpoint folders
    summary = json.loads((work / "summary.json").read_text())
    assert set(summary["runs"]) == {"baseline", "atmask"}


def test_run_local_failure_is_one_line_without_retries(
    tmp_path: Path, repo_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    raw["data"]["source"] = str(tmp_path / "no-such-dataset")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    start = time.monotonic()
    argv = [
        "pipeline",
        "run-local",
        "--workdir",
        str(tmp_path / "work"),
        "--params",
        str(tmp_path / "params.yaml"),
    ]
    assert atmask(argv) == 1
    assert time.monotonic() - start < 60  # the cluster's retry back-off (minutes) is not used locally
    last = capsys.readouterr().err.strip().splitlines()[-1].strip()
    assert last.startswith("atmask pipeline: error: local pipeline run failed (Pipeline 'atmask-ablation'")
    assert "'fingerprint-op'" in last and "\x1b" not in last  # the first task that reads the source
    assert not (tmp_path / "work" / "runs").exists() and not (tmp_path / "work" / "summary.json").exists()
