"""The GPU figures in one command (issue 19): prints them and writes them as JSON, in at most ~8 minutes.

Parts, each run by the bench script that owns it (in a child process, with its own time limit):

  model_step_b2 / _b8   ``bench/model_step.py``: forward+backward+SGD of baseline vs atmask, R50-FPN,
                        800x1333, bf16, batch 2 and 8 per GPU: s/step, img/s, peak memory, ratios
  train_throughput      ``bench/train_throughput.py`` through the real data loader on Penn-Fudan at
                        800x1333: img/s, share of the step spent waiting for data
  inference             ``bench/bench_inference.py``: latency at batch 1 (and throughput at batch 8),
                        baseline vs atmask, mask pasting included, split by stage
  evaluate              ``atmask ingest`` (synthetic) -> ``atmask train`` -> ``atmask evaluate`` of a tiny
                        run on the device: wall times and the run's metrics
  cuda_tests            ``pytest -k cuda``: the CUDA AMP training test and the other CUDA-only tests

    python bench/gpu_check.py --out gpu_check.json                 # on one GPU (the figures)
    python bench/gpu_check.py --quick --device cpu --out /tmp/g.json   # the same parts, small, on CPU

A part that fails or runs out of time is recorded as such (with the end of its output) and the others
still run; the JSON is rewritten after every part, so an interrupted check keeps what it measured. The exit
status is 1 when any part failed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "pennfudan-coco"
TINY_RUN = [  # the tiny run for `evaluate`: the cpu_demo recipe, shortened
    "--set", "recipes.cpu_demo.warmup_iters=5", "--set", "recipes.cpu_demo.lr_steps=[100]",
    "--set", "recipes.cpu_demo.checkpoint_every=1000", "--set", "recipes.cpu_demo.log_every=10",
]  # fmt: skip


class Check:
    """Runs the parts within one time budget and keeps the JSON on disk up to date."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args, self.work = args, work
        self.deadline = time.monotonic() + args.budget
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        }
        self.env.update(PYTHONUNBUFFERED="1", MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow.db'}")
        self.results: dict = {"device": args.device, "quick": args.quick, "parts": {}}

    def run(self, cmd: list[str], limit: float) -> tuple[int, str, float]:
        """``(exit status, output tail, seconds)``; 124 when the part ran out of time."""
        limit = min(limit * self.args.limit_scale, self.deadline - time.monotonic())
        if limit < 5:
            return 124, "not started: the check's time budget is spent", 0.0
        start = time.monotonic()
        try:
            out = subprocess.run(
                cmd, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=limit, check=False
            )
            code, text = out.returncode, out.stdout + out.stderr
        except subprocess.TimeoutExpired as err:  # its stdout/stderr are bytes, whatever text= said
            text = "".join(o.decode(errors="replace") for o in (err.stdout, err.stderr) if o)
            code, text = 124, f"{text}\n(stopped after {limit:.0f} s)"
        return code, text[-3000:], time.monotonic() - start

    def part(self, name: str, fn: Callable[[], dict]) -> None:
        print(f"== {name}", flush=True)
        try:
            self.results["parts"][name] = fn()
        except Exception as err:  # one broken part must not cost the GPU time of the others
            self.results["parts"][name] = {"status": "error", "error": f"{type(err).__name__}: {err}"}
        print(json.dumps(self.results["parts"][name], indent=1)[:1500], flush=True)
        self.save()

    def save(self) -> None:
        tmp = self.args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=2), encoding="utf-8")
        tmp.replace(self.args.out)

    def bench(self, script: str, extra: list[str], limit: float) -> dict:
        """A bench script with ``--json``: its numbers, or its failure."""
        out = self.work / f"{script}-{len(self.results['parts'])}.json"
        cmd = [sys.executable, str(BENCH / script), *extra, "--json", str(out)]
        code, tail, seconds = self.run(cmd, limit)
        status = "ok" if code == 0 and out.is_file() else ("timeout" if code == 124 else "failed")
        result = {"status": status, "seconds": round(seconds, 1), "command": " ".join(cmd[1:])}
        if status == "ok":
            result.update(json.loads(out.read_text(encoding="utf-8")))
        else:
            result["output_tail"] = tail
        print(tail[-1500:], flush=True)
        return result


