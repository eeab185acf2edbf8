"""What the KFP components do inside their container: prepare params, call the ``atmask`` CLI.

The component functions in :mod:`pipelines.components` are thin shells (KFP serialises their source);
everything they do lives here so it is importable from the project image and testable without KFP.
Every step goes through ``components.cli.main`` so the pipeline, DVC and users share one code path.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from components.errors import UserError
from components.run_layout import CHECKPOINT_DIR, INFO_FILE, MANIFEST_FILE, METRICS_FILE

PARAMS_FILE = "params.yaml"


def pipeline_overrides(overrides_json: str, keys: dict[str, Any]) -> dict[str, Any]:
    """Dotted params.yaml keys set by pipeline parameters (``data.source=...``); ``overrides_json`` wins."""
    try:
        extra = json.loads(overrides_json or "{}")
    except json.JSONDecodeError as err:
        raise UserError(f"pipeline parameter overrides: not valid JSON ({err}); pass an object") from None
    if not isinstance(extra, dict):
        raise UserError("pipeline parameter overrides: expected a JSON object of dotted keys to values")
    return {**keys, **extra}


def write_params(params_json: str, overrides: dict[str, Any], dest_dir: Path) -> Path:
    """Write params.yaml with ``overrides`` applied, validate it, and return its path."""
    from components.params import load_params, set_dotted

    raw = yaml.safe_load(params_json) or {}  # JSON is YAML
    for dotted, value in overrides.items():
        set_dotted(raw, dotted, value)
    dest_dir.mkdir(parents=True, exist_ok=True)
    path = dest_dir / PARAMS_FILE
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    load_params(path)  # fail here, naming the key, rather than deep inside a step
    return path


def use_tracking_uri(mlflow_tracking_uri: str) -> None:
    """A non-empty pipeline parameter wins over $MLFLOW_TRACKING_URI from the cluster Secret."""
    if mlflow_tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = mlflow_tracking_uri


def call_cli(argv: list[str]) -> None:
    from components.cli import main

    rc = main(argv)
    if rc != 0:
        raise RuntimeError(f"atmask {' '.join(argv)} exited with status {rc}")


def fingerprint_step(params: Path, source: str) -> str:
    """``atmask ingest --fingerprint``: changes exactly when ingesting ``source`` would give other data."""
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        call_cli(["ingest", "--source", source, "--params", str(params), "--fingerprint"])
    return printed.getvalue().strip().splitlines()[-1]


def ingest_step(params: Path, source: str, out_dir: Path) -> dict[str, Any]:
    call_cli(["ingest", "--source", source, "--out", str(out_dir), "--params", str(params)])
    return json.loads((out_dir / MANIFEST_FILE).read_text(encoding="utf-8"))


def gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        return 0


def run_items(params: Path, ablations: list[str]) -> list[dict[str, Any]]:
    """``[{"ablation": a, "seed": s}, ...]`` for the pipeline's ParallelFor: ablations x train.seeds."""
    from components.params import load_params

    loaded = load_params(params)
    unknown = [a for a in ablations if a not in loaded.ablations]
    if unknown or not ablations:
        raise UserError(
            f"pipeline parameter ablations: {', '.join(unknown) or '(none)'} not defined under 'ablations'; "
            f"choose from {', '.join(loaded.ablations)}"
        )
    return [{"ablation": a, "seed": s} for a in ablations for s in loaded.seeds]


def train_step(
    params: Path, ablation: str, seed: int, data_dir: Path, out_dir: Path, work_dir: Path | None = None
) -> None:
    """Train into ``work_dir`` (a volume that outlives the pod, so a retried task resumes from its last
    checkpoint) and copy the run without checkpoints to ``out_dir``; train in ``out_dir`` without one."""
    target = work_dir or out_dir
    _train(params, ablation, seed, data_dir, target)
    if work_dir is not None:
        shutil.copytree(work_dir, out_dir, ignore=shutil.ignore_patterns(CHECKPOINT_DIR), dirs_exist_ok=True)


def checkpoint_dir(
    checkpoint_root: str, params: Path, ablation: str, seed: int, data_checksum: str
) -> Path | None:
    """Where a training task keeps its run: keyed by its inputs (not the pipeline run id, which would defeat
    caching), so a retried pod resumes and a rerun with identical inputs finds the finished run."""
    if not checkpoint_root:
        return None
    root = Path(checkpoint_root)
    if not root.is_dir():
        print(
            f"atmask pipeline: {root} is not mounted; training without resumable checkpoints", file=sys.stderr
        )
        return None
    key = hashlib.sha256(params.read_bytes() + f"\0{ablation}\0{seed}\0{data_checksum}".encode()).hexdigest()
    return root / f"{ablation}-seed{seed}-{key[:16]}"


def _train(params: Path, ablation: str, seed: int, data_dir: Path, out_dir: Path) -> None:
    """One process per GPU with torchrun when the pod has several; in-process otherwise."""
    argv = [
        "train",
        "--config",
        ablation,
        "--seed",
        str(seed),
        "--params",
        str(params),
        "--data",
        str(data_dir),
    ]
    argv += ["--out", str(out_dir)]
    gpus = gpu_count()
    if gpus <= 1:
        call_cli(argv)
        return
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}"]
    result = subprocess.run([*cmd, "-m", "components.cli", *argv], check=False)
    if result.returncode != 0:
        raise RuntimeError(f"torchrun atmask train --config {ablation} exited with {result.returncode}")


def evaluate_step(params: Path, run_in: Path, data_dir: Path, run_out: Path) -> dict[str, float]:
    """Evaluate a copy of the trained run (input artifacts stay untouched) and return its metrics."""
    if run_out.exists():
        shutil.rmtree(run_out)
    shutil.copytree(run_in, run_out)
    call_cli(["evaluate", "--run", str(run_out), "--data", str(data_dir), "--params", str(params)])
    return json.loads((run_out / METRICS_FILE).read_text(encoding="utf-8"))


def run_name(run_dir: Path) -> str:
    """``<ablation>/seed<k>``: where an evaluated run folder goes (from its eval_info.json)."""
    info = json.loads((run_dir / INFO_FILE).read_text(encoding="utf-8"))
    return f"{info['ablation']}/seed{info.get('seed', 0)}"


def gather_runs(run_dirs: list[Path], runs_dir: Path) -> list[str]:
    """Lay the evaluated runs out as ``runs_dir/<ablation>/seed<k>/`` (what report and register read)."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for run_dir in run_dirs:
        name = run_name(run_dir)
        if (runs_dir / name).exists():
            raise UserError(f"two runs for {name} ({run_dir}); select each (ablation, seed) once")
        shutil.copytree(run_dir, runs_dir / name)
        names.append(name)
    return names


def report_step(params: Path, runs_dir: Path, out_dir: Path) -> str:
    call_cli(["report", "--runs", str(runs_dir), "--out", str(out_dir), "--params", str(params)])
    return (out_dir / "ablations.md").read_text(encoding="utf-8")


def register_step(params: Path, runs_dir: Path, pipeline_run_id: str, out: Path) -> dict[str, Any]:
    """``params`` already carries the gate (register.candidate, register.min_improvement)."""
    argv = ["register", "--runs", str(runs_dir), "--params", str(params), "--out", str(out)]
    call_cli([*argv, "--pipeline-run-id", pipeline_run_id])
    return json.loads(out.read_text(encoding="utf-8"))
