"""Validation and repair of COCO instance annotations, one record at a time.

Every problem found is either repaired (the record is fixed, or an empty annotation is dropped) or the
record is quarantined (left out of the output); both are recorded as a :class:`Problem`. Problems that make
the whole file unusable raise :class:`~components.errors.UserError`.

The per-annotation checks are written for COCO-sized files: the common, valid case runs a handful of
comparisons in pure Python; pycocotools is called only to recompute a box or an area that needed repair.
"""

from __future__ import annotations

import math
from array import array
from dataclasses import asdict, dataclass
from typing import Any

from pycocotools import mask as mask_util

from components.errors import UserError

REPAIRED = "repaired"
QUARANTINED = "quarantined"
EPS = 1e-3  # float slack for "inside the image"


@dataclass(frozen=True)
class Problem:
    split: str
    file: str
    id: int | str | None
    field: str
    reason: str
    action: str  # "repaired" | "quarantined"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Reporter:
    """Collects problems of one split/file."""

    def __init__(self, split: str, file: str):
        self.split = split
        self.file = file
        self.problems: list[Problem] = []

    def repaired(self, item_id: Any, field: str, reason: str, file: str | None = None) -> None:
        self.problems.append(
            Problem(self.split, file or self.file, _jsonable_id(item_id), field, reason, REPAIRED)
        )

    def quarantined(self, item_id: Any, field: str, reason: str, file: str | None = None) -> None:
        self.problems.append(
            Problem(self.split, file or self.file, _jsonable_id(item_id), field, reason, QUARANTINED)
        )


def _jsonable_id(value: Any) -> int | str | None:
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    return repr(value)[:80]


def _is_int(value: Any) -> bool:
    return type(value) is int


def _is_id(value: Any) -> bool:
    """An integer that fits the int64 index (ids beyond it are malformed, not just large)."""
    return type(value) is int and -(2**63) <= value < 2**63


def _is_number(value: Any) -> bool:
    return (type(value) is float or type(value) is int) and math.isfinite(value)


# ---------------------------------------------------------------- categories


def check_categories(raw: Any, file: str) -> list[dict[str, Any]]:
    """Categories sorted by id, each with id/name/supercategory. Bad categories are fatal.

    Any non-negative integer id is accepted (training maps them to labels 1..C in ascending order)."""
    if not isinstance(raw, list) or not raw:
        raise UserError(f"{file}: field 'categories' must be a non-empty list of {{id, name}} objects")
    out: dict[int, dict[str, Any]] = {}
    for i, cat in enumerate(raw):
        where = f"{file}: categories[{i}]"
        if not isinstance(cat, dict):
            raise UserError(f"{where}: expected an object with id and name, got {type(cat).__name__}")
        cid, name = cat.get("id"), cat.get("name")
        if not _is_id(cid) or cid < 0:  # 0 is a valid COCO id (labelling tools export it)
            raise UserError(f"{where}.id: expected a non-negative integer, got {cid!r}")
        if not isinstance(name, str) or not name:
            raise UserError(f"{where}.name: expected a non-empty string, got {name!r}")
        if cid in out:
            raise UserError(f"{where}.id: duplicate category id {cid}; category ids must be unique")
        sup = cat.get("supercategory")
        out[cid] = {"id": cid, "name": name, "supercategory": sup if isinstance(sup, str) else ""}
    return [out[k] for k in sorted(out)]


