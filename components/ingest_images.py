"""Check one image file and write its normalised copy.

Images that already are 8-bit RGB JPEG or PNG without an EXIF rotation are written byte for byte. Anything
else (grayscale, CMYK, palette, alpha, 16-bit, other formats, EXIF-rotated) is decoded, converted to RGB
and written as PNG. Missing, unreadable, unsupported, truncated, too large (:class:`ImageLimits`: checked
from the header, before any pixel is decoded) and wrong-size images are quarantined, with the reason
:mod:`components.images` gives.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from components.images import BadImage, ImageLimits, classify, open_image, to_rgb

ORIENTATION_TAG = 0x0112
SWAPPING_ORIENTATIONS = (5, 6, 7, 8)


@dataclass
class ImageOutcome:
    """What happened to one image; ``ok`` False means quarantined (see ``problems``)."""

    image_id: int
    file_name: str
    width: int | None = None
    height: int | None = None
    sha256: str | None = None
    ok: bool = True
    problems: list[tuple[str, str, str]] = field(default_factory=list)  # (field, reason, action)
    conversion: str | None = None

    def quarantine(self, field_name: str, reason: str) -> ImageOutcome:
        self.ok = False
        self.problems.append((field_name, reason, "quarantined"))
        return self


def _png_is_rgb8(data: bytes) -> bool:
    return len(data) > 26 and data[24] == 8 and data[25] == 2  # IHDR bit depth 8, colour type 2 (RGB)


def _orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(ORIENTATION_TAG, 1)
    except Exception:
        if im.format == "PNG":  # PNG's getexif decodes the pixels: this is the image's decode error
            raise
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _decode(im: Image.Image, data: bytes, mode: str, keep_bytes: bool) -> None:
    """Fully decode (detects truncation); JPEGs kept as they are decode at 1/8 scale for speed."""
    if mode != "full":
        return
    if keep_bytes and im.format == "JPEG":
        im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
    im.load()


def _plan_orientation(out: ImageOutcome, raw: tuple[int, int], orientation: int, declared) -> bool | None:
    """Decide whether to apply the EXIF rotation. None means the image is quarantined."""
    oriented = raw[::-1] if orientation in SWAPPING_ORIENTATIONS else raw
    if declared is None or declared == oriented:
        return orientation != 1
    if declared == raw:
        out.problems.append(
            (
                "orientation",
                f"EXIF orientation {orientation} ignored: the annotations match the stored pixels",
                "repaired",
            )
        )
        return False
    out.quarantine(
        "width/height",
        f"image is {oriented[0]}x{oriented[1]} but the annotation file says {declared[0]}x{declared[1]}",
    )
    return None


def _png_name(file_name: str, taken: frozenset[str]) -> str:
    stem, _ = os.path.splitext(file_name)
    name = stem + ".png"
    return name if name == file_name or name not in taken else file_name + ".png"


def process_image(
    entry: dict[str, Any],
    src_dir: Path,
    dst_dir: Path | None,
    *,
    mode: str = "full",
    link: bool = False,
    taken_names: frozenset[str] = frozenset(),
    limits: ImageLimits | None = None,
) -> ImageOutcome:
    """Check ``src_dir/entry['file_name']`` and write it to ``dst_dir`` (unless None)."""
    name = entry["file_name"]
    out = ImageOutcome(entry["id"], name)
    src = src_dir / name
    limits = limits or ImageLimits()
    try:
        limits.check_bytes(src.stat().st_size)  # before reading a huge file into memory
        data = src.read_bytes()
    except FileNotFoundError:
        return out.quarantine("file_name", f"image file not found: {src}")
    except BadImage as bad:
        return out.quarantine("file_name", f"{bad.kind} image {src}: {bad.detail}")
    except OSError as err:
        return out.quarantine("file_name", f"cannot read image file {src}: {err.strerror or err}")
    declared = (entry["width"], entry["height"]) if entry.get("width") and entry.get("height") else None
    try:
        im = open_image(data, limits)
        converted = _convert(out, im, data, mode, declared, taken_names)
    except (BadImage, OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as err:
        bad = classify(err)
        return out.quarantine("file_name", f"{bad.kind} image {src}: {bad.detail}")
    if converted is None:
        return out
    data, size = converted
    out.width, out.height = size
    if declared is None:
        out.problems.append(
            ("width/height", f"size missing in the annotation file; set to {size}", "repaired")
        )
    out.sha256 = hashlib.sha256(data).hexdigest()
    if dst_dir is not None:
        _write(src, dst_dir / out.file_name, data, link and out.file_name == name)
    return out


def _convert(
    out: ImageOutcome, im: Image.Image, data: bytes, mode: str, declared, taken: frozenset[str]
) -> tuple[bytes, tuple[int, int]] | None:
    """(bytes to write, size): ``data`` itself, or the image as RGB PNG. None if quarantined."""
    orientation = _orientation(im)
    apply = _plan_orientation(out, im.size, orientation, declared)
    if apply is None:
        return None
    fmt_ok = (im.format == "JPEG" and im.mode == "RGB") or (im.format == "PNG" and _png_is_rgb8(data))
    keep = fmt_ok and orientation == 1
    size = im.size  # before draft() shrinks a JPEG
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limits were checked
        _decode(im, data, mode, keep)
        if keep:
            return data, size
        out.conversion = f"{im.format} {im.mode}" + (f", EXIF orientation {orientation}" if apply else "")
        im = to_rgb(ImageOps.exif_transpose(im) if apply else im)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    out.file_name = _png_name(out.file_name, taken)
    return buf.getvalue(), im.size


def _write(src: Path, dst: Path, data: bytes, link: bool) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if link:
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    dst.write_bytes(data)
