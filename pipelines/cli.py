"""``atmask pipeline compile|submit|run-local``: the Kubeflow pipeline from the command line.

- ``compile`` writes pipelines/atmask_pipeline.yaml (committed; tests fail when it is stale).
- ``submit --host URL`` starts a run on a Kubeflow Pipelines server with ``kfp.Client``; the token comes
  from --token-env (default ``KF_PIPELINES_TOKEN``); an unreachable host or a refused token fails within
  a few seconds with one line.
- ``run-local`` runs the same pipeline with ``kfp.local`` on this machine on tiny synthetic data and
  collects metrics per ablation, the report and the registry decision under --workdir; ``--runner docker``
  runs every component in the project image instead (:mod:`pipelines.local_docker`).
"""

import argparse
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from components.errors import UserError
from components.io import write_json_atomic

TOKEN_ENV = "KF_PIPELINES_TOKEN"
COMPILED = Path(__file__).with_name("atmask_pipeline.yaml")
PIPELINE_NAME = "atmask-ablation"
CONNECT_TIMEOUT_S = 5.0
# run-local: sizes that make the whole DAG a few minutes on 2 CPU cores
LOCAL_OVERRIDES: dict[str, Any] = {
    "data.synthetic.train_images": 8,
    "data.synthetic.val_images": 4,
    "data.synthetic.image_size": 64,
    "data.synthetic.num_categories": 2,
    "data.synthetic.max_instances": 3,
    "model.backbone": "resnet18",
    "model.fpn_channels": 32,
    "model.mask_head_channels": 32,
    "model.box_head_dim": 64,
    "model.min_size": 64,
    "model.max_size": 64,
    "recipes.cpu_demo.iterations": 4,
    "recipes.cpu_demo.warmup_iters": 1,
    "recipes.cpu_demo.lr_steps": [3],
    "recipes.cpu_demo.batch_size": 2,
    "recipes.cpu_demo.base_batch_size": 2,
    "recipes.cpu_demo.workers": 0,
    "recipes.cpu_demo.checkpoint_every": 2,
    "evaluate.num_samples": 1,
    "evaluate.batch_size": 2,
}
LOCAL_ABLATIONS = ["baseline", "atmask"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="{compile,submit,run-local}")
    comp = sub.add_parser("compile", help="write the compiled pipeline YAML")
    comp.add_argument("--out", type=Path, default=COMPILED, help=f"output (default: {COMPILED.name})")
    comp.add_argument("--image", help="image for every component (default: the one in the compiled YAML)")
    comp.add_argument("--params", type=Path, default=Path("params.yaml"), help="defaults of the parameters")
    comp.add_argument("--gpus", type=int, default=1, help="GPUs per training pod (torchrun inside the pod)")

    sub_ = sub.add_parser("submit", help="start a run on a Kubeflow Pipelines server")
    sub_.add_argument(
        "--host", required=True, help="KFP API endpoint, e.g. https://kubeflow.example.com/pipeline"
    )
    sub_.add_argument("--experiment", default="atmask-ablations", help="KFP experiment name")
    sub_.add_argument("--run-name", help="name of the run (default: atmask-ablation-<time>)")
    sub_.add_argument("--param", action="append", default=[], metavar="K=V", help="pipeline parameter")
    sub_.add_argument("--package", type=Path, default=COMPILED, help="compiled pipeline YAML")
    sub_.add_argument("--token-env", default=TOKEN_ENV, help=f"env var with the bearer token ({TOKEN_ENV})")
    sub_.add_argument("--namespace", help="Kubeflow profile namespace (multi-user installs)")

    loc = sub.add_parser("run-local", help="run the pipeline here with kfp.local on tiny synthetic data")
    loc.add_argument("--workdir", type=Path, default=Path(".kfp_local"), help="outputs (default: .kfp_local)")
    loc.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file")
    loc.add_argument("--ablations", default=",".join(LOCAL_ABLATIONS), help="comma-separated ablations")
    loc.add_argument("--full-size", action="store_true", help="use params.yaml sizes instead of tiny ones")
    loc.add_argument(
        "--runner",
        choices=("subprocess", "docker"),
        default="subprocess",
        help="subprocess: this interpreter (default); docker: every component in --image, as Kubernetes runs it",
    )
    loc.add_argument("--image", help="local image for --runner docker (default: the compiled pipeline's)")
    loc.add_argument(
        "--mlflow-tracking-uri",
        help="tracking server (default: sqlite under --workdir; --runner docker needs an http(s):// server)",
    )


