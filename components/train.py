"""``atmask train``: train the baseline or an ATMask ablation (paper §4) into ``runs/<name>/``.

Outputs (rank 0, every file atomic): ``model.pt`` (components.checkpoint format), ``train_log.json``
(per-log-step losses, lr, images/s and a summary), ``plots/loss.csv`` (a DVC plot: ``step`` + one column
per loss), ``mlflow_run.json`` and ``checkpoints/ckpt_<iteration>.pt`` (+ ``.sha256``).

Recipe: SGD with momentum and weight decay, linear warm-up, multi-step decay. ``train.batch_size`` is the
global batch (all processes); when it differs from ``base_batch_size`` the lr is scaled linearly and the
log says so. Multi-process: ``torchrun`` (or ``--nproc-per-node N``, which re-launches through
``torch.distributed.run``); NCCL on GPUs, gloo on CPU; only rank 0 writes files and talks to MLflow.

Preemption: on SIGTERM the run finishes its current iteration, saves a checkpoint and exits with status
143 (``PREEMPTED_EXIT_CODE``, 128 + SIGTERM): not 0, because the run is unfinished and an orchestrator must
retry it (Kubeflow's retry policy, a PyTorchJob's ``ExitCode`` restart policy treats 128-255 as
retryable). Running the same command again resumes from the newest checkpoint that verifies.

Test hooks (environment): ``ATMASK_INJECT_NAN_AT=<iteration>`` makes that iteration's loss NaN;
``ATMASK_SIGNAL_AT=<iteration>:<TERM|KILL>`` sends that signal to this process after that iteration.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import platform
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from components import checkpoint as ckpt
from components import distributed as dist_utils
from components.errors import UserError
from components.io import write_json_atomic, write_text_atomic
from components.params import DEFAULT_PARAMS, Params, TrainParams, load_params
from components.tracking import RunTracker, check_reachable, git_commit, tracking_uri
from components.weights import fetch_weights
from model.config import ConfigError, ModelConfig
from model.data import CocoInstances, collate, train_transforms

PREEMPTED_EXIT_CODE = 143
LOG_FILE = "train_log.json"
LOSS_CSV = Path("plots") / "loss.csv"
NAN_ENV = "ATMASK_INJECT_NAN_AT"
SIGNAL_ENV = "ATMASK_SIGNAL_AT"


class Preempted(Exception):
    """SIGTERM arrived; a checkpoint of ``iteration`` was saved."""

    def __init__(self, iteration: int, path: Path | None) -> None:
        super().__init__(f"stopped by SIGTERM after iteration {iteration}")
        self.iteration = iteration
        self.path = path


# ---------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="ablation name (params.yaml 'ablations:')")
    parser.add_argument(
        "--params", type=Path, default=DEFAULT_PARAMS, help="params file (default params.yaml)"
    )
    parser.add_argument(
        "--data", type=Path, default=Path("data/coco"), help="ingested dataset (atmask ingest)"
    )
    parser.add_argument("--out", type=Path, default=None, help="run folder (default runs/<config>)")
    parser.add_argument(
        "--recipe", default=None, help="training recipe under 'recipes:' (default train.recipe)"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a params key (YAML value)"
    )
    parser.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="continue from the newest good checkpoint in --out (default); --no-resume starts over",
    )
    parser.add_argument("--nproc-per-node", type=int, default=1, help="processes per node (one per GPU)")
    parser.add_argument("--nnodes", type=int, default=1, help="nodes (run the same command on each)")
    parser.add_argument("--rdzv-endpoint", default=None, help="host:port of node 0 when --nnodes > 1")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--iterations", type=int, default=None, help="override the recipe's iterations")
    parser.add_argument("--deterministic", action="store_true", help="deterministic algorithms (for tests)")


def run(args: argparse.Namespace) -> int:
    if (args.nproc_per_node > 1 or args.nnodes > 1) and not _inside_launcher():
        if args.nproc_per_node < 1 or args.nnodes < 1:
            raise UserError("--nproc-per-node and --nnodes must be >= 1")
        return _relaunch(args)
    params = load_params(args.params, _overrides(args))
    out = args.out or Path("runs") / args.config
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
        )
    except Preempted as stop:
        print(
            f"atmask train: {stop}; checkpoint {stop.path}; run the same command again to resume "
            f"(exit status {PREEMPTED_EXIT_CODE})",
            file=sys.stderr,
        )
        return PREEMPTED_EXIT_CODE
    return 0


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


def _relaunch(args: argparse.Namespace) -> int:
    argv = ["train", "--config", args.config, "--params", str(args.params), "--data", str(args.data)]
    argv += ["--out", str(args.out or Path("runs") / args.config), "--device", args.device]
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


# ---------------------------------------------------------------- schedule and precision


def lr_factor(iteration: int, tp: TrainParams) -> float:
    """Linear warm-up from ``warmup_factor`` to 1, times ``lr_gamma`` per passed ``lr_steps`` milestone."""
    decay = tp.lr_gamma ** sum(1 for s in tp.lr_steps if iteration >= s)
    if iteration >= tp.warmup_iters:
        return decay
    alpha = iteration / tp.warmup_iters
    return decay * (tp.warmup_factor * (1 - alpha) + alpha)


def scaled_lr(tp: TrainParams) -> tuple[float, str]:
    """The linear scaling rule (Goyal et al. 2017) and the sentence that reports it."""
    if tp.batch_size == tp.base_batch_size:
        return tp.lr, f"lr {tp.lr:g} for global batch {tp.batch_size} (the recipe's base batch; not scaled)"
    lr = tp.lr * tp.batch_size / tp.base_batch_size
    note = (
        f"lr scaled linearly to {lr:g} = {tp.lr:g} x {tp.batch_size}/{tp.base_batch_size} "
        f"(global batch {tp.batch_size}, recipe tuned for {tp.base_batch_size})"
    )
    return lr, note


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """``auto``: bf16 where the GPU supports it, else fp16 (with a grad scaler); off on CPU."""
    if device.type != "cuda" or mode == "off":
        return None
    if mode == "bf16" or (mode == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def set_deterministic(seed: int, on: bool) -> None:
    torch.manual_seed(seed)
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # roi_align's CUDA backward has no deterministic kernel: warn instead of refusing to train.
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


# ---------------------------------------------------------------- data


class SeededSamples(torch.utils.data.Dataset):
    """Takes ``(index, sample_seed)`` from ShardedBatchSampler; augments with that seed's generator."""

    def __init__(self, dataset: CocoInstances, transforms: Any) -> None:
        self.dataset = dataset
        self.transforms = transforms

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, dict[str, Any]]:
        index, seed = item
        image_id = self.dataset.ids[index]
        image, target = self.dataset.load_image(image_id), self.dataset.load_target(image_id)
        return self.transforms(image, target, torch.Generator().manual_seed(seed))


