"""``atmask pipeline compile|submit|run-local``: the Kubeflow pipeline from the command line.

- ``compile`` writes pipelines/atmask_pipeline.yaml (committed; tests fail when it is stale).
- ``submit --host URL`` starts a run on a Kubeflow Pipelines server with ``kfp.Client``: the data version
  from dvc.lock (or ``--data-rev``) and the DVC remote, this checkout's commit, the ServiceAccount the run's
  pods use, and the namespace (default: the kube context's). The token comes from --token-env (default
  ``KF_PIPELINES_TOKEN``); an unreachable host, a refused token or a namespace KFP does not manage fails
  within a few seconds with one line.
- ``run-local`` runs the same pipeline with ``kfp.local`` on this machine (the local profile's recipe at
  tiny sizes) on the DVC data version of dvc.lock, pulled from the DVC remote, and collects metrics per
  ablation, the report and the registry decision under --workdir; ``--runner docker`` runs every component
  in the project image instead (:mod:`pipelines.local_docker`).
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
from components.run_layout import METRICS_FILE
from pipelines.names import COMPILED, DEFAULT_IMAGE, PIPELINE_NAME, compiled_pipeline

TOKEN_ENV = "KF_PIPELINES_TOKEN"
RUNNER_SA = "atmask-pipeline-runner"  # k8s/base/rbac.yaml
CONNECT_TIMEOUT_S = 5.0
# run-local: sizes that make the whole DAG a few minutes on 2 CPU cores
LOCAL_OVERRIDES: dict[str, Any] = {
    "data.synthetic.train_images": 8,
    "data.synthetic.val_images": 4,
    "data.synthetic.image_size": 64,
    "data.synthetic.num_categories": 2,
    "data.synthetic.max_instances": 3,
    "recipes.cpu_demo.model.backbone": "resnet18",
    "recipes.cpu_demo.model.fpn_channels": 32,
    "recipes.cpu_demo.model.mask_head_channels": 32,
    "recipes.cpu_demo.model.box_head_dim": 64,
    "recipes.cpu_demo.model.min_size": 64,
    "recipes.cpu_demo.model.max_size": 64,
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
    comp.add_argument("--out", type=Path, help=f"output (default: the checkout's pipelines/{COMPILED.name})")
    comp.add_argument("--image", help="image for every component (default: the one in the compiled YAML)")
    comp.add_argument("--params", type=Path, default=Path("params.yaml"), help="defaults of the parameters")
    comp.add_argument(
        "--gpus", type=int, help="default GPUs per node (default: params.yaml cluster.gpus_per_node)"
    )

    sub_ = sub.add_parser("submit", help="start a run on a Kubeflow Pipelines server")
    sub_.add_argument(
        "--host", required=True, help="KFP API endpoint, e.g. https://kubeflow.example.com/pipeline"
    )
    sub_.add_argument("--experiment", default="atmask-ablations", help="KFP experiment name")
    sub_.add_argument("--run-name", help="name of the run (default: atmask-ablation-<time>)")
    sub_.add_argument("--param", action="append", default=[], metavar="K=V", help="pipeline parameter")
    sub_.add_argument("--package", type=Path, help=f"compiled pipeline YAML (default: {COMPILED.name})")
    sub_.add_argument("--token-env", default=TOKEN_ENV, help=f"env var with the bearer token ({TOKEN_ENV})")
    sub_.add_argument("--namespace", help="profile namespace (multi-user KFP; default: the kube context's)")
    sub_.add_argument(
        "--service-account", default=RUNNER_SA, help=f"ServiceAccount of the run's pods ({RUNNER_SA})"
    )
    sub_.add_argument(
        "--recipe", help="training recipe (default: the compiled cluster profile, cluster.recipe)"
    )
    sub_.add_argument(
        "--data-rev", help="git revision whose dvc.lock names the data version (default: the working tree)"
    )
    sub_.add_argument(
        "--dvc-remote", help="DVC remote to pull from (default: the repository's default remote)"
    )

    loc = sub.add_parser("run-local", help="run the pipeline here with kfp.local on tiny synthetic data")
    loc.add_argument("--workdir", type=Path, default=Path(".kfp_local"), help="outputs (default: .kfp_local)")
    loc.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file")
    loc.add_argument("--ablations", default=",".join(LOCAL_ABLATIONS), help="comma-separated ablations")
    loc.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    loc.add_argument("--full-size", action="store_true", help="use params.yaml sizes instead of tiny ones")
    loc.add_argument(
        "--dvc-remote", help="DVC remote to pull from (default: the repository's default remote)"
    )
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

    if args.gpus is not None and args.gpus < 1:
        raise UserError(f"--gpus: must be >= 1, got {args.gpus}")
    committed = compiled_pipeline()
    image = args.image or pl.compiled_image(committed) or DEFAULT_IMAGE
    out = pl.compile_pipeline(args.out or committed, image, args.params, pl.GpuResources(gpus=args.gpus))
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


def check_host(host: str, token: str | None) -> dict[str, Any]:
    """Fail fast, in one line, on an unreachable host or a refused token (kfp.Client would retry); returns
    the server's healthz answer (``multi_user`` says whether runs need a profile namespace)."""
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
    try:
        return resp.json() if isinstance(resp.json(), dict) else {}
    except ValueError:
        return {}


