"""One split of ``atmask ingest``: stream-validate its annotation file, check its images in parallel, and
assemble the final ``instances_<split>.json`` (see :mod:`components.ingest` for the whole dataset)."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import GeneratorType
from typing import Any

from tqdm import tqdm

from components.coco_json import CocoJsonReader
from components.coco_validate import AnnotationChecker, Reporter, check_categories, check_image_entries
from components.errors import UserError
from components.images import ImageLimits
from components.ingest_images import ImageOutcome, process_image
from components.ingest_report import SplitCounts, no_usable_images

_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), check_circular=False, allow_nan=False)


@dataclass
class SplitWork:
    split: str
    ann_file: str
    info: Any
    licenses: Any
    categories: list[dict[str, Any]]
    images: list[dict[str, Any]]
    lines: Path
    checker: AnnotationChecker
    reporter: Reporter
    image_hashes: dict[str, str]
    conversions: list[dict[str, Any]]
    counts: SplitCounts


def check_images(
    entries: list[dict[str, Any]],
    image_dir: Path | None,
    dst_dir: Path | None,
    rep: Reporter,
    *,
    mode: str,
    workers: int,
    link: bool,
    split: str,
    limits: ImageLimits | None = None,
) -> tuple[list[dict[str, Any]], dict[str, str], list[dict[str, Any]], set[int]]:
    """Check image files in parallel. Returns kept entries, {file_name: sha256}, conversions, dropped ids."""
    if mode == "none":  # annotations only: trust the declared sizes
        outcomes = [_declared_only(e) for e in entries]
    else:
        assert image_dir is not None
        taken = frozenset(e["file_name"] for e in entries)

        def one(entry: dict[str, Any]) -> ImageOutcome:
            return process_image(
                entry, image_dir, dst_dir, mode=mode, link=link, taken_names=taken, limits=limits
            )

        with ThreadPoolExecutor(max(1, workers)) as pool:
            outcomes = list(
                tqdm(
                    pool.map(one, entries),
                    total=len(entries),
                    desc=f"images {split}",
                    unit="img",
                    disable=None,
                )
            )
    kept, hashes, conversions, dropped = [], {}, [], set()
    for entry, outcome in zip(entries, outcomes, strict=True):
        img_file = f"{image_dir.name}/{entry['file_name']}" if image_dir else entry["file_name"]
        for field_name, reason, action in outcome.problems:
            (rep.repaired if action == "repaired" else rep.quarantined)(
                entry["id"], field_name, reason, img_file
            )
        if not outcome.ok:
            dropped.add(entry["id"])
            continue
        if outcome.conversion:
            conversions.append(
                {
                    "split": split,
                    "file": img_file,
                    "id": entry["id"],
                    "from": outcome.conversion,
                    "to": outcome.file_name,
                }
            )
        kept.append(
            {**entry, "file_name": outcome.file_name, "width": outcome.width, "height": outcome.height}
        )
        if outcome.sha256:
            hashes[outcome.file_name] = outcome.sha256
    return kept, hashes, conversions, dropped


def _declared_only(entry: dict[str, Any]) -> ImageOutcome:
    out = ImageOutcome(entry["id"], entry["file_name"], entry.get("width"), entry.get("height"))
    if not out.width or not out.height:
        out.quarantine("width/height", "width/height missing and image files are not checked")
    return out


def process_split(
    split: str,
    ann_path: Path,
    image_dir: Path | None,
    work_dir: Path,
    *,
    ann_label: str | None = None,
    image_check: str = "full",
    workers: int = 1,
    link: bool = False,
    limits: ImageLimits | None = None,
    reporter: Reporter | None = None,
    counts: SplitCounts | None = None,
) -> SplitWork:
    """Stream-validate one annotation file; images go to ``work_dir/images/<split>`` (unless mode none).

    ``reporter`` and ``counts`` (made here when not given) hold what was found so far if this raises.
    """
    label = ann_label or ann_path.name
    rep = reporter or Reporter(split, label)
    tally = counts or SplitCounts()
    parts: dict[str, Any] = {}
    checker: AnnotationChecker | None = None
    buffered: list[Any] | None = None
    lines = work_dir / f".{split}.annotations.jsonl"
    dst = work_dir / "images" / split if image_check != "none" else None

    def start_annotations() -> AnnotationChecker:
        checker, found = _check_listed_images(
            parts.get("images"), label, split, image_dir, dst, rep, tally,
            mode=image_check, workers=workers, link=link, limits=limits,
        )  # fmt: skip
        parts.update(found)
        return checker

    with CocoJsonReader(ann_path) as reader, open(lines, "w", encoding="utf-8") as fh:
        for key, value in reader.items():
            if key == "annotations" and not isinstance(value, GeneratorType):
                raise UserError(f"{label}: field 'annotations' must be a list, got {type(value).__name__}")
            if key == "annotations" and "images" not in parts:
                buffered = list(value)  # unusual order: images after annotations
            elif key == "annotations":
                checker = start_annotations()
                tally.annotations_listed = _stream(value, checker, fh)
            elif key == "images":
                parts["images"] = list(value) if isinstance(value, GeneratorType) else value
            else:
                parts[key] = value
        if checker is None:
            if buffered is None:
                raise UserError(f"{label}: field 'annotations' is missing; a COCO instances file needs it")
            checker = start_annotations()
            tally.annotations_listed = _stream(buffered, checker, fh)
    info, licenses = parts.get("info"), parts.get("licenses")
    return SplitWork(
        split, label, info if isinstance(info, dict) else {}, licenses if isinstance(licenses, list) else [],
        check_categories(parts.get("categories"), label), parts["kept"], lines, checker, rep, parts["hashes"],
        parts["conversions"], tally,
    )  # fmt: skip


def _check_listed_images(
    raw: Any, label: str, split: str, image_dir: Path | None, dst: Path | None, rep: Reporter,
    tally: SplitCounts, **image_options: Any,
) -> tuple[AnnotationChecker, dict[str, Any]]:  # fmt: skip
    """Check the ``images`` entries and files; the checker for the annotations, and what was kept."""
    if raw is None:
        raise UserError(
            f"{label}: field 'images' is missing; a COCO file needs images, annotations, categories"
        )
    entries = check_image_entries(raw, rep)
    tally.images_listed = len(raw)
    kept, hashes, conversions, dropped = check_images(
        entries, image_dir, dst, rep, split=split, **image_options
    )
    tally.images_kept = len(kept)
    if not kept:
        raise UserError(no_usable_images(label, split, tally, [p.to_dict() for p in rep.problems]))
    checker = AnnotationChecker({e["id"]: (e["width"], e["height"]) for e in kept}, dropped, rep)
    return checker, {"kept": kept, "hashes": hashes, "conversions": conversions}


def _stream(annotations: Any, checker: AnnotationChecker, fh: Any) -> int:
    """Check and write every annotation; returns how many were listed."""
    encode, write = _ENCODER.encode, fh.write
    i = -1
    for i, ann in enumerate(annotations):
        kept = checker.check(ann, i)
        if kept is None:
            continue
        try:
            text = encode(kept)
        except ValueError:  # NaN/Infinity in a field no check looks at (JSON has no such numbers)
            checker.reject_last("annotations", "a value is NaN or Infinity, which JSON does not allow")
            continue
        write(text)
        write("\n")
    return i + 1


def assemble_split(work: SplitWork, categories: list[dict[str, Any]], out_file: Path) -> dict[str, Any]:
    """Write the final annotation file (dangling category ids quarantined here) and return its stats."""
    valid = {c["id"] for c in categories}
    chk, rep = work.checker, work.reporter
    out_file.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    per_cat: Counter[int] = Counter()
    kept = crowd = 0
    head = {"info": work.info, "licenses": work.licenses, "categories": categories, "images": work.images}
    with open(work.lines, encoding="utf-8") as src, open(out_file, "w", encoding="utf-8") as dst:

        def put(text: str) -> None:
            dst.write(text)
            digest.update(text.encode("utf-8"))

        try:
            put(_ENCODER.encode(head)[:-1] + ',"annotations":[')
        except ValueError:
            raise UserError(
                f"{work.ann_file}: 'info', 'licenses' or an image entry holds NaN or Infinity, which JSON does "
                "not allow; remove or replace those values"
            ) from None
        for i, line in enumerate(src):
            cid = chk.category_ids[i]
            if cid not in valid:
                rep.quarantined(
                    chk.ann_ids[i], "category_id", f"category_id {cid} does not match any category"
                )
                continue
            put(("," if kept else "") + line.rstrip("\n"))
            kept += 1
            per_cat[cid] += 1
            crowd += chk.crowd[i]
        put("]}\n")
    work.lines.unlink()
    image_digest = hashlib.sha256(
        "".join(f"{k} {v}\n" for k, v in sorted(work.image_hashes.items())).encode()
    )
    work.counts.annotations_kept = kept
    work.counts.empty_categories = sorted(c for c in valid if not per_cat[c])
    return {
        "images": len(work.images),
        "annotations": kept,
        "crowd_annotations": crowd,
        "instances_per_category": {str(k): per_cat[k] for k in sorted(valid)},
        "annotations_sha256": digest.hexdigest(),
        "images_sha256": image_digest.hexdigest(),
    }
