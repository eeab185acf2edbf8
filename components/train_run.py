"""One training run, resolved: :class:`RunContext`, and what it leaves behind (logs, summary, MLflow run)."""

from __future__ import annotations

import dataclasses
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from components import checkpoint as ckpt
from components import distributed as dist_utils
from components.io import write_json_atomic, write_text_atomic
from components.params import Params, TrainParams
from components.provenance import data_version, source_tags
from components.run_layout import LOSS_CSV, MODEL_FILE, TRAIN_LOG
from components.tracking import RunTracker
from components.train_loop import Loop
from components.train_recipe import amp_dtype, amp_name, data_checksum, scaled_lr
from model.config import ModelConfig
from model.data import CocoInstances


@dataclass(frozen=True)
class RunContext:
    """Everything a run reads, checked once before any work starts."""

    params: Params
    ablation: str
    model: ModelConfig
    recipe: TrainParams
    dataset: CocoInstances
    data_dir: Path
    out_dir: Path
    dist: dist_utils.DistInfo
    resume: bool
    tracking_uri: str

    @property
    def amp(self) -> torch.dtype | None:
        return amp_dtype(self.recipe.amp, self.dist.device)

    @property
    def device_info(self) -> str:
        info = self.dist
        if info.device.type == "cuda":
            return f"{torch.cuda.get_device_name(info.device)} x{info.world_size}"
        cpu = platform.processor() or platform.machine()
        return f"cpu ({cpu}) x{info.world_size}, {torch.get_num_threads()} threads"


def write_logs(out_dir: Path, loop: Loop, summary: dict[str, Any]) -> None:
    """train_log.json (records + summary) and plots/loss.csv (``step`` + one column per loss)."""
    write_json_atomic(out_dir / TRAIN_LOG, {"log": loop.log, "summary": summary})
    keys = sorted({k for r in loop.log for k in r if k.startswith("loss")}, key=lambda k: (k != "loss", k))
    rows = ["step," + ",".join(keys)]
    rows += [f"{r['iteration']}," + ",".join(f"{r.get(k, float('nan')):.6g}" for k in keys) for r in loop.log]
    write_text_atomic(out_dir / LOSS_CSV, "\n".join(rows) + "\n")


def summarize(
    ctx: RunContext, loop: Loop, seconds: float, start_iteration: int, status: str
) -> dict[str, Any]:
    done = loop.iteration - start_iteration
    lr, lr_note = scaled_lr(ctx.recipe)
    return {
        "status": status,
        "iterations": loop.iteration,
        "iterations_this_session": done,
        "seconds": round(seconds, 3),
        "seconds_per_iteration": round(seconds / done, 4) if done else None,
        "images_per_s": round(done * ctx.recipe.batch_size / seconds, 3) if done and seconds > 0 else None,
        "final_loss": loop.log[-1].get("loss") if loop.log else None,
        "lr": lr,
        "lr_scaling": lr_note,
        "global_batch": ctx.recipe.batch_size,
        "world_size": ctx.dist.world_size,
        "device": ctx.device_info,
        "amp": amp_name(ctx.amp),
        "skipped_nonfinite": loop.skipped,
        "resumed_from": loop.resumed_from,
        "deterministic": ctx.recipe.deterministic,
        "seed": ctx.recipe.seed,
        "ablation": ctx.ablation,
        "recipe": ctx.params.recipe,
    }


def start_tracker(ctx: RunContext) -> RunTracker | None:
    """The MLflow run on rank 0 (reopened on resume); every rank fails together if it cannot start."""

    def start() -> RunTracker:
        name, experiment = f"train-{ctx.ablation}-seed{ctx.recipe.seed}", ctx.params.mlflow.experiment
        tracker = RunTracker.start(ctx.tracking_uri, experiment, ctx.out_dir, name, resume=ctx.resume)
        recipe = {f"train.{k}": v for k, v in dataclasses.asdict(ctx.recipe).items() if k != "model"}
        tracker.log_params({**ctx.model.flat(), **recipe, "train.recipe": ctx.params.recipe})
        version = data_version(ctx.data_dir)
        tracker.set_tags({**run_tags(ctx), "data_dvc_md5": version.md5, "data_source": version.source})
        tracker.log_dataset(version, "training")
        return tracker

    holder: list[RunTracker] = []
    dist_utils.collective_check(lambda: holder.append(start()), ctx.dist)
    return holder[0] if holder else None


def run_tags(ctx: RunContext) -> dict[str, Any]:
    source = source_tags("atmask train")
    return {
        **source,
        "ablation": ctx.ablation,
        "seed": ctx.recipe.seed,
        "git_commit": source["mlflow.source.git.commit"],
        "data_checksum": data_checksum(ctx.data_dir),
        "data_dir": str(ctx.data_dir),
        "device": ctx.device_info,
        "world_size": ctx.dist.world_size,
        "amp": amp_name(ctx.amp),
        "lr_scaling": scaled_lr(ctx.recipe)[1],
    }


def finish(ctx: RunContext, loop: Loop, tracker: RunTracker | None, summary: dict[str, Any]) -> None:
    """Rank 0: model.pt, the logs, and the MLflow run's final metrics and artifacts."""
    out_dir = ctx.out_dir
    categories = ctx.dataset.coco.dataset["categories"]
    ckpt.save_model(out_dir / MODEL_FILE, loop.model, ctx.model, categories)
    write_logs(out_dir, loop, summary)
    if tracker is None:
        return
    final = {
        f"train_{k}": float(summary[k]) for k in ("seconds", "skipped_nonfinite") if summary[k] is not None
    }
    tracker.log_metrics(final, step=summary["iterations"])
    for name in (MODEL_FILE, TRAIN_LOG):
        tracker.log_artifact(out_dir / name)
    tracker.log_artifact(out_dir / LOSS_CSV, "plots")
    tracker.end("FINISHED")


class Clock:
    """Seconds and iterations of this session (a resumed run counts from where it resumed)."""

    def __init__(self, loop: Loop) -> None:
        self.started = time.perf_counter()
        self.start_iteration = loop.iteration

    def summary(self, ctx: RunContext, loop: Loop, status: str) -> dict[str, Any]:
        return summarize(ctx, loop, time.perf_counter() - self.started, self.start_iteration, status)