def load_train_set(data_dir: Path) -> CocoInstances:
    ann = data_dir / "annotations" / "instances_train.json"
    if not ann.is_file():
        raise UserError(f"{ann}: training annotations not found; run 'atmask ingest --out {data_dir}' first")
    dataset = CocoInstances.from_root(data_dir, "train", remove_empty=True)
    if len(dataset) == 0:
        raise UserError(f"{ann}: no training image has an annotated instance; nothing to train on")
    if not dataset.categories.category_ids:
        raise UserError(f"{ann}: no categories; the annotation file must list at least one")
    return dataset


def data_checksum(data_dir: Path) -> str:
    import json

    try:
        return str(json.loads((data_dir / "manifest.json").read_text(encoding="utf-8")).get("checksum"))
    except (OSError, ValueError, AttributeError):
        return "unknown"


def make_loader(
    dataset: CocoInstances, tp: TrainParams, cfg: ModelConfig, info: dist_utils.DistInfo, start: int
) -> torch.utils.data.DataLoader:
    sampler = dist_utils.ShardedBatchSampler(
        dist_utils.group_ids(dataset.aspect_ratios()),
        tp.batch_size,
        info.rank,
        info.world_size,
        tp.seed,
        start,
    )
    samples = SeededSamples(dataset, train_transforms(cfg.min_size, cfg.max_size, tp.hflip_prob))
    return torch.utils.data.DataLoader(
        samples,
        batch_sampler=sampler,
        num_workers=tp.workers,
        collate_fn=collate,
        pin_memory=info.device.type == "cuda",
        persistent_workers=tp.workers > 0,
        # Its own generator: drawing the workers' base seed must not advance the global RNG that the
        # model's RoI sampling uses (a resumed run would diverge from an uninterrupted one).
        generator=torch.Generator().manual_seed(tp.seed),
    )


