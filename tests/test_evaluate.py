"""``atmask evaluate`` on a really trained tiny model: outputs, exact metric keys, pycocotools equality,
MLflow REST visibility, and one clear error (no partial files) for each kind of bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import pytest
import requests
from PIL import Image

from components.coco_eval import evaluate_coco
from components.evaluate import metric_keys
from pipelines.main import main as atmask

STATS = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
ATMASK_KEYS = (
    [f"{iou}/{s}" for iou in ("bbox", "segm", "boundary") for s in STATS]
    + ["threshold_sweep/0.3/segm_AP", "threshold_sweep/0.5/segm_AP", "threshold_sweep/0.7/segm_AP"]
    + ["threshold_sweep/adaptive/segm_AP", "eval/num_images", "eval/num_detections"]
)
RUN_FILES = {"model.pt", "model.pt.sha256"}


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def _evaluate(run: Path, data: Path, repo_root: Path, *extra: str) -> int:
    return atmask(
        [
            "evaluate",
            "--run",
            str(run),
            "--data",
            str(data),
            "--params",
            str(repo_root / "params.yaml"),
            *extra,
        ]
    )


def test_evaluate_writes_stable_metrics_equal_to_pycocotools(
    tmp_path: Path, trained_atmask: Path, eval_data: Path, repo_root: Path, capsys: pytest.CaptureFixture
) -> None:
    run = _copy_run(trained_atmask, tmp_path / "atmask")
    (run / "plots").mkdir()
    (run / "plots" / "loss.csv").write_text("step,loss\n1,2.0\n")  # what training leaves there
    assert _evaluate(run, eval_data, repo_root) == 0
    assert "mlflow_run.json not found" in capsys.readouterr().out
    assert (run / "plots" / "loss.csv").read_text() == "step,loss\n1,2.0\n"  # a training output: kept

    metrics = json.loads((run / "metrics.json").read_text())
    assert list(metrics) == sorted(ATMASK_KEYS)  # written with sorted keys
    assert metric_keys([0.3, 0.5, 0.7], atmask=True) == ATMASK_KEYS
    dets = json.loads((run / "detections_val.json").read_text())
    assert len(dets) > 0 and metrics["eval/num_detections"] == len(dets)
    assert metrics["eval/num_images"] == 6
    assert metrics["segm/AP"] > 0.1 and metrics["bbox/AP"] > 0.1  # a trained model: non-trivial numbers
    gt = json.loads((eval_data / "annotations" / "instances_val.json").read_text())
    for iou_type in ("bbox", "segm", "boundary"):
        reference = evaluate_coco(gt, dets, iou_type, evaluator="pycocotools").stats
        for stat in STATS:
            assert metrics[f"{iou_type}/{stat}"] == pytest.approx(reference[stat], abs=1e-4)
    # ATMask's final masks are the adaptive binarization P >= T.
    assert metrics["threshold_sweep/adaptive/segm_AP"] == pytest.approx(metrics["segm/AP"], abs=1e-12)

    expected = {
        "metrics.json",
        "eval_info.json",
        "detections_val.json",
        *(f"plots/threshold_sweep.{ext}" for ext in ("png", "csv", "json")),
        *(f"plots/pr_curves.{ext}" for ext in ("png", "csv", "json")),
        "plots/loss.csv",
    }
    files = _files(run)
    assert expected | RUN_FILES <= files
    samples = sorted(f for f in files if f.startswith("samples/"))
    assert len([f for f in samples if f.endswith("_overlay.png")]) == 4  # params evaluate.num_samples
    assert all(f.endswith(("_overlay.png", "_maps.png")) for f in samples)
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # no staging left behind
    sweep = json.loads((run / "plots" / "threshold_sweep.json").read_text())
    assert {r["threshold"]: r["segm_AP"] for r in sweep} == {
        t: metrics[f"threshold_sweep/{t}/segm_AP"] for t in ("0.3", "0.5", "0.7", "adaptive")
    }
    info = json.loads((run / "eval_info.json").read_text())
    assert info["ablation"] == "atmask" and info["split"] == "val" and info["evaluator"] == "faster"


def test_baseline_keys_and_side_by_side_pictures(
    tmp_path: Path, make_run, trained_atmask: Path, eval_data: Path, repo_root: Path
) -> None:
    run = make_run(tmp_path / "baseline" / "seed0", "baseline", seed=1, steps=1)
    assert _evaluate(run, eval_data, repo_root) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert list(metrics) == sorted(k for k in ATMASK_KEYS if "adaptive" not in k)
    assert not any(f.endswith("_maps.png") for f in _files(run))

    # With runs/baseline/seed0 beside runs/atmask/seed0, the ATMask run's map pictures get a sixth panel:
    # the baseline's masks (the same seed's).
    atm = _copy_run(trained_atmask, tmp_path / "atmask" / "seed0")
    assert _evaluate(atm, eval_data, repo_root) == 0
    maps = sorted((atm / "samples").glob("*_maps.png"))
    assert maps and all(Image.open(p).size[0] == round(2.6 * 7 * 100) for p in maps)


@pytest.mark.slow
@pytest.mark.integration
def test_metrics_visible_through_mlflow_rest_api(
    tmp_path: Path, trained_atmask: Path, eval_data: Path, repo_root: Path, mlflow_server: str
) -> None:
    run = _copy_run(trained_atmask, tmp_path / "atmask")
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    exp_id = client.create_experiment(f"eval-{tmp_path.name}")
    run_id = client.create_run(exp_id).info.run_id
    record = {"run_id": run_id, "experiment_id": exp_id, "tracking_uri": mlflow_server}
    (run / "mlflow_run.json").write_text(json.dumps(record))

    assert _evaluate(run, eval_data, repo_root) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    got = requests.get(
        f"{mlflow_server}/api/2.0/mlflow/runs/get", params={"run_id": run_id}, timeout=10
    ).json()
    logged = {m["key"]: m["value"] for m in got["run"]["data"]["metrics"]}
    assert logged == {k.replace("/", "_"): v for k, v in metrics.items()}
    tags = {t["key"]: t["value"] for t in got["run"]["data"]["tags"]}
    assert tags["ablation"] == "atmask" and tags["head.k"] == "2.0"
    listed = requests.get(
        f"{mlflow_server}/api/2.0/mlflow/artifacts/list",
        params={"run_id": run_id, "path": "evaluation"},
        timeout=10,
    ).json()
    names = {f["path"] for f in listed["files"]}
    assert {"evaluation/metrics.json", "evaluation/plots", "evaluation/samples"} <= names


def test_run_without_model_fails_cleanly(
    tmp_path: Path, eval_data: Path, repo_root: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "empty-run"
    run.mkdir()
    assert _evaluate(run, eval_data, repo_root) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"atmask evaluate: error: {run / 'model.pt'}: no trained model here; "
                   "run 'atmask train' first or give the model.pt path"]  # fmt: skip
    assert list(run.iterdir()) == []


def test_empty_validation_split_fails_cleanly(
    tmp_path: Path, trained_atmask: Path, eval_data: Path, repo_root: Path, capsys: pytest.CaptureFixture
) -> None:
    data = tmp_path / "coco"
    shutil.copytree(eval_data / "annotations", data / "annotations")
    ann = data / "annotations" / "instances_val.json"
    gt = json.loads(ann.read_text())
    ann.write_text(json.dumps({**gt, "images": [], "annotations": []}))
    run = _copy_run(trained_atmask, tmp_path / "atmask")
    assert _evaluate(run, data, repo_root) == 1
    err = capsys.readouterr().err
    assert err == f"atmask evaluate: error: {ann}: the 'val' split has no images; nothing to evaluate\n"
    assert _files(run) == RUN_FILES


def test_results_file_for_another_dataset_is_refused(
    tmp_path: Path, eval_data: Path, repo_root: Path, capsys: pytest.CaptureFixture
) -> None:
    results = tmp_path / "other.json"
    seg = {"size": [64, 64], "counts": "0`0"}
    results.write_text(json.dumps([{"image_id": 9999, "category_id": 1, "score": 0.9, "bbox": [0, 0, 4, 4],
                                    "segmentation": seg}]))  # fmt: skip
    code = atmask(["evaluate", "--results", str(results), "--data", str(eval_data)])
    assert code == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"atmask evaluate: error: {results}: results refer to image ids [9999]"
    )


def test_evaluates_a_results_file(tmp_path: Path, eval_data: Path, capsys: pytest.CaptureFixture) -> None:
    gt = json.loads((eval_data / "annotations" / "instances_val.json").read_text())
    perfect = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "score": 1.0, "bbox": a["bbox"],
         "segmentation": a["segmentation"]}
        for a in gt["annotations"]
    ]  # fmt: skip
    results = tmp_path / "perfect.json"
    results.write_text(json.dumps(perfect))
    assert atmask(["evaluate", "--results", str(results), "--data", str(eval_data)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["segm/AP"] == pytest.approx(1.0) and printed["bbox/AP"] == pytest.approx(1.0)
    assert printed["boundary/AP"] == pytest.approx(1.0)


def test_unreachable_tracking_server_fails_before_writing(
    tmp_path: Path, trained_atmask: Path, eval_data: Path, repo_root: Path, capsys: pytest.CaptureFixture
) -> None:
    run = _copy_run(trained_atmask, tmp_path / "atmask")
    dead = "http://127.0.0.1:9"
    (run / "mlflow_run.json").write_text(
        json.dumps({"run_id": "abc", "experiment_id": "1", "tracking_uri": dead})
    )
    assert _evaluate(run, eval_data, repo_root) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"atmask evaluate: error: MLflow tracking server at {dead} is unreachable")
    assert _files(run) == RUN_FILES | {"mlflow_run.json"}


def test_model_trained_on_other_categories_is_refused(
    tmp_path: Path, trained_atmask: Path, eval_data: Path, repo_root: Path, capsys: pytest.CaptureFixture
) -> None:
    data = tmp_path / "coco"
    shutil.copytree(eval_data, data)
    ann = data / "annotations" / "instances_val.json"
    gt = json.loads(ann.read_text())
    gt["categories"] = [{**c, "name": f"other-{c['name']}"} for c in gt["categories"]]
    ann.write_text(json.dumps(gt))
    run = _copy_run(trained_atmask, tmp_path / "atmask")
    assert _evaluate(run, data, repo_root) == 1
    assert "evaluate on the dataset the run was trained on" in capsys.readouterr().err
    assert _files(run) == RUN_FILES


def _native_faster_boundary(gt: dict, dets: list[dict]) -> tuple[list[float], object]:
    """faster-coco-eval's own boundary mode (every band at full image size), as it ships."""
    import numpy as np
    from faster_coco_eval import COCO, COCOeval_faster

    def quiet(*_, **__):
        return None

    coco_gt = COCO(gt, print_function=quiet)
    coco_dt = coco_gt.loadRes([{k: v for k, v in d.items() if k != "bbox"} for d in dets])
    ev = COCOeval_faster(coco_gt, coco_dt, "boundary", print_function=quiet)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return list(ev.stats[:12]), np.asarray(ev.eval["precision"])