def run(args: argparse.Namespace) -> int:
    return {"compile": run_compile, "submit": run_submit, "run-local": run_local}[args.action](args)


# ------------------------------------------------------------------ compile


def run_compile(args: argparse.Namespace) -> int:
    from pipelines import pipeline as pl

    if args.gpus < 1:
        raise UserError(f"--gpus: must be >= 1, got {args.gpus}")
    image = args.image or pl.compiled_image(COMPILED) or pl.DEFAULT_IMAGE
    out = pl.compile_pipeline(args.out, image, args.params, pl.GpuResources(gpus=args.gpus))
    print(f"wrote {out} (image {image})")
    return 0


# ------------------------------------------------------------------ submit


def parse_params(pairs: list[str], declared: dict[str, str]) -> dict[str, Any]:
    """``k=v`` strings -> pipeline arguments; values are YAML (lists, numbers), checked against the spec."""
    values: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--param {pair!r}: expected KEY=VALUE")
        if key not in declared:
            raise UserError(
                f"--param {key}: not a pipeline parameter; choose from {', '.join(sorted(declared))}"
            )
        kind = declared[key]
        value: Any = raw
        if kind != "STRING":
            try:
                value = yaml.safe_load(raw)
            except yaml.YAMLError:
                raise UserError(f"--param {key}: {raw!r} is not a valid {kind.lower()}") from None
        if key == "ablations" and isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        _check_kind(key, kind, value)
        values[key] = value
    return values


def _check_kind(key: str, kind: str, value: Any) -> None:
    ok = {
        "STRING": lambda v: isinstance(v, str),
        "LIST": lambda v: isinstance(v, list),
        "NUMBER_DOUBLE": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "NUMBER_INTEGER": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "BOOLEAN": lambda v: isinstance(v, bool),
        "STRUCT": lambda v: isinstance(v, dict),
    }.get(kind, lambda v: True)
    if not ok(value):
        raise UserError(f"--param {key}: expected {kind.lower().replace('_', ' ')}, got {value!r}")


def declared_parameters(package: Path) -> dict[str, str]:
    if not package.is_file():
        raise UserError(f"{package}: compiled pipeline not found; run 'atmask pipeline compile' first")
    try:
        spec = next(yaml.safe_load_all(package.read_text(encoding="utf-8")))
        params = spec["root"]["inputDefinitions"]["parameters"]
    except (yaml.YAMLError, KeyError, TypeError, StopIteration) as err:
        raise UserError(f"{package}: not a compiled pipeline ({type(err).__name__}); recompile it") from None
    return {name: p["parameterType"] for name, p in params.items()}


def check_host(host: str, token: str | None) -> None:
    """Fail fast, in one line, on an unreachable host or a refused token (kfp.Client would retry)."""
    import requests

    url = host.rstrip("/") + "/apis/v2beta1/healthz"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        resp = requests.get(url, headers=headers, timeout=(CONNECT_TIMEOUT_S, 2 * CONNECT_TIMEOUT_S))
    except requests.exceptions.RequestException as err:
        reason = type(err).__name__
        raise UserError(
            f"--host {host}: cannot reach the Kubeflow Pipelines API ({reason}); check the URL, "
            "port-forward or VPN"
        ) from None
    if resp.status_code in (401, 403):
        raise UserError(
            f"--host {host}: token refused (HTTP {resp.status_code}); set a valid bearer token in "
            f"${TOKEN_ENV} (or the variable named by --token-env)"
        )
    if resp.status_code >= 400:
        raise UserError(
            f"--host {host}: {url} answered HTTP {resp.status_code}; is this the KFP API endpoint "
            "(it should serve /apis/v2beta1/healthz)?"
        )


def run_submit(args: argparse.Namespace) -> int:
    declared = declared_parameters(args.package)
    arguments = parse_params(args.param, declared)
    token = os.environ.get(args.token_env) or None
    check_host(args.host, token)
    import kfp

    run_name = args.run_name or f"{PIPELINE_NAME}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        client = kfp.Client(host=args.host, existing_token=token, namespace=args.namespace)
        result = client.create_run_from_pipeline_package(
            str(args.package),
            arguments=arguments,
            run_name=run_name,
            experiment_name=args.experiment,
            namespace=args.namespace,
        )
    except Exception as err:  # kfp_server_api raises ApiException and urllib3 errors; report in one line
        status = getattr(err, "status", None)
        detail = f"HTTP {status}: {getattr(err, 'reason', '')}" if status else f"{type(err).__name__}: {err}"
        raise UserError(f"--host {args.host}: submitting the run failed ({detail.strip()})") from None
    print(f"submitted run {result.run_id} ({run_name}) in experiment {args.experiment!r}")
    print(f"{args.host.rstrip('/')}/#/runs/details/{result.run_id}")
    return 0


