"""``atmask report``: the ablation table equals the runs' measured metrics (folders and MLflow)."""

from __future__ import annotations

import csv
import json
import shutil
import statistics
from pathlib import Path

import mlflow
import pytest

from components.evaluate import ablation_tags
from components.params import load_params
from components.report import COLUMNS, report
from components.tracking import mlflow_key
from model.config import ModelConfig
from pipelines.main import main as atmask

REPO_ROOT = Path(__file__).resolve().parents[1]
BASELINE_SEEDS = [
    {"segm/AP": 0.30, "segm/AP50": 0.50, "segm/AP75": 0.31, "segm/APs": 0.10, "segm/APm": 0.32, "segm/APl": -1.0,
     "bbox/AP": 0.35, "boundary/AP": 0.20},
    {"segm/AP": 0.34, "segm/AP50": 0.54, "segm/AP75": 0.35, "segm/APs": 0.12, "segm/APm": 0.36, "segm/APl": -1.0,
     "bbox/AP": 0.37, "boundary/AP": 0.22},
]  # fmt: skip


def _fake_run(runs: Path, name: str, ablation: str, metrics: dict[str, float]) -> None:
    run = runs / name
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps(metrics))
    head = ablation_tags(ModelConfig.for_ablation(ablation))
    (run / "eval_info.json").write_text(json.dumps({"ablation": ablation, "head": head}))


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory: pytest.TempPathFactory, trained_atmask: Path, eval_data: Path) -> Path:
    """One really evaluated ATMask run and two hand-written baseline seeds."""
    runs = tmp_path_factory.mktemp("report") / "runs"
    shutil.copytree(trained_atmask, runs / "atmask-s0")
    args = ["evaluate", "--run", str(runs / "atmask-s0"), "--data", str(eval_data)]
    assert atmask([*args, "--params", str(REPO_ROOT / "params.yaml")]) == 0
    for seed, metrics in enumerate(BASELINE_SEEDS):
        _fake_run(runs, f"baseline-s{seed}", "baseline", metrics)
    return runs


def _csv_rows(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return {r["ablation"]: r for r in csv.DictReader(fh)}


def test_report_equals_run_metrics(
    runs_dir: Path, tmp_path: Path, repo_root: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "reports"
    code = atmask(
        ["report", "--runs", str(runs_dir), "--out", str(out), "--params", str(repo_root / "params.yaml")]
    )
    assert code == 0
    measured = json.loads((runs_dir / "atmask-s0" / "metrics.json").read_text())
    rows = _csv_rows(out / "ablations.csv")
    assert list(rows) == ["baseline", "atmask"]  # params.yaml ablation order
    for key in COLUMNS:
        expected = "" if measured[key] < 0 else repr(measured[key])  # COCO's -1: nothing to measure
        assert rows["atmask"][f"{key}_mean"] == expected
        assert rows["atmask"][f"{key}_std"] == ""  # one run
    base = rows["baseline"]
    assert float(base["segm/AP_mean"]) == statistics.fmean([0.30, 0.34])
    assert float(base["segm/AP_std"]) == statistics.stdev([0.30, 0.34])
    assert float(base["bbox/AP_mean"]) == statistics.fmean([0.35, 0.37])
    assert base["segm/APl_mean"] == ""  # COCO's -1: nothing to measure
    assert float(rows["atmask"]["delta_segm/AP"]) == measured["segm/AP"] - statistics.fmean([0.30, 0.34])
    assert float(rows["atmask"]["delta_boundary/AP"]) == measured["boundary/AP"] - statistics.fmean(
        [0.20, 0.22]
    )
    assert (base["runs"], rows["atmask"]["runs"]) == ("2", "1")
    assert (rows["atmask"]["rt_source"], rows["atmask"]["k"], rows["atmask"]["p2t_fusion"]) == (
        "p2",
        "2.0",
        "True",
    )

    md = (out / "ablations.md").read_text()
    baseline_line = "| baseline |  |  |  |  |  | 2 | 32.0 ± 2.8 | 52.0 ± 2.8 | 33.0 ± 2.8 | 11.0 ± 1.4 | 34.0 ± 2.8 | n/a | 36.0 ± 1.4 | 21.0 ± 1.4 | – | – |"
    assert baseline_line in md.splitlines()
    atmask_line = next(line for line in md.splitlines() if line.startswith("| atmask |"))
    assert atmask_line.startswith("| atmask | ✓ | ✓ | ✓ | P2 | 2 | 1 | ")
    assert f"| {100 * measured['segm/AP']:.1f} |" in atmask_line
    assert atmask_line.endswith(
        f"| {100 * (measured['segm/AP'] - 0.32):+.1f} | {100 * (measured['boundary/AP'] - 0.21):+.1f} |"
    )
    assert baseline_line in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.integration
def test_report_from_mlflow_experiment_matches_folders(
    runs_dir: Path, tmp_path: Path, repo_root: Path, mlflow_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    name = f"report-{tmp_path.name}"
    exp_id = client.create_experiment(name)
    for run in sorted(runs_dir.iterdir()):
        metrics = json.loads((run / "metrics.json").read_text())
        tags = json.loads((run / "eval_info.json").read_text())["head"]
        run_id = client.create_run(exp_id, tags={k: str(v) for k, v in tags.items()}).info.run_id
        for key, value in metrics.items():
            client.log_metric(run_id, mlflow_key(key), value)
    client.create_run(exp_id)  # a run without evaluation (e.g. still training) is ignored
    params = load_params(repo_root / "params.yaml")
    from_folders = report(params, runs_dir, None, tmp_path / "a")
    from_mlflow = report(params, None, name, tmp_path / "b")

    def summary(rows):
        return [(r.ablation, {k: sorted(v) for k, v in r.values.items()}, r.head) for r in rows]

    assert summary(from_mlflow) == summary(from_folders)
    assert (tmp_path / "a" / "ablations.csv").read_text() == (tmp_path / "b" / "ablations.csv").read_text()


def test_no_evaluated_runs_is_one_clear_error(
    tmp_path: Path, repo_root: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "runs" / "only-trained").mkdir(parents=True)
    out = tmp_path / "reports"
    args = [
        "report",
        "--runs",
        str(tmp_path / "runs"),
        "--out",
        str(out),
        "--params",
        str(repo_root / "params.yaml"),
    ]
    assert atmask(args) == 1
    assert capsys.readouterr().err == (
        f"atmask report: error: {tmp_path / 'runs'}: no evaluated runs found; "
        "run 'atmask evaluate' on the trained runs first\n"
    )
    assert not out.exists()
