"""What ``atmask ingest`` tells the user: counts per split, the most frequent problems, the failure report.

``ingest_report.json`` (inside the output) lists every problem of a successful run. A fatal run leaves no
dataset, but when problems had been found before it stopped, the same report, with the error, goes to
``<out>.ingest_report.failed.json`` beside the output folder (so a previous good output stays untouched),
and the error line names the counts and the most frequent reasons with one example each.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from components.errors import UserError
from components.io import is_disk_full, write_json_atomic

FAILED_REPORT_SUFFIX = ".ingest_report.failed.json"
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_PATHLIKE = re.compile(r"\S*/\S*")
_NUMBER = re.compile(r"\d+(\.\d+)?")


@dataclass
class SplitCounts:
    """Images and annotations of one split: listed in the file, and kept in the output."""

    images_listed: int = 0
    images_kept: int = 0
    annotations_listed: int = 0
    annotations_kept: int = 0
    empty_categories: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "images": {
                "listed": self.images_listed,
                "kept": self.images_kept,
                "left_out": self.images_listed - self.images_kept,
            },
            "annotations": {
                "listed": self.annotations_listed,
                "kept": self.annotations_kept,
                "left_out": self.annotations_listed - self.annotations_kept,
            },
            "categories_without_annotations": list(self.empty_categories),
        }


def failed_report_path(out: Path) -> Path:
    return out.with_name(out.name + FAILED_REPORT_SUFFIX)


def reason_kind(problem: dict[str, Any]) -> str:
    """The problem's field and reason with names, paths and numbers blanked: what repeats across items."""
    text = _NUMBER.sub("N", _PATHLIKE.sub("<path>", _QUOTED.sub("'…'", problem["reason"])))
    return f"{problem['action']} {problem['field']}: {text}"


def top_reasons(problems: list[dict[str, Any]], n: int = 3) -> list[dict[str, Any]]:
    """The ``n`` most frequent kinds of problem, each with its count and its first occurrence."""
    counts = Counter(reason_kind(p) for p in problems)
    first: dict[str, dict[str, Any]] = {}
    for p in problems:
        first.setdefault(reason_kind(p), p)
    return [{"count": c, "kind": k, "example": first[k]} for k, c in counts.most_common(n)]


def describe_top(problems: list[dict[str, Any]], n: int = 3) -> str:
    """One line: ``8x quarantined file_name: <reason> (e.g. id 3); 1x ...``."""
    parts = []
    for top in top_reasons(problems, n):
        ex = top["example"]
        reason = (
            ex["reason"] if len(ex["reason"]) <= 300 else ex["reason"][:100] + "..." + ex["reason"][-197:]
        )
        parts.append(f"{top['count']}x {ex['action']} {ex['field']}: {reason} (e.g. id {ex['id']})")
    return "; ".join(parts) if parts else "no problem recorded"


def no_usable_images(label: str, split: str, counts: SplitCounts, problems: list[dict[str, Any]]) -> str:
    listed = counts.images_listed
    why = "the 'images' list is empty" if listed == 0 else "most frequent: " + describe_top(problems)
    return (
        f"{label}: no usable images in split {split!r} ({listed} listed, {listed} quarantined, 0 kept; "
        f"{why}); fix the file_name entries or the image files"
    )


def strict_failure(problems: list[dict[str, Any]]) -> UserError:
    first = "; ".join(f"{p['file']} id {p['id']} field {p['field']}: {p['reason']}" for p in problems[:3])
    return UserError(
        f"--strict: {len(problems)} problem(s) found, no dataset was written (first: {first}); fix the data "
        "or run without --strict to repair/quarantine and get the full report"
    )


def report(
    header: dict[str, Any],
    problems: list[dict[str, Any]],
    counts: dict[str, SplitCounts],
    conversions: list[dict[str, Any]],
) -> dict[str, Any]:
    """The content of ``ingest_report.json``."""
    return {
        **header,
        "problems": problems,
        "conversions": conversions,
        "summary": dict(Counter(p["action"] for p in problems)),
        "counts": {split: c.to_dict() for split, c in counts.items()},
        "top_reasons": top_reasons(problems, 10),
    }


def fail_with_report(
    out: Path,
    header: dict[str, Any],
    err: UserError,
    problems: list[dict[str, Any]],
    counts: dict[str, SplitCounts],
) -> UserError:
    """Write the failure report (when there is evidence to show) and return the error to raise."""
    path = failed_report_path(out)
    if not problems and not any(c.images_listed for c in counts.values()):
        path.unlink(missing_ok=True)  # nothing to show beyond the message (e.g. a JSON syntax error)
        return err
    content = {**report(header, problems, counts, []), "error": str(err), "dataset_written": False}
    try:
        write_json_atomic(path, content)
    except (UserError, OSError) as write_err:
        if isinstance(write_err, OSError) and not is_disk_full(write_err):
            raise
        return UserError(f"{err} (the failure report could not be written to {path}: disk full)")
    return UserError(f"{err}; every problem is listed in {path}")
