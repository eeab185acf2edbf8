"""A worker's batch crosses to the training process as one buffer, and comes back equal (model/packing.py)."""

import pickle
from typing import NamedTuple

import pytest
import torch

from model import packing
from model.data import DetectionLoader
from model.packing import ALIGN, PackingCollate, Receiver, pack, release_queues, unpack


class Pair(NamedTuple):
    tensor: torch.Tensor
    name: str


def tensors_in(node) -> list[torch.Tensor]:
    if isinstance(node, torch.Tensor):
        return [node]
    if isinstance(node, dict):
        node = list(node.values())
    if isinstance(node, list | tuple):
        return [t for v in node for t in tensors_in(v)]
    return []


def detection_batch() -> tuple[list[torch.Tensor], list[dict]]:
    gen = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 7, 5), dtype=torch.uint8, generator=gen) for _ in range(2)]
    targets = [
        {
            "boxes": torch.rand(3, 4, generator=gen),
            "labels": torch.tensor([1, 2, 3]),
            "masks": torch.randint(0, 2, (3, 7, 5), dtype=torch.uint8, generator=gen),
            "image_id": 11,
            "area": torch.rand(3, generator=gen, dtype=torch.float64),
            "iscrowd": torch.zeros(3, dtype=torch.int64),
        },
        {  # an image without instances: empty tensors keep their shapes
            "boxes": torch.zeros(0, 4),
            "labels": torch.zeros(0, dtype=torch.int64),
            "masks": torch.zeros(0, 7, 5, dtype=torch.uint8),
            "image_id": 12,
            "area": torch.zeros(0),
            "iscrowd": torch.zeros(0, dtype=torch.bool),
        },
    ]
    return images, targets


