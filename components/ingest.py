"""``atmask ingest``: validate a COCO dataset and write the normalised layout the other steps read.

Output (``--out``, default ``data/coco``)::

    images/<split>/<file_name>           JPEG/PNG as given; non-RGB, 16-bit, CMYK, EXIF-rotated -> RGB PNG
    annotations/instances_<split>.json   COCO: info, licenses, categories, images, annotations
    manifest.json                        counts, categories (+ id -> training label), checksums, source +
                                         fingerprint, ingest version
    ingest_report.json                   every problem: split, file, id, field, reason, action; counts

The whole output is written into a temporary folder beside ``--out`` and renamed at the end, so a failed
run leaves nothing partial behind (and a previous output as it was); when it had found problems, they go
to ``<out>.ingest_report.failed.json`` beside it. A run whose source fingerprint matches ``manifest.json``
does nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from components.coco_validate import Reporter, merge_categories
from components.errors import UserError
from components.images import ImageLimits
from components.ingest_report import SplitCounts, fail_with_report, failed_report_path, report, strict_failure
from components.ingest_sources import (
    COCO2017_BASE_URL,
    HttpSource,
    LocalSource,
    S3Source,
    Source,
    SyntheticSource,
    coco2017_source,
    locate_split,
    parse_http_source,
)
from components.ingest_split import SplitWork, assemble_split, check_images, process_split
from components.io import DiskFull, atomic_dir, disk_full_error, is_disk_full, write_json_atomic
from components.params import CHECK_MODES
from components.run_layout import MANIFEST_FILE
from components.synthetic import SyntheticConfig

__all__ = ["IngestResult", "assemble_split", "check_images", "ingest", "process_split", "source_fingerprint"]

INGEST_VERSION = "2"  # 2: category id 0, image limits, counts in the report
DEFAULT_OUT = Path("data/coco")


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def default_cache_dir() -> Path:
    return Path(os.environ.get("ATMASK_CACHE_DIR", Path.home() / ".cache" / "atmask"))


@dataclass
class IngestResult:
    out: Path
    skipped: bool
    manifest: dict[str, Any]
    problems: list[dict[str, Any]] = field(default_factory=list)

    def count(self, action: str) -> int:
        return sum(1 for p in self.problems if p["action"] == action)


# ---------------------------------------------------------------- the whole dataset


def make_source(
    source: str,
    splits: tuple[str, ...],
    *,
    s3_endpoint_url: str | None,
    synthetic: SyntheticConfig | None,
    workers: int,
    cache_dir: Path | None,
    checksum: str | None,
    coco_base_url: str | None,
) -> Source:
    cache = cache_dir or default_cache_dir()
    if source == "synthetic":
        return SyntheticSource(synthetic or SyntheticConfig(), splits)
    if source == "coco2017":
        return coco2017_source(splits, cache, coco_base_url)
    if source.startswith("s3://"):
        return S3Source(source, splits, s3_endpoint_url, workers)
    if source.startswith(("http://", "https://")):
        return HttpSource(parse_http_source(source, checksum), cache)
    if "://" in source:
        raise UserError(
            f"--source {source}: unsupported scheme; use a folder, s3://, http(s)://, coco2017 or synthetic"
        )
    return LocalSource(Path(source), splits, description=source)


def _up_to_date(out: Path, fingerprint: str, splits: tuple[str, ...]) -> dict[str, Any] | None:
    try:
        manifest = json.loads((out / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if manifest.get("source_fingerprint") != fingerprint:
        return None
    if not all((out / "annotations" / f"instances_{s}.json").is_file() for s in splits):
        return None
    return manifest


def _load_problems(out: Path) -> list[dict[str, Any]]:
    try:
        return json.loads((out / "ingest_report.json").read_text(encoding="utf-8")).get("problems", [])
    except (OSError, ValueError):
        return []


def _write_outputs(tmp: Path, works: list[SplitWork], header: dict[str, Any], strict: bool) -> dict[str, Any]:
    categories = merge_categories({w.split: w.categories for w in works})
    split_stats = {
        w.split: assemble_split(w, categories, tmp / "annotations" / f"instances_{w.split}.json")
        for w in works
    }
    problems = [p.to_dict() for w in works for p in w.reporter.problems]
    if strict and problems:
        raise strict_failure(problems)
    conversions = [c for w in works for c in w.conversions]
    full = report(header, problems, {w.split: w.counts for w in works}, conversions)
    write_json_atomic(tmp / "ingest_report.json", full)
    files = {f"images/{w.split}/{k}": v for w in works for k, v in w.image_hashes.items()}
    files.update(
        {f"annotations/instances_{s}.json": st["annotations_sha256"] for s, st in split_stats.items()}
    )
    files["ingest_report.json"] = hashlib.sha256((tmp / "ingest_report.json").read_bytes()).hexdigest()
    checksum = hashlib.sha256("".join(f"{k} {files[k]}\n" for k in sorted(files)).encode()).hexdigest()
    manifest = {
        **header,
        "splits": split_stats,
        "categories": categories,
        # training labels are 1..C in ascending category id order (model.data.CategoryMap); 0 is background
        "category_labels": {str(c["id"]): i + 1 for i, c in enumerate(categories)},
        "categories_without_annotations": {
            w.split: w.counts.empty_categories for w in works if w.counts.empty_categories
        },
        "checksum": checksum,
        "problems": full["summary"],
    }
    write_json_atomic(tmp / MANIFEST_FILE, manifest)
    return manifest


def _source_and_fingerprint(
    source: str,
    splits: tuple[str, ...],
    strict: bool,
    image_check: str,
    image_limits: ImageLimits | None = None,
    **source_options: Any,
) -> tuple[Source, dict[str, Any], str]:
    """The source, the output-relevant options, and a hash of both that changes when the data would."""
    if not splits:
        raise UserError("--splits: give at least one split, e.g. train,val")
    if image_check not in CHECK_MODES:
        raise UserError(f"--image-check: {image_check!r} is not one of {', '.join(CHECK_MODES)}")
    src = make_source(source, splits, **source_options)
    limits = (image_limits or ImageLimits()).to_mapping()
    options = {"splits": list(splits), "strict": strict, "image_check": image_check, "image_limits": limits}
    blob = json.dumps({"v": INGEST_VERSION, "source": src.fingerprint(), "options": options}, sort_keys=True)
    return src, options, hashlib.sha256(blob.encode()).hexdigest()


def source_fingerprint(
    source: str,
    *,
    splits: tuple[str, ...] = ("train", "val"),
    strict: bool = False,
    image_check: str = "full",
    image_limits: ImageLimits | None = None,
    **source_options: Any,
) -> str:
    """What ``ingest`` would record as ``source_fingerprint``, without downloading or writing anything:
    file listings, sizes, ETags or archive versions only. Orchestrators use it as a cache key."""
    splits = tuple(dict.fromkeys(splits))
    source_options["workers"] = source_options.get("workers") or default_workers()
    return _source_and_fingerprint(source, splits, strict, image_check, image_limits, **source_options)[2]


def ingest(
    source: str,
    out: Path,
    *,
    splits: tuple[str, ...] = ("train", "val"),
    strict: bool = False,
    s3_endpoint_url: str | None = None,
    synthetic: SyntheticConfig | None = None,
    workers: int | None = None,
    image_check: str = "full",
    cache_dir: Path | None = None,
    checksum: str | None = None,
    coco_base_url: str | None = None,
    force: bool = False,
    image_limits: ImageLimits | None = None,
) -> IngestResult:
    """Validate ``source`` and write the normalised dataset to ``out`` (see the module docstring).

    ``image_limits``: the largest image accepted (default :class:`ImageLimits`); larger ones are quarantined.
    """
    out = Path(out)
    splits = tuple(dict.fromkeys(splits))
    workers = workers or default_workers()
    src, options, fingerprint = _source_and_fingerprint(
        source,
        splits,
        strict,
        image_check,
        image_limits,
        s3_endpoint_url=s3_endpoint_url,
        synthetic=synthetic,
        workers=workers,
        cache_dir=cache_dir,
        checksum=checksum,
        coco_base_url=coco_base_url,
    )
    if not force and (manifest := _up_to_date(out, fingerprint, splits)) is not None:
        failed_report_path(out).unlink(missing_ok=True)  # a failure since then is moot: the source is back
        return IngestResult(out, True, manifest, _load_problems(out))
    header = {
        "ingest_version": INGEST_VERSION,
        "source": src.description,
        "source_fingerprint": fingerprint,
        "options": options,
    }
    options = {"image_check": image_check, "workers": workers, "link": src.link_ok, "limits": image_limits}
    manifest = _build(src, out, splits, header, strict, options)
    failed_report_path(out).unlink(missing_ok=True)
    return IngestResult(out, False, manifest, _load_problems(out))


def _build(
    src: Source,
    out: Path,
    splits: tuple[str, ...],
    header: dict[str, Any],
    strict: bool,
    options: dict[str, Any],
) -> dict[str, Any]:
    """Write the dataset into a temporary folder renamed onto ``out``; returns the manifest. A fatal error
    leaves ``out`` as it was, with its evidence in the failure report beside it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    found: dict[str, tuple[Reporter, SplitCounts]] = {}  # what each split had shown when a fatal error hit
    try:
        root = src.materialise(staging)
        with atomic_dir(out) as tmp:
            works = [_one_split(root, split, tmp, found, options) for split in splits]
            return _write_outputs(tmp, works, header, strict)
    except DiskFull as err:  # named after the output, not the temporary file it was writing
        raise disk_full_error(out, err.os_error) from None
    except UserError as err:
        problems = [p.to_dict() for rep, _ in found.values() for p in rep.problems]
        counts = {split: c for split, (_, c) in found.items()}
        raise fail_with_report(out, header, err, problems, counts) from None
    except OSError as err:
        if is_disk_full(err):  # e.g. while materialising the source in the staging folder
            raise disk_full_error(out, err) from None
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _one_split(
    root: Path, split: str, tmp: Path, found: dict[str, tuple[Reporter, SplitCounts]], options: dict[str, Any]
) -> SplitWork:
    ann, images = locate_split(root, split)
    label = os.path.relpath(ann, root)
    found[split] = (Reporter(split, label), SplitCounts())
    return process_split(
        split, ann, images, tmp, ann_label=label, reporter=found[split][0], counts=found[split][1], **options
    )