def merge_categories(per_split: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One category list for all splits; the same id with different names is fatal."""
    merged: dict[int, dict[str, Any]] = {}
    origin: dict[int, str] = {}
    for split, cats in per_split.items():
        for cat in cats:
            seen = merged.get(cat["id"])
            if seen is not None and seen["name"] != cat["name"]:
                raise UserError(
                    f"categories: id {cat['id']} is {seen['name']!r} in split {origin[cat['id']]!r} but "
                    f"{cat['name']!r} in split {split!r}; all splits must use the same category ids"
                )
            merged.setdefault(cat["id"], cat)
            origin.setdefault(cat["id"], split)
    return [merged[k] for k in sorted(merged)]


# ---------------------------------------------------------------- image entries


def check_image_entries(raw: Any, reporter: Reporter) -> list[dict[str, Any]]:
    """Structural checks of the ``images`` list: ids, file names, declared sizes."""
    if not isinstance(raw, list):
        raise UserError(f"{reporter.file}: field 'images' must be a list, got {type(raw).__name__}")
    images: list[dict[str, Any]] = []
    ids: set[int] = set()
    names: set[str] = set()
    for i, img in enumerate(raw):
        entry = _check_image_entry(img, i, reporter, ids, names)
        if entry is not None:
            images.append(entry)
    return images


def _check_image_entry(img: Any, index: int, rep: Reporter, ids: set[int], names: set[str]) -> dict | None:
    if not isinstance(img, dict):
        rep.quarantined(f"images[{index}]", "images", f"expected an object, got {type(img).__name__}")
        return None
    iid, name = img.get("id"), img.get("file_name")
    if not _is_id(iid):
        rep.quarantined(iid, "id", f"images[{index}]: image id must be an integer, got {iid!r}")
        return None
    if iid in ids:
        rep.quarantined(iid, "id", f"duplicate image id {iid}; keeping the first entry")
        return None
    if not isinstance(name, str) or not name.strip():
        rep.quarantined(iid, "file_name", f"file_name must be a non-empty string, got {name!r}")
        return None
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
        rep.quarantined(
            iid,
            "file_name",
            f"unsafe file_name {name!r}: must be relative to the split's image folder, without '..'",
        )
        return None
    if name in names:
        rep.quarantined(iid, "file_name", f"file_name {name!r} is used by another image")
        return None
    bad = next((k for k, v in img.items() if type(v) is float and not math.isfinite(v)), None)
    if bad is not None:
        rep.quarantined(iid, bad, f"{bad} is {img[bad]}, which JSON does not allow")
        return None
    ids.add(iid)
    names.add(name)
    entry = dict(img)
    for key in ("width", "height"):
        value = img.get(key)
        if not (_is_int(value) and value > 0):
            entry[key] = None  # taken from the image file (reported there)
    return entry


# ---------------------------------------------------------------- RLE helpers


def rle_string_counts(counts: str) -> list[int] | None:
    """Decode a compressed COCO RLE string (pycocotools' rleFrString) or return None if malformed."""
    out: list[int] = []
    p, n = 0, len(counts)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            if p >= n:
                return None
            c = ord(counts[p]) - 48
            if not 0 <= c < 64:
                return None
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(out) > 2:
            x += out[-2]
        if x < 0:
            return None
        out.append(x)
    return out


def _to_rle(seg: Any, h: int, w: int) -> dict[str, Any]:
    if isinstance(seg, list):
        return mask_util.merge(mask_util.frPyObjects(seg, h, w))
    return {"size": seg["size"], "counts": seg["counts"].encode("ascii")}


# ---------------------------------------------------------------- annotations


class AnnotationChecker:
    """Checks annotations of one split against its (already checked) images.

    ``sizes`` maps image id -> (width, height) of usable images; ``dropped_images`` holds ids of images
    that were quarantined (their annotations are quarantined with a pointer to the image).
    """

    def __init__(self, sizes: dict[int, tuple[int, int]], dropped_images: set[int], reporter: Reporter):
        self.sizes = sizes
        self.dropped_images = dropped_images
        self.rep = reporter
        self.seen_ids: set[int] = set()
        # compact index of kept annotations
        self.ann_ids = array("q")
        self.image_ids = array("q")
        self.category_ids = array("q")
        self.crowd = array("b")

    def check(self, ann: Any, index: int) -> dict[str, Any] | None:
        """Return the (possibly repaired) annotation, or None if it was dropped or quarantined."""
        if type(ann) is not dict:
            self.rep.quarantined(f"annotations[{index}]", "annotations", "expected an object")
            return None
        aid = ann.get("id")
        if not _is_id(aid):
            self.rep.quarantined(
                f"annotations[{index}]", "id", f"annotation id must be an integer, got {aid!r}"
            )
            return None
        if aid in self.seen_ids:
            self.rep.quarantined(aid, "id", f"duplicate annotation id {aid}; keeping the first one")
            return None
        self.seen_ids.add(aid)
        size = self._image_size(ann, aid)
        if size is None or not self._category_ok(ann, aid):
            return None
        ann = self._check_iscrowd(ann, aid)
        if ann is None:
            return None
        ann = self._check_segmentation(ann, aid, size)
        if ann is None:
            return None
        ann = self._check_bbox_area(ann, aid, size)
        if ann is not None:
            self.ann_ids.append(aid)
            self.image_ids.append(ann["image_id"])
            self.category_ids.append(ann["category_id"])
            self.crowd.append(ann["iscrowd"])
        return ann

    def _image_size(self, ann: dict, aid: int) -> tuple[int, int] | None:
        iid = ann.get("image_id")
        size = self.sizes.get(iid) if _is_int(iid) else None
        if size is None:
            if _is_int(iid) and iid in self.dropped_images:
                self.rep.quarantined(aid, "image_id", f"image {iid} was quarantined")
            else:
                self.rep.quarantined(aid, "image_id", f"image_id {iid!r} does not match any image")
        return size

    def _category_ok(self, ann: dict, aid: int) -> bool:
        cid = ann.get("category_id")
        if not _is_id(cid):
            self.rep.quarantined(aid, "category_id", f"category_id must be an integer, got {cid!r}")
            return False
        return True  # existence is checked once all categories are known (see dangling_categories)

    def _check_iscrowd(self, ann: dict, aid: int) -> dict | None:
        crowd = ann.get("iscrowd")
        if type(crowd) is int and (crowd == 0 or crowd == 1):
            return ann
        if crowd is None or isinstance(crowd, bool):
            fixed = 0 if crowd is None else int(crowd)
            self.rep.repaired(
                aid, "iscrowd", f"iscrowd {'missing' if crowd is None else repr(crowd)}; set to {fixed}"
            )
            return {**ann, "iscrowd": fixed}
        self.rep.quarantined(aid, "iscrowd", f"iscrowd must be 0 or 1, got {crowd!r}")
        return None

    def reject_last(self, field: str, reason: str) -> None:
        """Quarantine the annotation that :meth:`check` kept last (it failed a later check)."""
        self.rep.quarantined(self.ann_ids.pop(), field, reason)
        self.image_ids.pop()
        self.category_ids.pop()
        self.crowd.pop()

    # ------------------------------------------------------------ segmentation

    def _check_segmentation(self, ann: dict, aid: int, size: tuple[int, int]) -> dict | None:
        seg = ann.get("segmentation")
        if type(seg) is list:
            return self._check_polygons(ann, aid, seg, size)
        if type(seg) is dict:
            return self._check_rle(ann, aid, seg, size)
        if seg is None:
            self.rep.quarantined(aid, "segmentation", "segmentation is missing; instance masks are required")
        else:
            self.rep.quarantined(aid, "segmentation", f"expected polygons or RLE, got {type(seg).__name__}")
        return None

    def _check_polygons(self, ann: dict, aid: int, seg: list, size: tuple[int, int]) -> dict | None:
        w, h = size
        repaired = False
        if seg and type(seg[0]) in (int, float):
            self.rep.repaired(aid, "segmentation", "polygon was not nested in a list; wrapped")
            seg, repaired = [seg], True
        kept = []
        for ring in seg:
            status = self._ring_status(ring, w, h)
            if status == "ok":
                kept.append(ring)
            elif status == "short":
                self.rep.repaired(
                    aid, "segmentation", f"dropped a polygon with {len(ring) // 2} point(s); >= 3 needed"
                )
                repaired = True
            elif status == "outside":
                kept.append([min(max(v, 0.0), w if i % 2 == 0 else h) for i, v in enumerate(ring)])
                self.rep.repaired(aid, "segmentation", f"polygon points outside the {w}x{h} image clipped")
                repaired = True
            else:
                self.rep.quarantined(aid, "segmentation", status)
                return None
        if not kept:
            self.rep.repaired(aid, "segmentation", "no usable polygon left: empty annotation dropped")
            return None
        if repaired:
            ann = {**ann, "segmentation": kept, "_recompute": True}
        return ann

    @staticmethod
    def _ring_status(ring: Any, w: int, h: int) -> str:
        if type(ring) is not list:
            return f"polygon must be a list of numbers, got {type(ring).__name__}"
        n = len(ring)
        if n < 6 or n % 2:
            return "short" if n < 6 else f"polygon has an odd number ({n}) of coordinates"
        try:
            total = sum(ring)
        except TypeError:
            return "polygon contains a value that is not a number"
        if not math.isfinite(total):
            return "polygon contains a non-finite coordinate (NaN or infinity)"
        xs, ys = ring[0::2], ring[1::2]
        if min(xs) < -EPS or min(ys) < -EPS or max(xs) > w + EPS or max(ys) > h + EPS:
            return "outside"
        return "ok"

    def _check_rle(self, ann: dict, aid: int, seg: dict, size: tuple[int, int]) -> dict | None:
        w, h = size
        rle_size, counts = seg.get("size"), seg.get("counts")
        if rle_size != [h, w]:
            self.rep.quarantined(
                aid, "segmentation.size", f"RLE size {rle_size!r} does not match image [h, w] {[h, w]}"
            )
            return None
        if isinstance(counts, str):
            runs = rle_string_counts(counts)
            if runs is None or sum(runs) != h * w:
                self.rep.quarantined(
                    aid, "segmentation.counts", "compressed RLE does not decode to h*w pixels"
                )
                return None
            return ann
        if isinstance(counts, list) and all(_is_int(c) and c >= 0 for c in counts) and sum(counts) == h * w:
            rle = mask_util.frPyObjects({"size": [h, w], "counts": counts}, h, w)
            return {**ann, "segmentation": {"size": [h, w], "counts": rle["counts"].decode("ascii")}}
        self.rep.quarantined(
            aid, "segmentation.counts", "uncompressed RLE counts must be ints >= 0 summing to h*w"
        )
        return None

    # ------------------------------------------------------------ bbox and area

    def _check_bbox_area(self, ann: dict, aid: int, size: tuple[int, int]) -> dict | None:
        w, h = size
        recompute = ann.pop("_recompute", False)
        bbox, area = ann.get("bbox"), ann.get("area")
        bbox_ok = self._bbox_ok(bbox, w, h)
        area_ok = _is_number(area) and area > 0
        if bbox_ok and area_ok and not recompute:
            return ann
        rle = _to_rle(ann["segmentation"], h, w)
        true_area = float(mask_util.area(rle))
        if true_area <= 0:
            self.rep.repaired(
                aid, "segmentation", "mask has no pixels inside the image: empty annotation dropped"
            )
            return None
        ann = dict(ann)
        if not bbox_ok or recompute:
            new_box = [float(v) for v in mask_util.toBbox(rle)]
            if not bbox_ok:
                self.rep.repaired(aid, "bbox", f"{self._bbox_reason(bbox, w, h)}; recomputed from the mask")
            ann["bbox"] = new_box
        if not area_ok or recompute:
            if not area_ok:
                self.rep.repaired(
                    aid, "area", f"area {area!r} is not a positive number; recomputed from the mask"
                )
            ann["area"] = true_area
        return ann

    @staticmethod
    def _bbox_ok(bbox: Any, w: int, h: int) -> bool:
        if type(bbox) is not list or len(bbox) != 4:
            return False
        try:
            x, y, bw, bh = bbox
            return bw > 0 and bh > 0 and x >= -EPS and y >= -EPS and x + bw <= w + EPS and y + bh <= h + EPS
        except TypeError:
            return False

    @staticmethod
    def _bbox_reason(bbox: Any, w: int, h: int) -> str:
        if bbox is None:
            return "bbox missing"
        if type(bbox) is not list or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
            return f"bbox must be 4 finite numbers [x, y, w, h], got {bbox!r}"[:200]
        if bbox[2] <= 0 or bbox[3] <= 0:
            return f"bbox {bbox} has a non-positive size"
        return f"bbox {bbox} is not inside the {w}x{h} image"
