"""The training loop of ``atmask train``: optimisation step, logging window, checkpoint/restore, SIGTERM.

Every rank runs it; rank 0 writes checkpoints and talks to the tracker. Tests and tools reach into it
only through :class:`LoopHooks`, passed explicitly (fault injection is never read from the environment).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from components import checkpoint as ckpt
from components import distributed as dist_utils
from components.errors import UserError
from components.params import TrainParams
from components.tracking import RunTracker
from components.train_recipe import lr_factor, make_optimizer, scaled_lr, to_device
from model.config import ConfigError, ModelConfig


class Preempted(Exception):
    """SIGTERM arrived; a checkpoint of ``iteration`` was saved."""

    def __init__(self, iteration: int, path: Path | None) -> None:
        super().__init__(f"stopped by SIGTERM after iteration {iteration}")
        self.iteration = iteration
        self.path = path


@dataclass(frozen=True)
class LoopHooks:
    """Callbacks into the loop for tests and tools; None means no call."""

    on_loss: Callable[[int, torch.Tensor], torch.Tensor] | None = None  # may replace an iteration's loss
    after_iteration: Callable[[int], None] | None = None  # after the step, before the checkpoint check


@dataclass(frozen=True)
class LoopSettings:
    """What the loop reads and never changes."""

    recipe: TrainParams
    dist: dist_utils.DistInfo
    out_dir: Path
    amp: torch.dtype | None
    hooks: LoopHooks = field(default_factory=LoopHooks)


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


def build_loop(
    cfg: ModelConfig, tp: TrainParams, info: dist_utils.DistInfo, amp: torch.dtype | None, source: Path
) -> Loop:
    """Model on its device (DDP-wrapped when distributed), optimizer, schedule and grad scaler."""
    from model.builder import build_model

    try:
        model = build_model(cfg)
    except ConfigError as err:
        raise UserError(f"{source}: {err}") from None
    model.to(info.device)
    if tp.sync_bn and info.distributed:
        if info.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif info.is_main:
            print("atmask train: note: train.sync_bn needs GPUs; BatchNorm stays per-process on CPU")
    lr, _ = scaled_lr(tp)
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], lr, tp)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, tp))
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
    if info.distributed:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[info.local_rank] if info.device.type == "cuda" else None
        )
    return Loop(model, optimizer, scheduler, scaler)


# ---------------------------------------------------------------- checkpoints


def checkpoint_state(loop: Loop, info: dist_utils.DistInfo) -> dict[str, Any] | None:
    """The checkpoint payload on rank 0 (RNG states of every rank), None elsewhere. Collective."""
    rng = ckpt.rng_state()
    if info.distributed:
        rng_states: list[Any] = [None] * info.world_size
        torch.distributed.all_gather_object(rng_states, rng)
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


def save_checkpoint(loop: Loop, settings: LoopSettings) -> None:
    state = checkpoint_state(loop, settings.dist)
    if state is not None:
        keep = settings.recipe.keep_checkpoints
        loop.checkpoint = ckpt.save_checkpoint(settings.out_dir, loop.iteration, state, keep)
    dist_utils.barrier(settings.dist)


def restore(loop: Loop, out_dir: Path, info: dist_utils.DistInfo) -> None:
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
    if len(rng) == info.world_size:  # a different process count cannot replay the same random streams
        ckpt.set_rng_state(rng[info.rank])
    loop.iteration = loop.resumed_from = int(state["iteration"])
    loop.skipped = int(state.get("skipped", 0))
    loop.log = [dict(r) for r in state.get("log", []) if r["iteration"] <= loop.iteration]
    loop.checkpoint = Path(chosen)
    if info.is_main:
        print(f"atmask train: resuming from {chosen} (iteration {loop.iteration})")


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


# ---------------------------------------------------------------- one step


def step(
    loop: Loop, images: list[torch.Tensor], targets: list[dict[str, Any]], settings: LoopSettings
) -> dict[str, torch.Tensor] | None:
    """One optimisation step; the loss dict, or None when a non-finite loss was skipped."""
    iteration, info, tp = loop.iteration + 1, settings.dist, settings.recipe
    loop.lr = loop.optimizer.param_groups[0]["lr"]
    dtype = settings.amp
    with torch.autocast(info.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        losses = loop.model(images, targets)
    loss = sum(losses.values())
    if settings.hooks.on_loss is not None:
        loss = settings.hooks.on_loss(iteration, loss)
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


# ---------------------------------------------------------------- logging


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


def emit(loop: Loop, window: Window, settings: LoopSettings, tracker: RunTracker | None, bar) -> None:
    if window.steps == 0:
        return
    record = log_record(loop, window, settings.dist)
    if not settings.dist.is_main:
        return
    loop.log.append(record)
    losses = {k: v for k, v in record.items() if k.startswith("loss")}
    line = (
        f"iter {loop.iteration}/{settings.recipe.iterations}  {_fmt(losses)}  lr {record['lr']:.4g}  "
        f"{record['images_per_s']:.2f} img/s  data {100 * record['data_time_share']:.0f}%"
    )
    if bar is not None:
        bar.set_postfix_str(_fmt({"loss": record["loss"]}))
        if bar.disable:
            print(line, flush=True)
    if tracker is not None:
        tracker.log_metrics({k: v for k, v in record.items() if k != "iteration"}, step=loop.iteration)


def _progress(start: int, total: int, info: dist_utils.DistInfo):
    if not info.is_main:
        return None
    from tqdm import tqdm

    # disable=None: a bar on a terminal; plain log lines (printed by emit) in logs and CI.
    return tqdm(total=total, initial=start, desc="train", unit="it", disable=None, dynamic_ncols=True)


# ---------------------------------------------------------------- the loop


def run_loop(
    loop: Loop, loader: torch.utils.data.DataLoader, settings: LoopSettings, tracker: RunTracker | None
) -> None:
    """Iterate up to the recipe's iterations; raises ``Preempted`` after saving on SIGTERM."""
    with SignalFlag() as stop:
        _iterate(loop, loader, settings, tracker, stop)


