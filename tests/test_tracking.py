"""MLflow for training: a real ``mlflow server`` on 127.0.0.1; retries, outages, resumed runs."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import requests
from fixtures_train import write_params

from components.errors import UserError
from components.tracking import RunTracker, check_reachable, flat_params, retry, tracking_uri
from pipelines.main import main

pytestmark = pytest.mark.integration


def test_retry_backs_off_exponentially_then_succeeds() -> None:
    calls, sleeps = [], []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise requests.ConnectionError("refused")
        return "ok"

    assert retry(flaky, what="test", attempts=4, base_delay=0.5, sleep=sleeps.append) == (True, "ok")
    assert sleeps == [0.5, 1.0]


def test_retry_gives_up_without_raising(capsys) -> None:
    def down() -> None:
        raise requests.ConnectionError("refused")

    assert retry(down, what="log metrics", attempts=3, base_delay=0.1, sleep=lambda s: None) == (False, None)
    assert "MLflow log metrics failed after 3 attempts (ConnectionError: refused)" in capsys.readouterr().err


def test_tracking_uri_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from components.params import load_params

    params = load_params(write_params(tmp_path / "p.yaml"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(params) == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example:5000")
    assert tracking_uri(params) == "http://example:5000"


def test_flat_params_are_dotted_strings() -> None:
    assert flat_params({"model": {"head": {"k": 2.0}}, "train.lr": 0.02}) == {
        "model.head.k": "2.0",
        "train.lr": "0.02",
    }


def test_unreachable_server_is_one_user_error() -> None:
    from fixtures_services import free_port

    uri = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(
        UserError, match=rf"^MLflow tracking server at {uri} is unreachable \(ConnectionError\)"
    ):
        check_reachable(uri, timeout=2)


@pytest.mark.slow
def test_training_run_is_recorded_on_a_real_server(
    mlflow_server: str, tiny_coco: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    experiment = f"train-{uuid.uuid4().hex[:8]}"
    params = write_params(tmp_path / "params.yaml", iterations=3, checkpoint_every=10)
    raw = params.read_text(encoding="utf-8").replace("experiment: train-tests", f"experiment: {experiment}")
    params.write_text(raw, encoding="utf-8")
    out = tmp_path / "run"
    argv = [
        "train",
        "--config",
        "atmask",
        "--params",
        str(params),
        "--data",
        str(tiny_coco),
        "--out",
        str(out),
    ]
    assert main(argv) == 0

    record = json.loads((out / "mlflow_run.json").read_text(encoding="utf-8"))
    assert record["tracking_uri"] == mlflow_server
    client = mlflow.MlflowClient(mlflow_server)
    run = client.get_run(record["run_id"])
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == experiment
    p = run.data.params
    assert (p["model.backbone"], p["model.fpn_channels"], p["model.head.k"]) == ("resnet18", "32", "2.0")
    assert (p["train.lr"], p["train.batch_size"], p["train.iterations"], p["train.recipe"]) == (
        "0.01",
        "2",
        "3",
        "tiny",
    )
    tags = run.data.tags
    manifest = json.loads((tiny_coco / "manifest.json").read_text(encoding="utf-8"))
    assert tags["ablation"] == "atmask"
    assert tags["data_checksum"] == manifest["checksum"]
    assert len(tags["git_commit"].removesuffix("+dirty")) == 40
    assert tags["device"].startswith("cpu") and tags["world_size"] == "1" and tags["amp"] == "off"
    for key in ("loss", "loss_thr", "loss_bin", "loss_prob", "lr", "images_per_s"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2, 3], key
    logged = [m.value for m in client.get_metric_history(run.info.run_id, "loss")]
    expected = [r["loss"] for r in json.loads((out / "train_log.json").read_text())["log"]]
    assert logged == pytest.approx(expected)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model.pt", "train_log.json", "plots"} <= artifacts
    assert [a.path for a in client.list_artifacts(run.info.run_id, "plots")] == ["plots/loss.csv"]
    local = client.download_artifacts(run.info.run_id, "model.pt", str(tmp_path))
    assert Path(local).read_bytes() == (out / "model.pt").read_bytes()


@pytest.mark.slow
def test_outage_mid_run_loses_no_metrics(
    mlflow_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    import mlflow

    tracker = RunTracker.start(mlflow_server, f"outage-{uuid.uuid4().hex[:8]}", tmp_path, "t", resume=False)
    real = tracker.client.log_batch
    down = {"calls": 0}

    def unavailable(*args, **kwargs):
        down["calls"] += 1
        raise requests.ConnectionError("server restarting")

    monkeypatch.setattr(tracker.client, "log_batch", unavailable)
    monkeypatch.setattr("components.tracking.time.sleep", lambda s: None)
    tracker.log_metrics({"loss": 2.0}, step=1)  # the outage: kept, not raised
    assert down["calls"] == 2 and tracker.failures == 1
    assert "will retry with the next call, training goes on" in capsys.readouterr().err
    monkeypatch.setattr(tracker.client, "log_batch", real)  # the server is back
    tracker.log_metrics({"loss": 1.5}, step=2)
    tracker.end()
    client = mlflow.MlflowClient(mlflow_server)
    history = client.get_metric_history(tracker.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 2.0), (2, 1.5)]
    assert client.get_run(tracker.run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_resume_continues_the_same_run(mlflow_server: str, tmp_path: Path) -> None:
    experiment = f"resume-{uuid.uuid4().hex[:8]}"
    first = RunTracker.start(mlflow_server, experiment, tmp_path, "t", resume=True)
    first.log_params({"train": {"lr": 0.02}})
    again = RunTracker.start(mlflow_server, experiment, tmp_path, "t", resume=True)
    assert again.run_id == first.run_id
    again.log_params({"train": {"lr": 0.02, "iterations": 5}})  # already-logged params are not re-sent
    fresh = RunTracker.start(mlflow_server, experiment, tmp_path, "t", resume=False)
    assert fresh.run_id != first.run_id
    assert json.loads((tmp_path / "mlflow_run.json").read_text())["run_id"] == fresh.run_id
    params = again.client.get_run(first.run_id).data.params
    assert params == {"train.lr": "0.02", "train.iterations": "5"}
