"""``atmask register`` / ``promote`` against a real ``mlflow server``: load by alias and predict, the gate,
idempotency, manual promotion, and clean failures."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from pycocotools import mask as mask_util

from components.checkpoint import load_trained_model
from components.params import load_params
from components.pyfunc_model import OUTPUT_COLUMNS, detect, encode_image
from components.register import Candidate, gate, register
from pipelines.main import main as atmask

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runs_dir(
    tmp_path_factory: pytest.TempPathFactory, trained_atmask: Path, make_run, eval_data: Path
) -> Iterator[Path]:
    """An evaluated ATMask run (non-trivial AP) and an evaluated, barely trained baseline run."""
    runs = tmp_path_factory.mktemp("register") / "runs"
    shutil.copytree(trained_atmask, runs / "atmask")
    make_run(runs / "baseline", "baseline", seed=1, steps=1)
    for name in ("atmask", "baseline"):
        args = ["evaluate", "--run", str(runs / name), "--data", str(eval_data)]
        assert atmask([*args, "--params", str(REPO_ROOT / "params.yaml")]) == 0
    yield runs
    shutil.rmtree(runs.parent, ignore_errors=True)


@pytest.fixture
def registry(mlflow_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """(params with a model name of its own, params file) on the real MLflow server."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.chdir(tmp_path)
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    raw["register"]["model_name"] = f"atmask-rcnn-{tmp_path.name}"
    raw["mlflow"]["experiment"] = f"register-{tmp_path.name}"
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_params(path), path


def _metric(run: Path, key: str = "segm/AP") -> float:
    return json.loads((run / "metrics.json").read_text())[key]


@pytest.mark.slow
@pytest.mark.integration
def test_register_load_champion_predict_and_reregister_is_noop(
    runs_dir: Path, registry, eval_data: Path, tmp_path: Path
) -> None:
    params, _ = registry
    name = params.register.model_name
    assert _metric(runs_dir / "atmask") > _metric(runs_dir / "baseline")
    decision = register(params, runs_dir, "best", "pipe-42", tmp_path / "reports" / "registry.json")
    assert (decision["decision"], decision["version"]) == ("champion", "1")
    assert decision["candidate"]["ablation"] == "atmask"
    assert json.loads((tmp_path / "reports" / "registry.json").read_text()) == decision

    client = mlflow.MlflowClient()
    mv = client.get_model_version_by_alias(name, "champion")
    assert mv.version == "1"
    manifest = json.loads((eval_data / "manifest.json").read_text())
    assert mv.tags["ablation"] == "atmask" and mv.tags["pipeline_run_id"] == "pipe-42"
    assert mv.tags["data_hash"] == manifest["checksum"]
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", mv.tags["git_commit"])
    assert float(mv.tags["metric.segm_AP"]) == _metric(runs_dir / "atmask")

    loaded = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    gt = json.loads((eval_data / "annotations" / "instances_val.json").read_text())
    paths = [eval_data / "images" / "val" / im["file_name"] for im in gt["images"][:3]]
    frame = loaded.predict(
        pd.DataFrame({"image": [encode_image(p) for p in paths]}), params={"score_threshold": 0.3}
    )
    assert list(frame.columns) == OUTPUT_COLUMNS and len(frame) > 0
    model, _, cats = load_trained_model(runs_dir / "atmask")
    from PIL import Image

    from components.pyfunc_model import image_to_tensor

    direct = detect(model, cats, [image_to_tensor(Image.open(p)) for p in paths], 0.3)
    assert frame["image_index"].tolist() == [i for i, dets in enumerate(direct) for _ in dets]
    flat = [d for dets in direct for d in dets]
    assert frame["score"].tolist() == pytest.approx([d["score"] for d in flat], abs=1e-5)
    assert frame["category_id"].tolist() == [d["category_id"] for d in flat]
    for row, d in zip(frame.itertuples(), flat, strict=True):
        assert np.array_equal(mask_util.decode(json.loads(row.mask)).astype(bool), d["mask"])

    again = register(params, runs_dir, "best", "pipe-43", tmp_path / "reports" / "registry.json")
    assert (again["decision"], again["version"], again["aliases"]) == ("unchanged", "1", ["champion"])
    assert len(client.search_model_versions(f"name = '{name}'")) == 1


