"""KFP v2 lightweight Python components of the ablation pipeline.

Each function runs in the project image (``base_image``) with nothing installed at run time
(``packages_to_install=[]``, ``install_kfp_package=False``: the image already has kfp and ``atmask``), so
``kfp.local.SubprocessRunner(use_venv=False)`` runs the very same definitions with this machine's
interpreter. KFP serialises only the function source: the bodies import :mod:`pipelines.runtime`.
"""

from collections.abc import Callable
from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Input, Markdown, Metrics, Model, Output


def config_op(
    params_json: str,
    overrides: str,
    recipe: str,
    ablations: list,
    seeds: list,
    gpus_per_node: int,
    nodes: int,
    params_file: Output[dsl.Artifact],
) -> list:
    """params.yaml for this run (the pipeline's copy with its parameters applied, validated once), and
    the runs to make: one ``{"ablation", "seed"}`` item per pair, the ParallelFor's items. Checks that the
    recipe's global batch splits over ``gpus_per_node`` x ``nodes`` processes before any GPU is reserved."""
    from pathlib import Path

    from pipelines import runtime

    with runtime.one_line():
        seeds = runtime.int_list(seeds, "seeds")
        keys = runtime.pipeline_overrides(overrides, {"train.recipe": recipe, "train.seeds": seeds})
        path = runtime.write_params(params_json, keys, Path(params_file.path))
        return runtime.run_items(path, ablations, gpus_per_node * nodes)


def resources_op(gpus_per_node: int, nodes: int) -> NamedTuple(
    "Resources",
    gpus=str,
    cpu_request=str,
    cpu_limit=str,
    memory_request=str,
    memory_limit=str,
    node_selector=dict,
):
    """What the train task beside it requests for ``gpus_per_node`` x ``nodes``: a whole training node (CPU
    and memory per GPU, /dev/shm sized by the memory), or for several nodes a small launcher pod while the
    TrainJob's pods get the GPUs. A task of its own because KFP sizes a pod only from task outputs."""
    from collections import namedtuple

    from pipelines import runtime

    with runtime.one_line():
        res = runtime.train_task_resources(gpus_per_node, nodes)
    names = ["gpus", "cpu_request", "cpu_limit", "memory_request", "memory_limit", "node_selector"]
    return namedtuple("Resources", names)(*(res[n] for n in names))


def data_op(data_md5: str, dvc_remote: str, data_path: str, data_root: str) -> str:
    """The DVC data version ``data_md5`` on the shared datasets volume (pulled from ``dvc_remote`` once,
    reused after that); returns its folder, ``<data_root>/<hash>``, where train and evaluate (which mount
    the volume read-only and run after this task) find it from the same two parameters. Never cached: it
    is cheap when the version is there, and it must notice when the volume lost it."""
    from pipelines import runtime

    with runtime.one_line():
        return runtime.pull_step(data_md5, dvc_remote, data_root, data_path)


def train_op(
    params_file: Input[dsl.Artifact],
    data_root: str,
    data_md5: str,
    ablation: str,
    seed: int,
    gpus_per_node: int,
    nodes: int,
    image: str,
    train_timeout_s: int,
    git_commit: str,
    git_repo: str,
    mlflow_tracking_uri: str,
    checkpoint_root: str,
    model: Output[Model],
) -> None:
    """Train one (ablation, seed); the Model artifact is the run folder (model.pt, train_log.json,
    mlflow_run.json). One node: torchrun over this pod's GPUs. Several: a TrainJob (same command).

    With ``checkpoint_root`` on a volume (the atmask-runs PVC), a retry of this task resumes.
    """
    import os
    from pathlib import Path

    from pipelines import runtime

    with runtime.one_line():
        runtime.use_tracking_uri(mlflow_tracking_uri)
        runtime.use_source(git_commit, git_repo)
        params = Path(params_file.path) / runtime.PARAMS_FILE
        run_id = os.environ.get(runtime.RUN_ID_ENV, "")
        work = runtime.checkpoint_dir(checkpoint_root, run_id, ablation, seed)
        job = runtime.MultiNode(image, nodes, gpus_per_node, train_timeout_s)
        data_dir = runtime.data_folder(data_root, data_md5)
        runtime.train_step(params, ablation, seed, data_dir, Path(model.path), work, job)
    model.metadata["ablation"] = ablation
    model.metadata["seed"] = seed
    model.metadata["framework"] = "pytorch"


