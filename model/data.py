"""COCO instance data for torchvision detection models: dataset, augmentation, sampler, loader.

A sample is ``(image, target)``: ``image`` a uint8 tensor [3, H, W] at the file's own size; ``target`` a
dict with ``boxes`` float32 [N, 4] (XYXY, pixels), ``labels`` int64 [N] (contiguous 1..C), ``masks`` uint8
[N, H, W], ``image_id`` (int, the COCO image id), ``area`` float32 [N] and ``iscrowd`` int64 [N] (always 0:
crowd regions are not training targets; they stay in the annotation files for evaluation).

Workers only decode and flip: samples cross the process boundary and the host-to-device copy as uint8
(a quarter of float32's bytes), each batch packed into one shared-memory buffer (:class:`DetectionLoader`).
:func:`to_float_image` turns them into the float [0, 1] images torchvision's detection transform takes, on
the training device, right after the copy; that transform then normalises and resizes them (shortest side
``min_size``, longest <= ``max_size``): the one resize, on the device.

Augmentation is deterministic: each sample draws from its own generator seeded by (seed, epoch, index), so
the same seed gives the same batches whatever the number of workers.
"""

from __future__ import annotations

import contextlib
import io
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler, SequentialSampler
from torchvision.io import ImageReadMode, decode_image

from model.packing import PackingCollate, Receiver, release_queues

Target = dict[str, Any]
Transform = Callable[[torch.Tensor, Target, torch.Generator], tuple[torch.Tensor, Target]]


# ---------------------------------------------------------------- categories


@dataclass(frozen=True)
class CategoryMap:
    """Contiguous labels 1..C (0 is background) <-> COCO category ids, in ascending category id order."""

    category_ids: tuple[int, ...]
    names: tuple[str, ...]

    @classmethod
    def from_coco(cls, categories: Sequence[dict[str, Any]]) -> CategoryMap:
        cats = sorted(categories, key=lambda c: c["id"])
        return cls(tuple(c["id"] for c in cats), tuple(c["name"] for c in cats))

    @property
    def num_classes(self) -> int:
        """Number of classes including background (what torchvision's ``num_classes`` expects)."""
        return len(self.category_ids) + 1

    def label(self, category_id: int) -> int:
        return self.category_ids.index(category_id) + 1

    def category_id(self, label: int) -> int:
        if not 1 <= label <= len(self.category_ids):
            raise ValueError(f"label {label} is outside 1..{len(self.category_ids)}")
        return self.category_ids[label - 1]

    def to_category_ids(self, labels: torch.Tensor) -> torch.Tensor:
        lookup = torch.tensor((0, *self.category_ids), dtype=torch.int64)
        return lookup[labels.to(torch.int64)]


def load_coco(ann_file: Path) -> COCO:
    """pycocotools COCO without its progress prints."""
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(ann_file))


# ---------------------------------------------------------------- dataset