# ---------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "sources:\n"
        "  DIR                 local COCO folder: annotations/instances_<split>.json (or <split>2017)\n"
        "                      and images in <split>/, images/<split>/, <split>2017/ or images/\n"
        "  s3://bucket/prefix  the same layout in S3 or MinIO (credentials from the usual AWS variables)\n"
        "  https://.../x.zip   zip/tar archive(s) of that layout, comma-separated; URL#sha256=<hex>\n"
        "  coco2017            the official COCO 2017 archives (md5-checked, resumable downloads)\n"
        "  synthetic           the embedded generated dataset (default)\n\n"
        "exit status: 0 ok (problems repaired/quarantined are listed in ingest_report.json), 1 fatal error"
    )
    add = parser.add_argument
    add("--source", help="dataset source (see below); default: params data.source, else synthetic")
    add("--out", type=Path, help=f"output folder (default: params data.out, else {DEFAULT_OUT})")
    add("--splits", help="comma-separated splits to ingest (default: train,val)")
    add(
        "--strict",
        action="store_true",
        default=None,
        help="fail on any problem instead of repairing/quarantining",
    )
    add(
        "--s3-endpoint-url",
        help="S3 endpoint, e.g. http://minio:9000 (default: $AWS_ENDPOINT_URL or $S3_ENDPOINT_URL)",
    )
    add("--workers", type=int, help=f"parallel image checks/downloads (default: {default_workers()})")
    add(
        "--image-check",
        choices=CHECK_MODES,
        help="full: decode every image (finds truncation, default); header: read sizes only",
    )
    add(
        "--cache-dir",
        type=Path,
        help="where HTTP downloads are kept for resume (default: $ATMASK_CACHE_DIR or ~/.cache/atmask)",
    )
    add("--checksum", help="expected checksum of a single https:// archive, sha256:<hex> or md5:<hex>")
    add(
        "--coco-base-url",
        help=f"mirror of the COCO 2017 archives (default: {COCO2017_BASE_URL} or $ATMASK_COCO_BASE_URL)",
    )
    add("--force", action="store_true", help="ingest even if the source is unchanged since the last run")
    add(
        "--fingerprint",
        action="store_true",
        help="only print the source's fingerprint (listings, sizes, ETags; no download, nothing written)",
    )
    add("--synthetic-train-images", type=int, help="synthetic: number of train images (default 64)")
    add("--synthetic-val-images", type=int, help="synthetic: number of val images (default 16)")
    add("--synthetic-image-size", type=int, help="synthetic: image side in pixels (default 128)")
    add("--synthetic-num-categories", type=int, help="synthetic: number of shape categories, 1-6 (default 3)")
    add("--synthetic-max-instances", type=int, help="synthetic: max instances per image (default 4)")
    add("--seed", type=int, help="synthetic: random seed (default 0)")
    add("--params", type=Path, help="params.yaml whose 'data:' section gives defaults; flags override it")


