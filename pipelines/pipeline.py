"""The ``atmask-ablation`` pipeline: ingest -> ParallelFor(ablations: train -> evaluate) -> report -> register.

A ``fingerprint`` task (never cached) hashes the data source's listing before ingest, and ingest takes the
hash as an input: KFP's cache reuses the dataset only while the source's content is unchanged.

Pipeline parameters take their defaults from params.yaml at compile time (the whole file travels as
``params_json``; the parameters below override single keys of it). The image is fixed at compile time
(``atmask pipeline compile --image`` / ``atmask image push``), so a new image is a new component spec and
KFP's cache never reuses results of another image.
"""

import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from kfp import compiler, dsl, kubernetes

from components.errors import UserError
from components.io import write_text_atomic
from components.params import load_params
from pipelines.components import build_components
from pipelines.names import COMPILED, DEFAULT_IMAGE, PIPELINE_NAME

S3_SECRET = "atmask-s3"  # keys: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL
MLFLOW_SECRET = "atmask-mlflow-client"  # keys: MLFLOW_TRACKING_URI, MLFLOW_TRACKING_USERNAME/PASSWORD
S3_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL")
MLFLOW_KEYS = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
GPU_RESOURCE = "nvidia.com/gpu"
GPU_NODE_LABEL = ("nvidia.com/gpu.present", "true")  # set by NVIDIA GPU feature discovery
RUNS_PVC = "atmask-runs"  # k8s/base/storage.yaml; training checkpoints survive a preempted pod there
RUNS_MOUNT = "/mnt/atmask-runs"


@dataclass(frozen=True)
class GpuResources:
    """What one training (or evaluation) pod asks for; the node's GPUs are used with torchrun."""

    gpus: int = 1
    cpu_request: str = "8"
    cpu_limit: str = "16"
    memory_request: str = "48G"
    memory_limit: str = "64G"
    shm_size: str = "16Gi"
    retries: int = 3  # preemptible GPU nodes


def pipeline_defaults(params_path: str | Path = "params.yaml") -> dict[str, Any]:
    """Defaults of the pipeline parameters, read from params.yaml (validated first)."""
    path = Path(params_path)
    params = load_params(path)
    return {
        # one line: KFP copies defaults into the YAML header comment, where newlines would break the file
        "params_json": json.dumps(yaml.safe_load(path.read_text(encoding="utf-8")), separators=(",", ":")),
        "data_source": params.data.source,
        "ablations": list(params.ablations),
        "seeds": list(params.seeds),
        "recipe": params.recipe,
        "mlflow_tracking_uri": params.mlflow.tracking_uri or "",
        "register_candidate": params.register.candidate,
        "register_min_improvement": float(params.register.min_improvement),
        "overrides": "{}",
        "checkpoint_root": f"{RUNS_MOUNT}/checkpoints",
    }


def use_secrets(task: dsl.PipelineTask, s3: bool = True, mlflow: bool = True) -> dsl.PipelineTask:
    if s3:
        kubernetes.use_secret_as_env(task, S3_SECRET, {k: k for k in S3_KEYS})
    if mlflow:
        kubernetes.use_secret_as_env(task, MLFLOW_SECRET, {k: k for k in MLFLOW_KEYS})
    return task


def on_gpu_node(task: dsl.PipelineTask, res: GpuResources) -> dsl.PipelineTask:
    """GPUs, CPU/memory, a RAM-backed /dev/shm for DataLoader workers, GPU node placement, retries."""
    task.set_accelerator_type(GPU_RESOURCE).set_accelerator_limit(res.gpus)
    task.set_cpu_request(res.cpu_request).set_cpu_limit(res.cpu_limit)
    task.set_memory_request(res.memory_request).set_memory_limit(res.memory_limit)
    kubernetes.empty_dir_mount(task, "dshm", "/dev/shm", medium="Memory", size_limit=res.shm_size)
    kubernetes.add_node_selector(task, *GPU_NODE_LABEL)
    kubernetes.add_toleration(task, key=GPU_RESOURCE, operator="Exists", effect="NoSchedule")
    if res.retries:
        task.set_retry(res.retries, backoff_duration="60s", backoff_factor=2.0, backoff_max_duration="3600s")
    return task


def on_cpu_node(task: dsl.PipelineTask, cpu: str, memory: str, retries: int = 2) -> dsl.PipelineTask:
    task.set_cpu_request(cpu).set_cpu_limit(cpu).set_memory_request(memory).set_memory_limit(memory)
    return task.set_retry(retries, backoff_duration="30s") if retries else task


