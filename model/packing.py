"""A batch as one byte buffer, so it crosses from a DataLoader worker to the training process in one piece.

A tensor a worker returns travels in its own shared-memory segment: the worker copies it into a new shm
file, sends the file descriptor, and the training process maps it. A detection batch holds six tensors
per sample (image, masks, boxes, labels, area, iscrowd), so with batch 2 that is a dozen segments for a
few milliseconds of decoding, and the transport cost more than the work (one worker was slower than
none). :func:`pack` copies every tensor of a batch into one uint8 buffer allocated in shared memory (one
segment, one copy); :func:`unpack` returns the same structure as views into it: equal values, dtypes and
shapes, no copy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import get_worker_info

ALIGN = 16  # bytes: every slot starts where any dtype's view of it is legal


@dataclass(frozen=True)
class Slot:
    """Where one tensor lies in the buffer."""

    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass
class PackedBatch:
    """``buffer`` (uint8 [nbytes]) and the batch's structure with its tensors replaced by :class:`Slot`."""

    buffer: torch.Tensor
    layout: Any

    def pin_memory(self) -> PackedBatch:  # called by the DataLoader's pin-memory thread
        return PackedBatch(self.buffer.pin_memory(), self.layout)


def pack(batch: Any, shared: bool = False) -> PackedBatch:
    """``shared``: allocate the buffer in shared memory (in a worker), so sending it copies nothing more."""
    tensors: list[tuple[Slot, torch.Tensor]] = []
    end = 0

    def place(tensor: torch.Tensor) -> Slot:
        nonlocal end
        slot = Slot(end, tensor.numel() * tensor.element_size(), tensor.dtype, tuple(tensor.shape))
        tensors.append((slot, tensor))
        end += -(-slot.nbytes // ALIGN) * ALIGN
        return slot

    layout = _map_tensors(batch, place)
    buffer = _shared_bytes(end) if shared else torch.empty(end, dtype=torch.uint8)
    for slot, tensor in tensors:
        if slot.nbytes:
            flat = tensor.detach().contiguous().reshape(-1)
            buffer[slot.offset : slot.offset + slot.nbytes].copy_(flat.view(torch.uint8))
    return PackedBatch(buffer, layout)


def _shared_bytes(nbytes: int) -> torch.Tensor:
    # default_collate does the same in workers: a tensor in ordinary memory would be copied into a new
    # shared-memory segment when the worker's queue pickles it.
    storage = torch.UntypedStorage._new_shared(nbytes)
    return torch.empty(0, dtype=torch.uint8).set_(storage, 0, (nbytes,))


def unpack(packed: PackedBatch) -> Any:
    def view(slot: Slot) -> torch.Tensor:
        data = packed.buffer[slot.offset : slot.offset + slot.nbytes]
        return data.view(slot.dtype).view(slot.shape)

    return _map_slots(packed.layout, view)


def _map_tensors(node: Any, fn: Callable[[torch.Tensor], Slot]) -> Any:
    if isinstance(node, torch.Tensor):
        return fn(node)
    if isinstance(node, dict):
        return {k: _map_tensors(v, fn) for k, v in node.items()}
    if isinstance(node, list | tuple):
        return type(node)(_map_tensors(v, fn) for v in node)
    return node


def _map_slots(node: Any, fn: Callable[[Slot], torch.Tensor]) -> Any:
    if isinstance(node, Slot):
        return fn(node)
    if isinstance(node, dict):
        return {k: _map_slots(v, fn) for k, v in node.items()}
    if isinstance(node, list | tuple):
        return type(node)(_map_slots(v, fn) for v in node)
    return node


class PackingCollate:
    """A worker's collate function: ``collate``'s batch, packed (picklable, for any start method)."""

    def __init__(self, collate: Callable[[list[Any]], Any]):
        self.collate = collate

    def __call__(self, samples: list[Any]) -> PackedBatch:
        return pack(self.collate(samples), shared=get_worker_info() is not None)
