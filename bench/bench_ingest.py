"""Ingest validation cost at COCO scale, next to a bare ``pycocotools.coco.COCO()`` load of the same file.

Generates a COCO-style instances file (default 1,000,000 instances over 100,000 images of 640x480:
polygons with 8-24 points, 1% crowd regions as uncompressed RLE, like COCO 2017), then, each in a fresh
child process so that peak memory is its own:

  validate  ``components.ingest.process_split`` (streaming parse, every per-annotation check, compact index,
            uncompressed RLE -> compressed) + ``assemble_split`` (writes the normalised annotation file);
            image files are not read (``image_check="none"``: the declared sizes are trusted), so this is
            the annotation-side cost of ingest
  COCO()    ``json.load`` + ``createIndex`` of pycocotools

and prints wall time, peak RSS and the peak RSS growth over the process's start (imports) next to the JSON
size. Targets (issue 3): validate <= 3x COCO() time, peak memory < 4x JSON size.

    python bench/bench_ingest.py             # 1M instances / 100k images (~340 MB JSON; COCO() needs ~2.5 GB RAM)
    python bench/bench_ingest.py --quick     # 50k instances / 5k images
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WIDTH, HEIGHT = 640, 480


def _polygon(rng: np.random.Generator) -> tuple[list[float], list[float], float]:
    n = int(rng.integers(8, 25))
    cx, cy = rng.uniform(60, WIDTH - 60), rng.uniform(60, HEIGHT - 60)
    radius = rng.uniform(5, 55, size=n)
    angle = np.sort(rng.uniform(0, 2 * np.pi, size=n))
    xs = np.round(cx + radius * np.cos(angle), 2)
    ys = np.round(cy + radius * np.sin(angle), 2)
    poly = np.stack([xs, ys], 1).ravel().tolist()
    x0, y0 = float(xs.min()), float(ys.min())
    box = [x0, y0, round(float(xs.max()) - x0, 2), round(float(ys.max()) - y0, 2)]
    area = 0.5 * abs(float(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1))))
    return poly, box, round(area, 2)


def _crowd_rle(rng: np.random.Generator) -> tuple[dict, list[float], float]:
    """A rectangle as COCO's uncompressed (column-major) RLE."""
    x0, y0 = int(rng.integers(0, WIDTH - 100)), int(rng.integers(0, HEIGHT - 100))
    w, h = int(rng.integers(20, 100)), int(rng.integers(20, 100))
    counts = [x0 * HEIGHT + y0]
    for col in range(w):
        counts += [h, HEIGHT - h] if col < w - 1 else [h, HEIGHT - h - y0 + (WIDTH - x0 - w) * HEIGHT]
    return (
        {"size": [HEIGHT, WIDTH], "counts": counts},
        [float(x0), float(y0), float(w), float(h)],
        float(w * h),
    )


def generate(path: Path, num_images: int, num_instances: int, seed: int = 0) -> None:
    """Write the file streaming (never the whole dict in memory): images, then annotations."""
    rng = np.random.default_rng(seed)
    cats = [{"id": i, "name": f"class{i}", "supercategory": "thing"} for i in range(1, 81)]
    image_of = np.sort(rng.integers(1, num_images + 1, size=num_instances))
    category_of = rng.integers(1, 81, size=num_instances)
    crowd_of = rng.random(num_instances) < 0.01
    dumps = json.JSONEncoder(separators=(",", ":")).encode
    with open(path, "w", encoding="utf-8") as fh:
        fh.write('{"info":{"description":"bench"},"licenses":[],"categories":' + dumps(cats) + ',"images":[')
        fh.write(
            ",".join(
                dumps({"id": i, "file_name": f"{i:012d}.jpg", "width": WIDTH, "height": HEIGHT})
                for i in range(1, num_images + 1)
            )
        )
        fh.write('],"annotations":[')
        for k in range(num_instances):
            if crowd_of[k]:
                seg, box, area = _crowd_rle(rng)
            else:
                poly, box, area = _polygon(rng)
                seg = [poly]
            ann = {
                "id": k + 1,
                "image_id": int(image_of[k]),
                "category_id": int(category_of[k]),
                "iscrowd": int(crowd_of[k]),
                "segmentation": seg,
                "bbox": box,
                "area": area,
            }
            fh.write(("," if k else "") + dumps(ann))
        fh.write("]}")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def child(task: str, path: Path) -> None:
    if task == "validate":
        from components.ingest import assemble_split, process_split

        start_rss = _rss_mb()
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            work = process_split("train", path, None, Path(tmp), image_check="none", workers=1)
            t1 = time.perf_counter()
            stats = assemble_split(work, work.categories, Path(tmp) / "out.json")
            t2 = time.perf_counter()
        extra = {
            "parse_check_s": t1 - t0,
            "write_s": t2 - t1,
            "annotations": stats["annotations"],
            "problems": len(work.reporter.problems),
        }
    else:
        import contextlib
        import io

        from pycocotools.coco import COCO

        start_rss = _rss_mb()
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(str(path))
        t2 = time.perf_counter()
        extra = {"annotations": len(coco.anns)}
    print(json.dumps({"wall_s": t2 - t0, "peak_mb": _rss_mb(), "start_mb": start_rss, **extra}))


def measure(task: str, path: Path) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", task, str(path)], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise SystemExit(f"{task} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="50k instances over 5k images")
    parser.add_argument("--images", type=int, help="number of images (default 100000, quick 5000)")
    parser.add_argument("--instances", type=int, help="number of instances (default 1000000, quick 50000)")
    parser.add_argument("--file", type=Path, help="reuse/keep the generated file here")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]))
        return
    images = args.images or (5_000 if args.quick else 100_000)
    instances = args.instances or (50_000 if args.quick else 1_000_000)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.file or Path(tmp) / "instances_bench.json"
        if not path.exists():
            t0 = time.perf_counter()
            generate(path, images, instances)
            print(f"generated {path} in {time.perf_counter() - t0:.1f} s")
        size_mb = path.stat().st_size / 2**20
        coco = measure("coco", path)
        val = measure("validate", path)
        assert val["annotations"] == coco["annotations"] == instances and val["problems"] == 0, (val, coco)
        report(images, instances, size_mb, val, coco)


def report(images: int, instances: int, size_mb: float, val: dict, coco: dict) -> None:
    print(f"\n{instances:,} instances over {images:,} images, JSON {size_mb:.1f} MB")
    print(f"{'':24}{'wall s':>10}{'peak RSS MB':>14}{'RSS growth MB':>15}{'peak/JSON':>11}")
    for name, r in (("validate+index (ingest)", val), ("pycocotools COCO()", coco)):
        grow = r["peak_mb"] - r["start_mb"]
        print(
            f"{name:24}{r['wall_s']:>10.2f}{r['peak_mb']:>14.0f}{grow:>15.0f}{r['peak_mb'] / size_mb:>11.2f}"
        )
    print(
        f"  validate = parse+check {val['parse_check_s']:.2f} s + write normalised file {val['write_s']:.2f} s"
    )
    ratio = val["wall_s"] / coco["wall_s"]
    mem = val["peak_mb"] / size_mb
    print(f"time ratio validate/COCO(): {ratio:.2f}x (target <= 3x: {'met' if ratio <= 3 else 'MISSED'})")
    print(f"peak memory / JSON size: {mem:.2f}x (target < 4x: {'met' if mem < 4 else 'MISSED'})")


if __name__ == "__main__":
    main()