def evaluate_op(
    params_file: Input[dsl.Artifact],
    data_root: str,
    data_md5: str,
    model: Input[Model],
    mlflow_tracking_uri: str,
    evaluated: Output[Model],
    metrics: Output[Metrics],
) -> None:
    """COCO bbox/segm/boundary AP of one trained run; metrics also go to the run's MLflow run."""
    from pathlib import Path

    from pipelines import runtime

    runtime.use_tracking_uri(mlflow_tracking_uri)
    params = Path(params_file.path) / runtime.PARAMS_FILE
    with runtime.one_line():
        data_dir = runtime.data_folder(data_root, data_md5)
        values = runtime.evaluate_step(params, Path(model.path), data_dir, Path(evaluated.path))
    for key, value in sorted(values.items()):
        metrics.log_metric(key.replace("/", "_"), float(value))
    evaluated.metadata["ablation"] = model.metadata.get("ablation", "")
    evaluated.metadata["seed"] = model.metadata.get("seed", "")
    evaluated.metadata["segm_AP"] = float(values["segm/AP"])


def report_op(
    params_file: Input[dsl.Artifact],
    runs: Input[list[Model]],
    mlflow_tracking_uri: str,
    report: Output[Markdown],
    table: Output[Dataset],
) -> None:
    """The ablation table (paper Tables 2-5, mean ± std over seeds, paired intervals against the baseline)
    from every evaluated run of this pipeline run; also logged as the experiment's ``study`` run."""
    import shutil
    import tempfile
    from pathlib import Path

    from pipelines import runtime

    runtime.use_tracking_uri(mlflow_tracking_uri)
    params = Path(params_file.path) / runtime.PARAMS_FILE
    with tempfile.TemporaryDirectory() as tmp:
        runtime.gather_runs([Path(r.path) for r in runs], Path(tmp) / "runs")
        markdown = runtime.report_step(params, Path(tmp) / "runs", Path(tmp) / "reports")
        shutil.copyfile(Path(tmp) / "reports" / "ablations.csv", table.path)
    Path(report.path).write_text(markdown, encoding="utf-8")


def register_op(
    params_file: Input[dsl.Artifact],
    runs: Input[list[Model]],
    mlflow_tracking_uri: str,
    register_candidate: str,
    register_min_improvement: float,
    pipeline_run_id: str,
    decision: Output[dsl.Artifact],
) -> NamedTuple("RegisterOutputs", model_uri=str, alias=str):
    """Register the best (or chosen) run in the MLflow Model Registry; gate the champion alias."""
    import tempfile
    from collections import namedtuple
    from pathlib import Path

    from pipelines import runtime

    runtime.use_tracking_uri(mlflow_tracking_uri)
    gate = {"register.candidate": register_candidate, "register.min_improvement": register_min_improvement}
    with tempfile.TemporaryDirectory() as tmp:
        text = (Path(params_file.path) / runtime.PARAMS_FILE).read_text(encoding="utf-8")
        params = runtime.write_params(text, gate, Path(tmp) / "params")
        runtime.gather_runs([Path(r.path) for r in runs], Path(tmp) / "runs")
        result = runtime.register_step(params, Path(tmp) / "runs", pipeline_run_id, Path(decision.path))
    decision.metadata["version"] = str(result["version"])
    decision.metadata["decision"] = result["decision"]
    outputs = namedtuple("RegisterOutputs", ["model_uri", "alias"])
    uri = result.get("model_uri") or f"models:/{result['model_name']}/{result['version']}"
    return outputs(uri, result["decision"])


FUNCTIONS: dict[str, Callable] = {
    "config": config_op,
    "data": data_op,
    "resources": resources_op,
    "train": train_op,
    "evaluate": evaluate_op,
    "report": report_op,
    "register": register_op,
}


def build_components(image: str) -> dict[str, Callable]:
    """The seven components, each running in ``image`` with no run-time installs."""
    return {
        name: dsl.component(func, base_image=image, packages_to_install=[], install_kfp_package=False)
        for name, func in FUNCTIONS.items()
    }
