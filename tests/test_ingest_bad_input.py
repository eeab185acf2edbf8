"""Malformed COCO inputs, one per case, each with its exact outcome: repaired + reported, quarantined +
reported, converted, or a one-line fatal error (exit 1, no traceback, no output folder left behind).

Every case starts from the same small valid dataset built in ``tmp_path`` (two 40x30 images, two categories,
three annotations) and breaks one thing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_util

from components import cli
from components.ingest import ingest

W, H = 40, 30
SQUARE = [5.0, 5.0, 15.0, 5.0, 15.0, 15.0, 5.0, 15.0]
TRIANGLE = [20.0, 10.0, 35.0, 10.0, 30.0, 25.0]


def rle_of(mask: np.ndarray) -> dict[str, Any]:
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def blob_mask() -> np.ndarray:
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[18:26, 22:34] = 1
    return mask


def poly_box_area(poly: list[float]) -> tuple[list[float], float]:
    rle = mask_util.merge(mask_util.frPyObjects([poly], H, W))
    return [float(v) for v in mask_util.toBbox(rle)], float(mask_util.area(rle))


def base_coco() -> dict[str, Any]:
    sq_box, sq_area = poly_box_area(SQUARE)
    tri_box, tri_area = poly_box_area(TRIANGLE)
    blob = blob_mask()
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "segmentation": [SQUARE], "bbox": sq_box, "area": sq_area},
        {
            "id": 2,
            "image_id": 2,
            "category_id": 2,
            "segmentation": [TRIANGLE],
            "bbox": tri_box,
            "area": tri_area,
        },
        {
            "id": 3,
            "image_id": 1,
            "category_id": 1,
            "segmentation": rle_of(blob),
            "bbox": [22.0, 18.0, 12.0, 8.0],
            "area": float(blob.sum()),
        },
    ]
    for ann in anns:
        ann["iscrowd"] = 0
    return {
        "info": {"description": "bad-input test"},
        "images": [
            {"id": 1, "file_name": "a.png", "width": W, "height": H},
            {"id": 2, "file_name": "b.png", "width": W, "height": H},
        ],
        "annotations": anns,
        "categories": [{"id": 1, "name": "thing", "supercategory": "x"}, {"id": 2, "name": "other"}],
    }


def rgb(w: int = W, h: int = H) -> Image.Image:
    arr = (np.arange(h * w * 3, dtype=np.uint32).reshape(h, w, 3) * 7 % 251).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def build(root: Path) -> dict[str, Any]:
    (root / "images" / "train").mkdir(parents=True)
    (root / "annotations").mkdir()
    rgb().save(root / "images" / "train" / "a.png")
    rgb().save(root / "images" / "train" / "b.png")
    return base_coco()


def ann(coco: dict, ann_id: int) -> dict:
    return next(a for a in coco["annotations"] if a["id"] == ann_id)


def img_path(root: Path, name: str = "b.png") -> Path:
    return root / "images" / "train" / name


# ---------------------------------------------------------------- outcomes


@dataclass
class Outcome:
    """Expected problems as (action, field, id, reason fragment); ``check`` inspects the output."""

    problems: list[tuple[str, str, Any, str]] = field(default_factory=list)
    kept_anns: tuple[int, ...] = (1, 2, 3)
    kept_images: tuple[str, ...] = ("a.png", "b.png")
    check: Callable[[dict, Path, dict], None] | None = None


@dataclass
class Fatal:
    message: str
    argv: tuple[str, ...] = ()


Mutation = Callable[[Path, dict], Any]  # returns None (write coco) or bytes (write these instead)


def rep(field_: str, ann_id: Any, reason: str) -> tuple[str, str, Any, str]:
    return ("repaired", field_, ann_id, reason)


def qua(field_: str, item_id: Any, reason: str) -> tuple[str, str, Any, str]:
    return ("quarantined", field_, item_id, reason)


# ---------------------------------------------------------------- annotation repairs


def m_bbox_outside(root, coco):
    ann(coco, 1)["bbox"] = [5.0, 5.0, 60.0, 10.0]


def m_bbox_zero(root, coco):
    ann(coco, 1)["bbox"] = [5.0, 5.0, 0.0, 10.0]


def m_bbox_missing(root, coco):
    del ann(coco, 2)["bbox"]


def m_bbox_strings(root, coco):
    ann(coco, 2)["bbox"] = ["1", "2", "3", "4"]


def m_area_negative(root, coco):
    ann(coco, 1)["area"] = -4


def m_iscrowd_missing(root, coco):
    del ann(coco, 2)["iscrowd"]


def m_iscrowd_bool(root, coco):
    ann(coco, 3)["iscrowd"] = True


def m_polygon_short_ring(root, coco):
    ann(coco, 1)["segmentation"] = [SQUARE, [1.0, 1.0, 2.0, 2.0]]


def m_polygon_all_short(root, coco):
    ann(coco, 2)["segmentation"] = [[20.0, 10.0, 35.0, 10.0]]


def m_polygon_outside(root, coco):
    ann(coco, 1)["segmentation"] = [[5.0, 5.0, 55.0, 5.0, 55.0, 15.0, 5.0, 15.0]]


def m_polygon_flat(root, coco):
    ann(coco, 2)["segmentation"] = list(TRIANGLE)


def m_uncompressed_rle(root, coco):
    flat = blob_mask().flatten(order="F")  # COCO's uncompressed RLE: column-major runs, zeros first
    runs, value, n = [], 0, 0
    for px in flat:
        if px != value:
            runs.append(n)
            value, n = px, 0
        n += 1
    runs.append(n)
    ann(coco, 3)["segmentation"] = {"size": [H, W], "counts": [int(r) for r in runs]}
    ann(coco, 3)["iscrowd"] = 1


def m_image_size_missing(root, coco):
    del coco["images"][1]["width"]


# ---------------------------------------------------------------- quarantines


def m_duplicate_ann_id(root, coco):
    ann(coco, 3)["id"] = 1


def m_duplicate_image_id(root, coco):
    coco["images"][1]["id"] = 1


def m_dangling_image_id(root, coco):
    ann(coco, 2)["image_id"] = 99


def m_dangling_category(root, coco):
    ann(coco, 2)["category_id"] = 7


def m_category_string(root, coco):
    ann(coco, 2)["category_id"] = "2"


def m_ann_id_string(root, coco):
    ann(coco, 2)["id"] = "two"


def m_polygon_nan(root, coco):
    ann(coco, 1)["segmentation"] = [[5.0, 5.0, float("nan"), 5.0, 15.0, 15.0]]


def m_polygon_odd(root, coco):
    ann(coco, 1)["segmentation"] = [[5.0, 5.0, 15.0, 5.0, 15.0, 15.0, 5.0]]


def m_polygon_text(root, coco):
    ann(coco, 1)["segmentation"] = [[5.0, 5.0, "x", 5.0, 15.0, 15.0]]


def m_segmentation_missing(root, coco):
    del ann(coco, 2)["segmentation"]


def m_rle_wrong_size(root, coco):
    ann(coco, 3)["segmentation"]["size"] = [W, H]


def m_rle_bad_counts(root, coco):
    ann(coco, 3)["segmentation"]["counts"] = "not an RLE~~~"


def m_rle_short_counts(root, coco):
    ann(coco, 3)["segmentation"] = rle_of(np.zeros((H, W - 1), dtype=np.uint8)) | {"size": [H, W]}


def m_uncompressed_rle_wrong_sum(root, coco):
    ann(coco, 3)["segmentation"] = {"size": [H, W], "counts": [10, 20, 30]}


def m_iscrowd_two(root, coco):
    ann(coco, 1)["iscrowd"] = 2


def m_unsafe_file_name(root, coco):
    coco["images"][1]["file_name"] = "../b.png"


def m_nan_extra_field(root, coco):
    ann(coco, 1)["score"] = float("nan")


def m_infinity_in_image(root, coco):
    coco["images"][1]["score"] = float("inf")


# ---------------------------------------------------------------- image files


def m_missing_image(root, coco):
    img_path(root).unlink()


def m_truncated_jpeg(root, coco):
    rgb().save(img_path(root, "b.jpg"), quality=95)
    data = img_path(root, "b.jpg").read_bytes()
    img_path(root, "b.jpg").write_bytes(data[: len(data) // 2])
    coco["images"][1]["file_name"] = "b.jpg"


def m_not_an_image(root, coco):
    img_path(root).write_bytes(b"this is not a PNG file at all")


def m_wrong_size_image(root, coco):
    rgb(W + 8, H).save(img_path(root))


def m_grayscale(root, coco):
    rgb().convert("L").save(img_path(root))


def m_grayscale_jpeg(root, coco):
    rgb().convert("L").save(img_path(root, "b.jpg"), quality=95)
    coco["images"][1]["file_name"] = "b.jpg"


def m_cmyk_jpeg(root, coco):
    rgb().convert("CMYK").save(img_path(root, "b.jpg"), quality=95)
    coco["images"][1]["file_name"] = "b.jpg"


def m_16bit(root, coco):
    arr = np.full((H, W), 40000, dtype=np.uint16)
    Image.fromarray(arr).save(img_path(root))


def smooth() -> Image.Image:
    """Gradients (survive JPEG nearly unchanged): red grows to the right, green downwards."""
    y, x = np.mgrid[0:H, 0:W]
    arr = np.stack([x * 255 // (W - 1), y * 255 // (H - 1), np.full_like(x, 128)], axis=-1)
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def exif_rotated(root: Path) -> None:
    """Stored as 30x40 (w x h) with EXIF orientation 6: displayed (rotated) it is 40x30."""
    stored = smooth().transpose(Image.Transpose.ROTATE_90)  # 30 wide, 40 high
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(img_path(root, "b.jpg"), quality=95, exif=exif)


def m_exif_rotated(root, coco):
    exif_rotated(root)
    coco["images"][1]["file_name"] = "b.jpg"


def m_exif_rotated_annotated_raw(root, coco):
    exif_rotated(root)
    coco["images"][1].update(file_name="b.jpg", width=H, height=W)
    poly = [2.0, 2.0, 20.0, 2.0, 10.0, 20.0]
    rle = mask_util.merge(mask_util.frPyObjects([poly], W, H))  # stored frame: 30 wide, 40 high
    ann(coco, 2).update(segmentation=[poly], bbox=[float(v) for v in mask_util.toBbox(rle)])


# ---------------------------------------------------------------- checks on the output


def box_is(ann_id: int, box: list[float], area: float | None = None):
    def check(out: dict, root: Path, result: dict) -> None:
        a = out[ann_id]
        assert a["bbox"] == box
        if area is not None:
            assert a["area"] == area

    return check


def field_is(ann_id: int, key: str, value: Any):
    def check(out: dict, root: Path, result: dict) -> None:
        assert out[ann_id][key] == value

    return check


def converted(name: str, source: str, expect: Callable[[np.ndarray], None] | None = None, size=(W, H)):
    def check(out: dict, root: Path, result: dict) -> None:
        conv = result["conversions"]
        assert len(conv) == 1 and conv[0]["to"] == name and conv[0]["id"] == 2
        assert conv[0]["from"].startswith(source), conv[0]["from"]
        with Image.open(root / "images" / "train" / name) as im:
            assert (im.format, im.mode, im.size) == ("PNG", "RGB", size)
            if expect:
                expect(np.asarray(im))

    return check


def gray_pixels(arr: np.ndarray) -> None:
    expected = np.asarray(rgb().convert("L"))
    assert np.array_equal(arr[..., 0], expected) and np.array_equal(arr[..., 2], expected)


def sixteen_bit_pixels(arr: np.ndarray) -> None:
    assert np.all(arr == round(40000 * 255 / 65535))


def rotated_pixels(arr: np.ndarray) -> None:
    # the JPEG was rotated before saving: applying the EXIF rotation gives the original back (JPEG loss aside)
    assert np.abs(arr.astype(int) - np.asarray(smooth()).astype(int)).max() < 12


def uncompressed_converted(out: dict, root: Path, result: dict) -> None:
    seg = out[3]["segmentation"]
    assert isinstance(seg["counts"], str) and seg["size"] == [H, W]
    assert np.array_equal(mask_util.decode({"size": [H, W], "counts": seg["counts"].encode()}), blob_mask())
    assert out[3]["iscrowd"] == 1


SQ_BOX, SQ_AREA = poly_box_area(SQUARE)
TRI_BOX, TRI_AREA = poly_box_area(TRIANGLE)
CLIPPED_BOX, CLIPPED_AREA = poly_box_area([5.0, 5.0, 40.0, 5.0, 40.0, 15.0, 5.0, 15.0])
TXT_BOX = "image 2 was quarantined"

CASES: dict[str, tuple[Mutation, Outcome | Fatal]] = {
    # repaired + reported
    "bbox_outside_image": (
        m_bbox_outside,
        Outcome([rep("bbox", 1, "is not inside the 40x30 image")], check=box_is(1, SQ_BOX)),
    ),
    "bbox_zero_size": (
        m_bbox_zero,
        Outcome([rep("bbox", 1, "non-positive size")], check=box_is(1, SQ_BOX)),
    ),
    "bbox_missing": (m_bbox_missing, Outcome([rep("bbox", 2, "bbox missing")], check=box_is(2, TRI_BOX))),
    "bbox_wrong_type": (
        m_bbox_strings,
        Outcome([rep("bbox", 2, "must be 4 finite numbers")], check=box_is(2, TRI_BOX)),
    ),
    "area_negative": (
        m_area_negative,
        Outcome([rep("area", 1, "not a positive number")], check=box_is(1, SQ_BOX, SQ_AREA)),
    ),
    "iscrowd_missing": (
        m_iscrowd_missing,
        Outcome([rep("iscrowd", 2, "iscrowd missing; set to 0")], check=field_is(2, "iscrowd", 0)),
    ),
    "iscrowd_bool": (
        m_iscrowd_bool,
        Outcome([rep("iscrowd", 3, "iscrowd True; set to 1")], check=field_is(3, "iscrowd", 1)),
    ),
    "polygon_fewer_than_3_points": (
        m_polygon_short_ring,
        Outcome(
            [rep("segmentation", 1, "dropped a polygon with 2 point(s)")],
            check=field_is(1, "segmentation", [SQUARE]),
        ),
    ),
    "polygon_all_rings_short": (
        m_polygon_all_short,
        Outcome(
            [
                rep("segmentation", 2, "dropped a polygon with 2 point(s)"),
                rep("segmentation", 2, "no usable polygon left: empty annotation dropped"),
            ],
            kept_anns=(1, 3),
        ),
    ),
    "polygon_outside_image": (
        m_polygon_outside,
        Outcome(
            [rep("segmentation", 1, "outside the 40x30 image clipped")],
            check=box_is(1, CLIPPED_BOX, CLIPPED_AREA),
        ),
    ),
    "polygon_not_nested": (
        m_polygon_flat,
        Outcome(
            [rep("segmentation", 2, "not nested in a list")], check=field_is(2, "segmentation", [TRIANGLE])
        ),
    ),
    "image_size_missing": (
        m_image_size_missing,
        Outcome([rep("width/height", 2, "size missing in the annotation file; set to (40, 30)")]),
    ),
    "exif_orientation_disagrees_with_annotations": (
        m_exif_rotated_annotated_raw,
        Outcome(
            [rep("orientation", 2, "EXIF orientation 6 ignored")],
            kept_images=("a.png", "b.png"),  # re-encoded without the EXIF tag, so no reader rotates it
            check=converted("b.png", "JPEG RGB", size=(H, W)),
        ),
    ),
    # converted (not a problem: recorded under "conversions")
    "uncompressed_rle_crowd": (m_uncompressed_rle, Outcome(check=uncompressed_converted)),
    "grayscale_png": (m_grayscale, Outcome(check=converted("b.png", "PNG L", gray_pixels))),
    "grayscale_jpeg": (
        m_grayscale_jpeg,
        Outcome(kept_images=("a.png", "b.png"), check=converted("b.png", "JPEG L")),
    ),
    "cmyk_jpeg": (
        m_cmyk_jpeg,
        Outcome(kept_images=("a.png", "b.png"), check=converted("b.png", "JPEG CMYK")),
    ),
    "16bit_png": (m_16bit, Outcome(check=converted("b.png", "PNG I;16", sixteen_bit_pixels))),
    "exif_rotated": (
        m_exif_rotated,
        Outcome(
            kept_images=("a.png", "b.png"),
            check=converted("b.png", "JPEG RGB, EXIF orientation 6", rotated_pixels),
        ),
    ),
    # quarantined + reported
    "duplicate_annotation_id": (
        m_duplicate_ann_id,
        Outcome([qua("id", 1, "duplicate annotation id 1")], kept_anns=(1, 2)),
    ),
    "duplicate_image_id": (
        m_duplicate_image_id,
        Outcome(
            [qua("id", 1, "duplicate image id 1"), qua("image_id", 2, "image_id 2 does not match any image")],
            kept_anns=(1, 3),
            kept_images=("a.png",),
        ),
    ),
    "dangling_image_id": (
        m_dangling_image_id,
        Outcome([qua("image_id", 2, "image_id 99 does not match any image")], kept_anns=(1, 3)),
    ),
    "dangling_category_id": (
        m_dangling_category,
        Outcome([qua("category_id", 2, "category_id 7 does not match any category")], kept_anns=(1, 3)),
    ),
    "category_id_wrong_type": (
        m_category_string,
        Outcome([qua("category_id", 2, "must be an integer, got '2'")], kept_anns=(1, 3)),
    ),
    "annotation_id_wrong_type": (
        m_ann_id_string,
        Outcome([qua("id", "'annotations[1]'", "annotation id must be an integer")], kept_anns=(1, 3)),
    ),
    "polygon_nan": (
        m_polygon_nan,
        Outcome([qua("segmentation", 1, "non-finite coordinate")], kept_anns=(2, 3)),
    ),
    "polygon_odd_coordinates": (
        m_polygon_odd,
        Outcome([qua("segmentation", 1, "odd number (7) of coordinates")], kept_anns=(2, 3)),
    ),
    "polygon_not_numbers": (
        m_polygon_text,
        Outcome([qua("segmentation", 1, "not a number")], kept_anns=(2, 3)),
    ),
    "segmentation_missing": (
        m_segmentation_missing,
        Outcome([qua("segmentation", 2, "segmentation is missing")], kept_anns=(1, 3)),
    ),
    "rle_wrong_size": (
        m_rle_wrong_size,
        Outcome([qua("segmentation.size", 3, "does not match image [h, w] [30, 40]")], kept_anns=(1, 2)),
    ),
    "rle_compressed_garbage": (
        m_rle_bad_counts,
        Outcome([qua("segmentation.counts", 3, "compressed RLE does not decode")], kept_anns=(1, 2)),
    ),
    "rle_compressed_wrong_pixel_count": (
        m_rle_short_counts,
        Outcome([qua("segmentation.counts", 3, "compressed RLE does not decode to h*w")], kept_anns=(1, 2)),
    ),
    "rle_uncompressed_wrong_sum": (
        m_uncompressed_rle_wrong_sum,
        Outcome([qua("segmentation.counts", 3, "summing to h*w")], kept_anns=(1, 2)),
    ),
    "iscrowd_not_0_or_1": (
        m_iscrowd_two,
        Outcome([qua("iscrowd", 1, "iscrowd must be 0 or 1, got 2")], kept_anns=(2, 3)),
    ),
    "unsafe_file_name": (
        m_unsafe_file_name,
        Outcome(
            [
                qua("file_name", 2, "unsafe file_name '../b.png'"),
                qua("image_id", 2, "does not match any image"),
            ],
            kept_anns=(1, 3),
            kept_images=("a.png",),
        ),
    ),
    "nan_in_unchecked_annotation_field": (
        m_nan_extra_field,
        Outcome([qua("annotations", 1, "NaN or Infinity, which JSON does not allow")], kept_anns=(2, 3)),
    ),
    "infinity_in_image_entry": (
        m_infinity_in_image,
        Outcome(
            [
                qua("score", 2, "score is inf, which JSON does not allow"),
                qua("image_id", 2, "does not match"),
            ],
            kept_anns=(1, 3),
            kept_images=("a.png",),
        ),
    ),
    "missing_image_file": (
        m_missing_image,
        Outcome(
            [qua("file_name", 2, "image file not found"), qua("image_id", 2, TXT_BOX)],
            kept_anns=(1, 3),
            kept_images=("a.png",),
        ),
    ),
    "truncated_image": (
        m_truncated_jpeg,
        Outcome(
            [qua("file_name", 2, "truncated"), qua("image_id", 2, TXT_BOX)],
            kept_anns=(1, 3),
            kept_images=("a.png",),
        ),
    ),
    "unreadable_image": (
        m_not_an_image,
        Outcome(
            [qua("file_name", 2, "unreadable image"), qua("image_id", 2, TXT_BOX)],
            kept_anns=(1, 3),
            kept_images=("a.png",),
        ),
    ),
    "wrong_size_image": (
        m_wrong_size_image,
        Outcome(
            [
                qua("width/height", 2, "image is 48x30 but the annotation file says 40x30"),
                qua("image_id", 2, TXT_BOX),
            ],
            kept_anns=(1, 3),
            kept_images=("a.png",),
        ),
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_malformed_input_is_repaired_or_quarantined(name, tmp_path):
    mutate, expected = CASES[name]
    assert isinstance(expected, Outcome)
    root = tmp_path / "src"
    coco = build(root)
    mutate(root, coco)
    (root / "annotations" / "instances_train.json").write_text(json.dumps(coco))

    result = ingest(str(root), tmp_path / "out", splits=("train",), workers=1)

    got = [(p["action"], p["field"], p["id"], p["reason"]) for p in result.problems]
    assert len(got) == len(expected.problems), got
    for (action, field_, item, reason), want in zip(got, expected.problems, strict=True):
        assert (action, field_, item) == want[:3], got
        assert want[3] in reason, (reason, want[3])
    assert all(p["split"] == "train" and p["file"] for p in result.problems)
    out_dir = tmp_path / "out"
    out = json.loads((out_dir / "annotations" / "instances_train.json").read_text())
    by_id = {a["id"]: a for a in out["annotations"]}
    assert tuple(sorted(by_id)) == expected.kept_anns
    assert tuple(sorted(i["file_name"] for i in out["images"])) == expected.kept_images
    assert sorted(p.name for p in (out_dir / "images" / "train").iterdir()) == list(expected.kept_images)
    assert all(i["width"] > 0 and i["height"] > 0 for i in out["images"])
    report = json.loads((out_dir / "ingest_report.json").read_text())
    assert report["problems"] == result.problems
    summary = {a: sum(1 for p in expected.problems if p[0] == a) for a in ("repaired", "quarantined")}
    assert report["summary"] == {k: v for k, v in summary.items() if v}
    assert result.manifest["splits"]["train"]["annotations"] == len(expected.kept_anns)
    if expected.check:
        expected.check(by_id, out_dir, report)
    else:
        assert report["conversions"] == []


# ---------------------------------------------------------------- fatal errors


def raw(text: str | bytes) -> Mutation:
    return lambda root, coco: text.encode() if isinstance(text, str) else text


def drop_key(key: str) -> Mutation:
    return lambda root, coco: coco.pop(key) and None


def set_key(key: str, value: Any) -> Mutation:
    return lambda root, coco: coco.update({key: value})


def m_all_images_missing(root, coco):
    for p in (root / "images" / "train").iterdir():
        p.unlink()


def m_no_annotation_file(root, coco):
    return b"__skip__"


def m_no_image_folder(root, coco):
    m_all_images_missing(root, coco)
    (root / "images" / "train").rmdir()
    (root / "images").rmdir()


def m_category_duplicate(root, coco):
    coco["categories"][1]["id"] = 1


def m_category_bad_id(root, coco):
    coco["categories"][0]["id"] = "1"


FATAL: dict[str, tuple[Mutation, Fatal]] = {
    "truncated_json": (raw('{"images": [{"id": 1, "file_na'), Fatal("invalid JSON at line 1 column")),
    "json_syntax_error": (
        raw('{"annotations": [1 2]}'),
        Fatal("expected ',' or ']' in an array"),
    ),
    "empty_file": (raw(""), Fatal("top level must be a JSON object")),
    "top_level_list": (
        raw("[]"),
        Fatal("top level must be a JSON object with images/annotations/categories"),
    ),
    "not_utf8": (raw(b'{"info": "\xff\xfe"}'), Fatal("not UTF-8 text")),
    "images_missing": (drop_key("images"), Fatal("field 'images' is missing")),
    "annotations_missing": (drop_key("annotations"), Fatal("field 'annotations' is missing")),
    "categories_missing": (drop_key("categories"), Fatal("field 'categories' must be a non-empty list")),
    "images_not_a_list": (
        set_key("images", {"1": "a.png"}),
        Fatal("field 'images' must be a list, got dict"),
    ),
    "annotations_not_a_list": (set_key("annotations", {}), Fatal("field 'annotations' must be a list")),
    "no_images_listed": (set_key("images", []), Fatal("no usable images in split 'train' (0 listed")),
    "all_image_files_missing": (m_all_images_missing, Fatal("no usable images in split 'train' (2 listed")),
    "nan_in_info": (
        lambda root, coco: coco["info"].update(year=float("nan")),
        Fatal("'info', 'licenses' or an image entry holds NaN or Infinity"),
    ),
    "duplicate_category_id": (m_category_duplicate, Fatal("categories[1].id: duplicate category id 1")),
    "category_id_not_int": (m_category_bad_id, Fatal("categories[0].id: expected a non-negative integer")),
    "no_annotation_file": (m_no_annotation_file, Fatal("no annotation file for split 'train'")),
    "no_image_folder": (m_no_image_folder, Fatal("no image folder for split 'train'")),
    "strict_turns_repair_into_failure": (
        m_bbox_outside,
        Fatal("--strict: 1 problem(s) found, no dataset was written", ("--strict",)),
    ),
    "strict_turns_quarantine_into_failure": (
        m_dangling_image_id,
        Fatal("image_id 99 does not match any image", ("--strict",)),
    ),
}


@pytest.mark.parametrize("name", list(FATAL))
def test_fatal_input_fails_with_one_line_and_no_output(name, tmp_path, capsys):
    mutate, expected = FATAL[name]
    root = tmp_path / "src"
    coco = build(root)
    text = mutate(root, coco)
    if text != b"__skip__":
        data = json.dumps(coco).encode() if text is None else text
        (root / "annotations" / "instances_train.json").write_bytes(data)
    out = tmp_path / "out"

    rc = cli.main(["ingest", "--source", str(root), "--out", str(out), "--splits", "train", *expected.argv])
    captured = capsys.readouterr()

    assert rc == 1
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("atmask ingest: error: ")
    assert expected.message in lines[0], lines[0]
    assert "Traceback" not in captured.err + captured.out
    report = tmp_path / "out.ingest_report.failed.json"
    # no output, staging or temp folder; the failure report beside it when there was evidence to keep
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["src", *[report.name][: report.exists()]])
    assert report.exists() == lines[0].endswith(f"; every problem is listed in {report}")
    if report.exists():
        failed = json.loads(report.read_text())
        assert failed["dataset_written"] is False and failed["error"] in lines[0]


def test_fatal_error_keeps_a_previous_good_output(tmp_path, capsys):
    root = tmp_path / "src"
    coco = build(root)
    ann_file = root / "annotations" / "instances_train.json"
    ann_file.write_text(json.dumps(coco))
    out = tmp_path / "out"
    ingest(str(root), out, splits=("train",), workers=1)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    ann_file.write_text('{"images": [')
    rc = cli.main(["ingest", "--source", str(root), "--out", str(out), "--splits", "train"])
    assert rc == 1 and "invalid JSON" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--source", "/nonexistent/dataset"], "--source /nonexistent/dataset: no such folder"),
        (["--source", "ftp://host/x"], "--source ftp://host/x: unsupported scheme"),
        (
            ["--source", "synthetic", "--synthetic-image-size", "8"],
            "data.synthetic.image_size: 8 is out of range",
        ),
        (["--source", "synthetic", "--workers", "0"], "--workers: must be >= 1, got 0"),
        (["--source", "synthetic", "--splits", " , "], "--splits: give at least one split"),
    ],
)
def test_bad_options_fail_with_one_line(argv, message, tmp_path, capsys):
    rc = cli.main(["ingest", "--out", str(tmp_path / "out"), *argv])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and message in err, err
    assert list(tmp_path.iterdir()) == []


def test_strict_passes_on_clean_data(tmp_path):
    root = tmp_path / "src"
    coco = build(root)
    (root / "annotations" / "instances_train.json").write_text(json.dumps(coco))
    result = ingest(str(root), tmp_path / "out", splits=("train",), strict=True, workers=1)
    assert result.problems == [] and result.manifest["splits"]["train"]["annotations"] == 3


def test_header_image_check_reads_sizes_but_not_pixels(tmp_path):
    root = tmp_path / "src"
    coco = build(root)
    m_truncated_jpeg(root, coco)  # b.jpg: header intact, pixel data cut in half
    rgb(W + 8, H).save(img_path(root, "a.png"))  # a.png: wrong size, visible in the header
    (root / "annotations" / "instances_train.json").write_text(json.dumps(coco))
    result = ingest(str(root), tmp_path / "out", splits=("train",), image_check="header", workers=1)
    got = [(p["action"], p["field"], p["id"]) for p in result.problems]
    assert got == [
        ("quarantined", "width/height", 1),
        ("quarantined", "image_id", 1),
        ("quarantined", "image_id", 3),
    ]
    out = json.loads((tmp_path / "out" / "annotations" / "instances_train.json").read_text())
    assert [i["file_name"] for i in out["images"]] == [
        "b.jpg"
    ]  # truncation is only found by --image-check full
    assert (tmp_path / "out" / "images" / "train" / "b.jpg").read_bytes() == img_path(
        root, "b.jpg"
    ).read_bytes()


WEIRD_VALUES = [None, "x", "", [], {}, [1], True, False, -1, 0, 2**70, 1e308, -0.5, 3.7, {"a": 1}, [[1, 2]],
                [None], ["1"], {"size": [1, 2], "counts": "x"}, {"size": "ab", "counts": [1]}, {"counts": 5},
                [[1, 2, 3, 4, 5, 6]], [[1e9, 1, 2, 3, 4, 5]], float("nan")]  # fmt: skip


def fuzzed(base: dict, rng) -> dict:
    """``base`` with 1-3 fields (of annotations, images, categories or the top level) set to odd values."""
    import copy

    coco = copy.deepcopy(base)
    for _ in range(rng.randint(1, 3)):
        key = rng.choice(["annotations", "images", "categories", None])
        if key is None:
            coco[rng.choice(list(coco))] = rng.choice(WEIRD_VALUES)
        elif isinstance(coco.get(key), list) and coco[key] and all(isinstance(x, dict) for x in coco[key]):
            item = rng.choice(coco[key])
            item[rng.choice([*item, "extra"])] = rng.choice(WEIRD_VALUES)
    return coco


def test_fuzzed_inputs_end_in_valid_output_or_a_user_error(tmp_path):
    import random

    from pycocotools.coco import COCO

    from components.errors import UserError

    root = tmp_path / "src"
    base = build(root)
    rng = random.Random(1234)
    outcomes = {"ok": 0, "error": 0}
    for i in range(150):
        (root / "annotations" / "instances_train.json").write_text(json.dumps(fuzzed(base, rng)))
        out = tmp_path / f"out{i}"
        try:
            ingest(str(root), out, splits=("train",), workers=1)
        except UserError:
            outcomes["error"] += 1
            assert not out.exists()
            continue
        outcomes["ok"] += 1
        coco = COCO(str(out / "annotations" / "instances_train.json"))
        for a in coco.anns.values():  # everything kept is decodable and consistent with its image
            info = coco.imgs[a["image_id"]]
            assert coco.annToMask(a).shape == (info["height"], info["width"]) and a["area"] > 0
            assert a["category_id"] in coco.cats and a["iscrowd"] in (0, 1)
    assert outcomes["ok"] > 50 and outcomes["error"] > 10, outcomes
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("out")) == ["src"]