# ------------------------------------------------------------------ run-local


def local_arguments(
    params_path: Path, workdir: Path, ablations: list[str], tiny: bool, tracking_uri: str | None = None
) -> dict[str, Any]:
    from pipelines import pipeline as pl

    defaults = pl.pipeline_defaults(params_path)
    unknown = [a for a in ablations if a not in defaults["ablations"]]
    if unknown or not ablations:
        raise UserError(
            f"--ablations: {', '.join(unknown) or '(none)'} not defined in {params_path}; "
            f"choose from {', '.join(defaults['ablations'])}"
        )
    return {
        "ablations": ablations,
        "mlflow_tracking_uri": tracking_uri or f"sqlite:///{(workdir / 'mlflow.db').resolve()}",
        "overrides": json.dumps(LOCAL_OVERRIDES if tiny else {}),
        "checkpoint_root": str(workdir / "checkpoints"),  # stands in for the runs PVC
    }


def run_local(args: argparse.Namespace) -> int:
    from kfp import local

    from pipelines import pipeline as pl

    workdir = args.workdir.resolve()
    ablations = [a.strip() for a in args.ablations.split(",") if a.strip()]
    arguments = local_arguments(args.params, workdir, ablations, not args.full_size, args.mlflow_tracking_uri)
    root = workdir / "pipeline_root"
    image = args.image or pl.compiled_image() or pl.DEFAULT_IMAGE
    if args.runner == "docker":  # checks its inputs first, then makes the folders
        from pipelines.local_docker import docker_runner

        runner = docker_runner(image, arguments["mlflow_tracking_uri"], [root, workdir / "checkpoints"])
    else:
        runner = local.SubprocessRunner(use_venv=False)
    root.mkdir(parents=True, exist_ok=True)
    (workdir / "checkpoints").mkdir(exist_ok=True)
    local.init(runner=runner, pipeline_root=str(root), raise_on_error=True)
    # no retries here: kfp.local honours the cluster's preemption back-off (minutes) even for a plain bug
    func = pl.build_pipeline(image, args.params, pl.GpuResources(retries=0))
    before = set(root.iterdir())
    try:
        func(**arguments)
    except RuntimeError as err:
        message = re.sub(r"\x1b\[[0-9;]*m", "", str(err))  # kfp.local colours its messages
        raise UserError(f"local pipeline run failed ({message}); the task's log is above") from None
    created = sorted(set(root.iterdir()) - before, key=lambda p: p.stat().st_mtime)
    if not created:
        raise UserError(f"{root}: the local run wrote no outputs")
    summary = collect_outputs(created[-1], workdir)
    print(json.dumps(summary, indent=1))
    return 0


def collect_outputs(run_root: Path, workdir: Path) -> dict[str, Any]:
    """Copy what the run produced to workdir/{runs/<ablation>/, reports/} and return a summary."""
    runs_dir, reports = workdir / "runs", workdir / "reports"
    for folder in (runs_dir, reports):
        shutil.rmtree(folder, ignore_errors=True)
    from pipelines.runtime import gather_runs

    evaluated = sorted(p.parent for p in run_root.glob("**/evaluate-op/evaluated/metrics.json"))
    names = gather_runs(evaluated, runs_dir)
    reports.mkdir(parents=True)
    for pattern, name in (("report-op/report", "ablations.md"), ("report-op/table", "ablations.csv")):
        shutil.copyfile(_one(run_root, pattern), reports / name)
    shutil.copyfile(_one(run_root, "register-op/decision"), reports / "registry.json")
    decision = json.loads((reports / "registry.json").read_text(encoding="utf-8"))
    summary = {
        "pipeline_root": str(run_root),
        "runs": {n: json.loads((runs_dir / n / "metrics.json").read_text())["segm/AP"] for n in names},
        "report": str(reports / "ablations.md"),
        "registered": {k: decision.get(k) for k in ("model_name", "version", "decision", "model_uri")},
    }
    write_json_atomic(workdir / "summary.json", summary)
    return summary


def _one(root: Path, pattern: str) -> Path:
    found = sorted(root.glob(pattern))
    if len(found) != 1:
        raise UserError(f"{root}: expected one {pattern} output, found {len(found)}")
    return found[0]