class CocoInstances(Dataset):
    """Instance segmentation samples from a COCO annotation file and its image folder.

    Masks are decoded lazily, per sample, from polygons or RLE with pycocotools.
    """

    def __init__(
        self,
        image_dir: Path,
        ann_file: Path,
        *,
        transforms: Transform | None = None,
        remove_empty: bool = False,
        seed: int = 0,
    ):
        self.image_dir = Path(image_dir)
        self.coco = load_coco(Path(ann_file))
        self.categories = CategoryMap.from_coco(self.coco.dataset.get("categories", []))
        self._label = {cid: i + 1 for i, cid in enumerate(self.categories.category_ids)}
        ids = sorted(self.coco.imgs)
        if remove_empty:
            ids = [i for i in ids if any(not a.get("iscrowd", 0) for a in self.coco.imgToAnns.get(i, []))]
        self.ids = ids
        self.transforms = transforms
        self.seed = seed
        self.epoch = 0

    @classmethod
    def from_root(cls, root: Path, split: str, **kwargs: Any) -> CocoInstances:
        """The normalised layout written by ``atmask ingest``: ``root/images/<split>``, ``root/annotations``."""
        root = Path(root)
        return cls(root / "images" / split, root / "annotations" / f"instances_{split}.json", **kwargs)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.ids)

    def aspect_ratios(self) -> list[float]:
        """Width / height per sample, from the annotation file (no image decoding)."""
        return [self.coco.imgs[i]["width"] / self.coco.imgs[i]["height"] for i in self.ids]

    def load_image(self, image_id: int) -> torch.Tensor:
        path = self.image_dir / self.coco.imgs[image_id]["file_name"]
        data = torch.from_numpy(np.fromfile(path, dtype=np.uint8))
        return decode_image(data, mode=ImageReadMode.RGB)

    def load_target(self, image_id: int) -> Target:
        info = self.coco.imgs[image_id]
        h, w = info["height"], info["width"]
        anns = [a for a in self.coco.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
        boxes = [
            [a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
            for a in anns
        ]
        if anns:
            rles = [self.coco.annToRLE(a) for a in anns]
            masks = torch.from_numpy(np.ascontiguousarray(mask_util.decode(rles).transpose(2, 0, 1)))
        else:
            masks = torch.zeros((0, h, w), dtype=torch.uint8)
        return {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor([self._label[a["category_id"]] for a in anns], dtype=torch.int64),
            "masks": masks,
            "image_id": int(image_id),
            "area": torch.tensor([a["area"] for a in anns], dtype=torch.float32),
            "iscrowd": torch.zeros(len(anns), dtype=torch.int64),
        }

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        image_id = self.ids[index]
        image, target = self.load_image(image_id), self.load_target(image_id)
        if self.transforms is not None:
            gen = torch.Generator().manual_seed(_mix(self.seed, self.epoch, index))
            image, target = self.transforms(image, target, gen)
        return image, target


def _mix(*values: int) -> int:
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2))) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


# ---------------------------------------------------------------- transforms


class Compose:
    def __init__(self, transforms: Sequence[Transform]):
        self.transforms = list(transforms)

    def __call__(
        self, image: torch.Tensor, target: Target, gen: torch.Generator
    ) -> tuple[torch.Tensor, Target]:
        for t in self.transforms:
            image, target = t(image, target, gen)
        return image, target


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(
        self, image: torch.Tensor, target: Target, gen: torch.Generator
    ) -> tuple[torch.Tensor, Target]:
        if torch.rand((), generator=gen).item() >= self.p:
            return image, target
        width = image.shape[-1]
        target = dict(target)
        boxes = target["boxes"].clone()
        boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
        target["boxes"] = boxes
        target["masks"] = target["masks"].flip(-1)
        return image.flip(-1), target


def train_transforms(hflip_prob: float = 0.5) -> Compose:
    """Augmentation in the loader: a horizontal flip. Resizing is the model transform's, on the device."""
    return Compose([RandomHorizontalFlip(hflip_prob)])


def to_float_image(image: torch.Tensor) -> torch.Tensor:
    """A uint8 image (0..255) as float32 in [0, 1], what torchvision's detection models take; a floating
    image is returned as it is. Call it after the copy to the device, so the copy moves uint8."""
    return image if image.is_floating_point() else image.float().div_(255.0)


# ---------------------------------------------------------------- batching


def collate(batch: Sequence[tuple[torch.Tensor, Target]]) -> tuple[list[torch.Tensor], list[Target]]:
    """Lists of images and targets, as torchvision detection models take them."""
    images, targets = zip(*batch, strict=True) if batch else ((), ())
    return list(images), list(targets)


