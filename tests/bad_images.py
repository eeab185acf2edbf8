"""Hostile and broken image files, built in a few milliseconds each, with the reason kind every surface
(``atmask ingest``, ``atmask predict``, the served model) must give for them (components.images)."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable

import numpy as np
from PIL import Image

from components.images import ImageLimits


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header(width: int, height: int, color_type: int = 2, idat: bytes = b"") -> bytes:
    """A PNG whose header claims ``width`` x ``height`` 8-bit pixels, with ``idat`` as its pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def real_bomb(side: int = 12_000) -> bytes:
    """A valid grey PNG of side x side zeros (144 MP by default, ~140 KB): decodable, and a bomb."""
    comp = zlib.compressobj(9)
    row = bytes(side + 1)  # filter byte + pixels
    data = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    return png_header(side, side, 0, data)


def encoded(image: Image.Image, fmt: str, **save: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save)
    return buf.getvalue()


def picture(w: int = 48, h: int = 40) -> Image.Image:
    arr = (np.arange(h * w * 3, dtype=np.uint32).reshape(h, w, 3) * 7 % 251).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def noise(w: int = 48, h: int = 40) -> Image.Image:
    """Random pixels: a PNG of about 3 bytes a pixel (does not compress)."""
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8))


def tiff_float64(w: int = 4, h: int = 4) -> bytes:
    """A little-endian TIFF with one 64-bit float sample per pixel: a layout Pillow does not decode."""
    entries = [(256, 3, w), (257, 3, h), (258, 3, 64), (259, 3, 1), (262, 3, 1), (273, 4, 0),
               (277, 3, 1), (278, 3, h), (279, 4, w * h * 8), (339, 3, 3)]  # fmt: skip
    data_at = 8 + 2 + len(entries) * 12 + 4
    out = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(entries))
    for tag, kind, value in entries:
        value = data_at if tag == 273 else value
        packed = struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value)
        out += struct.pack("<HHI", tag, kind, 1) + packed
    return out + b"\0\0\0\0" + bytes(w * h * 8)


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def corrupt_png_data() -> bytes:
    """A complete PNG whose compressed pixel data is garbage (CRC fixed, so only decoding finds it)."""
    good = encoded(picture(), "PNG")
    start = good.index(b"IDAT") + 4
    length = struct.unpack(">I", good[start - 8 : start - 4])[0]
    body = bytes(b ^ 0x5A for b in good[start : start + length])
    return good[: start - 8] + _chunk(b"IDAT", body) + good[start + length + 4 :]


# name -> (file bytes, expected reason kind, a fragment of the detail, limits to apply or None)
BadCase = tuple[Callable[[], bytes], str, str, ImageLimits | None]
BAD_IMAGES: dict[str, BadCase] = {
    "bomb_header_20000x20000": (lambda: png_header(20_000, 20_000), "too large", "decompression bomb", None),
    "bomb_real_12000x12000": (
        real_bomb,
        "too large",
        "12000x12000 pixels (144.0 MP) is over the limit of 89.5 MP",
        None,
    ),
    "side_over_limit": (
        lambda: encoded(Image.new("L", (17_000, 2)), "PNG"),
        "too large",
        "17000x2 pixels (34000 pixels) is over the limit of 16384 px a side",
        None,
    ),
    "pixels_over_configured_limit": (
        lambda: encoded(picture(), "PNG"),
        "too large",
        "48x40 pixels (1920 pixels) is over the limit of 1000 pixels (max_image_pixels)",
        ImageLimits(max_pixels=1000),
    ),
    "file_over_configured_limit": (
        lambda: encoded(noise(), "PNG"),
        "too large",
        "over the limit of 4096 bytes (max_image_bytes)",
        ImageLimits(max_bytes=4096),
    ),
    "truncated_png": (lambda: truncated(encoded(picture(), "PNG")), "truncated or corrupt", "", None),
    "truncated_jpeg": (
        lambda: truncated(encoded(picture(), "JPEG", quality=95)),
        "truncated or corrupt",
        "truncated",
        None,
    ),
    "corrupt_png_pixels": (corrupt_png_data, "truncated or corrupt", "", None),
    "wrong_magic_html": (
        lambda: b"<!DOCTYPE html><html><body>404 Not Found</body></html>",
        "unreadable",
        "starts with b'<!DOCTYPE html><'",
        None,
    ),
    "empty_file": (lambda: b"", "unreadable", "the file is empty", None),
    "random_bytes": (lambda: bytes(range(7, 250, 3)) * 4, "unreadable", "no PNG/JPEG/... signature", None),
    "eps_postscript": (
        lambda: b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n",
        "unsupported",
        "EPS is not an accepted format",
        None,
    ),
    "pdf": (
        lambda: b"%PDF-1.4\n1 0 obj\n<<>>\nendobj\n",
        "unsupported",
        "PDF is not an accepted format",
        None,
    ),
    "heic": (
        lambda: b"\0\0\0\x18ftypheic" + bytes(40),
        "unsupported",
        "HEIC is not an accepted format",
        None,
    ),
    "tiff_float64_samples": (tiff_float64, "unsupported", "a TIFF file with", None),
    "float_tiff_with_nan": (
        lambda: encoded(Image.fromarray(np.full((40, 48), np.nan, dtype=np.float32)), "TIFF"),
        "unsupported",
        "NaN or infinite",
        None,
    ),
}
