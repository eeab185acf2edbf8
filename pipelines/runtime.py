"""What the KFP components do inside their container: prepare params, call the ``atmask`` CLI.

The component functions in :mod:`pipelines.components` are thin shells (KFP serialises their source);
everything they do lives here so it is importable from the project image and testable without KFP.
Every step goes through ``components.cli.main`` so the pipeline, DVC and users share one code path.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from components.errors import UserError
from components.provenance import ENV_COMMIT, ENV_REPO, ENV_SOURCE_TYPE
from components.run_layout import CHECKPOINT_DIR, INFO_FILE, METRICS_FILE, MODEL_FILE
from pipelines.launcher import Launcher, api_client
from pipelines.trainjob import NodeResources, TrainJobRequest, trainjob_manifest

PARAMS_FILE = "params.yaml"
# Set in the train task from its pod (kubernetes.use_field_path_as_env): the KFP run id that labels every
# pod of a run (a retried task keeps it, a new run has another), the namespace and the ServiceAccount.
RUN_ID_ENV, NAMESPACE_ENV, SA_ENV = "ATMASK_PIPELINE_RUN_ID", "ATMASK_NAMESPACE", "ATMASK_SERVICE_ACCOUNT"
# Per GPU of a training node: CPU for torchrun's ranks and their DataLoader workers, host memory, both as
# request and limit; /dev/shm is memory-backed and sized to the pod's memory limit, so all scale together.
PER_GPU = {"cpu_request": 8, "cpu_limit": 16, "memory_request_g": 48, "memory_limit_g": 64}
LAUNCHER = {"cpu_request": "1", "cpu_limit": "2", "memory_request": "2G", "memory_limit": "4G"}


@contextlib.contextmanager
def one_line() -> Iterator[None]:
    """A task that fails on a ``UserError`` exits with that one line, not a traceback."""
    try:
        yield
    except UserError as err:
        raise SystemExit(f"atmask pipeline: error: {err}") from None


def node_resources(gpus: int) -> NodeResources:
    """One training node with ``gpus`` GPUs (the train task itself, or each node of a TrainJob)."""
    p = PER_GPU
    return NodeResources(
        gpus,
        str(p["cpu_request"] * gpus),
        str(p["cpu_limit"] * gpus),
        f"{p['memory_request_g'] * gpus}G",
        f"{p['memory_limit_g'] * gpus}G",
    )


def train_task_resources(gpus: int, nodes: int) -> dict[str, Any]:
    """What the pipeline's train task requests: a whole training node for one node; for several, a small
    launcher pod (no GPU, any node) while the TrainJob's pods get the GPUs."""
    if gpus < 1 or nodes < 1:
        raise UserError(f"pipeline parameters gpus_per_node={gpus}, nodes={nodes}: both must be >= 1")
    if nodes > 1:
        return {**LAUNCHER, "gpus": "0", "node_selector": {}}
    res = node_resources(gpus)
    return {
        "cpu_request": res.cpu_request,
        "cpu_limit": res.cpu_limit,
        "memory_request": res.memory_request,
        "memory_limit": res.memory_limit,
        "gpus": str(gpus),
        "node_selector": {"nvidia.com/gpu.present": "true"},
    }


def use_source(git_commit: str, git_repo: str) -> None:
    """Provenance for MLflow's source tags: this task has no git checkout, the submit passed them."""
    os.environ[ENV_SOURCE_TYPE] = "JOB"
    if git_commit:
        os.environ[ENV_COMMIT] = git_commit
    if git_repo:
        os.environ[ENV_REPO] = git_repo


def int_list(values: list, name: str) -> list[int]:
    """A list parameter of integers as KFP hands it over (JSON numbers: ``0`` may arrive as ``0.0``)."""
    if not all(isinstance(v, (int, float)) and float(v).is_integer() for v in values):
        raise UserError(f"pipeline parameter {name}: expected a list of integers, got {values!r}")
    return [int(v) for v in values]


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
    if rc != 0:  # the step printed its one-line error: the task ends on it, without a traceback
        raise SystemExit(rc)


def pull_step(md5: str, remote: str, root: str, name: str) -> str:
    """``atmask pull``: the data version on the shared datasets volume; returns its folder."""
    if not md5 or not remote:
        raise UserError(
            "pipeline parameters data_md5 and dvc_remote must be set; 'atmask pipeline submit' reads them "
            "from dvc.lock and .dvc/config (run 'dvc repro ingest && dvc push' first)"
        )
    call_cli(["pull", "--md5", md5, "--remote", remote, "--root", root, "--name", name])
    return str(data_folder(root, md5, check=False))


def data_folder(root: str, md5: str, check: bool = True) -> Path:
    """Where ``atmask pull`` put the data version ``md5`` under ``root`` (train and evaluate read it)."""
    folder = Path(root) / md5.removesuffix(".dir")
    if check and not folder.with_name(folder.name + ".json").is_file():
        raise UserError(
            f"{folder}: data version {md5} is not on the datasets volume; the pipeline's data task pulls it "
            f"first (mount atmask-datasets at {Path(root).parent})"
        )
    return folder


def gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        return 0


def run_items(params: Path, ablations: list[str], processes: int = 1) -> list[dict[str, Any]]:
    """``[{"ablation": a, "seed": s}, ...]`` for the pipeline's ParallelFor: ablations x train.seeds.

    Checks here, before any GPU is reserved, that the recipe's global batch splits over ``processes``.
    """
    from components.params import load_params

    loaded = load_params(params)
    unknown = [a for a in ablations if a not in loaded.ablations]
    if unknown or not ablations:
        raise UserError(
            f"pipeline parameter ablations: {', '.join(unknown) or '(none)'} not defined under 'ablations'; "
            f"choose from {', '.join(loaded.ablations)}"
        )
    batch = loaded.train.batch_size
    if batch % processes:
        raise UserError(
            f"recipes.{loaded.recipe}.batch_size {batch} (the global batch) is not divisible by "
            f"{processes} processes (nodes x gpus_per_node); change the GPUs or set the batch with overrides"
        )
    return [{"ablation": a, "seed": s} for a in ablations for s in loaded.seeds]


@dataclass(frozen=True)
class MultiNode:
    """Training over several nodes: a TrainJob in this task's namespace, running ``image``."""

    image: str
    nodes: int
    gpus: int
    timeout_s: int
    poll_s: float = 30.0


def train_step(
    params: Path,
    ablation: str,
    seed: int,
    data_dir: Path,
    out_dir: Path,
    work_dir: Path | None = None,
    multinode: MultiNode | None = None,
) -> None:
    """Train into ``work_dir`` (a volume that outlives the pod, so a retried task resumes from its last
    checkpoint) and copy the run without checkpoints to ``out_dir``; train in ``out_dir`` without one.
    With ``multinode`` (nodes > 1) a TrainJob trains into ``work_dir`` instead of this pod."""
    target = work_dir or out_dir
    if multinode is not None and multinode.nodes > 1:
        if work_dir is None:
            raise UserError(
                "multi-node training writes to the atmask-runs volume; set checkpoint_root (and mount it)"
            )
        _train_multinode(params, ablation, seed, data_dir, work_dir, multinode)
    else:
        _train(params, ablation, seed, data_dir, target)
    if work_dir is not None:
        shutil.copytree(work_dir, out_dir, ignore=shutil.ignore_patterns(CHECKPOINT_DIR), dirs_exist_ok=True)


def _train_multinode(
    params: Path, ablation: str, seed: int, data_dir: Path, work: Path, job: MultiNode
) -> None:
    work.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(params, work / PARAMS_FILE)  # the training pods read it from the runs volume
    env = {
        k: os.environ[k]
        for k in (ENV_COMMIT, ENV_REPO, ENV_SOURCE_TYPE, "MLFLOW_TRACKING_URI")
        if os.environ.get(k)
    }
    namespace = os.environ.get(NAMESPACE_ENV) or _pod_namespace()
    req = TrainJobRequest(
        pipeline_run=os.environ.get(RUN_ID_ENV, ""),
        ablation=ablation,
        seed=seed,
        image=job.image,
        namespace=namespace,
        nodes=job.nodes,
        resources=node_resources(job.gpus),
        params=str(work / PARAMS_FILE),
        data_dir=str(data_dir),
        out_dir=str(work),
        timeout_s=job.timeout_s,
        env=env,
    )
    Launcher(api_client(), namespace, os.environ.get(SA_ENV, ""), job.poll_s).run(
        trainjob_manifest(req), job.timeout_s
    )
    if not (work / MODEL_FILE).is_file():
        raise UserError(
            f"TrainJob {namespace}/{req.name} completed but left no {work / MODEL_FILE}; see its log above"
        )


def _pod_namespace() -> str:
    path = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    if not path.is_file():
        raise UserError(
            f"multi-node training needs the task's namespace: set ${NAMESPACE_ENV} or run in a pod"
        )
    return path.read_text(encoding="utf-8").strip()


def checkpoint_dir(checkpoint_root: str, run_id: str, ablation: str, seed: int) -> Path | None:
    """Where a training task keeps its run: ``<root>/<pipeline run>/<ablation>/seed<k>``. A retry of the
    task (same run id) resumes there; a new pipeline run never sees an old run's checkpoints. The folder
    is created here (the volume's group is the pod's fsGroup, so the image's user may write it)."""
    if not checkpoint_root:
        return None
    root = Path(checkpoint_root)
    if not root.is_dir():
        print(
            f"atmask pipeline: {root} is not mounted; training without resumable checkpoints", file=sys.stderr
        )
        return None
    if not run_id:
        print(
            f"atmask pipeline: ${RUN_ID_ENV} is not set; training without resumable checkpoints",
            file=sys.stderr,
        )
        return None
    work = root / run_id / ablation / f"seed{seed}"
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(
            f"{work}: cannot create the checkpoint folder as uid {os.getuid()} ({err.strerror}); the pod needs "
            "fsGroup 10001 on the atmask-runs volume (k8s/base/admission.yaml)"
        ) from None
    return work


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