def test_fast_boundary_equals_faster_coco_eval_boundary_mode() -> None:
    """Our boundary AP (Boundary IoU only where mask IoU >= 0.5, bands on the box) gives exactly the
    numbers of faster-coco-eval's boundary mode, and those of the pycocotools reference; crowd too."""
    import numpy as np
    from pycocotools import mask as mask_util

    rng = np.random.default_rng(7)
    images, anns, dets = [], [], []
    for image_id in range(1, 13):
        images.append({"id": image_id, "width": 64, "height": 48, "file_name": f"{image_id}.png"})
        for _ in range(4):
            x, y, s, cat = *rng.integers(0, 50, 2), int(rng.integers(6, 18)), int(rng.integers(1, 3))
            m = np.zeros((48, 64), np.uint8, order="F")
            m[y : y + s, x : x + s] = 1  # may touch the image border
            rle = mask_util.encode(m)
            rle["counts"] = rle["counts"].decode()
            crowd = int(len(anns) % 7 == 3)
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat, "segmentation": rle,
                         "area": float(m.sum()), "bbox": mask_util.toBbox(rle).tolist(), "iscrowd": crowd})  # fmt: skip
            for _ in range(3):
                dx, dy = rng.integers(-1, 2, 2)
                d = np.roll(np.roll(m, dy, 0), dx, 1) if rng.random() < 0.8 else np.asfortranarray(m[::-1])
                drle = mask_util.encode(np.asfortranarray(d))
                drle["counts"] = drle["counts"].decode()
                dets.append({"image_id": image_id, "category_id": cat if rng.random() < 0.9 else 3 - cat,
                             "segmentation": drle, "score": float(rng.random())})  # fmt: skip
    gt = {
        "images": images,
        "annotations": anns,
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    }
    ours = evaluate_coco(gt, dets, "boundary")
    reference = evaluate_coco(gt, dets, "boundary", evaluator="pycocotools")
    native_stats, native_precision = _native_faster_boundary(gt, dets)
    assert 0.05 < ours.stats["AP"] < 0.95  # a non-trivial case
    assert list(ours.stats.values()) == native_stats
    np.testing.assert_array_equal(ours.precision, native_precision)
    for stat, value in reference.stats.items():
        assert ours.stats[stat] == pytest.approx(value, abs=1e-4)