def _read_params(path: Path | None) -> dict[str, Any]:
    """The ``data:`` section as a mapping. The whole file is validated: ingest is the first stage of the
    pipeline, so a typo anywhere in params.yaml stops the run here, before anything is trained."""
    if path is None:
        return {}
    from components.params import load_params

    return dataclasses.asdict(load_params(path).data)


def _synthetic_config(args: argparse.Namespace, params: dict[str, Any]) -> SyntheticConfig:
    values = dict(params.get("synthetic") or {})
    SyntheticConfig.from_dict(values)  # unknown keys fail here, naming the key
    flags = {
        "train_images": args.synthetic_train_images,
        "val_images": args.synthetic_val_images,
        "image_size": args.synthetic_image_size,
        "num_categories": args.synthetic_num_categories,
        "max_instances": args.synthetic_max_instances,
        "seed": args.seed,
    }
    values.update({k: v for k, v in flags.items() if v is not None})
    return SyntheticConfig.from_dict(values)


def _pick(flag: Any, params: dict[str, Any], key: str, default: Any) -> Any:
    if flag is not None:
        return flag
    value = params.get(key)
    return default if value is None else value


def run(args: argparse.Namespace) -> int:
    params = _read_params(args.params)
    splits = _pick(args.splits, params, "splits", "train,val")
    splits = tuple(s.strip() for s in (splits.split(",") if isinstance(splits, str) else splits) if s.strip())
    endpoint = _pick(args.s3_endpoint_url, params, "s3_endpoint_url", None)
    endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("S3_ENDPOINT_URL")
    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers: must be >= 1, got {args.workers}")
    cache = _pick(args.cache_dir, params, "cache_dir", None)
    source = str(_pick(args.source, params, "source", "synthetic"))
    options: dict[str, Any] = {
        "splits": splits,
        "strict": bool(_pick(args.strict, params, "strict", False)),
        "s3_endpoint_url": endpoint,
        "synthetic": _synthetic_config(args, params),
        "workers": _pick(args.workers, params, "workers", None),
        "image_check": _pick(args.image_check, params, "image_check", "full"),
        "cache_dir": Path(cache) if cache else None,
        "checksum": args.checksum,
        "coco_base_url": args.coco_base_url,
        "image_limits": ImageLimits.from_mapping(params),  # data.max_image_{pixels,side,bytes}, if set
    }
    if args.fingerprint:
        print(source_fingerprint(source, **options))
        return 0
    out = Path(_pick(args.out, params, "out", DEFAULT_OUT))
    _print_summary(ingest(source, out, force=args.force, **options))
    return 0


def _print_summary(result: IngestResult) -> None:
    if result.skipped:
        print(f"{result.out}: up to date (source unchanged since the last ingest); nothing to do")
        return
    counts = ", ".join(
        f"{s}: {v['images']} images / {v['annotations']} annotations"
        for s, v in result.manifest["splits"].items()
    )
    empty = result.manifest.get("categories_without_annotations") or {}
    note = "".join(f"; {s}: no annotation of category id(s) {ids}" for s, ids in empty.items())
    print(
        f"{result.out}: {counts}; {result.count('repaired')} repaired, {result.count('quarantined')} "
        f"quarantined{note} (see {result.out / 'ingest_report.json'})"
    )