def _iterate(loop: Loop, loader, settings: LoopSettings, tracker: RunTracker | None, stop: SignalFlag):
    tp, info = settings.recipe, settings.dist
    bar = _progress(loop.iteration, tp.iterations, info)
    window = Window()
    batches = iter(loader)
    try:
        while loop.iteration < tp.iterations:
            t0 = time.perf_counter()
            images, targets = _next_batch(batches, stop, loop, settings)
            images, targets = to_device(images, targets, info.device)
            window.data_seconds += time.perf_counter() - t0
            losses = step(loop, images, targets, settings)
            loop.iteration += 1
            if losses is not None:
                window.add(losses, len(images))
            if bar is not None:
                bar.update(1)
            if loop.iteration % tp.log_every == 0 or loop.iteration == tp.iterations:
                emit(loop, window, settings, tracker, bar)
                window = Window()
            if settings.hooks.after_iteration is not None:
                settings.hooks.after_iteration(loop.iteration)
            preempted = dist_utils.any_rank(stop.raised, info)
            if preempted or loop.iteration % tp.checkpoint_every == 0:
                save_checkpoint(loop, settings)
            if preempted:
                raise Preempted(loop.iteration, loop.checkpoint)
    finally:
        if bar is not None:
            bar.close()


def _next_batch(batches: Iterator[Any], stop: SignalFlag, loop: Loop, settings: LoopSettings):
    try:
        return next(batches)
    except RuntimeError:
        if not stop.raised:
            raise
        # SIGTERM sent to the whole process group also ended the loader's workers: save and stop.
        save_checkpoint(loop, settings)
        raise Preempted(loop.iteration, loop.checkpoint) from None
