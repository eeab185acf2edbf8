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
5. Several writers: MLflow has no compare-and-set on aliases, so two registrations that read the same
   champion could both pass the gate and the slower write would win. Instead, a version that beats its
   baseline is tagged ``gate_eligible=true`` and, once registered, :func:`converge` moves ``champion`` to
   the best eligible version and re-reads until a read finds nothing to move. Whatever the interleaving,
   after the last registration returns the champion is the best eligible version; a version that passed
   the gate but lost to one registered at the same time becomes ``challenger`` with that reason. Versions
   that existed when ``atmask promote`` last moved the champion by hand are not eligible any more.
6. ``reports/registry.json`` (atomic) describes the decision.
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
from components.images import ImageLimits
from components.io import write_json_atomic
from components.params import Params, load_params
from components.provenance import git_commit
from components.run_layout import INFO_FILE, METRICS_FILE
from components.tracking import check_reachable, mlflow_key, read_mlflow_run, tracking_uri

PACKAGES_ROOT = Path(__file__).resolve().parents[1]  # model/ and components/ as installed
CHAMPION, CHALLENGER = "champion", "challenger"
ELIGIBLE_TAG = "gate_eligible"  # version tag: "true" when it beats its own run set's baseline
FLOOR_TAG = "champion_floor"  # registered-model tag set by `atmask promote`: versions <= it are not eligible
CONVERGE_ROUNDS = 50


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
    if not beats_baseline(cand, cands, metric, margin):
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


def beats_baseline(cand: Candidate, cands: list[Candidate], metric: str, margin: float) -> bool:
    """The part of the gate that does not depend on the registry: eligibility to be champion at all."""
    baselines = [c.value(metric) for c in cands if c.ablation == "baseline"]
    return cand.ablation == "baseline" or not baselines or cand.value(metric) > max(baselines) + margin


def current_champion(client: Any, name: str, metric: str) -> tuple[str, float] | None:
    from mlflow.exceptions import MlflowException

    try:
        mv = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None
    value = mv.tags.get(f"metric.{mlflow_key(metric)}")
    return (str(mv.version), float(value) if value is not None else float("-inf"))


# ------------------------------------------------------------------ MLflow


def code_commit() -> str:
    """The commit of the checkout the installed code lives in (a venv inside the repository), else of the
    working directory's; $ATMASK_GIT_COMMIT in images."""
    commit = git_commit(PACKAGES_ROOT)
    return commit if commit != "unknown" else git_commit()


def version_tags(cand: Candidate, sha: str, pipeline_run_id: str | None) -> dict[str, str]:
    tags = {
        "ablation": cand.ablation,
        "git_commit": code_commit(),
        "data_hash": str(cand.info.get("data_checksum") or "unknown"),
        "pipeline_run_id": pipeline_run_id or "none",
        "model_sha256": sha,
        "source_run": str(cand.run_dir),
    }
    tags.update({f"metric.{mlflow_key(k)}": repr(float(v)) for k, v in cand.metrics.items()})
    return tags


def best_eligible(client: Any, name: str, metric: str) -> tuple[str, float] | None:
    """(version, value) of the eligible version with the highest ``metric`` (ties: the older version)."""
    floor = int(client.get_registered_model(name).tags.get(FLOOR_TAG, 0))
    key = f"metric.{mlflow_key(metric)}"
    found = [
        (str(mv.version), float(mv.tags[key]))
        for mv in client.search_model_versions(f"name = '{name}' and tags.{ELIGIBLE_TAG} = 'true'")
        if int(mv.version) > floor and key in mv.tags and mv.status == "READY"
    ]
    return max(found, key=lambda v: (v[1], -int(v[0]))) if found else None


Move = tuple[str | None, str, float]  # (champion before, champion after, its metric)


def converge(
    client: Any, name: str, metric: str, margin: float
) -> tuple[tuple[str, float] | None, list[Move]]:
    """Move ``champion`` to the best eligible version until a fresh read finds nothing to move; returns
    the champion then, and the moves this call made. The gate's rule holds: the alias only moves to a
    version that beats the current champion by more than ``margin``.

    Correct with concurrent writers because every writer re-reads after its own write: the last alias
    write is followed by its writer's read, which sees every version registered before it, and a version
    registered after that read is checked by its own registration's converge.
    """
    moves: list[Move] = []
    for _ in range(CONVERGE_ROUNDS):
        champion = current_champion(client, name, metric)
        best = best_eligible(client, name, metric)
        if best is None or (champion is not None and not best[1] > champion[1] + margin):
            return champion, moves
        if champion is not None and best[0] == champion[0]:
            return champion, moves
        client.set_registered_model_alias(name, CHAMPION, best[0])
        moves.append((champion[0] if champion else None, best[0], best[1]))
    raise UserError(
        f"model {name!r}: the champion alias did not settle after {CONVERGE_ROUNDS} re-reads (many "
        "registrations at once?); run 'atmask register' again, it is idempotent"
    )


