"""The embedded default dataset: seeded, COCO-format images of shapes with hard boundaries.

Every image is rendered at 4x resolution and box-filtered down (anti-aliased edges), then optionally
blurred, on a textured background. Instances touch and overlap (later ones occlude earlier ones, and the
visible part is the ground-truth mask), have thin parts (star spikes, thin bars, ring walls) and span
COCO's small / medium / large area ranges where the image size allows it. Masks are stored as compressed
RLE, taken from the anti-aliased coverage at 0.5, so a model has to get the boundary pixels right.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter
from pycocotools import mask as mask_util

from components.params import SyntheticConfig

GENERATOR_VERSION = 2
SUPERSAMPLE = 4
# COCO's area ranges (pixels): small < 32^2 <= medium < 96^2 <= large
SIZE_CLASSES = (("small", 48.0, 32.0**2), ("medium", 32.0**2, 96.0**2), ("large", 96.0**2, 160.0**2))
SIZE_PROBS = (0.35, 0.5, 0.15)
MIN_VISIBLE_FRACTION = 0.35
MIN_VISIBLE_PIXELS = 24


# ---------------------------------------------------------------- shapes (signed coverage at supersampling)

Grid = tuple[np.ndarray, np.ndarray]  # x, y coordinates (object frame, unit = pixel at supersampling)


def _ellipse(x: np.ndarray, y: np.ndarray, r: float, rng: np.random.Generator) -> np.ndarray:
    aspect = rng.uniform(0.55, 1.0)
    return (x / r) ** 2 + (y / (r * aspect)) ** 2 <= 1.0


def _star(x: np.ndarray, y: np.ndarray, r: float, rng: np.random.Generator) -> np.ndarray:
    points = int(rng.integers(4, 7))
    inner = rng.uniform(0.3, 0.45)
    angle = np.arctan2(y, x)
    radius = np.hypot(x, y)
    # piecewise-linear star boundary: thin spikes at the tips
    phase = (angle * points / (2 * math.pi)) % 1.0
    tri = np.abs(phase - 0.5) * 2.0  # 1 at the spikes, 0 between them
    bound = r * (inner + (1.0 - inner) * tri**1.5)
    return radius <= bound


def _ring(x: np.ndarray, y: np.ndarray, r: float, rng: np.random.Generator) -> np.ndarray:
    wall = rng.uniform(0.25, 0.45)
    radius = np.hypot(x, y)
    return (radius <= r) & (radius >= r * (1.0 - wall))


def _bar(x: np.ndarray, y: np.ndarray, r: float, rng: np.random.Generator) -> np.ndarray:
    thickness = rng.uniform(0.12, 0.25)
    return (np.abs(x) <= r) & (np.abs(y) <= r * thickness)


def _triangle(x: np.ndarray, y: np.ndarray, r: float, rng: np.random.Generator) -> np.ndarray:
    inside = np.ones(x.shape, dtype=bool)
    for k in range(3):
        a = 2 * math.pi * k / 3 + math.pi / 2
        inside &= x * math.cos(a) + y * math.sin(a) <= r * 0.5
    return inside


def _cross(x: np.ndarray, y: np.ndarray, r: float, rng: np.random.Generator) -> np.ndarray:
    arm = rng.uniform(0.15, 0.3)
    inside = np.abs(x) <= r
    inside &= np.abs(y) <= r
    return inside & ((np.abs(x) <= r * arm) | (np.abs(y) <= r * arm))


ShapeFn = Callable[[np.ndarray, np.ndarray, float, np.random.Generator], np.ndarray]
# (name, supercategory, function, area of the shape relative to its bounding square (2r)^2, roughly)
SHAPES: tuple[tuple[str, str, ShapeFn, float], ...] = (
    ("ellipse", "round", _ellipse, 0.6),
    ("triangle", "pointy", _triangle, 0.3),
    ("star", "pointy", _star, 0.3),
    ("ring", "round", _ring, 0.45),
    ("cross", "straight", _cross, 0.4),
    ("bar", "straight", _bar, 0.2),
)


def categories(num_categories: int) -> list[dict[str, Any]]:
    return [
        {"id": i + 1, "name": name, "supercategory": sup}
        for i, (name, sup, _, _) in enumerate(SHAPES[:num_categories])
    ]


# ---------------------------------------------------------------- rendering


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Low-contrast textured background: gradient + smooth noise + faint stripes, values in [0, 1]."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = rng.uniform(0.25, 0.55, size=3).astype(np.float32)
    grad = rng.uniform(-0.12, 0.12, size=(2, 3)).astype(np.float32)
    img = base + xx[..., None] * grad[0] + yy[..., None] * grad[1]
    coarse = rng.normal(0.0, 0.05, size=(size // 8 + 1, size // 8 + 1, 1)).astype(np.float32)
    img += np.kron(coarse, np.ones((8, 8, 1), dtype=np.float32))[:size, :size]
    freq, angle = rng.uniform(6, 18), rng.uniform(0, math.pi)
    img += 0.03 * np.sin(2 * math.pi * freq * (xx * math.cos(angle) + yy * math.sin(angle)))[..., None]
    img += rng.normal(0.0, 0.015, size=img.shape).astype(np.float32)
    return img


# Each category's hue: RGB offsets around the object's lightness. Real classes have typical appearances;
# here the hue tells the category apart, so a short CPU training is spent on masks and boundaries (what
# the paper is about) rather than on telling a star from a ring by outline alone.
CATEGORY_HUES = np.array(
    [[1, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, -1], [1, -1, 1], [-1, 1, 1]], dtype=np.float32
)


def _texture(
    rng: np.random.Generator, shape: tuple[int, int], background_mean: float, category: int
) -> np.ndarray:
    """Object fill: far from the background in lightness, the category's hue, with stripes or checks."""
    h, w = shape
    lum = rng.uniform(0.7, 0.85) if background_mean < 0.45 else rng.uniform(0.15, 0.3)
    hue = 0.25 * CATEGORY_HUES[category] + rng.uniform(-0.05, 0.05, size=3)
    colour = np.clip(lum + hue, 0.0, 1.0).astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) / SUPERSAMPLE
    period = rng.uniform(3.0, 8.0)
    if rng.random() < 0.5:
        pattern = np.sin(2 * math.pi * (xx + yy) / period)
    else:
        pattern = np.sign(np.sin(2 * math.pi * xx / period) * np.sin(2 * math.pi * yy / period))
    return colour + 0.06 * pattern[..., None].astype(np.float32)