def to_device(images: list[torch.Tensor], targets: list[dict[str, Any]], device: torch.device):
    images = [im.to(device, non_blocking=True) for im in images]
    targets = [
        {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in t.items()}
        for t in targets
    ]
    return images, targets


# ---------------------------------------------------------------- state


@dataclass
class Loop:
    """Everything the training loop mutates, and what a checkpoint restores."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None
    iteration: int = 0
    skipped: int = 0
    log: list[dict[str, float]] = field(default_factory=list)
    resumed_from: int | None = None
    checkpoint: Path | None = None
    lr: float = 0.0  # the lr of the latest iteration


def build_loop(params: Params, cfg: ModelConfig, tp: TrainParams, info: dist_utils.DistInfo) -> Loop:
    from model.builder import build_model

    try:
        model = build_model(cfg)
    except ConfigError as err:
        raise UserError(f"{params.source}: {err}") from None
    model.to(info.device)
    if tp.sync_bn and info.distributed:
        if info.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif info.is_main:
            print("atmask train: note: train.sync_bn needs GPUs; BatchNorm stays per-process on CPU")
    lr, _ = scaled_lr(tp)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(trainable, lr, tp)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, tp))
    dtype = amp_dtype(tp.amp, info.device)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    if info.distributed:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[info.local_rank] if info.device.type == "cuda" else None
        )
    return Loop(model, optimizer, scheduler, scaler)


def make_optimizer(params: list[nn.Parameter], lr: float, tp: TrainParams) -> torch.optim.Optimizer:
    """SGD with momentum, as the paper (and Detectron2/torchvision references); AdamW for short runs from
    scratch, where it converges in far fewer steps (the CPU demo)."""
    if tp.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=tp.weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=tp.momentum, weight_decay=tp.weight_decay)


def checkpoint_state(loop: Loop, info: dist_utils.DistInfo) -> dict[str, Any] | None:
    """The checkpoint payload on rank 0 (RNG states of every rank), None elsewhere. Collective."""
    rng = ckpt.rng_state()
    if info.distributed:
        gathered: list[Any] = [None] * info.world_size
        torch.distributed.all_gather_object(gathered, rng)
        rng_states = gathered
    else:
        rng_states = [rng]
    if not info.is_main:
        return None
    return {
        "model": {k: v.detach().cpu() for k, v in ckpt.unwrap(loop.model).state_dict().items()},
        "optimizer": loop.optimizer.state_dict(),
        "scheduler": loop.scheduler.state_dict(),
        "scaler": loop.scaler.state_dict() if loop.scaler is not None else None,
        "rng": rng_states,
        "skipped": loop.skipped,
        "log": loop.log,
    }


def save_checkpoint(loop: Loop, info: dist_utils.DistInfo, out_dir: Path, keep: int) -> Path | None:
    state = checkpoint_state(loop, info)
    path = ckpt.save_checkpoint(out_dir, loop.iteration, state, keep) if state is not None else None
    dist_utils.barrier(info)
    return path


def restore(loop: Loop, out_dir: Path, info: dist_utils.DistInfo, world_size: int) -> None:
    """Continue from the newest checkpoint that verifies (rank 0 picks it; every rank reads that file)."""
    found = ckpt.load_latest_checkpoint(out_dir) if info.is_main else None
    chosen = dist_utils.broadcast_object(str(found[1]) if found else None, info)
    if chosen is None:
        return
    state = found[0] if found else torch.load(chosen, map_location="cpu", weights_only=True)
    ckpt.unwrap(loop.model).load_state_dict(state["model"])
    loop.optimizer.load_state_dict(state["optimizer"])
    loop.scheduler.load_state_dict(state["scheduler"])
    if loop.scaler is not None and state.get("scaler"):
        loop.scaler.load_state_dict(state["scaler"])
    rng = state["rng"]
    if len(rng) == world_size:  # a different process count cannot replay the same random streams
        ckpt.set_rng_state(rng[info.rank])
    loop.iteration = loop.resumed_from = int(state["iteration"])
    loop.skipped = int(state.get("skipped", 0))
    loop.log = [dict(r) for r in state.get("log", []) if r["iteration"] <= loop.iteration]
    loop.checkpoint = Path(chosen)
    if info.is_main:
        print(f"atmask train: resuming from {chosen} (iteration {loop.iteration})")


# ---------------------------------------------------------------- signals


class SignalFlag:
    """Remembers a SIGTERM instead of dying; restores the previous handler on exit."""

    def __init__(self) -> None:
        self.raised = False
        self._previous: Any = None

    def __enter__(self) -> SignalFlag:
        with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.raised = True

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "")
    return int(value) if value.strip().isdigit() else None


def _test_signal(iteration: int) -> None:
    spec = os.environ.get(SIGNAL_ENV, "")
    at, _, name = spec.partition(":")
    if at.strip().isdigit() and int(at) == iteration:
        os.kill(os.getpid(), signal.SIGKILL if name.upper() == "KILL" else signal.SIGTERM)


# ---------------------------------------------------------------- the loop


@dataclass
class Window:
    """Losses summed over the current log window, as tensors (no host sync until the log step)."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    steps: int = 0
    images: int = 0
    data_seconds: float = 0.0
    start: float = field(default_factory=time.perf_counter)

    def add(self, losses: dict[str, torch.Tensor], images: int) -> None:
        for key, value in losses.items():
            value = value.detach().float()
            self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.steps += 1
        self.images += images


