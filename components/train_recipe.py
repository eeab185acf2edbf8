"""What a training recipe (``recipes.<name>`` in params.yaml) turns into: the lr schedule, precision,
optimizer, seeding, and the data loader that feeds the loop (paper §4: SGD, warm-up, multi-step decay)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from components import distributed as dist_utils
from components.errors import UserError
from components.params import TrainParams
from components.run_layout import MANIFEST_FILE
from model.data import CocoInstances, DetectionLoader, to_float_image, train_transforms


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


def amp_name(dtype: torch.dtype | None) -> str:
    return str(dtype or "off").replace("torch.", "")


def make_optimizer(params: list[nn.Parameter], lr: float, tp: TrainParams) -> torch.optim.Optimizer:
    """SGD with momentum, as the paper (and Detectron2/torchvision references); AdamW for short runs from
    scratch, where it converges in far fewer steps."""
    if tp.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=tp.weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=tp.momentum, weight_decay=tp.weight_decay)


def set_deterministic(seed: int, on: bool) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # roi_align's CUDA backward has no deterministic kernel: warn instead of refusing to train.
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


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
    """The ingested dataset's content checksum (manifest.json), or "unknown"."""
    try:
        return str(json.loads((data_dir / MANIFEST_FILE).read_text(encoding="utf-8")).get("checksum"))
    except (OSError, ValueError, AttributeError):
        return "unknown"


def make_loader(
    dataset: CocoInstances, tp: TrainParams, info: dist_utils.DistInfo, start: int
) -> torch.utils.data.DataLoader:
    """Aspect-ratio grouped, sharded over ranks, seeded per iteration from ``start`` (resume is exact)."""
    sampler = dist_utils.ShardedBatchSampler(
        dist_utils.group_ids(dataset.aspect_ratios()),
        tp.batch_size,
        info.rank,
        info.world_size,
        tp.seed,
        start,
    )
    samples = SeededSamples(dataset, train_transforms(tp.hflip_prob))  # the model's transform resizes
    return DetectionLoader(
        samples,
        batch_sampler=sampler,
        num_workers=tp.workers,
        pin_memory=info.device.type == "cuda",
        persistent_workers=tp.workers > 0,
        # Its own generator: drawing the workers' base seed must not advance the global RNG that the
        # model's RoI sampling uses (a resumed run would diverge from an uninterrupted one).
        generator=torch.Generator().manual_seed(tp.seed),
    )


def to_device(
    images: list[torch.Tensor], targets: list[dict[str, Any]], device: torch.device
) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """The loader's uint8 batch on ``device`` (non-blocking copies from pinned memory on CUDA), images
    converted to float [0, 1] there, after the copy; masks stay uint8."""
    images = [to_float_image(im.to(device, non_blocking=True)) for im in images]
    targets = [
        {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in t.items()}
        for t in targets
    ]
    return images, targets