class DetectionLoader(DataLoader):
    """A DataLoader whose workers hand over each batch packed in a reused shared-memory buffer
    (:mod:`model.packing`) and whose iterator gives back the ordinary batch: the same values as with
    ``num_workers=0``. With workers, ``pin_memory`` pins while copying the batch out of the buffer.

    Each set of worker processes gets its own buffers, queues and receiver (a new set per iterator, or one
    for the loader's life with ``persistent_workers``). A batch in flight when an iteration is abandoned
    keeps its buffer; a worker whose buffers are all out uses one-off ones (correct, slower)."""

    def __init__(self, dataset: Dataset, *, collate_fn: Callable = collate, **kwargs: Any):
        self._collate_samples = collate_fn
        self._pin_while_copying = (
            bool(kwargs.pop("pin_memory", False)) if kwargs.get("num_workers") else False
        )
        self._receiver: Receiver | None = None
        super().__init__(dataset, collate_fn=collate_fn, **kwargs)

    def __iter__(self) -> Iterator[Any]:
        if not self.num_workers:
            return super().__iter__()
        if self._receiver is None or not self.persistent_workers:  # new worker processes start below
            releases = release_queues(self.num_workers, self.multiprocessing_context)
            pool = (self.prefetch_factor or 2) + 2
            self.collate_fn = PackingCollate(self._collate_samples, releases, pool_size=pool)
            self._receiver = Receiver(releases, pin=self._pin_while_copying)
        return map(self._receiver, super().__iter__())


def aspect_ratio_groups(ratios: Sequence[float]) -> list[int]:
    """Group 0: portrait (w < h), group 1: landscape or square, like Detectron2's grouping."""
    return [0 if r < 1.0 else 1 for r in ratios]


class GroupedBatchSampler(Sampler[list[int]]):
    """Batches whose images share an aspect-ratio group, so padding to a common size wastes little.

    Takes indices from ``sampler`` (random, sequential or distributed) in order; each group fills its own
    batch. Left-over partial batches come at the end of the epoch unless ``drop_last``.
    """

    def __init__(
        self, sampler: Sampler[int], group_ids: Sequence[int], batch_size: int, drop_last: bool = False
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.sampler = sampler
        self.group_ids = list(group_ids)
        self.batch_size = batch_size
        self.drop_last = drop_last

    def __iter__(self) -> Iterator[list[int]]:
        buckets: dict[int, list[int]] = {}
        for idx in self.sampler:
            bucket = buckets.setdefault(self.group_ids[idx], [])
            bucket.append(idx)
            if len(bucket) == self.batch_size:
                yield bucket.copy()
                bucket.clear()
        if not self.drop_last:
            for group in sorted(buckets):
                if buckets[group]:
                    yield buckets[group]

    def _indices(self) -> Sequence[int] | Sampler[int]:
        """Every index the sampler yields, without drawing from a random sampler's generator."""
        s = self.sampler
        if isinstance(s, SequentialSampler) or (
            isinstance(s, RandomSampler) and not s.replacement and s.num_samples == len(s.data_source)
        ):
            return range(len(s))
        return s

    def __len__(self) -> int:
        counts: dict[int, int] = {}
        for idx in self._indices():
            counts[self.group_ids[idx]] = counts.get(self.group_ids[idx], 0) + 1
        div = (
            (lambda n: n // self.batch_size) if self.drop_last else (lambda n: math.ceil(n / self.batch_size))
        )
        return sum(div(n) for n in counts.values())


def seed_worker(worker_id: int) -> None:
    """worker_init_fn: seed Python's and NumPy's RNGs from the per-worker torch seed."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def make_loader(
    dataset: CocoInstances,
    *,
    batch_size: int,
    shuffle: bool,
    workers: int = 0,
    seed: int = 0,
    group_by_aspect_ratio: bool = True,
    sampler: Sampler[int] | None = None,
    drop_last: bool = False,
) -> DataLoader:
    """A deterministic DataLoader (seeded sampler, per-sample augmentation seeds, seeded workers)."""
    gen = torch.Generator().manual_seed(seed)
    if sampler is None:
        sampler = RandomSampler(dataset, generator=gen) if shuffle else SequentialSampler(dataset)
    if group_by_aspect_ratio:
        groups = aspect_ratio_groups(dataset.aspect_ratios())
        batch_sampler: Sampler[list[int]] = GroupedBatchSampler(sampler, groups, batch_size, drop_last)
    else:
        from torch.utils.data import BatchSampler

        batch_sampler = BatchSampler(sampler, batch_size, drop_last)
    return DetectionLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=workers,
        worker_init_fn=seed_worker,
        generator=gen,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
    )