def step(
    loop: Loop, images: list[torch.Tensor], targets: list[dict[str, Any]], tp: TrainParams, info, dtype
) -> dict[str, torch.Tensor] | None:
    """One optimisation step; the loss dict, or None when a non-finite loss was skipped."""
    iteration = loop.iteration + 1
    loop.lr = loop.optimizer.param_groups[0]["lr"]
    with torch.autocast(info.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        losses = loop.model(images, targets)
    loss = sum(losses.values())
    if _env_int(NAN_ENV) == iteration:
        loss = loss * float("nan")
    finite = bool(torch.isfinite(loss).item())  # the one host sync per step: skip/stop needs it now
    if dist_utils.any_rank(not finite, info):
        loop.optimizer.zero_grad(set_to_none=True)
        values = {k: float(v.detach()) for k, v in losses.items()} | {"loss": float(loss.detach())}
        if tp.on_nonfinite == "stop":
            raise UserError(
                f"non-finite loss at iteration {iteration} ({_fmt(values)}); in the recipe "
                "(recipes.<name> in params.yaml) lower lr or set grad_clip, check the data, or set "
                "on_nonfinite: skip to skip such batches"
            )
        loop.skipped += 1
        print(
            f"atmask train: warning: non-finite loss at iteration {iteration}; batch skipped", file=sys.stderr
        )
        loop.scheduler.step()
        return None
    backward(loop, loss, tp)
    return {**losses, "loss": loss}


def backward(loop: Loop, loss: torch.Tensor, tp: TrainParams) -> None:
    scaler = loop.scaler
    (scaler.scale(loss) if scaler is not None else loss).backward()
    if tp.grad_clip is not None:
        if scaler is not None:
            scaler.unscale_(loop.optimizer)
        params = [p for g in loop.optimizer.param_groups for p in g["params"]]
        nn.utils.clip_grad_norm_(params, tp.grad_clip)
    if scaler is not None:
        scaler.step(loop.optimizer)
        scaler.update()
    else:
        loop.optimizer.step()
    loop.optimizer.zero_grad(set_to_none=True)
    loop.scheduler.step()


def _fmt(values: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in values.items())


def log_record(loop: Loop, window: Window, info: dist_utils.DistInfo) -> dict[str, float]:
    """Rank-averaged mean losses of the window, lr, images/s (all ranks) and the data loader's share."""
    keys = sorted(window.sums)
    means = {k: float(window.sums[k]) / max(window.steps, 1) for k in keys}
    seconds = time.perf_counter() - window.start
    means["_data_share"] = window.data_seconds / seconds if seconds > 0 else 0.0
    means = dist_utils.reduce_mean(means, info)
    return {
        "iteration": loop.iteration,
        **{k: means[k] for k in keys},
        "lr": loop.lr,
        "images_per_s": window.images * info.world_size / seconds if seconds > 0 else 0.0,
        "data_time_share": means["_data_share"],
    }


def train_iterations(
    loop: Loop,
    loader: torch.utils.data.DataLoader,
    tp: TrainParams,
    info: dist_utils.DistInfo,
    out_dir: Path,
    tracker: RunTracker | None,
    stop: SignalFlag,
) -> None:
    dtype = amp_dtype(tp.amp, info.device)
    bar = _progress(loop.iteration, tp.iterations, info)
    window = Window()
    batches = iter(loader)
    try:
        while loop.iteration < tp.iterations:
            t0 = time.perf_counter()
            images, targets = _next_batch(batches, stop, loop, info, out_dir, tp)
            images, targets = to_device(images, targets, info.device)
            window.data_seconds += time.perf_counter() - t0
            losses = step(loop, images, targets, tp, info, dtype)
            loop.iteration += 1
            if losses is not None:
                window.add(losses, len(images))
            if bar is not None:
                bar.update(1)
            if loop.iteration % tp.log_every == 0 or loop.iteration == tp.iterations:
                emit(loop, window, info, tracker, bar, tp)
                window = Window()
            _test_signal(loop.iteration)
            preempted = dist_utils.any_rank(stop.raised, info)
            if preempted or loop.iteration % tp.checkpoint_every == 0:
                loop.checkpoint = save_checkpoint(loop, info, out_dir, tp.keep_checkpoints) or loop.checkpoint
            if preempted:
                raise Preempted(loop.iteration, loop.checkpoint)
    finally:
        if bar is not None:
            bar.close()


def _next_batch(batches: Iterator[Any], stop: SignalFlag, loop: Loop, info, out_dir: Path, tp: TrainParams):
    try:
        return next(batches)
    except RuntimeError:
        if not stop.raised:
            raise
        # SIGTERM sent to the whole process group also ended the loader's workers: save and stop.
        loop.checkpoint = save_checkpoint(loop, info, out_dir, tp.keep_checkpoints) or loop.checkpoint
        raise Preempted(loop.iteration, loop.checkpoint) from None


def emit(loop: Loop, window: Window, info, tracker: RunTracker | None, bar, tp: TrainParams) -> None:
    if window.steps == 0:
        return
    record = log_record(loop, window, info)
    if not info.is_main:
        return
    loop.log.append(record)
    losses = {k: v for k, v in record.items() if k.startswith("loss")}
    line = (
        f"iter {loop.iteration}/{tp.iterations}  {_fmt(losses)}  lr {record['lr']:.4g}  "
        f"{record['images_per_s']:.2f} img/s  data {100 * record['data_time_share']:.0f}%"
    )
    if bar is not None:
        bar.set_postfix_str(_fmt({"loss": record["loss"]}))
        if bar.disable:
            print(line, flush=True)
    if tracker is not None:
        metrics = {k: v for k, v in record.items() if k != "iteration"}
        tracker.log_metrics(metrics, step=loop.iteration)


def _progress(start: int, total: int, info: dist_utils.DistInfo):
    if not info.is_main:
        return None
    from tqdm import tqdm

    # disable=None: a bar on a terminal; plain log lines (printed by emit) in logs and CI.
    return tqdm(total=total, initial=start, desc="train", unit="it", disable=None, dynamic_ncols=True)


# ---------------------------------------------------------------- outputs


def write_outputs(
    out_dir: Path, loop: Loop, summary: dict[str, Any], cfg: ModelConfig, coco_cats: list[dict[str, Any]]
) -> None:
    ckpt.save_model(out_dir / ckpt.MODEL_FILE, loop.model, cfg, coco_cats)
    write_logs(out_dir, loop, summary)


def write_logs(out_dir: Path, loop: Loop, summary: dict[str, Any]) -> None:
    write_json_atomic(out_dir / LOG_FILE, {"log": loop.log, "summary": summary})
    loss_keys = sorted(
        {k for r in loop.log for k in r if k.startswith("loss")}, key=lambda k: (k != "loss", k)
    )
    rows = ["step," + ",".join(loss_keys)]
    rows += [
        f"{r['iteration']}," + ",".join(f"{r.get(k, float('nan')):.6g}" for k in loss_keys) for r in loop.log
    ]
    write_text_atomic(out_dir / LOSS_CSV, "\n".join(rows) + "\n")


def device_info(info: dist_utils.DistInfo) -> str:
    if info.device.type == "cuda":
        return f"{torch.cuda.get_device_name(info.device)} x{info.world_size}"
    return f"cpu ({platform.processor() or platform.machine()}) x{info.world_size}, {torch.get_num_threads()} threads"


# ---------------------------------------------------------------- entry point


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
) -> dict[str, Any]:
    """Train ``ablation`` on ``data_dir`` into ``out_dir``; returns the summary written to train_log.json.

    Works single-process or inside ``torchrun`` (every rank calls it). Raises ``UserError`` for bad input,
    an unreachable tracking server or a non-finite loss (``on_nonfinite: stop``); ``Preempted`` on SIGTERM.
    """
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    tp = _effective_recipe(params.train, iterations, deterministic)
    dist_utils.resolve_device(device)  # fails early and clearly for --device cuda without a GPU
    info = dist_utils.init_distributed(device)
    try:
        return _train(params, ablation, data_dir, out_dir, tp, info, resume)
    finally:
        dist_utils.cleanup()