def _sample_radius(rng: np.random.Generator, size: int, fill: float) -> float:
    """Radius (output pixels) so that the object's area falls in a randomly chosen COCO size class."""
    max_area = 0.75 * size * size
    classes = [(lo, min(hi, max_area)) for _, lo, hi in SIZE_CLASSES if lo < max_area]
    probs = np.array(SIZE_PROBS[: len(classes)])
    lo, hi = classes[int(rng.choice(len(classes), p=probs / probs.sum()))]
    area = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    return math.sqrt(area / (4.0 * fill))


def _place(rng: np.random.Generator, size: int, radius: float, previous: list[tuple[float, float, float]]):
    """Centre of the next instance; sometimes right next to the previous one so that they touch."""
    if previous and rng.random() < 0.4:
        px, py, pr = previous[-1]
        angle = rng.uniform(0, 2 * math.pi)
        dist = (pr + radius) * rng.uniform(0.75, 1.0)
        cx, cy = px + dist * math.cos(angle), py + dist * math.sin(angle)
    else:
        cx, cy = rng.uniform(0, size), rng.uniform(0, size)
    margin = radius * 0.6
    return float(np.clip(cx, margin, size - margin)), float(np.clip(cy, margin, size - margin))


def _window(size: int, radius: float, centre: tuple[float, float]) -> tuple[slice, slice]:
    """Supersampled rows/cols that can hold a shape of this radius (rotations included)."""
    s, reach = size * SUPERSAMPLE, radius * 1.5 + 1
    x0, x1 = (int(np.clip((centre[0] + d) * SUPERSAMPLE, 0, s)) for d in (-reach, reach))
    y0, y1 = (int(np.clip((centre[1] + d) * SUPERSAMPLE, 0, s)) for d in (-reach, reach))
    return slice(y0, y1), slice(x0, x1)


def _shape_coverage(
    rng: np.random.Generator, size: int, cat: int, radius: float, centre: tuple[float, float]
) -> tuple[tuple[slice, slice], np.ndarray]:
    """Boolean shape at supersampled resolution inside its window, randomly rotated."""
    rows, cols = _window(size, radius, centre)
    x = (np.arange(cols.start, cols.stop, dtype=np.float32)[None, :] + 0.5) / SUPERSAMPLE - centre[0]
    y = (np.arange(rows.start, rows.stop, dtype=np.float32)[:, None] + 0.5) / SUPERSAMPLE - centre[1]
    theta = rng.uniform(0, 2 * math.pi)
    xr = x * math.cos(theta) + y * math.sin(theta)
    yr = -x * math.sin(theta) + y * math.cos(theta)
    return (rows, cols), SHAPES[cat][2](xr, yr, radius, rng)


