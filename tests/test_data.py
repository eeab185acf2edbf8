"""Data loading: targets equal pycocotools' decoding, augmentation keeps masks and boxes consistent, batching
groups by aspect ratio, and loading is deterministic whatever the number of workers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_util
from torch.utils.data import RandomSampler, SequentialSampler
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from components.ingest import ingest
from components.synthetic import SyntheticConfig
from components.train_recipe import to_device
from model.builder import IMAGE_MEAN, IMAGE_STD
from model.data import (
    CategoryMap,
    CocoInstances,
    GroupedBatchSampler,
    RandomHorizontalFlip,
    aspect_ratio_groups,
    collate,
    load_coco,
    make_loader,
    train_transforms,
)

SYN = SyntheticConfig(seed=11, train_images=6, val_images=2, image_size=64, num_categories=3, max_instances=4)


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "coco"
    ingest("synthetic", out, synthetic=SYN, workers=1)
    return out


def mask_box(mask: torch.Tensor) -> list[float]:
    """Tight XYXY pixel box of a binary mask (pixel i covers [i, i + 1])."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def check_against_pycocotools(ds: CocoInstances, index: int) -> int:
    image, target = ds[index]
    image_id = ds.ids[index]
    info = ds.coco.imgs[image_id]
    anns = [a for a in ds.coco.imgToAnns[image_id] if not a["iscrowd"]]
    with Image.open(ds.image_dir / info["file_name"]) as im:
        pixels = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
    assert image.dtype == torch.uint8 and image.shape == (3, info["height"], info["width"])
    assert torch.equal(image, pixels)
    assert target["image_id"] == image_id
    assert target["masks"].dtype == torch.uint8 and target["masks"].shape == (len(anns), *image.shape[1:])
    for i, ann in enumerate(anns):
        assert np.array_equal(target["masks"][i].numpy(), ds.coco.annToMask(ann))
        x, y, w, h = ann["bbox"]
        assert target["boxes"][i].tolist() == pytest.approx([x, y, x + w, y + h])
        assert target["labels"][i].item() == ds.categories.label(ann["category_id"])
        assert target["area"][i].item() == pytest.approx(ann["area"])
    assert target["iscrowd"].tolist() == [0] * len(anns)
    return len(anns)


def test_pennfudan_targets_equal_ann_to_mask(pennfudan):
    ds = CocoInstances(pennfudan / "train", pennfudan / "annotations" / "instances_train.json")
    assert len(ds) == 100 and ds.categories.num_classes == 2
    busiest = max(range(len(ds)), key=lambda i: len(ds.coco.imgToAnns[ds.ids[i]]))
    counted = sum(check_against_pycocotools(ds, i) for i in (0, 1, 57, busiest))
    assert counted >= 4 + 3
    assert ds[busiest][1]["labels"].tolist() == [1] * len(ds.coco.imgToAnns[ds.ids[busiest]])


def test_synthetic_rle_targets_equal_ann_to_mask(synthetic_root):
    ds = CocoInstances.from_root(synthetic_root, "train")
    assert len(ds) == 6
    total = sum(check_against_pycocotools(ds, i) for i in range(len(ds)))
    assert total == len(ds.coco.anns)
    labels = torch.cat([ds[i][1]["labels"] for i in range(len(ds))])
    expected = [ds.categories.label(a["category_id"]) for i in ds.ids for a in ds.coco.imgToAnns[i]]
    assert labels.tolist() == expected


def write_coco(tmp_path: Path, coco: dict) -> Path:
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(coco))
    return path


def test_crowd_regions_are_not_targets_and_empty_images_can_be_skipped(tmp_path, synthetic_root):
    coco = json.loads((synthetic_root / "annotations" / "instances_train.json").read_text())
    first = [a for a in coco["annotations"] if a["image_id"] == 1]
    for a in first:
        a["iscrowd"] = 1
    one_crowd = next(a for a in coco["annotations"] if a["image_id"] == 2)
    one_crowd["iscrowd"] = 1
    ann_file = write_coco(tmp_path, coco)
    image_dir = synthetic_root / "images" / "train"

    ds = CocoInstances(image_dir, ann_file)
    assert ds.ids == [1, 2, 3, 4, 5, 6]
    _, t1 = ds[0]
    assert t1["boxes"].shape == (0, 4) and t1["masks"].shape == (0, 64, 64) and t1["labels"].numel() == 0
    _, t2 = ds[1]
    kept = [a for a in coco["annotations"] if a["image_id"] == 2 and not a["iscrowd"]]
    assert t2["masks"].shape[0] == len(kept)

    assert CocoInstances(image_dir, ann_file, remove_empty=True).ids == [2, 3, 4, 5, 6]


