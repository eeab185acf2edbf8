"""``atmask train``: train the baseline or an ATMask ablation (paper §4) into ``runs/<name>/``.

Outputs (rank 0, every file atomic): ``model.pt`` (components.checkpoint format), ``train_log.json``
(per-log-step losses, lr, images/s and a summary), ``plots/loss.csv`` (a DVC plot: ``step`` + one column
per loss), ``mlflow_run.json`` and ``checkpoints/ckpt_<iteration>.pt`` (+ ``.sha256``).

Recipe (:mod:`components.train_recipe`): SGD with momentum and weight decay, linear warm-up, multi-step
decay. ``batch_size`` is the global batch (all processes); when it differs from ``base_batch_size`` the lr
is scaled linearly and the log says so. Multi-process: ``torchrun`` (or ``--nproc-per-node N``, which
re-launches through ``torch.distributed.run``); NCCL on GPUs, gloo on CPU; only rank 0 writes files and
talks to MLflow. The loop itself is :mod:`components.train_loop`.

Preemption: on SIGTERM the run finishes its current iteration, saves a checkpoint and exits with status
143 (``PREEMPTED_EXIT_CODE``, 128 + SIGTERM): not 0, because the run is unfinished and an orchestrator must
retry it (Kubeflow's retry policy, a training job's ``ExitCode`` restart policy treats 128-255 as
retryable). Running the same command again resumes from the newest checkpoint that verifies.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from components import checkpoint as ckpt
from components import distributed as dist_utils
from components.errors import UserError
from components.params import DEFAULT_PARAMS, Params, TrainParams, load_params
from components.tracking import RunTracker, check_reachable, tracking_uri
from components.train_loop import LoopHooks, LoopSettings, Preempted, build_loop, restore, run_loop
from components.train_recipe import load_train_set, make_loader, scaled_lr, set_deterministic
from components.train_run import Clock, RunContext, finish, start_tracker, write_logs
from components.weights import fetch_weights

PREEMPTED_EXIT_CODE = 143


def add_arguments(parser: argparse.ArgumentParser) -> None:
    arg = parser.add_argument
    arg("--config", required=True, help="ablation name (params.yaml 'ablations:')")
    arg("--params", type=Path, default=DEFAULT_PARAMS, help="params file (default params.yaml)")
    arg("--data", type=Path, default=Path("data/coco"), help="ingested dataset (atmask ingest)")
    arg("--out", type=Path, default=None, help="run folder (default runs/<config>/seed<seed>)")
    arg("--seed", type=int, default=None, help="seed of this run (default: the recipe's seed)")
    arg("--recipe", default=None, help="training recipe under 'recipes:' (default train.recipe)")
    arg("--set", action="append", default=[], metavar="KEY=VALUE", help="override a params key (YAML value)")
    arg(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="continue from the newest good checkpoint in --out (default); --no-resume starts over",
    )
    arg("--nproc-per-node", type=int, default=1, help="processes per node (one per GPU)")
    arg("--nnodes", type=int, default=1, help="nodes (run the same command on each)")
    arg("--rdzv-endpoint", default=None, help="host:port of node 0 when --nnodes > 1")
    arg("--device", choices=("auto", "cpu", "cuda"), default="auto")
    arg("--iterations", type=int, default=None, help="override the recipe's iterations")
    arg("--deterministic", action="store_true", help="deterministic algorithms (for tests)")


def run(args: argparse.Namespace, hooks: LoopHooks | None = None) -> int:
    params = load_params(args.params, _overrides(args))
    seed = params.train.seed if args.seed is None else args.seed
    out = args.out or default_run_dir(args.config, seed)
    if (args.nproc_per_node > 1 or args.nnodes > 1) and not _inside_launcher():
        if args.nproc_per_node < 1 or args.nnodes < 1:
            raise UserError("--nproc-per-node and --nnodes must be >= 1")
        return _relaunch(args, out, seed)
    try:
        train(
            params,
            args.config,
            args.data,
            out,
            resume=args.resume,
            device=args.device,
            iterations=args.iterations,
            deterministic=args.deterministic or None,
            seed=seed,
            hooks=hooks,
        )
    except Preempted as stop:
        print(
            f"atmask train: {stop}; checkpoint {stop.path}; run the same command again to resume "
            f"(exit status {PREEMPTED_EXIT_CODE})",
            file=sys.stderr,
        )
        return PREEMPTED_EXIT_CODE
    return 0


def default_run_dir(ablation: str, seed: int) -> Path:
    return Path("runs") / ablation / f"seed{seed}"


def _inside_launcher() -> bool:
    return dist_utils.launched_by_us() or "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. --set recipes.cpu_demo.lr=0.01")
        try:
            overrides[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise UserError(f"--set {item!r}: the value is not valid YAML") from None
    if args.recipe:
        overrides["train.recipe"] = args.recipe
    return overrides


def _relaunch(args: argparse.Namespace, out: Path, seed: int) -> int:
    argv = ["train", "--config", args.config, "--params", str(args.params), "--data", str(args.data)]
    argv += ["--out", str(out), "--seed", str(seed), "--device", args.device]
    argv += ["--resume" if args.resume else "--no-resume"]
    for item in args.set:
        argv += ["--set", item]
    if args.recipe:
        argv += ["--recipe", args.recipe]
    if args.iterations is not None:
        argv += ["--iterations", str(args.iterations)]
    if args.deterministic:
        argv.append("--deterministic")
    try:
        return dist_utils.relaunch(args.nproc_per_node, args.nnodes, argv, args.rdzv_endpoint)
    except ValueError as err:
        raise UserError(str(err)) from None


def train(
    params: Params,
    ablation: str,
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    resume: bool = True,
    device: str = "auto",
    iterations: int | None = None,
    deterministic: bool | None = None,
    seed: int | None = None,
    hooks: LoopHooks | None = None,
) -> dict[str, Any]:
    """Train ``ablation`` on ``data_dir`` into ``out_dir``; returns the summary written to train_log.json.

    Works single-process or inside ``torchrun`` (every rank calls it). Raises ``UserError`` for bad input,
    an unreachable tracking server or a non-finite loss (``on_nonfinite: stop``); ``Preempted`` on SIGTERM.
    """
    recipe = _effective_recipe(params.train, iterations, deterministic, seed)
    dist_utils.resolve_device(device)  # fails early and clearly for --device cuda without a GPU
    info = dist_utils.init_distributed(device)
    try:
        ctx = prepare(params, ablation, Path(data_dir), Path(out_dir), recipe, info, resume)
        return launch(ctx, hooks or LoopHooks())
    finally:
        dist_utils.cleanup()


def _effective_recipe(
    tp: TrainParams, iterations: int | None, deterministic: bool | None, seed: int | None
) -> TrainParams:
    changes: dict[str, Any] = {} if seed is None else {"seed": seed}
    if seed is not None and seed < 0:
        raise UserError(f"--seed: must be >= 0, got {seed}")
    if iterations is not None:
        if iterations < 1:
            raise UserError(f"--iterations: must be >= 1, got {iterations}")
        changes["iterations"] = iterations
    if deterministic is not None:
        changes["deterministic"] = deterministic
    return dataclasses.replace(tp, **changes) if changes else tp


def prepare(
    params: Params,
    ablation: str,
    data_dir: Path,
    out_dir: Path,
    recipe: TrainParams,
    info: dist_utils.DistInfo,
    resume: bool,
) -> RunContext:
    """Check what can be checked before any work: batch vs processes, the data, the tracking server."""
    if recipe.batch_size % info.world_size:
        raise UserError(
            f"{params.source}: recipes.{params.recipe}.batch_size {recipe.batch_size} (the global batch) is "
            f"not divisible by {info.world_size} processes; set it to a multiple of the process count"
        )
    dataset = load_train_set(data_dir)
    model = params.model_config(ablation, dataset.categories.num_classes)
    uri = tracking_uri(params)
    dist_utils.collective_check(lambda: check_reachable(uri), info)
    return RunContext(params, ablation, model, recipe, dataset, data_dir, out_dir, info, resume, uri)


def launch(ctx: RunContext, hooks: LoopHooks) -> dict[str, Any]:
    """Build (or restore) the loop, run it, and write the outputs; the MLflow run follows the run's fate."""
    if ctx.dist.is_main and not ctx.resume:
        ckpt.remove_checkpoints(ctx.out_dir)
    set_deterministic(ctx.recipe.seed, ctx.recipe.deterministic)
    weights = fetch_weights(ctx.model, ctx.params.data.s3_endpoint_url)
    loop = build_loop(weights, ctx.recipe, ctx.dist, ctx.amp, ctx.params.source)
    if ctx.resume:
        restore(loop, ctx.out_dir, ctx.dist)
    tracker = start_tracker(ctx)
    if ctx.dist.is_main:
        where = f"{ctx.dist.world_size} process(es) on {ctx.device_info}"
        print(f"atmask train: {ctx.ablation}: {scaled_lr(ctx.recipe)[1]}; {where}")
    loader = make_loader(ctx.dataset, ctx.recipe, ctx.dist, loop.iteration)
    clock = Clock(loop)
    try:
        run_loop(loop, loader, LoopSettings(ctx.recipe, ctx.dist, ctx.out_dir, ctx.amp, hooks), tracker)
    except Preempted:
        if ctx.dist.is_main:
            write_logs(ctx.out_dir, loop, clock.summary(ctx, loop, "preempted"))
        _end(tracker, "KILLED")
        raise
    except BaseException:
        _end(tracker, "FAILED")
        raise
    summary = clock.summary(ctx, loop, "finished")
    if ctx.dist.is_main:
        finish(ctx, loop, tracker, summary)
    dist_utils.barrier(ctx.dist)
    return summary


def _end(tracker: RunTracker | None, status: str) -> None:
    if tracker is not None:
        tracker.end(status)


__all__ = ["PREEMPTED_EXIT_CODE", "LoopHooks", "Preempted", "add_arguments", "run", "train"]