def _downsample(a: np.ndarray) -> np.ndarray:
    s = a.shape[0] // SUPERSAMPLE
    return a.reshape(s, SUPERSAMPLE, s, SUPERSAMPLE, *a.shape[2:]).mean(axis=(1, 3))


def _render_once(rng: np.random.Generator, cfg: SyntheticConfig, n: int):
    """One attempt: returns the image and (category, visible mask) per instance, or None if an instance
    ended up mostly hidden behind the others (it would be an unlabelled object)."""
    size = cfg.image_size
    background = _background(rng, size)
    owner = np.full((size * SUPERSAMPLE,) * 2, -1, dtype=np.int16)  # which instance covers each subpixel
    placed: list[tuple[float, float, float]] = []
    cats, full_areas, windows = [], [], []
    for i in range(n):
        cat = int(rng.integers(0, cfg.num_categories))
        radius = _sample_radius(rng, size, SHAPES[cat][3])
        centre = _place(rng, size, radius, placed)
        window, shape = _shape_coverage(rng, size, cat, radius, centre)
        owner[window][shape] = i
        placed.append((*centre, radius))
        cats.append(cat)
        windows.append(window)
        full_areas.append(float(shape.sum()) / SUPERSAMPLE**2)
    sub = np.repeat(np.repeat(background, SUPERSAMPLE, axis=0), SUPERSAMPLE, axis=1)
    instances = []
    for i, (cat, full_area, win) in enumerate(zip(cats, full_areas, windows, strict=True)):
        own = owner == i
        mask = _downsample(own.astype(np.float32)) >= 0.5
        visible = int(mask.sum())
        if visible < MIN_VISIBLE_PIXELS or visible < MIN_VISIBLE_FRACTION * full_area:
            return None
        tex = _texture(rng, own[win].shape, float(background.mean()), cat)
        sub[win] = np.where(own[win][..., None], tex, sub[win])
        instances.append((cat + 1, mask))
    return _downsample(sub), instances


def _render(
    rng: np.random.Generator, cfg: SyntheticConfig
) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    n = int(rng.integers(1, cfg.max_instances + 1))
    for attempt in range(40):
        result = _render_once(rng, cfg, n if attempt < 20 else max(1, n // 2))
        if result is not None:
            return result
    raise RuntimeError("synthetic generator could not place visible instances; increase image_size")


def _to_png(image: np.ndarray, rng: np.random.Generator, path: Path) -> None:
    pil = Image.fromarray((np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), "RGB")
    blur = rng.choice([0.0, 0.0, 0.5, 0.8, 1.1])
    if blur > 0:
        pil = pil.filter(ImageFilter.GaussianBlur(float(blur)))
    pil.save(path, format="PNG")


def _annotation(ann_id: int, image_id: int, cat: int, mask: np.ndarray) -> dict[str, Any]:
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    x, y, w, h = (float(v) for v in mask_util.toBbox(rle))
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": cat,
        "iscrowd": 0,
        "area": float(mask_util.area(rle)),
        "bbox": [x, y, w, h],
        "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
    }


def _image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, {"train": 1, "val": 2}.get(split, 3), index, GENERATOR_VERSION])


def generate_split(cfg: SyntheticConfig, split: str, count: int, image_dir: Path) -> dict[str, Any]:
    """Render ``count`` images into ``image_dir`` and return the split's COCO dict."""
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(count):
        rng = _image_rng(cfg.seed, split, index)
        image, instances = _render(rng, cfg)
        image_id = index + 1
        file_name = f"{split}_{index:06d}.png"
        _to_png(image, rng, image_dir / file_name)
        images.append(
            {"id": image_id, "file_name": file_name, "width": cfg.image_size, "height": cfg.image_size}
        )
        for cat, mask in instances:
            annotations.append(_annotation(len(annotations) + 1, image_id, cat, mask))
    return {
        "info": {"description": "ATMask synthetic shapes", "version": str(GENERATOR_VERSION)},
        "images": images,
        "annotations": annotations,
        "categories": categories(cfg.num_categories),
    }


def generate(cfg: SyntheticConfig, root: Path, splits: tuple[str, ...] = ("train", "val")) -> Path:
    """Write a raw COCO dataset (``root/<split>/``, ``root/annotations/instances_<split>.json``)."""
    counts = {"train": cfg.train_images, "val": cfg.val_images}
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split in splits:
        count = counts.get(split, cfg.val_images)
        coco = generate_split(cfg, split, count, root / split)
        with open(root / "annotations" / f"instances_{split}.json", "w", encoding="utf-8") as fh:
            json.dump(coco, fh, sort_keys=True)
    return root