def submit_arguments(args: argparse.Namespace, declared: dict[str, str]) -> dict[str, Any]:
    """The run's arguments: the data version and source from this checkout, then --recipe, then --param."""
    from pipelines import run_inputs

    repo = run_inputs.repo_root(Path.cwd())
    data = run_inputs.data_arguments(repo, "data/coco", args.data_rev, args.dvc_remote, cluster=True)
    data.pop("endpoint")  # pods take the S3 endpoint from the atmask-s3 Secret
    computed = {**data, **run_inputs.source_arguments(repo)}
    if args.recipe:
        computed["recipe"] = args.recipe
    missing = sorted(set(computed) - set(declared))
    if missing:
        raise UserError(
            f"{args.package}: no parameters {', '.join(missing)}; recompile it (atmask pipeline compile)"
        )
    return {**computed, **parse_params(args.param, declared)}


def submit_namespace(args: argparse.Namespace, health: dict[str, Any]) -> str | None:
    from pipelines import run_inputs

    namespace = args.namespace or run_inputs.kube_namespace()
    if health.get("multi_user") and not namespace:
        raise UserError(
            f"--host {args.host}: multi-user Kubeflow Pipelines needs a profile namespace; pass --namespace "
            "(e.g. atmask-pipelines, the Profile in k8s/profile) or set one in your kube context"
        )
    return namespace if health.get("multi_user", True) else None


def run_submit(args: argparse.Namespace) -> int:
    args.package = args.package or compiled_pipeline()
    declared = declared_parameters(args.package)
    arguments = submit_arguments(args, declared)
    token = os.environ.get(args.token_env) or None
    health = check_host(args.host, token)
    namespace = submit_namespace(args, health)
    import kfp

    run_name = args.run_name or f"{PIPELINE_NAME}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        client = kfp.Client(host=args.host, existing_token=token, namespace=namespace)
        result = client.create_run_from_pipeline_package(
            str(args.package),
            arguments=arguments,
            run_name=run_name,
            experiment_name=args.experiment,
            namespace=namespace,
            service_account=args.service_account,
        )
    except Exception as err:  # kfp_server_api raises ApiException and urllib3 errors; report in one line
        raise submit_error(args.host, namespace, err) from None
    print(f"submitted run {result.run_id} ({run_name}) in experiment {args.experiment!r}")
    print(f"data {arguments['data_path']} {arguments['data_md5']} from {arguments['dvc_remote']}")
    print(f"{args.host.rstrip('/')}/#/runs/details/{result.run_id}")
    return 0


def submit_error(host: str, namespace: str | None, err: Exception) -> UserError:
    status = getattr(err, "status", None)
    body = str(getattr(err, "body", "") or "")
    detail = f"HTTP {status}: {getattr(err, 'reason', '')}" if status else f"{type(err).__name__}: {err}"
    if namespace and status in (400, 403, 404) and "namespace" in body.lower():
        return UserError(
            f"--namespace {namespace}: Kubeflow Pipelines does not manage it ({detail.strip()}); create the "
            "Profile (kubectl apply -k k8s/profile) or pass the namespace of a profile you belong to"
        )
    return UserError(f"--host {host}: submitting the run failed ({detail.strip()})")


# ------------------------------------------------------------------ run-local