def mark_superseded(client: Any, name: str, moves: list[Move], read_before: str | None, metric: str) -> None:
    """A champion this registration displaced that it had not read before registering was registered at
    the same time and lost the race: tag it ``superseded_by`` and make it the challenger. (Displacing the
    champion it had read is the ordinary sequential case; a manual promotion is left alone.)"""
    for old, new, value in moves:
        if old is None or old in (read_before, new):
            continue
        if "promoted_manually" in client.get_model_version(name, old).tags:
            continue
        note = f"v{new} ({metric} {value:.4f}), registered at the same time, is better and took the champion alias"
        client.set_model_version_tag(name, old, "superseded_by", note)
        client.set_registered_model_alias(name, CHALLENGER, old)


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


def pyfunc_spec(model_pt: Path, limits: ImageLimits | None = None) -> dict[str, Any]:
    """Keyword arguments of ``mlflow.pyfunc.log_model``/``save_model`` for a ``model.pt``: what is registered.
    ``limits``: the largest input image the served model accepts (``model_config``)."""
    from mlflow.models import infer_signature

    from components import pyfunc_model

    example = pyfunc_model.input_example()
    signature = infer_signature(example, params={"score_threshold": pyfunc_model.DEFAULT_SCORE_THRESHOLD})
    return {
        "python_model": pyfunc_model.ATMaskPyfunc(),
        "artifacts": {"model_pt": str(model_pt)},
        "code_paths": [str(PACKAGES_ROOT / "components"), str(PACKAGES_ROOT / "model")],
        "signature": signature,
        "input_example": example,
        "pip_requirements": requirements(),
        "model_config": (limits or ImageLimits()).to_mapping(),
    }


def log_pyfunc(cand: Candidate, params: Params) -> Any:
    """Log the run as a pyfunc model into its training run (or a new run); returns ModelInfo."""
    import mlflow

    record = read_mlflow_run(cand.run_dir)
    if (
        record is not None
        and record.get("tracking_uri", mlflow.get_tracking_uri()) == mlflow.get_tracking_uri()
    ):
        active = mlflow.start_run(run_id=record["run_id"])
    else:
        # set_experiment returns without activating the experiment when another process created it at
        # the same moment: pass its id explicitly.
        experiment = mlflow.set_experiment(params.mlflow.experiment)
        active = mlflow.start_run(
            experiment_id=experiment.experiment_id,
            run_name=f"register-{cand.run_dir.name}",
            tags={"ablation": cand.ablation},
        )
    with active:
        limits = ImageLimits.from_mapping(params.data)  # data.max_image_{pixels,side,bytes}, if set
        return mlflow.pyfunc.log_model(name="model", **pyfunc_spec(cand.run_dir / MODEL_FILE, limits))


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
        try:
            client.create_registered_model(
                name, description="ATMask R-CNN / Mask R-CNN instance segmentation (pyfunc)"
            )
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":  # another registration created it just now
                raise


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
    name, metric, margin = reg.model_name, reg.metric, reg.min_improvement
    ensure_model(client, name)
    champion = current_champion(client, name, metric)
    promote, reason = gate(cand, cands, champion, metric, margin)
    eligible = beats_baseline(cand, cands, metric, margin)
    info = log_pyfunc(cand, params)
    tags = {**version_tags(cand, sha, pipeline_run_id), ELIGIBLE_TAG: str(eligible).lower()}
    mv = mlflow.register_model(info.model_uri, name, tags=tags)
    version = str(mv.version)
    final, moves = converge(client, name, metric, margin)
    mark_superseded(client, name, moves, champion[0] if champion else None, metric)
    won = final is not None and final[0] == version
    if won and not promote:  # the champion it was compared with was replaced by a worse one meanwhile
        reason = f"{metric} {cand.value(metric):.4f} is the best eligible version once the registry settled"
    elif not won and promote:
        winner = f"v{final[0]} ({final[1]:.4f})" if final else "another version"
        reason = (
            f"{reason}; but lost the race: {winner}, registered at the same time, is better and is champion"
        )
    alias = CHAMPION if won else CHALLENGER
    if not won:
        client.set_registered_model_alias(name, CHALLENGER, version)
    client.set_model_version_tag(name, version, "gate", reason)
    return {
        "version": version,
        "decision": alias,
        "aliases": [alias],
        "reason": reason,
        "previous_champion": {"version": champion[0], "value": champion[1]} if champion else None,
        "champion": {"version": final[0], "value": final[1]} if final else None,
        "model_uri": f"models:/{name}/{version}",
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