def test_band_on_the_box_equals_reference_band() -> None:
    """rle_band (bounding-box erosion, runs split at column ends) == mask_boundary on the full image."""
    import numpy as np
    from pycocotools import mask as mask_util

    from components.boundary import mask_boundary, rle_band

    rng = np.random.default_rng(3)
    cases = [np.zeros((30, 40), np.uint8), np.ones((30, 40), np.uint8)]
    edge = np.zeros((30, 40), np.uint8)
    edge[20:, 5] = 1
    edge[:7, 6] = 1  # a run from the bottom of column 5 into the top of column 6
    cases.append(edge)
    cases += [(rng.random((30, 40)) < p).astype(np.uint8) for p in (0.1, 0.5, 0.9)]
    for _ in range(20):
        m = np.zeros((30, 40), np.uint8)
        y, x = rng.integers(-5, 30, 2)
        m[max(y, 0) : y + rng.integers(1, 25), max(x, 0) : x + rng.integers(1, 35)] = 1
        cases.append(m)
    for ratio in (0.02, 0.1):
        for m in cases:
            band = rle_band(mask_util.encode(np.asfortranarray(m)), ratio)
            full = np.zeros(m.shape, bool)
            rows, cols = band.pixels.shape
            full[band.y0 : band.y0 + rows, band.x0 : band.x0 + cols] = band.pixels
            np.testing.assert_array_equal(full, mask_boundary(m, ratio).astype(bool))
            assert band.area == full.sum()
