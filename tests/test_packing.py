"""A worker's batch crosses to the training process as one buffer, and comes back equal (model/packing.py)."""

import pickle

import torch

from model.packing import ALIGN, PackedBatch, PackingCollate, pack, unpack


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
    batch = {"t": base.t(), "slice": base[:, 1:3], "bools": base > 10}
    out = unpack(pack(batch))
    assert torch.equal(out["t"], base.t()) and torch.equal(out["slice"], base[:, 1:3])
    assert out["bools"].dtype == torch.bool and torch.equal(out["bools"], base > 10)
    out["t"].zero_()
    assert torch.equal(out["slice"], base[:, 1:3])  # slots never overlap


def test_packing_collate_is_picklable_and_packs_the_collated_batch() -> None:
    collate = pickle.loads(pickle.dumps(PackingCollate(list)))
    packed = collate([torch.ones(2), torch.zeros(3)])
    assert isinstance(packed, PackedBatch)
    assert [t.tolist() for t in unpack(packed)] == [[1.0, 1.0], [0.0, 0.0, 0.0]]
