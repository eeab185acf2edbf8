"""Reading untrusted image bytes: size limits, one-line reasons, conversion to 8-bit RGB.

Shared by ``atmask ingest`` (every dataset image), ``atmask predict`` and the served pyfunc model, so a
hostile or broken image gets the same one-line reason everywhere. The file size is checked before
anything is parsed, and the header's width and height before any pixel is decoded, so a decompression
bomb (a small file that claims 20000x20000 pixels) costs nothing.

Reasons come in four kinds (:attr:`BadImage.kind`): ``too large`` (over :class:`ImageLimits`),
``unreadable`` (no known image signature: an HTML error page, an empty or random file), ``unsupported``
(a known format or pixel layout this project does not decode: EPS, PDF, HEIC, 64-bit float TIFF, ...) and
``truncated or corrupt`` (a known format whose data ends early or does not decode).
"""

from __future__ import annotations

import dataclasses
import io
import re
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from components.errors import UserError

# Formats Pillow decodes by itself (no external programs such as Ghostscript): nothing else is opened.
FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP", "PPM")  # JPEG includes MPO (camera JPEGs)
_SIGNATURES: tuple[tuple[bytes, int, str], ...] = (  # (magic, offset, format)
    (b"\x89PNG\r\n\x1a\n", 0, "PNG"),
    (b"\xff\xd8\xff", 0, "JPEG"),
    (b"GIF87a", 0, "GIF"),
    (b"GIF89a", 0, "GIF"),
    (b"BM", 0, "BMP"),
    (b"II*\x00", 0, "TIFF"),
    (b"MM\x00*", 0, "TIFF"),
    (b"WEBP", 8, "WEBP"),
    (b"%!PS", 0, "EPS"),
    (b"\xc5\xd0\xd3\xc6", 0, "EPS"),
    (b"%PDF", 0, "PDF"),
    (b"<svg", 0, "SVG"),
    (b"8BPS", 0, "PSD"),
    (b"ftypheic", 4, "HEIC"),
    (b"ftypheix", 4, "HEIC"),
    (b"ftypmif1", 4, "HEIF"),
    (b"ftypavif", 4, "AVIF"),
    (b"\x00\x00\x00\x0cjP  ", 0, "JPEG 2000"),
)
_TRUNCATION = ("truncated", "broken data stream", "end of file", "unexpected end", "premature end")


@dataclass(frozen=True)
class ImageLimits:
    """The largest image accepted. Defaults: Pillow's own decompression-bomb threshold (about 89.5
    megapixels), 16384 pixels a side, 256 MiB a file."""

    max_pixels: int = 89_478_485
    max_side: int = 16_384
    max_bytes: int = 256 * 2**20

    def __post_init__(self) -> None:
        for key, value in asdict(self).items():
            if type(value) is not int or value < 1:
                raise UserError(f"max_image_{key[4:]}: must be a positive integer, got {value!r}")

    @classmethod
    def from_mapping(cls, values: Any) -> ImageLimits:
        """Limits from the keys ``max_image_pixels``, ``max_image_side``, ``max_image_bytes`` of a mapping or
        a dataclass (e.g. the params ``data:`` section); other keys are ignored, missing or None ones default."""
        if dataclasses.is_dataclass(values) and not isinstance(values, type):
            values = dataclasses.asdict(values)
        values = dict(values or {})
        given = {k: values.get(f"max_image_{k[4:]}") for k in ("max_pixels", "max_side", "max_bytes")}
        return cls(**{k: v for k, v in given.items() if v is not None})

    def to_mapping(self) -> dict[str, int]:
        return {f"max_image_{k[4:]}": v for k, v in asdict(self).items()}

    def check_bytes(self, size: int) -> None:
        if size > self.max_bytes:
            raise BadImage(
                "too large",
                f"the file is {_mib(size)}, over the limit of {_mib(self.max_bytes)} (max_image_bytes)",
            )

    def check_size(self, width: int, height: int) -> None:
        pixels = width * height
        if pixels > self.max_pixels:
            over = f"over the limit of {_mp(self.max_pixels)} (max_image_pixels)"
        elif max(width, height) > self.max_side:
            over = f"over the limit of {self.max_side} px a side (max_image_side)"
        else:
            return
        raise BadImage(
            "too large",
            f"{width}x{height} pixels ({_mp(pixels)}) is {over}: a decompression bomb or an oversized "
            "image; downscale it",
        )