def build_pipeline(
    image: str = DEFAULT_IMAGE,
    params_path: str | Path = "params.yaml",
    resources: GpuResources | None = None,
) -> Callable:
    """The pipeline function, with parameter defaults from ``params_path`` and components in ``image``."""
    d = pipeline_defaults(params_path)
    res = resources or GpuResources()
    ops = build_components(image)

    @dsl.pipeline(name=PIPELINE_NAME, description="ATMask R-CNN ablations: ingest, train, evaluate, report")
    def atmask_ablation(
        params_json: str = d["params_json"],
        data_source: str = d["data_source"],
        ablations: list = d["ablations"],
        seeds: list = d["seeds"],
        recipe: str = d["recipe"],
        mlflow_tracking_uri: str = d["mlflow_tracking_uri"],
        register_candidate: str = d["register_candidate"],
        register_min_improvement: float = d["register_min_improvement"],
        overrides: str = d["overrides"],
        checkpoint_root: str = d["checkpoint_root"],
    ) -> None:
        config = ops["config"](
            params_json=params_json,
            overrides=overrides,
            data_source=data_source,
            recipe=recipe,
            ablations=ablations,
            seeds=seeds,
        ).set_display_name("config")
        cpu_retries = 2 if res.retries else 0
        on_cpu_node(config, "1", "1G", cpu_retries)
        fingerprint = ops["fingerprint"](
            params_json=params_json, overrides=overrides, data_source=data_source
        )
        fingerprint.set_display_name("fingerprint").set_caching_options(False)
        on_cpu_node(use_secrets(fingerprint, mlflow=False), "1", "2G", cpu_retries)
        ingest = ops["ingest"](
            params_json=params_json,
            overrides=overrides,
            data_source=data_source,
            source_fingerprint=fingerprint.output,
        )
        on_cpu_node(use_secrets(ingest.set_display_name("ingest"), mlflow=False), "4", "16G", cpu_retries)
        params_file, data = config.outputs["params_file"], ingest.outputs["data"]
        with dsl.ParallelFor(items=config.outputs["Output"]) as run:  # one item per (ablation, seed)
            train = ops["train"](
                params_file=params_file,
                data=data,
                ablation=run.ablation,
                seed=run.seed,
                mlflow_tracking_uri=mlflow_tracking_uri,
                checkpoint_root=checkpoint_root,
            ).set_display_name("train")
            on_gpu_node(use_secrets(train), res)
            kubernetes.mount_pvc(train, pvc_name=RUNS_PVC, mount_path=RUNS_MOUNT)
            evaluate = ops["evaluate"](
                params_file=params_file,
                data=data,
                model=train.outputs["model"],
                mlflow_tracking_uri=mlflow_tracking_uri,
            ).set_display_name("evaluate")
            on_gpu_node(use_secrets(evaluate), GpuResources(gpus=1, retries=res.retries))
        report = ops["report"](
            params_file=params_file,
            runs=dsl.Collected(evaluate.outputs["evaluated"]),
            mlflow_tracking_uri=mlflow_tracking_uri,
        ).set_display_name("report")
        on_cpu_node(use_secrets(report, s3=False), "1", "4G", cpu_retries)
        register = ops["register"](
            params_file=params_file,
            runs=dsl.Collected(evaluate.outputs["evaluated"]),
            mlflow_tracking_uri=mlflow_tracking_uri,
            register_candidate=register_candidate,
            register_min_improvement=register_min_improvement,
            pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        ).set_display_name("register")
        # The gate compares with the registry's current champion, which changes outside this pipeline.
        register.after(report).set_caching_options(False)
        on_cpu_node(use_secrets(register), "2", "8G", cpu_retries)

    return atmask_ablation


def compile_pipeline(
    out: str | Path = COMPILED,
    image: str = DEFAULT_IMAGE,
    params_path: str | Path = "params.yaml",
    resources: GpuResources | None = None,
) -> Path:
    """Compile to ``out`` (atomically: a failed compile leaves the previous file in place)."""
    out = Path(out)
    func = build_pipeline(image, params_path, resources)
    with tempfile.TemporaryDirectory() as tmp:
        compiled = Path(tmp) / "pipeline.yaml"  # KFP insists on a .yaml suffix
        compiler.Compiler().compile(func, str(compiled))
        write_text_atomic(out, compiled.read_text(encoding="utf-8"))
    return out


def compiled_image(path: str | Path = COMPILED) -> str | None:
    """The image the compiled pipeline runs in (the same for every component), or None if not compiled."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        executors = next(yaml.safe_load_all(path.read_text(encoding="utf-8")))["deploymentSpec"]["executors"]
    except (yaml.YAMLError, KeyError, TypeError, StopIteration) as err:
        raise UserError(f"{path}: not a compiled pipeline ({type(err).__name__}); pass --image") from None
    images = {e["container"]["image"] for e in executors.values()}
    if len(images) != 1:
        raise UserError(f"{path}: components use different images {sorted(images)}; recompile")
    return images.pop()