def test_category_map_with_sparse_coco_ids():
    cats = CategoryMap.from_coco([{"id": 90, "name": "c"}, {"id": 1, "name": "a"}, {"id": 5, "name": "b"}])
    assert cats.category_ids == (1, 5, 90) and cats.names == ("a", "b", "c") and cats.num_classes == 4
    assert [cats.label(c) for c in (1, 5, 90)] == [1, 2, 3]
    assert cats.category_id(3) == 90
    assert cats.to_category_ids(torch.tensor([1, 3, 2, 0])).tolist() == [1, 90, 5, 0]
    with pytest.raises(ValueError, match=r"label 4 is outside 1\.\.3"):
        cats.category_id(4)


# ---------------------------------------------------------------- transforms


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_hflip_flips_image_masks_and_boxes_consistently(synthetic_root):
    ds = CocoInstances.from_root(synthetic_root, "train")
    for index in range(3):
        image, target = ds[index]
        flipped_image, flipped = RandomHorizontalFlip(1.0)(image, target, gen())
        width = image.shape[-1]
        assert torch.equal(flipped_image, image.flip(-1))
        assert torch.equal(flipped["masks"], target["masks"].flip(-1))
        x1, y1, x2, y2 = target["boxes"].unbind(1)
        assert torch.equal(flipped["boxes"], torch.stack([width - x2, y1, width - x1, y2], 1))
        for mask, box, orig in zip(flipped["masks"], flipped["boxes"], target["boxes"], strict=True):
            assert mask_box(mask) == box.tolist()  # synthetic boxes are the masks' tight boxes
            assert mask_box(mask) != orig.tolist() or orig[0] + orig[2] == width
        assert torch.equal(flipped["labels"], target["labels"]) and torch.equal(
            target["boxes"], ds[index][1]["boxes"]
        )
        same_image, same = RandomHorizontalFlip(0.0)(image, target, gen())
        assert same_image is image and same is target


def test_the_one_resize_is_the_models_transform_on_the_loaders_uint8_sample(pennfudan):
    """The loader hands the file's pixels; to_device's conversion + the model's transform bring them to
    800 x 1333 with boxes, masks and area consistent, in one resize."""
    ds = CocoInstances(pennfudan / "train", pennfudan / "annotations" / "instances_train.json")
    image, target = ds[0]  # 559 x 536 (w x h), uint8
    images, targets = to_device([image], [target], torch.device("cpu"))
    assert images[0].dtype == torch.float32 and torch.equal(images[0], image.float() / 255)
    assert targets[0]["masks"].dtype == torch.uint8
    transform = GeneralizedRCNNTransform(800, 1333, list(IMAGE_MEAN), list(IMAGE_STD)).train()
    batch, out = transform(images, targets)
    (nh, nw), (h, w) = batch.image_sizes[0], image.shape[-2:]
    assert (nh, nw) == (800, round(w * 800 / h))
    sx, sy = nw / w, nh / h
    assert torch.allclose(out[0]["boxes"], target["boxes"] * torch.tensor([sx, sy, sx, sy]))
    assert out[0]["masks"].shape == (len(target["masks"]), nh, nw)
    for mask, box, area in zip(out[0]["masks"], out[0]["boxes"], target["area"], strict=True):
        assert mask_box(mask) == pytest.approx(box.tolist(), abs=2.5)
        assert mask.sum().item() == pytest.approx(area.item() * sx * sy, rel=0.03)
    wide = transform([torch.rand(3, 100, 1000)])[0]
    assert wide.image_sizes[0] == (133, 1333)  # the longest side is capped at max_size


def test_train_transforms_are_deterministic_per_seed_epoch_and_index(synthetic_root):
    def batch(seed: int, epoch: int) -> list[torch.Tensor]:
        ds = CocoInstances.from_root(synthetic_root, "train", transforms=train_transforms(), seed=seed)
        ds.set_epoch(epoch)
        return [ds[i][1]["boxes"] for i in range(len(ds))]

    a, b = batch(0, 0), batch(0, 0)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    flips = [
        [not torch.equal(x, y) for x, y in zip(batch(0, e), batch(0, 99), strict=True)] for e in range(3)
    ]
    assert any(any(f) for f in flips)  # another epoch draws other flips
    ds = CocoInstances.from_root(synthetic_root, "train", transforms=train_transforms())
    image, target = ds[0]  # not resized: the model's transform does that, once, on the device
    assert (
        image.dtype == torch.uint8 and image.shape == (3, 64, 64) and target["masks"].shape[-2:] == (64, 64)
    )