class BadImage(ValueError):
    """An image that cannot be used; ``str()`` is one line: ``<kind>: <detail>``."""

    def __init__(self, kind: str, detail: str) -> None:
        self.kind = kind
        self.detail = " ".join(detail.split())[:300]
        super().__init__(f"{kind}: {self.detail}")


def _mp(pixels: int) -> str:
    return f"{pixels / 1e6:.1f} MP" if pixels >= 100_000 else f"{pixels} pixels"


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size} bytes"


def sniff(data: bytes) -> str | None:
    """The format named by the file's first bytes (None if no known signature)."""
    for magic, offset, fmt in _SIGNATURES:
        if data[offset : offset + len(magic)] == magic:
            return fmt
    if len(data) > 2 and data[:1] == b"P" and data[1:2] in b"123456" and data[2:3].isspace():
        return "PPM"
    return None


def _unidentified(data: bytes) -> BadImage:
    fmt = sniff(data)
    if fmt is None:
        start = "the file is empty" if not data else f"the file starts with {data[:16]!r}"
        return BadImage("unreadable", f"not an image: no PNG/JPEG/... signature ({start})")
    if fmt not in FORMATS:
        return BadImage("unsupported", f"{fmt} is not an accepted format; convert it to PNG or JPEG")
    why = "a pixel layout Pillow does not decode"
    try:  # the format's own reader says what it does not support (Image.open only says "cannot identify")
        Image.OPEN[fmt][0](io.BytesIO(data), "")
    except (SyntaxError, OSError, ValueError, KeyError, IndexError, TypeError) as err:
        why = str(err) or why
    except Exception:  # only for the message; the image is refused either way
        pass
    return BadImage("unsupported", f"a {fmt} file with {why}; save it as 8-bit RGB PNG or JPEG")


def classify(err: BaseException) -> BadImage:
    """A Pillow error raised while decoding -> its one-line reason."""
    if isinstance(err, BadImage):
        return err
    text = str(err) or type(err).__name__
    if isinstance(err, Image.DecompressionBombError):
        found = re.search(r"\((\d+) pixels\)", text)
        pixels = f"{int(found.group(1)) / 1e6:.1f} MP" if found else "too many pixels"
        return BadImage(
            "too large",
            f"{pixels} is over Pillow's hard limit of {2 * Image.MAX_IMAGE_PIXELS / 1e6:.1f} MP: "
            "a decompression bomb or an oversized image; downscale it",
        )
    lowered = text.lower()
    if "conversion from" in lowered or "not supported" in lowered or "unknown pixel mode" in lowered:
        return BadImage("unsupported", text)
    if any(t in lowered for t in _TRUNCATION) or isinstance(err, (OSError, SyntaxError, ValueError)):
        return BadImage("truncated or corrupt", text)
    return BadImage("truncated or corrupt", f"{type(err).__name__}: {text}")


def open_image(data: bytes, limits: ImageLimits | None = None) -> Image.Image:
    """Parse the header of ``data`` (no pixels decoded) and check the limits; raises :class:`BadImage`."""
    limits = limits or ImageLimits()
    limits.check_bytes(len(data))
    with warnings.catch_warnings():
        # Pillow warns above ~89.5 MP; our own limits decide (checked right below).
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data), formats=FORMATS)
        except UnidentifiedImageError:
            raise _unidentified(data) from None
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise classify(err) from None
    limits.check_size(*im.size)
    return im


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB: 16-bit and float images scaled, alpha composited on black, anything else converted."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        if not np.isfinite(arr).all():
            raise BadImage("unsupported", f"mode {im.mode} image holds NaN or infinite pixel values")
        scale = 255.0 / 65535.0 if arr.max(initial=0) > 255 or im.mode.startswith("I;16") else 1.0
        im = Image.fromarray(np.clip(arr * scale + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        im = Image.alpha_composite(background, rgba)
    return im.convert("RGB")


def decode_rgb(data: bytes, limits: ImageLimits | None = None) -> Image.Image:
    """The whole image, decoded and converted to 8-bit RGB; raises :class:`BadImage`."""
    im = open_image(data, limits)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im.load()
            return to_rgb(im)
    except BadImage:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as err:
        raise classify(err) from None