def _effective_recipe(tp: TrainParams, iterations: int | None, deterministic: bool | None) -> TrainParams:
    changes: dict[str, Any] = {}
    if iterations is not None:
        if iterations < 1:
            raise UserError(f"--iterations: must be >= 1, got {iterations}")
        changes["iterations"] = iterations
    if deterministic is not None:
        changes["deterministic"] = deterministic
    return dataclasses.replace(tp, **changes) if changes else tp


def _train(
    params: Params,
    ablation: str,
    data_dir: Path,
    out_dir: Path,
    tp: TrainParams,
    info: dist_utils.DistInfo,
    resume: bool,
) -> dict[str, Any]:
    if tp.batch_size % info.world_size:
        raise UserError(
            f"{params.source}: recipes.{params.recipe}.batch_size {tp.batch_size} (the global batch) is not "
            f"divisible by {info.world_size} processes; set it to a multiple of the process count"
        )
    dataset = load_train_set(data_dir)
    cfg = params.model_config(ablation, dataset.categories.num_classes)
    uri = tracking_uri(params)
    _collective_check(lambda: check_reachable(uri), info)
    if info.is_main and not resume:
        for old in ckpt.list_checkpoints(out_dir):
            old.unlink(missing_ok=True)
            old.with_name(old.name + ".sha256").unlink(missing_ok=True)
    set_deterministic(tp.seed, tp.deterministic)
    loop = build_loop(params, fetch_weights(cfg, params.data.s3_endpoint_url), tp, info)
    if resume:
        restore(loop, out_dir, info, info.world_size)
    lr, lr_note = scaled_lr(tp)
    tracker = _start_tracker(params, uri, ablation, cfg, tp, data_dir, out_dir, info, resume, lr_note)
    if info.is_main:
        print(f"atmask train: {ablation}: {lr_note}; {info.world_size} process(es) on {device_info(info)}")
    loader = make_loader(dataset, tp, cfg, info, loop.iteration)
    started = time.perf_counter()
    start_iteration = loop.iteration
    coco_cats = list(dataset.coco.dataset["categories"])
    try:
        with SignalFlag() as stop:
            train_iterations(loop, loader, tp, info, out_dir, tracker, stop)
    except Preempted:
        if info.is_main:
            write_logs(
                out_dir, loop, _summary(loop, tp, info, lr, lr_note, started, start_iteration, "preempted")
            )
        _end(tracker, "KILLED")
        raise
    except BaseException:
        _end(tracker, "FAILED")
        raise
    summary = _summary(loop, tp, info, lr, lr_note, started, start_iteration, "finished")
    if info.is_main:
        write_outputs(out_dir, loop, summary, cfg, coco_cats)
        _finish_tracker(tracker, out_dir, summary)
    dist_utils.barrier(info)
    return summary


