"""Hostile and broken images (tests/bad_images.py) give the same one-line reason on every surface:
``atmask ingest`` quarantines them, ``atmask predict`` stops with one line and writes nothing, and the
served model (a real ``mlflow models serve`` process) answers HTTP 400 with a one-line message and no
stack trace."""

from __future__ import annotations

import base64
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pytest
import requests
import torch
from bad_images import BAD_IMAGES, encoded, picture
from fixtures_eval import TINY_MODEL
from fixtures_services import _bin, _serve, free_port

from components.checkpoint import save_model
from components.cli import main as atmask
from components.errors import UserError
from components.images import ImageLimits
from components.ingest import ingest
from components.predict import predict
from components.pyfunc_model import encode_image
from components.register import pyfunc_spec
from model.builder import build_model
from model.config import ModelConfig

W, H = 48, 40
NO_MODEL = "no-such-run"  # predict reads every image before it loads the model: these tests never get there
SQUARE = [5.0, 5.0, 20.0, 5.0, 20.0, 20.0, 5.0, 20.0]
DEFAULT_CASES = [name for name, case in BAD_IMAGES.items() if case[3] is None]


def _dataset(root: Path, bad: bytes) -> Path:
    """Two listed images, ``a.png`` (good, 24x20, within every limit the cases set) and ``b.png``
    (``bad``, declared 48x40), one square annotation on each."""
    (root / "images" / "train").mkdir(parents=True)
    (root / "annotations").mkdir()
    picture(24, 20).save(root / "images" / "train" / "a.png")
    (root / "images" / "train" / "b.png").write_bytes(bad)
    anns = [
        {"id": i, "image_id": i, "category_id": 1, "segmentation": [SQUARE], "bbox": [5.0, 5.0, 15.0, 15.0],
         "area": 225.0, "iscrowd": 0}
        for i in (1, 2)
    ]  # fmt: skip
    coco = {
        "images": [
            {"id": 1, "file_name": "a.png", "width": 24, "height": 20},
            {"id": 2, "file_name": "b.png", "width": W, "height": H},
        ],
        "annotations": anns,
        "categories": [{"id": 1, "name": "thing"}],
    }
    (root / "annotations" / "instances_train.json").write_text(json.dumps(coco))
    return root


@pytest.mark.parametrize("name", list(BAD_IMAGES))
def test_ingest_quarantines_the_image_with_one_reason(name: str, tmp_path: Path) -> None:
    make, kind, fragment, limits = BAD_IMAGES[name]
    src = _dataset(tmp_path / "src", make())
    result = ingest(str(src), tmp_path / "out", splits=("train",), workers=1, image_limits=limits)
    got = [(p["action"], p["field"], p["id"]) for p in result.problems]
    assert got == [("quarantined", "file_name", 2), ("quarantined", "image_id", 2)], result.problems
    reason = result.problems[0]["reason"]
    assert reason.startswith(f"{kind} image {src / 'images' / 'train' / 'b.png'}: ") and fragment in reason
    assert "\n" not in reason and len(reason) < 500
    assert sorted(p.name for p in (tmp_path / "out" / "images" / "train").iterdir()) == ["a.png"]
    assert result.manifest["options"]["image_limits"] == (limits or ImageLimits()).to_mapping()


@pytest.mark.parametrize("name", DEFAULT_CASES)
def test_predict_stops_with_one_line_and_writes_nothing(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    make, kind, fragment, _ = BAD_IMAGES[name]
    bad = tmp_path / "input.png"
    bad.write_bytes(make())
    out = tmp_path / "pred"
    assert atmask(["predict", str(bad), "--model", str(tmp_path / NO_MODEL), "--out", str(out)]) == 1
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert lines[0].startswith(f"atmask predict: error: {bad}: cannot read the image ({kind}: ")
    assert fragment in lines[0]
    assert not out.exists()


@pytest.mark.parametrize("name", [n for n in BAD_IMAGES if n not in DEFAULT_CASES])
def test_predict_applies_configured_limits(name: str, tmp_path: Path) -> None:
    make, kind, fragment, limits = BAD_IMAGES[name]
    image = tmp_path / "input.png"
    image.write_bytes(make())
    with pytest.raises(
        UserError, match=re.escape(f"cannot read the image ({kind}: ") + ".*" + re.escape(fragment)
    ):
        predict([image], str(tmp_path / NO_MODEL), tmp_path / "pred", image_limits=limits)
    assert not (tmp_path / "pred").exists()


# ---------------------------------------------------------------- the served model


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of ``mlflow models serve`` on a tiny (untrained) model, logged exactly as ``atmask register``
    logs one."""
    root = tmp_path_factory.mktemp("served")
    torch.manual_seed(0)
    cfg = ModelConfig.for_ablation("atmask", num_classes=2, **TINY_MODEL)
    save_model(root / "model.pt", build_model(cfg), cfg, [{"id": 0, "name": "thing", "supercategory": ""}])
    mlflow.pyfunc.save_model(str(root / "model"), **pyfunc_spec(root / "model.pt"))
    port = free_port()
    cmd = [_bin("mlflow"), "models", "serve", "-m", str(root / "model"), "--env-manager", "local"]
    cmd += ["-h", "127.0.0.1", "-p", str(port), "-w", "1"]
    env = {**os.environ, "ATMASK_DEVICE": "cpu", "OMP_NUM_THREADS": "2"}
    with _serve(cmd, f"http://127.0.0.1:{port}/ping", root / "serve.log", env, timeout=180):
        yield f"http://127.0.0.1:{port}"


def _score(url: str, images: list[str]) -> requests.Response:
    body = {"dataframe_split": {"columns": ["image"], "data": [[b] for b in images]}}
    return requests.post(f"{url}/invocations", json=body, timeout=120)


@pytest.mark.slow
@pytest.mark.integration
def test_served_model_answers_400_with_one_line_per_bad_image(served: str) -> None:
    good = encode_image(np.asarray(picture(W, H)))
    ok = _score(served, [good])
    assert ok.status_code == 200 and "predictions" in ok.json()
    for name in DEFAULT_CASES:
        make, kind, fragment, _ = BAD_IMAGES[name]
        payload = base64.b64encode(make()).decode("ascii")
        resp = _score(served, [good, payload])
        assert resp.status_code == 400, (name, resp.status_code, resp.text[:500])
        body = resp.json()
        assert set(body) <= {"error_code", "message", "sqlstate", "error_class"}, (name, body.keys())
        message = body["message"]
        assert message.startswith(f"row 1: {kind}: ") and fragment in message, (name, message)
        assert "\n" not in message and "Traceback" not in resp.text and "stack_trace" not in resp.text
        assert len(resp.text) < 1000  # the request's payload is not echoed back


@pytest.mark.slow
@pytest.mark.integration
def test_served_model_answers_400_for_input_that_is_not_an_image_file(served: str) -> None:
    cases = {
        "not base64 !!": "row 0: not base64",
        base64.b64encode(encoded(picture(), "JPEG")).decode()[:-8] + "@@@@@@@@": "row 0: not base64",
    }
    for value, start in cases.items():
        resp = _score(served, [value])
        assert resp.status_code == 400 and resp.json()["message"].startswith(start), resp.text[:300]
        assert "stack_trace" not in resp.text