def model_step(check: Check, batch: int) -> dict:
    a = check.args
    size = ["--quick"] if a.quick else []
    steps = ["--warmup", "1", "--steps", "2"] if a.quick else ["--warmup", "3", "--steps", "10"]
    device = ["--device", a.device, "--amp", "bf16"]
    return check.bench("model_step.py", [*size, *steps, *device, "--batch", str(batch)], 90)


def train_throughput(check: Check) -> dict:
    a = check.args
    if not (a.data / "annotations" / "instances_train.json").is_file():
        return {"status": "skipped", "reason": f"no Penn-Fudan (COCO layout) at {a.data}; pass --data DIR"}
    sizes = ["--quick", "--steps", "2", "--rounds", "1", "--warmup", "1"] if a.quick else ["--rounds", "2"]
    extra = [*sizes, "--data", str(a.data), "--device", a.device, "--batch", str(a.train_batch)]
    return check.bench("train_throughput.py", [*extra, "--workers", str(a.workers)], 150)


def inference(check: Check) -> dict:
    a = check.args
    extra = ["--quick", "--iters", "1", "--batches", "1", "2"] if a.quick else ["--batches", "1", "8"]
    return check.bench("bench_inference.py", [*extra, "--device", a.device], 90)


def evaluate(check: Check) -> dict:
    """Ingest a small synthetic set, train briefly on the device, evaluate there: times and metrics."""
    a, data, run = check.args, check.work / "coco", check.work / "run"
    atmask = [sys.executable, "-m", "pipelines.main"]
    images = ["8", "4"] if a.quick else ["32", "16"]
    steps = []
    for name, cmd, limit in (
        ("ingest", [*atmask, "ingest", "--source", "synthetic", "--out", str(data),
                    "--synthetic-train-images", images[0], "--synthetic-val-images", images[1]], 60),
        ("train", [*atmask, "train", "--config", "atmask", "--data", str(data), "--out", str(run),
                   "--device", a.device, "--iterations", "4" if a.quick else "40", *TINY_RUN], 150),
        ("evaluate", [*atmask, "evaluate", "--run", str(run), "--data", str(data), "--device", a.device], 120),
    ):  # fmt: skip
        code, tail, seconds = check.run(cmd, limit)
        steps.append({"step": name, "exit": code, "seconds": round(seconds, 1)})
        if code != 0:
            return {"status": "timeout" if code == 124 else "failed", "steps": steps, "output_tail": tail}
    metrics = sorted(run.rglob("metrics.json"))
    found = json.loads(metrics[0].read_text(encoding="utf-8")) if metrics else {}
    keys = ("segm/AP", "segm/AP50", "bbox/AP", "boundary/AP")
    return {"status": "ok", "steps": steps, "metrics": {k: found[k] for k in keys if k in found}}