def _collective_check(check, info: dist_utils.DistInfo) -> None:
    """Run ``check`` on rank 0; every rank raises its UserError (no rank is left waiting)."""
    message = None
    if info.is_main:
        try:
            check()
        except UserError as err:
            message = str(err)
    message = dist_utils.broadcast_object(message, info)
    if message:
        raise UserError(message)


def _start_tracker(params, uri, ablation, cfg, tp, data_dir, out_dir, info, resume, lr_note):
    def start() -> RunTracker:
        tracker = RunTracker.start(uri, params.mlflow.experiment, out_dir, f"train-{ablation}", resume=resume)
        tracker.log_params(_flat_params(cfg, tp, params))
        tracker.set_tags(
            {
                "ablation": ablation,
                "mlflow.source.git.commit": git_commit(),
                "git_commit": git_commit(),
                "data_checksum": data_checksum(data_dir),
                "data_dir": str(data_dir),
                "device": device_info(info),
                "world_size": info.world_size,
                "amp": str(amp_dtype(tp.amp, info.device) or "off").replace("torch.", ""),
                "lr_scaling": lr_note,
            }
        )
        return tracker

    holder: list[RunTracker] = []
    _collective_check(lambda: holder.append(start()), info)
    return holder[0] if holder else None


def _flat_params(cfg: ModelConfig, tp: TrainParams, params: Params) -> dict[str, Any]:
    train = {f"train.{k}": v for k, v in dataclasses.asdict(tp).items() if k != "model"}
    return {**cfg.flat(), **train, "train.recipe": params.recipe}


