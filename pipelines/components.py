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
    data_source: str,
    recipe: str,
    ablations: list,
    seeds: list,
    params_file: Output[dsl.Artifact],
) -> list:
    """params.yaml for this run (the pipeline's copy with its parameters applied, validated once), and
    the runs to make: one ``{"ablation", "seed"}`` item per pair, the ParallelFor's items."""
    from pathlib import Path

    from pipelines import runtime

    keys = {"data.source": data_source, "train.recipe": recipe, "train.seeds": seeds}
    keys = runtime.pipeline_overrides(overrides, keys)
    path = runtime.write_params(params_json, keys, Path(params_file.path))
    return runtime.run_items(path, ablations)


def fingerprint_op(params_json: str, overrides: str, data_source: str) -> str:
    """The source's fingerprint (listings, sizes, ETags; nothing downloaded). Never cached: it is what lets
    the ingest task's cache notice that the objects behind an unchanged ``s3://`` or URL have changed."""
    import tempfile
    from pathlib import Path

    from pipelines import runtime

    keys = runtime.pipeline_overrides(overrides, {"data.source": data_source})
    with tempfile.TemporaryDirectory() as tmp:
        return runtime.fingerprint_step(runtime.write_params(params_json, keys, Path(tmp)), data_source)


def ingest_op(
    params_json: str, overrides: str, data_source: str, source_fingerprint: str, data: Output[Dataset]
) -> None:
    """Validate and normalise the COCO source into the Dataset artifact.

    Takes only what the data depends on (``source_fingerprint`` included), so a new recipe or registry
    gate reuses the cached dataset, and changed source objects do not.
    """
    import tempfile
    from pathlib import Path

    from pipelines import runtime

    keys = runtime.pipeline_overrides(overrides, {"data.source": data_source})
    with tempfile.TemporaryDirectory() as tmp:
        params = runtime.write_params(params_json, keys, Path(tmp))
        manifest = runtime.ingest_step(params, data_source, Path(data.path))
    data.metadata["checksum"] = manifest.get("checksum", "")
    data.metadata["source_fingerprint"] = source_fingerprint
    data.metadata["source"] = data_source


def train_op(
    params_file: Input[dsl.Artifact],
    data: Input[Dataset],
    ablation: str,
    seed: int,
    mlflow_tracking_uri: str,
    checkpoint_root: str,
    model: Output[Model],
) -> None:
    """Train one (ablation, seed); the Model artifact is the run folder (model.pt, train_log.json,
    mlflow_run.json).

    With ``checkpoint_root`` on a volume (the atmask-runs PVC), a retry after preemption resumes.
    """
    from pathlib import Path

    from pipelines import runtime

    runtime.use_tracking_uri(mlflow_tracking_uri)
    params = Path(params_file.path) / runtime.PARAMS_FILE
    work = runtime.checkpoint_dir(checkpoint_root, params, ablation, seed, data.metadata.get("checksum", ""))
    runtime.train_step(params, ablation, seed, Path(data.path), Path(model.path), work)
    model.metadata["ablation"] = ablation
    model.metadata["seed"] = seed
    model.metadata["framework"] = "pytorch"


def evaluate_op(
    params_file: Input[dsl.Artifact],
    data: Input[Dataset],
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
    values = runtime.evaluate_step(params, Path(model.path), Path(data.path), Path(evaluated.path))
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
    "fingerprint": fingerprint_op,
    "ingest": ingest_op,
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
