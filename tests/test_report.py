"""``atmask report``: the ablation table equals the runs' measured metrics (folders and MLflow), over seeds,
with paired differences to the baseline and their 95% intervals checked against hand-computed numbers."""

from __future__ import annotations

import csv
import json
import math
import shutil
import statistics
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest

from components.evaluate import ablation_tags
from components.paired import paired_difference, t_quantile
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


def _fake_run(runs: Path, ablation: str, seed: int, metrics: dict[str, float]) -> Path:
    run = runs / ablation / f"seed{seed}"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps(metrics))
    head = ablation_tags(ModelConfig.for_ablation(ablation))
    (run / "eval_info.json").write_text(json.dumps({"ablation": ablation, "head": head, "seed": seed}))
    return run


@pytest.fixture(scope="module")
def runs_dir(
    tmp_path_factory: pytest.TempPathFactory, trained_atmask: Path, eval_data: Path
) -> Iterator[Path]:
    """One really evaluated ATMask run (seed 0) and two hand-written baseline seeds (0, 1)."""
    runs = tmp_path_factory.mktemp("report") / "runs"
    run = runs / "atmask" / "seed0"
    shutil.copytree(trained_atmask, run)
    (run / "train_log.json").write_text(json.dumps({"log": [], "summary": {"seed": 0}}))
    args = ["evaluate", "--run", str(run), "--data", str(eval_data)]
    assert atmask([*args, "--params", str(REPO_ROOT / "params.yaml")]) == 0
    for seed, metrics in enumerate(BASELINE_SEEDS):
        _fake_run(runs, "baseline", seed, metrics)
    yield runs
    shutil.rmtree(runs.parent, ignore_errors=True)