def cuda_tests(check: Check) -> dict:
    cmd = [sys.executable, "-m", "pytest", "tests", "-k", "cuda", "-q", "-rA", "-p", "no:cacheprovider"]
    code, tail, seconds = check.run(cmd, 240)
    found = re.findall(
        r"(\d+) (passed|failed|skipped|errors?|deselected)", tail.splitlines()[-1] if tail else ""
    )
    counts = {kind.rstrip("s"): int(n) for n, kind in found}
    status = {0: "ok", 124: "timeout", 5: "none collected"}.get(code, "failed")
    if status == "ok" and not counts.get("passed"):
        status = "skipped"  # no CUDA device: every CUDA test skipped itself
    return {"status": status, "seconds": round(seconds, 1), "counts": counts, "output_tail": tail}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small models and sizes (CPU rehearsal)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="JSON results file")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="Penn-Fudan in COCO layout")
    parser.add_argument("--budget", type=float, help="seconds for all parts (default 480; quick 3600)")
    parser.add_argument("--batches", type=int, nargs=2, help="model_step batches (default 2 8; quick 1 2)")
    parser.add_argument(
        "--train-batch", type=int, help="train_throughput images per step (default 8; quick 2)"
    )
    parser.add_argument(
        "--workers", type=int, help="train_throughput loader workers per model (default 6; quick 1)"
    )
    parser.add_argument("--skip", nargs="*", default=[], help="parts to leave out")
    args = parser.parse_args()
    # The CPU rehearsal runs every code path at small sizes, under much longer time limits.
    args.budget = args.budget or (3600 if args.quick else 480)
    args.limit_scale = 10 if args.quick else 1
    args.batches = args.batches or ([1, 2] if args.quick else [2, 8])
    args.train_batch = args.train_batch or (2 if args.quick else 8)
    args.workers = args.workers if args.workers is not None else (1 if args.quick else 6)
    args.out = args.out.resolve()
    args.data = args.data.resolve()
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        check = Check(args, Path(tmp))
        parts: dict[str, Callable[[], dict]] = {
            f"model_step_b{args.batches[0]}": lambda: model_step(check, args.batches[0]),
            f"model_step_b{args.batches[1]}": lambda: model_step(check, args.batches[1]),
            "train_throughput": lambda: train_throughput(check),
            "inference": lambda: inference(check),
            "evaluate": lambda: evaluate(check),
            "cuda_tests": lambda: cuda_tests(check),
        }
        for name, fn in parts.items():
            if name not in args.skip:
                check.part(name, fn)
        check.results["seconds"] = round(time.monotonic() - start, 1)
        check.save()
    print(summary(check.results))
    bad = [n for n, r in check.results["parts"].items() if r.get("status") not in ("ok", "skipped")]
    print(f"written {args.out}; {len(bad)} part(s) not ok{': ' + ', '.join(bad) if bad else ''}")
    return 1 if bad else 0


def summary(results: dict) -> str:
    """The headline numbers, one line each."""
    parts, lines = results["parts"], [f"gpu_check ({results['device']}, {results['seconds']} s)"]
    for name in (n for n in parts if n.startswith("model_step_")):
        r = parts[name]
        if r.get("status") == "ok":
            ab = r["ablations"]
            lines.append(
                f"{name}: baseline {ab['baseline']['img_s']:.1f} img/s, atmask {ab['atmask']['img_s']:.1f} "
                f"img/s, time ratio {r['time_ratio']:.3f}, memory ratio {r['memory_ratio']:.3f} "
                f"(peak {ab['atmask']['peak_mib']:.0f} MiB)"
            )
    r = parts.get("train_throughput", {})
    if r.get("status") == "ok":
        ab = r["ablations"]
        lines.append(
            f"train_throughput: atmask {ab['atmask']['img_s']:.1f} img/s (data wait "
            f"{100 * ab['atmask']['data_share']:.1f} %), baseline {ab['baseline']['img_s']:.1f} img/s, "
            f"step ratio {r['step_ratio']:.3f}"
        )
    r = parts.get("inference", {})
    if r.get("status") == "ok":
        one = r["batches"]["1"]
        lines.append(
            f"inference batch 1: baseline {1000 * one['baseline']['latency_s_per_img']:.1f} ms, atmask "
            f"{1000 * one['atmask']['latency_s_per_img']:.1f} ms "
            f"(ratio {one['atmask']['total_s'] / one['baseline']['total_s']:.3f})"
        )
    for name in ("evaluate", "cuda_tests"):
        r = parts.get(name, {})
        lines.append(f"{name}: {r.get('status')} {r.get('metrics') or r.get('counts') or ''}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
