"""The ``atmask-ablation`` pipeline: data -> ParallelFor((ablation, seed): train -> evaluate) -> report -> register.

Data by reference, versioned by DVC: ``atmask pipeline submit`` reads the data version from dvc.lock (the
hash of ``data/coco``) and the DVC remote from .dvc/config; the ``data`` task pulls exactly that content
into the shared datasets volume once (``atmask pull``) and passes its folder on; train and evaluate mount
the volume read-only. No dataset travels through the artifact store.

Training: ``gpus_per_node`` x ``nodes`` are run-time parameters. A ``resources`` task turns them into what each
train task requests (CPU, memory and /dev/shm scale with the GPUs); one node trains in the task with
torchrun, several in a Kubeflow Trainer TrainJob that the task launches and follows.

Pipeline parameters take their defaults from params.yaml at compile time (the cluster profile
``cluster:``; the whole file travels as ``params_json``). The image is fixed at compile time (``atmask
pipeline compile --image`` / ``atmask image push``), so a new image is a new component spec and KFP's
cache never reuses results of another image.

What KFP's task API cannot express (read-only volume mounts, fsGroup, PriorityClass) the namespace's
admission policies add to pods by their labels (k8s/base/admission.yaml); the labels are set here.
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
from pipelines import runtime
from pipelines.components import build_components
from pipelines.names import COMPILED, DEFAULT_IMAGE, PIPELINE_NAME
from pipelines.trainjob import (
    DATASETS_MOUNT,
    DATASETS_PVC,
    GPU_NODE_LABEL,
    GPU_PRIORITY_LABEL,
    GPU_RESOURCE,
    MLFLOW_KEYS,
    MLFLOW_SECRET,
    RUNS_MOUNT,
    RUNS_PVC,
    S3_KEYS,
    S3_SECRET,
)

PIPELINE_LABEL = ("atmask.io/pipeline", PIPELINE_NAME)  # every task's pod: fsGroup (admission policy)
READ_ONLY_DATA_LABEL = ("atmask.io/datasets", "read-only")  # the datasets volume becomes read-only
DAY_S = 24 * 3600


@dataclass(frozen=True)
class GpuResources:
    """Compile-time choices: the default GPUs per node (None: params.yaml ``cluster.gpus_per_node``) and
    the retries of preemptible GPU tasks (0 for ``run-local``)."""

    gpus: int | None = None
    retries: int = 3


def pipeline_defaults(params_path: str | Path = "params.yaml") -> dict[str, Any]:
    """Defaults of the pipeline parameters, read from params.yaml (validated first)."""
    path = Path(params_path)
    params = load_params(path)
    return {
        # one line: KFP copies defaults into the YAML header comment, where newlines would break the file
        "params_json": json.dumps(yaml.safe_load(path.read_text(encoding="utf-8")), separators=(",", ":")),
        "ablations": list(params.ablations),
        "seeds": list(params.seeds),
        "recipe": params.cluster.recipe or params.recipe,
        "gpus_per_node": params.cluster.gpus_per_node,
        "nodes": params.cluster.nodes,
        "data_md5": "",  # atmask pipeline submit: from dvc.lock
        "data_path": params.data.out,
        "dvc_remote": "",  # atmask pipeline submit: from .dvc/config
        "git_commit": "",
        "git_repo": "",
        "mlflow_tracking_uri": params.mlflow.tracking_uri or "",
        "register_candidate": params.register.candidate,
        "register_min_improvement": float(params.register.min_improvement),
        "overrides": "{}",
        "data_root": f"{DATASETS_MOUNT}/dvc",
        "checkpoint_root": f"{RUNS_MOUNT}/checkpoints",
        "train_timeout_s": 7 * DAY_S,
    }


def use_secrets(task: dsl.PipelineTask, s3: bool = True, mlflow: bool = True) -> dsl.PipelineTask:
    if s3:
        kubernetes.use_secret_as_env(task, S3_SECRET, {k: k for k in S3_KEYS})
    if mlflow:
        kubernetes.use_secret_as_env(task, MLFLOW_SECRET, {k: k for k in MLFLOW_KEYS})
    return task


def labelled(task: dsl.PipelineTask, *labels: tuple[str, str]) -> dsl.PipelineTask:
    for key, value in (PIPELINE_LABEL, *labels):
        kubernetes.add_pod_label(task, key, value)
    return task


def on_gpu_node(task: dsl.PipelineTask, retries: int, node_selector: Any = None) -> dsl.PipelineTask:
    """GPU placement, a RAM-backed /dev/shm for DataLoader workers (sized to the memory limit), the data
    read-only, the GPU PriorityClass, retries. Resources are set by the caller."""
    task.set_accelerator_type(GPU_RESOURCE)
    kubernetes.empty_dir_mount(task, "dshm", "/dev/shm", medium="Memory")
    if node_selector is None:
        kubernetes.add_node_selector(task, *GPU_NODE_LABEL)
    else:
        kubernetes.add_node_selector_json(task, node_selector)
    kubernetes.add_toleration(task, key=GPU_RESOURCE, operator="Exists", effect="NoSchedule")
    kubernetes.mount_pvc(task, pvc_name=DATASETS_PVC, mount_path=DATASETS_MOUNT)
    labelled(task, READ_ONLY_DATA_LABEL, GPU_PRIORITY_LABEL)
    if retries:
        task.set_retry(retries, backoff_duration="60s", backoff_factor=2.0, backoff_max_duration="3600s")
    return task


def on_cpu_node(task: dsl.PipelineTask, cpu: str, memory: str, retries: int = 2) -> dsl.PipelineTask:
    task.set_cpu_request(cpu).set_cpu_limit(cpu).set_memory_request(memory).set_memory_limit(memory)
    labelled(task)
    return task.set_retry(retries, backoff_duration="30s") if retries else task


def from_pod(task: dsl.PipelineTask) -> dsl.PipelineTask:
    """The KFP run id (labels every pod of a run; a retry keeps it), namespace and ServiceAccount."""
    kubernetes.use_field_path_as_env(task, runtime.RUN_ID_ENV, "metadata.labels['pipeline/runid']")
    kubernetes.use_field_path_as_env(task, runtime.NAMESPACE_ENV, "metadata.namespace")
    return kubernetes.use_field_path_as_env(task, runtime.SA_ENV, "spec.serviceAccountName")


class _Dag:
    """Adds the tasks to the pipeline being built; ``p`` holds the pipeline's parameters (channels)."""

    def __init__(self, ops: dict[str, Callable], image: str, res: GpuResources, p: dict[str, Any]) -> None:
        self.ops, self.image, self.res, self.p = ops, image, res, p
        self.cpu_retries = 2 if res.retries else 0

    def head(self) -> tuple[dsl.PipelineTask, dsl.PipelineTask]:
        p = self.p
        keys = ("params_json", "overrides", "recipe", "ablations", "seeds", "gpus_per_node", "nodes")
        config = self.ops["config"](**{k: p[k] for k in keys}).set_display_name("config")
        on_cpu_node(config, "1", "1G", self.cpu_retries)
        keys = ("data_md5", "dvc_remote", "data_path", "data_root")
        data = self.ops["data"](**{k: p[k] for k in keys}).set_display_name("data").set_caching_options(False)
        on_cpu_node(use_secrets(data, mlflow=False), "4", "8G", self.cpu_retries)
        kubernetes.mount_pvc(data, pvc_name=DATASETS_PVC, mount_path=DATASETS_MOUNT)  # the only writer
        return config, data

    def train(self, params_file: Any, run: Any, data: dsl.PipelineTask) -> dsl.PipelineTask:
        """resources -> train: one node with torchrun, or a launcher pod for a TrainJob."""
        p = self.p
        pod = self.ops["resources"](gpus_per_node=p["gpus_per_node"], nodes=p["nodes"])
        on_cpu_node(pod.set_display_name("resources"), "500m", "512M", self.cpu_retries)
        keys = (
            "data_root",
            "data_md5",
            "gpus_per_node",
            "nodes",
            "train_timeout_s",
            "git_commit",
            "git_repo",
        )
        keys += ("mlflow_tracking_uri", "checkpoint_root")
        train = self.ops["train"](
            params_file=params_file,
            ablation=run.ablation,
            seed=run.seed,
            image=self.image,
            **{k: p[k] for k in keys},
        ).set_display_name("train")
        train.after(data)
        train.set_accelerator_limit(pod.outputs["gpus"])
        train.set_cpu_request(pod.outputs["cpu_request"]).set_cpu_limit(pod.outputs["cpu_limit"])
        train.set_memory_request(pod.outputs["memory_request"]).set_memory_limit(pod.outputs["memory_limit"])
        on_gpu_node(from_pod(use_secrets(train)), self.res.retries, pod.outputs["node_selector"])
        return kubernetes.mount_pvc(train, pvc_name=RUNS_PVC, mount_path=RUNS_MOUNT)

    def evaluate(self, params_file: Any, train: dsl.PipelineTask) -> dsl.PipelineTask:
        p = self.p
        evaluate = self.ops["evaluate"](
            params_file=params_file,
            data_root=p["data_root"],
            data_md5=p["data_md5"],
            model=train.outputs["model"],
            mlflow_tracking_uri=p["mlflow_tracking_uri"],
        ).set_display_name("evaluate")
        one = runtime.node_resources(1)
        evaluate.set_accelerator_limit(1).set_cpu_request(one.cpu_request).set_cpu_limit(one.cpu_limit)
        evaluate.set_memory_request(one.memory_request).set_memory_limit(one.memory_limit)
        return on_gpu_node(use_secrets(evaluate), self.res.retries)

    def tail(self, params_file: Any, evaluate: dsl.PipelineTask) -> None:
        p = self.p
        runs = dsl.Collected(evaluate.outputs["evaluated"])
        uri = p["mlflow_tracking_uri"]
        report = self.ops["report"](params_file=params_file, runs=runs, mlflow_tracking_uri=uri)
        on_cpu_node(use_secrets(report.set_display_name("report"), s3=False), "1", "4G", self.cpu_retries)
        register = self.ops["register"](
            params_file=params_file,
            runs=dsl.Collected(evaluate.outputs["evaluated"]),
            mlflow_tracking_uri=uri,
            register_candidate=p["register_candidate"],
            register_min_improvement=p["register_min_improvement"],
            pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        ).set_display_name("register")
        # The gate compares with the registry's current champion, which changes outside this pipeline.
        register.after(report).set_caching_options(False)
        on_cpu_node(use_secrets(register), "2", "8G", self.cpu_retries)