def _summary(loop: Loop, tp, info, lr, lr_note, started, start_iteration, status) -> dict[str, Any]:
    seconds = time.perf_counter() - started
    done = loop.iteration - start_iteration
    last = loop.log[-1] if loop.log else {}
    return {
        "status": status,
        "iterations": loop.iteration,
        "iterations_this_session": done,
        "seconds": round(seconds, 3),
        "seconds_per_iteration": round(seconds / done, 4) if done else None,
        "images_per_s": round(done * tp.batch_size / seconds, 3) if done and seconds > 0 else None,
        "final_loss": last.get("loss"),
        "lr": lr,
        "lr_scaling": lr_note,
        "global_batch": tp.batch_size,
        "world_size": info.world_size,
        "device": device_info(info),
        "amp": str(amp_dtype(tp.amp, info.device) or "off").replace("torch.", ""),
        "skipped_nonfinite": loop.skipped,
        "resumed_from": loop.resumed_from,
        "deterministic": tp.deterministic,
    }


def _finish_tracker(tracker: RunTracker | None, out_dir: Path, summary: dict[str, Any]) -> None:
    if tracker is None:
        return
    final = {
        f"train_{k}": float(summary[k]) for k in ("seconds", "skipped_nonfinite") if summary[k] is not None
    }
    tracker.log_metrics(final, step=summary["iterations"])
    for name in (ckpt.MODEL_FILE, LOG_FILE):
        tracker.log_artifact(out_dir / name)
    tracker.log_artifact(out_dir / LOSS_CSV, "plots")
    tracker.end("FINISHED")


def _end(tracker: RunTracker | None, status: str) -> None:
    if tracker is not None:
        tracker.end(status)


__all__ = ["PREEMPTED_EXIT_CODE", "Preempted", "add_arguments", "lr_factor", "run", "scaled_lr", "train"]
