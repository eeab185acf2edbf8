"""``atmask predict``: overlays and COCO JSON from a run folder and from the registry (same output)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from pycocotools import mask as mask_util

from components.checkpoint import load_trained_model
from components.detections import detect, image_to_tensor
from components.params import load_params
from components.register import register
from pipelines.main import main as atmask

REPO_ROOT = Path(__file__).resolve().parents[1]


def _val_images(eval_data: Path, count: int = 2) -> list[Path]:
    gt = json.loads((eval_data / "annotations" / "instances_val.json").read_text())
    return [eval_data / "images" / "val" / im["file_name"] for im in gt["images"][:count]]


def test_predict_from_run_folder(trained_atmask: Path, eval_data: Path, tmp_path: Path) -> None:
    images = _val_images(eval_data)
    out = tmp_path / "pred"
    args = ["predict", *map(str, images), "--model", str(trained_atmask), "--out", str(out)]
    assert atmask([*args, "--score-threshold", "0.3"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{p.stem}_overlay.png" for p in images] + ["predictions.json"]
    )
    for path in images:
        assert Image.open(out / f"{path.stem}_overlay.png").size == Image.open(path).size
    result = json.loads((out / "predictions.json").read_text())
    assert [im["file_name"] for im in result["images"]] == [p.name for p in images]
    model, _, cats = load_trained_model(trained_atmask)
    direct = detect(model, cats, [image_to_tensor(Image.open(p)) for p in images], 0.3)
    flat = [(i + 1, d) for i, dets in enumerate(direct) for d in dets]
    assert len(flat) > 0 and len(result["annotations"]) == len(flat)
    assert result["categories"] == cats
    for ann, (image_id, d) in zip(result["annotations"], flat, strict=True):
        assert ann["image_id"] == image_id and ann["category_id"] == d["category_id"]
        assert ann["score"] == pytest.approx(d["score"], abs=1e-6) and ann["score"] >= 0.3
        assert np.array_equal(mask_util.decode(ann["segmentation"]).astype(bool), d["mask"])
        x1, y1, x2, y2 = d["box"]
        assert ann["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1])


@pytest.mark.slow
@pytest.mark.integration
def test_predict_from_registry_matches_run_folder(
    trained_atmask: Path, eval_data: Path, tmp_path: Path, mlflow_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    runs = tmp_path / "runs"
    import shutil

    shutil.copytree(trained_atmask, runs / "atmask")
    assert atmask(["evaluate", "--run", str(runs / "atmask"), "--data", str(eval_data),
                   "--params", str(REPO_ROOT / "params.yaml")]) == 0  # fmt: skip
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    name = f"predict-{tmp_path.name}"
    raw["register"]["model_name"] = name
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    register(load_params(tmp_path / "params.yaml"), runs, "best", None, tmp_path / "registry.json")

    images = [str(p) for p in _val_images(eval_data)]
    assert atmask(["predict", *images, "--model", str(runs / "atmask"), "--out", str(tmp_path / "a")]) == 0
    assert (
        atmask(["predict", *images, "--model", f"models:/{name}@champion", "--out", str(tmp_path / "b")]) == 0
    )
    assert (tmp_path / "a" / "predictions.json").read_text() == (
        tmp_path / "b" / "predictions.json"
    ).read_text()


def test_unreadable_image_fails_before_writing(
    trained_atmask: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    out = tmp_path / "pred"
    assert atmask(["predict", str(bad), "--model", str(trained_atmask), "--out", str(out)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"atmask predict: error: {bad}: cannot read the image")
    assert not out.exists()


def test_missing_model_fails_cleanly(eval_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "pred"
    image = str(_val_images(eval_data, 1)[0])
    assert atmask(["predict", image, "--model", str(tmp_path / "no-run"), "--out", str(out)]) == 1
    assert capsys.readouterr().err == (
        f"atmask predict: error: {tmp_path / 'no-run'}: no trained model here; "
        "run 'atmask train' first or give the model.pt path\n"
    )
    assert not out.exists()
