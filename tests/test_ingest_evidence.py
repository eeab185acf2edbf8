"""Datasets from other labelling tools: a fatal ingest says why (counts, the most frequent reasons with an
example each, ``<out>.ingest_report.failed.json`` beside the output, no dataset left), and category ids are
any non-negative integers (0 included) with the id -> training label mapping in the manifest."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from bad_images import png_header, real_bomb, truncated
from fixtures_train import write_params

from components import cli
from components.ingest import ingest
from components.synthetic import SyntheticConfig, generate

W, H = 40, 30
SQUARE = [5.0, 5.0, 15.0, 5.0, 15.0, 15.0, 5.0, 15.0]


def _png(path: Path, w: int = W, h: int = H) -> bytes:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), (90, 140, 200)).save(path)
    return path.read_bytes()


def _coco(names: list[str], categories: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    cats = categories or [{"id": 1, "name": "thing"}]
    return {
        "images": [{"id": i + 1, "file_name": n, "width": W, "height": H} for i, n in enumerate(names)],
        "annotations": [
            {"id": i + 1, "image_id": i + 1, "category_id": cats[i % len(cats)]["id"],
             "segmentation": [SQUARE], "bbox": [5.0, 5.0, 10.0, 10.0], "area": 100.0, "iscrowd": 0}
            for i in range(len(names))
        ],
        "categories": cats,
    }  # fmt: skip


def _write(root: Path, coco: dict[str, Any], split: str = "train") -> Path:
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
    return root


def _fail(root: Path, out: Path, capsys: pytest.CaptureFixture, *argv: str) -> str:
    rc = cli.main(["ingest", "--source", str(root), "--out", str(out), "--splits", "train", *argv])
    err = capsys.readouterr().err
    assert rc == 1 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err.strip()


def _failed_report(out: Path) -> dict[str, Any]:
    return json.loads(out.with_name(out.name + ".ingest_report.failed.json").read_text())


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------- fatal errors carry their evidence


def test_absolute_file_names_are_counted_and_explained(tmp_path: Path, capsys) -> None:
    elsewhere = tmp_path / "export" / "imgs"  # another tool wrote absolute paths to where it kept them
    names = [str(elsewhere / f"img{i}.png") for i in range(8)]
    for name in names:
        _png(Path(name))
    root = _write(tmp_path / "src", _coco(names))
    out = tmp_path / "out"
    line = _fail(root, out, capsys)
    assert "no usable images in split 'train' (8 listed, 8 quarantined, 0 kept; most frequent: " in line
    assert f"8x quarantined file_name: unsafe file_name '{names[0]}': must be relative to the split" in line
    assert "(e.g. id 1)" in line and line.endswith(
        f"every problem is listed in {out}.ingest_report.failed.json"
    )
    report = _failed_report(out)
    assert report["counts"]["train"]["images"] == {"listed": 8, "kept": 0, "left_out": 8}
    assert [p["id"] for p in report["problems"]] == list(range(1, 9))
    assert report["top_reasons"][0]["count"] == 8 and report["top_reasons"][0]["example"]["id"] == 1
    assert report["dataset_written"] is False and report["error"] in line
    assert _leftovers(tmp_path) == ["export", "out.ingest_report.failed.json", "src"]  # no dataset, no temp


@pytest.mark.parametrize(
    ("bomb", "detail"),
    [
        (lambda: png_header(20_000, 20_000), "400.0 MP is over Pillow's hard limit of 179.0 MP"),
        (real_bomb, "12000x12000 pixels (144.0 MP) is over the limit of 89.5 MP (max_image_pixels)"),
    ],
    ids=["header_claims_20000x20000", "real_12000x12000_in_140kB"],
)
def test_a_decompression_bomb_as_the_only_image_is_named(bomb, detail: str, tmp_path: Path, capsys) -> None:
    root = _write(tmp_path / "src", _coco(["bomb.png"]))
    (root / "images" / "train" / "bomb.png").write_bytes(bomb())
    line = _fail(root, tmp_path / "out", capsys)
    assert (
        "(1 listed, 1 quarantined, 0 kept; most frequent: 1x quarantined file_name: too large image " in line
    )
    assert detail in line and "a decompression bomb" in line
    assert _failed_report(tmp_path / "out")["problems"][0]["reason"].startswith("too large image ")


def test_most_frequent_reasons_come_first_with_one_example_each(tmp_path: Path, capsys) -> None:
    names = [f"missing{i}.png" for i in range(3)] + ["cut0.png", "cut1.png", "/abs/x.png", "bad id"]
    coco = _coco(names)
    coco["images"][-1]["id"] = "seven"  # a structural problem: still counted as listed
    root = _write(tmp_path / "src", coco)
    for name in ("cut0.png", "cut1.png"):
        path = root / "images" / "train" / name
        path.write_bytes(truncated(_png(path)))
    line = _fail(root, tmp_path / "out", capsys)
    assert (
        "(7 listed, 7 quarantined, 0 kept; most frequent: 3x quarantined file_name: image file not found"
        in line
    )
    first, second, third = line.split("most frequent: ")[1].split("; ")[:3]
    assert first.endswith("missing0.png (e.g. id 1)")
    assert (
        second.startswith("2x quarantined file_name: truncated or corrupt image ") and "(e.g. id 4)" in second
    )
    assert third.startswith("1x quarantined")
    tops = _failed_report(tmp_path / "out")["top_reasons"]
    assert [t["count"] for t in tops] == [3, 2, 1, 1]


def test_failure_keeps_the_previous_output_and_success_clears_the_failure_report(
    tmp_path: Path, capsys
) -> None:
    root = _write(tmp_path / "src", _coco(["a.png", "b.png"]))
    for name in ("a.png", "b.png"):
        _png(root / "images" / "train" / name)
    out = tmp_path / "out"
    ingest(str(root), out, splits=("train",), workers=1)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for name in ("a.png", "b.png"):
        (root / "images" / "train" / name).unlink()
    _fail(root, out, capsys)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # untouched, nothing added
    assert _failed_report(out)["counts"]["train"]["images"]["listed"] == 2
    for name in ("a.png", "b.png"):
        _png(root / "images" / "train" / name)
    ingest(str(root), out, splits=("train",), workers=1, force=True)
    assert _leftovers(tmp_path) == ["out", "src"]  # the stale failure report is gone


def test_a_failing_second_split_reports_both_splits(tmp_path: Path, capsys) -> None:
    root = _write(tmp_path / "src", _coco(["a.png"]))
    _png(root / "images" / "train" / "a.png")
    _write(root, _coco(["gone.png", "gone2.png"]), "val")
    rc = cli.main(["ingest", "--source", str(root), "--out", str(tmp_path / "out"), "--splits", "train,val"])
    line = capsys.readouterr().err
    assert rc == 1 and "no usable images in split 'val' (2 listed, 2 quarantined, 0 kept" in line
    counts = _failed_report(tmp_path / "out")["counts"]
    assert counts["train"]["images"] == {"listed": 1, "kept": 1, "left_out": 0}
    assert counts["val"]["images"] == {"listed": 2, "kept": 0, "left_out": 2}
    assert not (tmp_path / "out").exists()


def test_strict_failure_writes_every_problem_beside_the_output(tmp_path: Path, capsys) -> None:
    root = _write(tmp_path / "src", _coco(["a.png", "b.png", "c.png"]))
    _png(root / "images" / "train" / "a.png")
    line = _fail(root, tmp_path / "out", capsys, "--strict")
    assert line.startswith("atmask ingest: error: --strict: 4 problem(s) found, no dataset was written")
    report = _failed_report(tmp_path / "out")
    assert len(report["problems"]) == 4 and report["counts"]["train"]["images"]["kept"] == 1


# ---------------------------------------------------------------- category ids


def _categories_dataset(root: Path, cats: list[dict[str, Any]], n: int = 3) -> Path:
    names = [f"i{i}.png" for i in range(n)]
    root = _write(root, _coco(names, cats))
    for name in names:
        _png(root / "images" / "train" / name)
    return root


@pytest.mark.parametrize(
    "ids",
    [(0, 1, 2), (0,), (7, 0, 1_000_000), (2**62, 3)],
    ids=["from_0", "only_0", "sparse_unsorted", "huge"],
)
def test_any_non_negative_category_id_is_accepted_and_mapped(ids, tmp_path: Path) -> None:
    cats = [{"id": cid, "name": f"c{cid}", "supercategory": "all"} for cid in ids]
    root = _categories_dataset(tmp_path / "src", cats, n=len(ids))
    result = ingest(str(root), tmp_path / "out", splits=("train",), workers=1)
    assert result.problems == []
    assert [c["id"] for c in result.manifest["categories"]] == sorted(ids)
    assert result.manifest["category_labels"] == {str(cid): i + 1 for i, cid in enumerate(sorted(ids))}
    out = json.loads((tmp_path / "out" / "annotations" / "instances_train.json").read_text())
    assert sorted(a["category_id"] for a in out["annotations"]) == sorted(ids)

    from model.data import CategoryMap  # training's mapping agrees with the manifest's

    mapping = CategoryMap.from_coco(out["categories"])
    assert {str(c): mapping.label(c) for c in ids} == result.manifest["category_labels"]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ([{"id": -1, "name": "x"}], "categories[0].id: expected a non-negative integer, got -1"),
        ([{"id": True, "name": "x"}], "categories[0].id: expected a non-negative integer, got True"),
        ([{"id": 1.0, "name": "x"}], "categories[0].id: expected a non-negative integer, got 1.0"),
        ([{"id": "0", "name": "x"}], "categories[0].id: expected a non-negative integer, got '0'"),
        ([{"id": None, "name": "x"}], "categories[0].id: expected a non-negative integer, got None"),
        ([{"id": 0, "name": "a"}, {"id": 0, "name": "b"}], "categories[1].id: duplicate category id 0"),
    ],
    ids=["negative", "bool", "float", "string", "null", "duplicate_0"],
)
def test_bad_category_ids_are_still_refused(bad, message: str, tmp_path: Path, capsys) -> None:
    root = _categories_dataset(tmp_path / "src", [{"id": 5, "name": "ok"}])
    coco = json.loads((root / "annotations" / "instances_train.json").read_text())
    coco["categories"] = bad
    (root / "annotations" / "instances_train.json").write_text(json.dumps(coco))
    assert message in _fail(root, tmp_path / "out", capsys)
    assert not (tmp_path / "out").exists()


def test_a_category_without_annotations_is_kept_and_reported(tmp_path: Path, capsys) -> None:
    cats = [{"id": 0, "name": "background-ish"}, {"id": 1, "name": "used"}, {"id": 2, "name": "unused"}]
    root = _categories_dataset(tmp_path / "src", cats[:2], n=2)
    coco = json.loads((root / "annotations" / "instances_train.json").read_text())
    coco["categories"] = cats
    (root / "annotations" / "instances_train.json").write_text(json.dumps(coco))
    out = tmp_path / "out"
    assert cli.main(["ingest", "--source", str(root), "--out", str(out), "--splits", "train"]) == 0
    assert "train: no annotation of category id(s) [2]" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert [c["id"] for c in manifest["categories"]] == [0, 1, 2]
    assert manifest["splits"]["train"]["instances_per_category"] == {"0": 1, "1": 1, "2": 0}
    assert manifest["categories_without_annotations"] == {"train": [2]}
    report = json.loads((out / "ingest_report.json").read_text())
    assert report["counts"]["train"]["categories_without_annotations"] == [2] and report["problems"] == []


# ---------------------------------------------------------------- id 0 through training and evaluation


@pytest.mark.slow
def test_category_id_0_trains_and_evaluates(tmp_path: Path, local_tracking: str) -> None:
    """Synthetic data re-labelled 0..2 (as labelling tools export): ingest -> 4 iterations -> evaluate."""
    raw = generate(SyntheticConfig(train_images=8, val_images=4, image_size=64, seed=5), tmp_path / "raw")
    for split in ("train", "val"):
        path = raw / "annotations" / f"instances_{split}.json"
        coco = json.loads(path.read_text())
        shifted = copy.deepcopy(coco)
        for item in (*shifted["categories"], *shifted["annotations"]):
            key = "id" if "name" in item else "category_id"
            item[key] -= 1
        path.write_text(json.dumps(shifted))
    data = tmp_path / "coco"
    assert cli.main(["ingest", "--source", str(raw), "--out", str(data)]) == 0
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["category_labels"] == {"0": 1, "1": 2, "2": 3}

    params = write_params(tmp_path / "params.yaml", iterations=4, checkpoint_every=4)
    raw_params = yaml.safe_load(params.read_text())
    raw_params["model"]["box_score_thresh"] = 0.0  # an almost untrained model still detects every class
    params.write_text(yaml.safe_dump(raw_params))
    run = tmp_path / "run"
    train = ["train", "--config", "atmask", "--params", str(params), "--data", str(data), "--out", str(run)]
    assert cli.main(train) == 0
    evaluate = ["evaluate", "--run", str(run), "--data", str(data), "--params", str(params)]
    assert cli.main(evaluate) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["eval/num_images"] == 4 and metrics["segm/AP"] >= 0.0
    detections = json.loads((run / "detections_val.json").read_text())
    assert {d["category_id"] for d in detections} == {0, 1, 2}  # label 1 <-> id 0, and so on
    model_cats = torch.load(run / "model.pt", weights_only=True)["categories"]
    assert [c["id"] for c in model_cats] == [0, 1, 2]  # label i + 1 <-> category id i