def test_unpack_gives_back_every_tensor_equal_with_its_dtype_and_shape() -> None:
    batch = (*detection_batch(), torch.tensor(2.5, dtype=torch.float16), "note")
    packed = pack(batch)
    assert tensors_in(packed.layout) == [] and packed.buffer.dtype == torch.uint8
    received = pickle.loads(pickle.dumps(packed))
    out = unpack(received)
    assert type(out) is tuple and out[3] == "note" and out[1][1]["image_id"] == 12
    before, after = tensors_in(batch), tensors_in(out)
    assert len(before) == len(after) == 13  # 2 images, 5 per target, the scalar
    for a, b in zip(before, after, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    storages = {t.untyped_storage().data_ptr() for t in after}
    assert storages == {received.buffer.untyped_storage().data_ptr()}  # views, no copies
    assert all(t.storage_offset() * t.element_size() % ALIGN == 0 for t in after)


def test_packed_views_are_independent_and_non_contiguous_input_is_packed_by_value() -> None:
    base = torch.arange(24, dtype=torch.int32).reshape(4, 6)
    hwc = torch.randint(0, 256, (5, 7, 3), dtype=torch.uint8)
    batch = {"t": base.t(), "slice": base[:, 1:3], "bools": base > 10, "chw": hwc.permute(2, 0, 1)}
    batch["one"] = torch.arange(10.0)[::3][:1]  # one element, stride 3
    batch["pair"] = Pair(base[:1, 4], "x")  # a namedtuple keeps its type
    out = unpack(pack(batch))
    assert torch.equal(out["one"], batch["one"]) and isinstance(out["pair"], Pair)
    assert torch.equal(out["pair"].tensor, base[:1, 4]) and out["pair"].name == "x"
    assert torch.equal(out["t"], base.t()) and torch.equal(out["slice"], base[:, 1:3])
    # a decoded image (HWC memory seen as CHW) moves as it lies and comes back with the same strides
    assert torch.equal(out["chw"], batch["chw"]) and out["chw"].stride() == batch["chw"].stride()
    assert out["t"].stride() == base.t().stride() and out["slice"].is_contiguous()
    assert out["bools"].dtype == torch.bool and torch.equal(out["bools"], base > 10)
    out["t"].zero_()
    assert torch.equal(out["slice"], base[:, 1:3])  # slots never overlap


class VaryingBatches(torch.utils.data.Dataset):
    """Samples whose sizes change from index to index, so buffers are reused, outgrown and replaced."""

    def __len__(self) -> int:
        return 40

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        gen = torch.Generator().manual_seed(index)
        side = 8 + 3 * (index % 7) + (20 if index == 25 else 0)
        image = torch.randint(0, 256, (3, side, side + 1), dtype=torch.uint8, generator=gen)
        return image, {"boxes": torch.rand(index % 3, 4, generator=gen), "image_id": index}


def loaded(workers: int, persistent: bool = False) -> tuple[DetectionLoader, list]:
    loader = DetectionLoader(
        VaryingBatches(), batch_size=2, num_workers=workers, persistent_workers=persistent
    )
    return loader, [batch for _ in range(2) for batch in loader]  # two epochs


@pytest.mark.parametrize("persistent", [False, True])
def test_workers_reuse_a_few_buffers_and_every_batch_kept_stays_intact(persistent: bool) -> None:
    """40 batches per worker through a pool of 4 buffers, every batch still referenced at the end (a
    buffer rewritten too early would change one of them), each equal to the in-process batch."""
    _, expected = loaded(0)
    loader, got = loaded(2, persistent)
    assert len(got) == len(expected) == 40
    for (images_a, targets_a), (images_b, targets_b) in zip(expected, got, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(images_a, images_b, strict=True))
        assert [t["image_id"] for t in targets_a] == [t["image_id"] for t in targets_b]
        assert all(torch.equal(a["boxes"], b["boxes"]) for a, b in zip(targets_a, targets_b, strict=True))
    receiver = loader._receiver
    assert 0 < len(receiver._mapped) <= 2 * 4  # the pools of the last workers only
    assert receiver.trips["reused"] >= 5 and receiver.trips["one-off"] == 0, receiver.trips  # last epoch


def test_a_consumer_that_holds_every_buffer_out_gets_one_off_buffers() -> None:
    releases = release_queues(1)
    collate = PackingCollate(list, releases, pool_size=2)
    info = type("Info", (), {"id": 0})()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(packing, "get_worker_info", lambda: info)
        shipments = [collate([torch.full((4,), float(i))]) for i in range(4)]
    assert [s.index for s in shipments] == [0, 1, None, None]  # nothing handed back yet
    receiver = Receiver(releases)
    assert [receiver(s)[0].tolist() for s in shipments] == [[float(i)] * 4 for i in range(4)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(packing, "get_worker_info", lambda: info)
        again = collate([torch.ones(2)])
    assert again.index in (0, 1) and again.buffer is None  # handed back, reused, already mapped
    assert receiver(again)[0].tolist() == [1.0, 1.0]


def test_spawned_workers_get_the_collate_and_its_queues() -> None:
    """The start method of macOS and of CUDA-safe set-ups: the collate function and its queues are
    pickled into each worker while it starts."""
    loader = DetectionLoader(VaryingBatches(), batch_size=4, num_workers=1, multiprocessing_context="spawn")
    first = [targets[0]["image_id"] for _, targets in loader]
    assert first == list(range(0, 40, 4))


def test_two_live_iterators_over_one_loader_each_get_their_own_buffers() -> None:
    _, expected = loaded(0)
    loader = DetectionLoader(VaryingBatches(), batch_size=2, num_workers=1)
    pairs = list(zip(loader, loader, strict=True))
    assert len(pairs) == 20
    for (a, b), (images, targets) in zip(pairs, expected[:20], strict=True):
        for got in (a, b):
            assert all(torch.equal(x, y) for x, y in zip(got[0], images, strict=True))
            assert [t["image_id"] for t in got[1]] == [t["image_id"] for t in targets]
