"""``atmask register``: log the chosen run to the MLflow Model Registry, with a gate on the champion alias.

1. Candidates are the evaluated runs under ``--runs`` (``model.pt`` + ``metrics.json`` + ``eval_info.json``).
   ``--candidate best`` takes the highest ``register.metric`` (``segm/AP``); ``--candidate <ablation>``
   the best run of that ablation.
2. Idempotent: a version whose ``model_sha256`` tag equals the candidate's ``model.pt`` sha256 means the
   run is already registered; nothing new is created (decision ``unchanged``).
3. Otherwise the run is logged as a pyfunc model (:mod:`components.pyfunc_model`; artifact: the
   weights-only ``model.pt``) and registered as a new version of ``register.model_name`` with tags
   ``ablation``, ``metric.<name>`` (every metric, '/' -> '_'), ``git_commit``, ``data_hash``,
   ``pipeline_run_id``, ``model_sha256``, ``source_run``.
4. Gate: alias ``champion`` moves to the new version only if its metric beats the current champion's
   and the best ``baseline`` run's of the same set of runs by more than ``register.min_improvement``
   (the baseline comparison is skipped when the candidate is itself a baseline run, or the set has
   none). Otherwise the version gets alias ``challenger`` and the reason is printed.
5. ``reports/registry.json`` (atomic) describes the decision.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from components.checkpoint import MODEL_FILE, sha256_file
from components.errors import UserError
from components.io import write_json_atomic
from components.params import Params, load_params
from components.provenance import git_commit
from components.run_layout import INFO_FILE, METRICS_FILE
from components.tracking import check_reachable, mlflow_key, read_mlflow_run, tracking_uri

REPO_ROOT = Path(__file__).resolve().parents[1]
CHAMPION, CHALLENGER = "champion", "challenger"


@dataclass(frozen=True)
class Candidate:
    run_dir: Path
    ablation: str
    metrics: dict[str, float]
    info: dict[str, Any]

    def value(self, metric: str) -> float:
        return float(self.metrics[metric])


# ------------------------------------------------------------------ candidates


def load_candidates(runs_dir: Path) -> list[Candidate]:
    if not runs_dir.is_dir():
        raise UserError(f"{runs_dir}: runs folder not found; pass --runs with the folder holding runs/<name>")
    found = []
    for run in sorted({p.parent for p in runs_dir.rglob(MODEL_FILE)}):  # runs/<ablation>/seed<k>
        if not all((run / f).is_file() for f in (MODEL_FILE, METRICS_FILE, INFO_FILE)):
            continue
        try:
            metrics = json.loads((run / METRICS_FILE).read_text(encoding="utf-8"))
            info = json.loads((run / INFO_FILE).read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise UserError(
                f"{run}: unreadable {METRICS_FILE} / {INFO_FILE} ({err}); re-run 'atmask evaluate'"
            ) from None
        found.append(Candidate(run, info["ablation"], metrics, info))
    if not found:
        raise UserError(
            f"{runs_dir}: no evaluated runs (model.pt + metrics.json + eval_info.json); run 'atmask evaluate' first"
        )
    return found


def choose(cands: list[Candidate], which: str, metric: str) -> Candidate:
    if any(metric not in c.metrics for c in cands):
        raise UserError(f"register.metric: {metric!r} is not in the runs' metrics.json (e.g. segm/AP)")
    pool = cands if which == "best" else [c for c in cands if c.ablation == which]
    if not pool:
        have = ", ".join(sorted({c.ablation for c in cands}))
        raise UserError(f"--candidate {which!r}: no evaluated run of that ablation; evaluated: {have}")
    return max(pool, key=lambda c: (c.value(metric), str(c.run_dir)))


# ------------------------------------------------------------------ gate


def gate(
    cand: Candidate, cands: list[Candidate], champion: tuple[str, float] | None, metric: str, margin: float
) -> tuple[bool, str]:
    """``(promote?, reason)``: beat the current champion and the best baseline run by more than ``margin``."""
    value = cand.value(metric)
    reasons = []
    if champion is not None and not value > champion[1] + margin:
        reasons.append(
            f"{metric} {value:.4f} does not beat champion v{champion[0]} ({champion[1]:.4f}) by > {margin}"
        )
    baselines = [c.value(metric) for c in cands if c.ablation == "baseline"]
    if cand.ablation != "baseline" and baselines and not value > max(baselines) + margin:
        reasons.append(
            f"{metric} {value:.4f} does not beat the baseline run ({max(baselines):.4f}) by > {margin}"
        )
    if reasons:
        return False, "; ".join(reasons)
    against = f"champion v{champion[0]} ({champion[1]:.4f})" if champion else "no champion yet"
    if cand.ablation == "baseline" or not baselines:
        base = "no baseline comparison: " + (
            "it is the baseline" if baselines else "no baseline run in this set"
        )
    else:
        base = f"the baseline run ({max(baselines):.4f})"
    return True, f"{metric} {value:.4f} beats {against}; {base}; margin {margin}"


def current_champion(client: Any, name: str, metric: str) -> tuple[str, float] | None:
    from mlflow.exceptions import MlflowException

    try:
        mv = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None
    value = mv.tags.get(f"metric.{mlflow_key(metric)}")
    return (str(mv.version), float(value) if value is not None else float("-inf"))


# ------------------------------------------------------------------ MLflow


def version_tags(cand: Candidate, sha: str, pipeline_run_id: str | None) -> dict[str, str]:
    tags = {
        "ablation": cand.ablation,
        "git_commit": git_commit(REPO_ROOT),
        "data_hash": str(cand.info.get("data_checksum") or "unknown"),
        "pipeline_run_id": pipeline_run_id or "none",
        "model_sha256": sha,
        "source_run": str(cand.run_dir),
    }
    tags.update({f"metric.{mlflow_key(k)}": repr(float(v)) for k, v in cand.metrics.items()})
    return tags


def find_registered(client: Any, name: str, sha: str) -> Any | None:
    found = client.search_model_versions(f"name = '{name}' and tags.model_sha256 = '{sha}'")
    return min(found, key=lambda mv: int(mv.version)) if found else None


def requirements() -> list[str]:
    names = ["torch", "torchvision", "pycocotools", "pillow", "numpy", "pandas", "mlflow"]
    pins = []
    for name in names:
        try:
            pins.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            pins.append(name)
    return pins


def log_pyfunc(cand: Candidate, params: Params) -> Any:
    """Log the run as a pyfunc model into its training run (or a new run); returns ModelInfo."""
    import mlflow
    from mlflow.models import infer_signature

    from components import pyfunc_model

    record = read_mlflow_run(cand.run_dir)
    if (
        record is not None
        and record.get("tracking_uri", mlflow.get_tracking_uri()) == mlflow.get_tracking_uri()
    ):
        active = mlflow.start_run(run_id=record["run_id"])
    else:
        mlflow.set_experiment(params.mlflow.experiment)
        active = mlflow.start_run(run_name=f"register-{cand.run_dir.name}", tags={"ablation": cand.ablation})
    example = pyfunc_model.input_example()
    signature = infer_signature(example, params={"score_threshold": pyfunc_model.DEFAULT_SCORE_THRESHOLD})
    with active:
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=pyfunc_model.ATMaskPyfunc(),
            artifacts={"model_pt": str(cand.run_dir / MODEL_FILE)},
            code_paths=[str(REPO_ROOT / "components"), str(REPO_ROOT / "model")],
            signature=signature,
            input_example=example,
            pip_requirements=requirements(),
        )


def _mlflow_client(params: Params) -> tuple[Any, str]:
    import mlflow

    uri = tracking_uri(params)
    check_reachable(uri, "MLflow tracking/registry server")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri), uri


def ensure_model(client: Any, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(
            name, description="ATMask R-CNN / Mask R-CNN instance segmentation (pyfunc)"
        )


# ------------------------------------------------------------------ the step


def register(
    params: Params,
    runs_dir: str | Path = "runs",
    candidate: str | None = None,
    pipeline_run_id: str | None = None,
    out: str | Path = "reports/registry.json",
) -> dict[str, Any]:
    """Register the chosen run and apply the gate; returns (and writes to ``out``) the decision."""
    reg = params.register
    cands = load_candidates(Path(runs_dir))
    cand = choose(cands, candidate or reg.candidate, reg.metric)
    sha = sha256_file(cand.run_dir / MODEL_FILE)
    client, uri = _mlflow_client(params)
    name = reg.model_name
    decision: dict[str, Any] = {
        "model_name": name,
        "tracking_uri": uri,
        "metric": reg.metric,
        "candidate": {"run": str(cand.run_dir), "ablation": cand.ablation, "value": cand.value(reg.metric)},
        "model_sha256": sha,
    }
    existing = find_registered(client, name, sha)
    if existing is not None:
        aliases = sorted(client.get_model_version(name, existing.version).aliases)
        reason = f"{cand.run_dir} is already registered as version {existing.version}; nothing to do"
        decision.update(version=str(existing.version), decision="unchanged", aliases=aliases, reason=reason)
    else:
        decision.update(register_new(client, params, cand, cands, sha, pipeline_run_id))
    write_json_atomic(out, decision)
    print(f"atmask register: {name} v{decision['version']}: {decision['decision']} - {decision['reason']}")
    return decision


def register_new(client, params: Params, cand: Candidate, cands, sha: str, pipeline_run_id) -> dict[str, Any]:
    import mlflow

    reg = params.register
    ensure_model(client, reg.model_name)
    champion = current_champion(client, reg.model_name, reg.metric)
    promote, reason = gate(cand, cands, champion, reg.metric, reg.min_improvement)
    info = log_pyfunc(cand, params)
    mv = mlflow.register_model(info.model_uri, reg.model_name, tags=version_tags(cand, sha, pipeline_run_id))
    alias = CHAMPION if promote else CHALLENGER
    client.set_registered_model_alias(reg.model_name, alias, mv.version)
    client.set_model_version_tag(reg.model_name, mv.version, "gate", reason)
    return {
        "version": str(mv.version),
        "decision": alias,
        "aliases": [alias],
        "reason": reason,
        "previous_champion": {"version": champion[0], "value": champion[1]} if champion else None,
        "model_uri": f"models:/{reg.model_name}/{mv.version}",
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--runs", type=Path, default=Path("runs"), help="folder of evaluated runs (default: runs)"
    )
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file")
    parser.add_argument("--candidate", help="best, or an ablation name (default: params register.candidate)")
    parser.add_argument(
        "--pipeline-run-id", help="id of the pipeline run that produced the runs (a version tag)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("reports/registry.json"),
        help="decision file (default: reports/registry.json)",
    )


def run(args: argparse.Namespace) -> int:
    params = load_params(args.params)
    register(params, args.runs, args.candidate, args.pipeline_run_id, args.out)
    return 0