def local_arguments(
    params_path: Path,
    workdir: Path,
    ablations: list[str],
    tiny: bool,
    seeds: list[int] | None = None,
    dvc_remote: str | None = None,
    tracking_uri: str = "",
) -> dict[str, Any]:
    """run-local's arguments: the local profile (train.recipe) on one process, the data version of
    dvc.lock pulled from the DVC remote (S3 or a folder) into workdir/datasets, checkpoints in the workdir."""
    from components.params import load_params
    from pipelines import pipeline as pl
    from pipelines import run_inputs

    defaults = pl.pipeline_defaults(params_path)
    unknown = [a for a in ablations if a not in defaults["ablations"]]
    if unknown or not ablations:
        raise UserError(
            f"--ablations: {', '.join(unknown) or '(none)'} not defined in {params_path}; "
            f"choose from {', '.join(defaults['ablations'])}"
        )
    repo = run_inputs.repo_root(params_path.resolve().parent)
    data = run_inputs.data_arguments(repo, defaults["data_path"], None, dvc_remote, cluster=False)
    if data.pop("endpoint") and not os.environ.get("AWS_ENDPOINT_URL"):
        os.environ["AWS_ENDPOINT_URL"] = remote_endpoint(repo, dvc_remote)  # what the cluster's Secret sets
    return {
        **data,
        **run_inputs.source_arguments(repo),
        "ablations": ablations,
        "seeds": seeds or [0],
        "recipe": load_params(params_path).recipe,  # the local profile
        "gpus_per_node": 1,
        "nodes": 1,
        "mlflow_tracking_uri": tracking_uri,
        "overrides": json.dumps(LOCAL_OVERRIDES if tiny else {}),
        "data_root": str(workdir / "datasets"),  # stands in for the datasets PVC
        "checkpoint_root": str(workdir / "checkpoints"),  # stands in for the runs PVC
    }


def remote_endpoint(repo: Path, name: str | None) -> str:
    from components.provenance import remote_config

    return (remote_config(repo, name) or {}).get("endpointurl", "")


def run_local(args: argparse.Namespace) -> int:
    from kfp import local

    from pipelines import pipeline as pl
    from pipelines import runtime

    workdir = args.workdir.resolve()
    image = args.image or pl.compiled_image(compiled_pipeline()) or DEFAULT_IMAGE
    tracking_uri = args.mlflow_tracking_uri or f"sqlite:///{workdir / 'mlflow.db'}"
    if args.runner == "docker":  # before dvc.lock is read or any folder made
        from pipelines.local_docker import check_inputs

        check_inputs(image, tracking_uri)
    ablations = [a.strip() for a in args.ablations.split(",") if a.strip()]
    arguments = local_arguments(
        args.params,
        workdir,
        ablations,
        not args.full_size,
        parse_seeds(args.seeds),
        args.dvc_remote,
        tracking_uri,
    )
    root = workdir / "pipeline_root"
    os.environ[runtime.RUN_ID_ENV] = f"local-{time.strftime('%Y%m%d-%H%M%S')}"  # a cluster pod's run-id label
    runner = local_runner(args.runner, image, arguments, workdir)
    local.init(runner=runner, pipeline_root=str(root), raise_on_error=True)
    # no retries here: kfp.local honours the cluster's preemption back-off (minutes) even for a plain bug
    func = pl.build_pipeline(image, args.params, pl.GpuResources(retries=0))
    root.mkdir(parents=True, exist_ok=True)
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


def parse_seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds {text!r}: expected comma-separated integers, e.g. 0,1,2") from None


def local_runner(kind: str, image: str, arguments: dict[str, Any], workdir: Path) -> Any:
    """kfp.local's runner: this interpreter, or the image with the folders the pods would mount (the
    pipeline root, the datasets and runs PVCs' stand-ins) and a folder DVC remote read-only."""
    from kfp import local

    folders = [workdir / "pipeline_root", Path(arguments["data_root"]), Path(arguments["checkpoint_root"])]
    if kind != "docker":
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
        return local.SubprocessRunner(use_venv=False)
    from pipelines.local_docker import docker_runner

    remote = arguments["dvc_remote"]
    read_only = [] if "://" in remote else [Path(remote)]
    return docker_runner(image, folders, read_only)


def collect_outputs(run_root: Path, workdir: Path) -> dict[str, Any]:
    """Copy what the run produced to workdir/{runs/<ablation>/seed<k>/, reports/} and return a summary."""
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
        "runs": {n: json.loads((runs_dir / n / METRICS_FILE).read_text())["segm/AP"] for n in names},
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