@pytest.mark.slow
@pytest.mark.integration
def test_gate_refuses_worse_model_and_promote_moves_champion(
    runs_dir: Path, registry, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    params, params_file = registry
    name = params.register.model_name
    register(params, runs_dir, "atmask", None, tmp_path / "registry.json")
    capsys.readouterr()
    code = atmask(
        ["register", "--runs", str(runs_dir), "--params", str(params_file), "--candidate", "baseline"]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert f"{name} v2: challenger - segm/AP" in out and "does not beat champion v1" in out
    client = mlflow.MlflowClient()
    assert client.get_model_version_by_alias(name, "champion").version == "1"
    assert client.get_model_version_by_alias(name, "challenger").version == "2"
    decision = json.loads((tmp_path / "reports" / "registry.json").read_text())
    assert decision["decision"] == "challenger" and decision["previous_champion"]["version"] == "1"

    assert atmask(["promote", "--version", "2", "--params", str(params_file)]) == 0
    assert f"{name}: champion moved from v1 to v2 (manual" in capsys.readouterr().out
    mv = client.get_model_version_by_alias(name, "champion")
    assert mv.version == "2" and mv.tags["promoted_from"] == "1" and "promoted_manually" in mv.tags


def _cand(ablation: str, ap: float) -> Candidate:
    return Candidate(Path(f"runs/{ablation}"), ablation, {"segm/AP": ap}, {})


def test_gate_rules() -> None:
    atm, base = _cand("atmask", 0.40), _cand("baseline", 0.38)
    assert gate(atm, [atm, base], None, "segm/AP", 0.0) == (
        True,
        "segm/AP 0.4000 beats no champion yet; the baseline run (0.3800); margin 0.0",
    )
    assert gate(atm, [atm], ("2", 0.3), "segm/AP", 0.0) == (
        True,
        "segm/AP 0.4000 beats champion v2 (0.3000); no baseline comparison: no baseline run in this set; margin 0.0",
    )
    assert gate(atm, [atm, base], ("3", 0.39), "segm/AP", 0.0)[0] is True
    ok, why = gate(atm, [atm, base], ("3", 0.39), "segm/AP", 0.02)  # margin: 0.40 is not > 0.41
    assert not ok and why.startswith("segm/AP 0.4000 does not beat champion v3 (0.3900) by > 0.02")
    assert "does not beat the baseline run (0.3800)" in why
    ok, why = gate(atm, [atm, _cand("baseline", 0.41)], None, "segm/AP", 0.0)  # worse than its baseline
    assert not ok and why == "segm/AP 0.4000 does not beat the baseline run (0.4100) by > 0.0"
    assert gate(base, [atm, base], None, "segm/AP", 0.0)[0] is True  # a baseline is not compared to itself
    assert gate(atm, [atm], ("1", 0.40), "segm/AP", 0.0)[0] is False  # equal is not better


def test_unreachable_registry_fails_cleanly(
    runs_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    out = tmp_path / "registry.json"
    args = [
        "register",
        "--runs",
        str(runs_dir),
        "--params",
        str(REPO_ROOT / "params.yaml"),
        "--out",
        str(out),
    ]
    assert atmask(args) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1
    assert err[0].startswith("atmask register: error: MLflow tracking/registry server at http://127.0.0.1:9")
    assert not out.exists()


def test_runs_without_model_fail_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "runs" / "x"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text("{}")
    out = tmp_path / "registry.json"
    args = [
        "register",
        "--runs",
        str(tmp_path / "runs"),
        "--params",
        str(REPO_ROOT / "params.yaml"),
        "--out",
        str(out),
    ]
    assert atmask(args) == 1
    assert capsys.readouterr().err == (
        f"atmask register: error: {tmp_path / 'runs'}: no evaluated runs (model.pt + metrics.json + "
        "eval_info.json); run 'atmask evaluate' first\n"
    )
    assert not out.exists()