def _csv_rows(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return {r["ablation"]: r for r in csv.DictReader(fh)}


def _report(runs: Path, out: Path, *extra: str) -> int:
    argv = ["report", "--runs", str(runs), "--out", str(out), "--params", str(REPO_ROOT / "params.yaml")]
    return atmask([*argv, "--no-mlflow", *extra])


def test_report_equals_run_metrics(runs_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "reports"
    assert _report(runs_dir, out) == 0
    measured = json.loads((runs_dir / "atmask" / "seed0" / "metrics.json").read_text())
    rows = _csv_rows(out / "ablations.csv")
    assert list(rows) == ["baseline", "atmask"]  # params.yaml ablation order
    for key in COLUMNS:
        expected = "" if measured[key] < 0 else repr(measured[key])  # COCO's -1: nothing to measure
        assert rows["atmask"][f"{key}_mean"] == expected
        assert rows["atmask"][f"{key}_std"] == ""  # one seed
    base = rows["baseline"]
    assert float(base["segm/AP_mean"]) == statistics.fmean([0.30, 0.34])
    assert float(base["segm/AP_std"]) == statistics.stdev([0.30, 0.34])
    assert base["segm/APl_mean"] == ""  # COCO's -1: nothing to measure
    # the paired difference uses the seed both have (0): one pair, no interval
    assert float(rows["atmask"]["delta_segm/AP"]) == pytest.approx(measured["segm/AP"] - 0.30, abs=1e-12)
    assert rows["atmask"]["delta_segm/AP_pairs"] == "1" and rows["atmask"]["delta_segm/AP_ci_low"] == ""
    assert (base["runs"], base["seeds"], rows["atmask"]["runs"], rows["atmask"]["seeds"]) == (
        "2",
        "0 1",
        "1",
        "0",
    )
    assert (rows["atmask"]["rt_source"], rows["atmask"]["k"], rows["atmask"]["fusion"]) == (
        "p2",
        "2.0",
        "chained",
    )

    md = (out / "ablations.md").read_text()
    baseline_line = (
        "| baseline |  |  |  |  |  |  | 2 | 32.0 ± 2.8 | 52.0 ± 2.8 | 33.0 ± 2.8 | 11.0 ± 1.4 | 34.0 ± 2.8 | n/a "
        "| 36.0 ± 1.4 | 21.0 ± 1.4 | – | – | – |"
    )
    assert baseline_line in md.splitlines()
    atmask_line = next(line for line in md.splitlines() if line.startswith("| atmask |"))
    assert atmask_line.startswith("| atmask | ✓ | ✓ | ✓ | P2 | 2 |  | 1 | ")
    assert f"| {100 * (measured['segm/AP'] - 0.30):+.1f} |" in atmask_line
    assert baseline_line in capsys.readouterr().out
    assert {p.name for p in (out / "plots").iterdir()} == {
        "ablations.png", "threshold_sweep.png", "pr_curves.png", "loss.png",
    }  # fmt: skip


HAND = {  # segm/AP of three seeds; the differences to the baseline are +0.02, +0.04, +0.01
    "baseline": [0.20, 0.25, 0.30],
    "thr_fusion": [0.22, 0.29, 0.31],
    "atmask": [0.26, 0.31, 0.37],  # +0.06, +0.06, +0.07: a clear gain
}


def test_paired_intervals_equal_a_hand_computed_case(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    for ablation, values in HAND.items():
        for seed, value in enumerate(values):
            metrics = {key: value for key in COLUMNS}
            _fake_run(runs, ablation, seed, metrics)
    assert _report(runs, tmp_path / "out") == 0
    rows = _csv_rows(tmp_path / "out" / "ablations.csv")

    # thr_fusion: d = (0.02, 0.04, 0.01), mean 0.02333.., sd 0.0152753, t(0.975, 2) = 4.302653
    half = 4.302652729911275 * 0.015275252316519466 / math.sqrt(3)
    thr = rows["thr_fusion"]
    assert float(thr["delta_segm/AP"]) == pytest.approx(0.07 / 3, abs=1e-12)
    assert float(thr["delta_segm/AP_ci_low"]) == pytest.approx(0.07 / 3 - half, abs=1e-9)
    assert float(thr["delta_segm/AP_ci_high"]) == pytest.approx(0.07 / 3 + half, abs=1e-9)
    assert thr["delta_segm/AP_pairs"] == "3" and thr["delta_segm/AP_significant"] == "false"
    # atmask: d = (0.06, 0.06, 0.07), mean 0.063333, sd 0.0057735: the interval excludes 0
    half = 4.302652729911275 * 0.005773502691896263 / math.sqrt(3)
    assert float(rows["atmask"]["delta_segm/AP_ci_low"]) == pytest.approx(0.19 / 3 - half, abs=1e-9)
    assert rows["atmask"]["delta_segm/AP_significant"] == "true"

    md = (tmp_path / "out" / "ablations.md").read_text().splitlines()
    thr_line = next(line for line in md if line.startswith("| thr_fusion |"))
    assert "| +2.3 [-1.5, +6.1] n.s. |" in thr_line  # ΔAP with its interval, marked not significant
    atmask_line = next(line for line in md if line.startswith("| atmask |"))
    assert "| +6.3 [+4.9, +7.8] |" in atmask_line and "n.s." not in atmask_line
    assert "| baseline |" in md[6] and "| 3 | 25.0 ± 5.0 |" in md[6]


def test_t_quantile_and_unpaired_seeds() -> None:
    assert t_quantile(2) == pytest.approx(4.302652729911275)
    assert t_quantile(4) == pytest.approx(2.7764451051977987)
    assert paired_difference({0: 0.3}, {1: 0.2}) is None  # no seed in common
    single = paired_difference({0: 0.3, 5: 0.1}, {0: 0.2})
    assert (
        single.n == 1
        and single.mean == pytest.approx(0.1)
        and single.low is None
        and single.significant is None
    )


def test_the_study_is_logged_to_mlflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runs = tmp_path / "runs"
    for ablation, values in HAND.items():
        for seed, value in enumerate(values):
            _fake_run(runs, ablation, seed, {key: value for key in COLUMNS})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    argv = [
        "report",
        "--runs",
        str(runs),
        "--out",
        str(tmp_path / "out"),
        "--params",
        str(REPO_ROOT / "params.yaml"),
    ]
    assert atmask(argv) == 0
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name(load_params(REPO_ROOT / "params.yaml").mlflow.experiment)
    (study,) = client.search_runs([experiment.experiment_id], "tags.study = 'ablations'")
    metrics = study.data.metrics
    assert metrics["thr_fusion/delta_segm_AP"] == pytest.approx(0.07 / 3)
    assert metrics["atmask/segm_AP_mean"] == pytest.approx(statistics.fmean(HAND["atmask"]))
    assert metrics["baseline/seeds"] == 3.0
    artifacts = {a.path for a in client.list_artifacts(study.info.run_id, "report")}
    assert {"report/ablations.md", "report/ablations.csv", "report/plots"} <= artifacts


@pytest.mark.slow
@pytest.mark.integration
def test_report_from_mlflow_experiment_matches_folders(
    runs_dir: Path, tmp_path: Path, repo_root: Path, mlflow_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    name = f"report-{tmp_path.name}"
    exp_id = client.create_experiment(name)
    for metrics_path in sorted(runs_dir.rglob("metrics.json")):
        metrics = json.loads(metrics_path.read_text())
        info = json.loads((metrics_path.parent / "eval_info.json").read_text())
        tags = {**{k: str(v) for k, v in info["head"].items()}, "seed": str(info["seed"])}
        run_id = client.create_run(exp_id, tags=tags).info.run_id
        for key, value in metrics.items():
            client.log_metric(run_id, mlflow_key(key), value)
    client.create_run(exp_id)  # a run without evaluation (e.g. still training) is ignored
    params = load_params(repo_root / "params.yaml")
    from_folders = report(params, runs_dir, None, tmp_path / "a")
    from_mlflow = report(params, None, name, tmp_path / "b")

    def summary(rows):
        return [(r.ablation, {k: r.values(k) for k in COLUMNS}, r.head) for r in rows]

    assert summary(from_mlflow) == summary(from_folders)
    assert (tmp_path / "a" / "ablations.csv").read_text() == (tmp_path / "b" / "ablations.csv").read_text()


def test_no_evaluated_runs_is_one_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "runs" / "only-trained").mkdir(parents=True)
    out = tmp_path / "reports"
    assert _report(tmp_path / "runs", out) == 1
    assert capsys.readouterr().err == (
        f"atmask report: error: {tmp_path / 'runs'}: no evaluated runs found; "
        "run 'atmask evaluate' on the trained runs first\n"
    )
    assert not out.exists()