# ---------------------------------------------------------------- batching


def test_grouped_batch_sampler_keeps_groups_apart_and_covers_every_index():
    ratios = [0.5, 1.5, 1.0, 0.75, 2.0, 0.6, 1.2, 0.9, 1.33]
    groups = aspect_ratio_groups(ratios)
    assert groups == [0, 1, 1, 0, 1, 0, 1, 0, 1]
    sampler = GroupedBatchSampler(SequentialSampler(range(9)), groups, batch_size=2)
    batches = list(sampler)
    assert batches == [[1, 2], [0, 3], [4, 6], [5, 7], [8]]
    assert len(sampler) == len(batches)
    dropped = GroupedBatchSampler(SequentialSampler(range(9)), groups, batch_size=2, drop_last=True)
    assert list(dropped) == [[1, 2], [0, 3], [4, 6], [5, 7]] and len(dropped) == 4

    shuffled = GroupedBatchSampler(RandomSampler(range(9), generator=gen(3)), groups, batch_size=3)
    batches = list(shuffled)
    assert sorted(i for b in batches for i in b) == list(range(9))
    assert all(len({groups[i] for i in b}) == 1 for b in batches)
    assert len(shuffled) == len(batches) == 4
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        GroupedBatchSampler(SequentialSampler(range(3)), [0, 0, 0], 0)


def test_collate_returns_lists():
    batch = [(torch.zeros(3, 4, 5), {"image_id": 1}), (torch.ones(3, 6, 5), {"image_id": 2})]
    images, targets = collate(batch)
    assert [i.shape[1] for i in images] == [4, 6] and [t["image_id"] for t in targets] == [1, 2]
    assert collate([]) == ([], [])


def loader_batches(
    root: Path, workers: int
) -> list[tuple[list[int], list[torch.Tensor], list[torch.Tensor]]]:
    ds = CocoInstances.from_root(root, "train", transforms=train_transforms(), seed=7)
    loader = make_loader(ds, batch_size=2, shuffle=True, workers=workers, seed=5)
    return [([t["image_id"] for t in targets], images, targets) for images, targets in loader]


@pytest.mark.parametrize("workers", [1, 2])
def test_loader_is_deterministic_whatever_the_number_of_workers(synthetic_root, workers):
    """Workers hand over packed batches (model/packing.py): unpacked, every field equals workers=0's."""
    serial = loader_batches(synthetic_root, 0)
    parallel = loader_batches(synthetic_root, workers)
    assert len(serial) == 3 and sorted(i for ids, _, _ in serial for i in ids) == [1, 2, 3, 4, 5, 6]
    assert [ids for ids, _, _ in serial] == [ids for ids, _, _ in parallel]
    for (_, img_a, tgt_a), (_, img_b, tgt_b) in zip(serial, parallel, strict=True):
        assert all(x.dtype == torch.uint8 and torch.equal(x, y) for x, y in zip(img_a, img_b, strict=True))
        for a, b in zip(tgt_a, tgt_b, strict=True):
            assert a.keys() == b.keys() and a["image_id"] == b["image_id"]
            tensors = [k for k, v in a.items() if isinstance(v, torch.Tensor)]
            assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in tensors)
    assert [ids for ids, _, _ in serial] != [[1, 2], [3, 4], [5, 6]]  # shuffled


def test_load_coco_is_quiet(synthetic_root, capsys):
    coco = load_coco(synthetic_root / "annotations" / "instances_val.json")
    assert len(coco.imgs) == 2 and capsys.readouterr().out == ""
    rle = coco.annToRLE(next(iter(coco.anns.values())))
    assert mask_util.area(rle) == next(iter(coco.anns.values()))["area"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_loader_batch_is_pinned_and_converted_on_the_device(synthetic_root):
    ds = CocoInstances.from_root(synthetic_root, "train", transforms=train_transforms(), seed=7)
    images, targets = next(iter(make_loader(ds, batch_size=2, shuffle=False, workers=1)))
    assert all(im.dtype == torch.uint8 and im.is_pinned() for im in images)
    on_gpu, gpu_targets = to_device(images, targets, torch.device("cuda"))
    for im, gpu in zip(images, on_gpu, strict=True):
        assert gpu.is_cuda and gpu.dtype == torch.float32
        assert torch.equal(gpu.cpu(), im.float() / 255)
    assert all(t["masks"].is_cuda and t["masks"].dtype == torch.uint8 for t in gpu_targets)