def build_pipeline(
    image: str = DEFAULT_IMAGE,
    params_path: str | Path = "params.yaml",
    resources: GpuResources | None = None,
) -> Callable:
    """The pipeline function, with parameter defaults from ``params_path`` and components in ``image``."""
    d = pipeline_defaults(params_path)
    res = resources or GpuResources()
    ops = build_components(image)

    @dsl.pipeline(name=PIPELINE_NAME, description="ATMask R-CNN ablations: train, evaluate, report, register")
    def atmask_ablation(
        params_json: str = d["params_json"],
        ablations: list = d["ablations"],
        seeds: list = d["seeds"],
        recipe: str = d["recipe"],
        gpus_per_node: int = res.gpus or d["gpus_per_node"],
        nodes: int = d["nodes"],
        data_md5: str = d["data_md5"],
        data_path: str = d["data_path"],
        dvc_remote: str = d["dvc_remote"],
        git_commit: str = d["git_commit"],
        git_repo: str = d["git_repo"],
        mlflow_tracking_uri: str = d["mlflow_tracking_uri"],
        register_candidate: str = d["register_candidate"],
        register_min_improvement: float = d["register_min_improvement"],
        overrides: str = d["overrides"],
        data_root: str = d["data_root"],
        checkpoint_root: str = d["checkpoint_root"],
        train_timeout_s: int = d["train_timeout_s"],
    ) -> None:
        dag = _Dag(ops, image, res, dict(locals()))
        config, data = dag.head()
        params_file = config.outputs["params_file"]
        with dsl.ParallelFor(items=config.outputs["Output"]) as run:  # one item per (ablation, seed)
            evaluate = dag.evaluate(params_file, dag.train(params_file, run, data))
        dag.tail(params_file, evaluate)

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
