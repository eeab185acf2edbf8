"""How a batch crosses from a DataLoader worker to the training process: packed, in a reused buffer.

A tensor a worker returns normally travels in a new shared-memory segment of its own: the worker copies it
in, sends the file descriptor, the training process maps it, and both fault in every page of it. A
detection batch holds six tensors per sample (image, masks, boxes, labels, area, iscrowd), and on a 2-core
machine moving them cost more than decoding them (one worker was slower than none).

Here a worker packs every tensor of a batch into one uint8 buffer (:func:`pack`, :func:`unpack`: the same
structure back as views: equal values, dtypes and shapes, and the same strides for any tensor whose memory
is dense, such as a permuted one; sliced or expanded tensors come back contiguous) taken from a small pool of shared-memory buffers
it reuses (:class:`PackingCollate`). A buffer's descriptor is sent once; after that a batch is a few
hundred bytes naming the buffer and its layout. The training process copies the batch out (into pinned
memory when the batch goes to a GPU, the copy it needs anyway) and hands the buffer back to its worker
(:class:`Receiver`), so a buffer is never rewritten while anything can still read it.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import get_worker_info

ALIGN = 16  # bytes: every slot starts where any dtype's view of it is legal


@dataclass(frozen=True)
class Slot:
    """Where one tensor lies in the buffer: its bytes in memory order, as a contiguous tensor of
    ``shape``, and ``order``, the permutation that gives back the tensor's own dimension order."""

    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    order: tuple[int, ...]


def _memory_order(tensor: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """``tensor`` as a contiguous permutation of itself (decoded images are HWC memory seen as CHW: moving
    their bytes as they lie costs a copy, making them contiguous first a transpose), and that permutation."""
    order = tuple(sorted(range(tensor.dim()), key=lambda d: -tensor.stride(d)))
    dense = tensor.permute(order)
    if dense.is_contiguous():
        return dense, order
    return tensor.contiguous(), tuple(range(tensor.dim()))


@dataclass
class PackedBatch:
    """``buffer`` (uint8) and the batch's structure with its tensors replaced by :class:`Slot`."""

    buffer: torch.Tensor
    layout: Any


def plan(batch: Any) -> tuple[Any, list[tuple[Slot, torch.Tensor]], int]:
    """The layout of ``batch`` in one buffer, each tensor with its slot, and the bytes it needs."""
    placed: list[tuple[Slot, torch.Tensor]] = []
    end = 0

    def place(tensor: torch.Tensor) -> Slot:
        nonlocal end
        dense, order = _memory_order(tensor.detach())
        slot = Slot(end, dense.numel() * dense.element_size(), dense.dtype, tuple(dense.shape), order)
        placed.append((slot, dense))
        end += -(-slot.nbytes // ALIGN) * ALIGN
        return slot

    return _map(batch, torch.Tensor, place), placed, end


def write(placed: list[tuple[Slot, torch.Tensor]], buffer: torch.Tensor) -> None:
    for slot, tensor in placed:
        if slot.nbytes:
            flat = tensor.reshape(-1)
            flat = flat if tensor.numel() > 1 else flat.new_empty(flat.shape).copy_(flat)  # stride 1
            buffer[slot.offset : slot.offset + slot.nbytes].copy_(flat.view(torch.uint8))


def pack(batch: Any) -> PackedBatch:
    layout, placed, nbytes = plan(batch)
    buffer = torch.empty(nbytes, dtype=torch.uint8)
    write(placed, buffer)
    return PackedBatch(buffer, layout)


def unpack(packed: PackedBatch) -> Any:
    def view(slot: Slot) -> torch.Tensor:
        data = packed.buffer[slot.offset : slot.offset + slot.nbytes]
        dense = data.view(slot.dtype).view(slot.shape)
        return dense.permute(tuple(slot.order.index(d) for d in range(len(slot.order))))

    return _map(packed.layout, Slot, view)


def _map(node: Any, leaf: type, fn: Callable[[Any], Any]) -> Any:
    """``node`` with every ``leaf`` inside dicts, lists and tuples replaced by ``fn(leaf)``."""
    if isinstance(node, leaf):
        return fn(node)
    if isinstance(node, dict):
        return {k: _map(v, leaf, fn) for k, v in node.items()}
    if isinstance(node, tuple) and hasattr(node, "_fields"):  # a namedtuple
        return type(node)(*(_map(v, leaf, fn) for v in node))
    if isinstance(node, list | tuple):
        return type(node)(_map(v, leaf, fn) for v in node)
    return node


# ---------------------------------------------------------------- worker → training process


@dataclass
class Shipment:
    """What a worker returns: its batch in pool buffer ``index`` (``buffer`` only on that buffer's first
    trip; None afterwards, the receiver has it mapped) or, with ``index`` None, in a one-off buffer."""

    worker: int
    index: int | None
    buffer: torch.Tensor | None
    nbytes: int
    layout: Any


def release_queues(workers: int, context: Any = None) -> list[Any]:
    """One queue per worker on which the training process hands buffers back."""
    ctx = multiprocessing.get_context(context) if isinstance(context, str | None) else context
    return [ctx.SimpleQueue() for _ in range(workers)]


class PackingCollate:
    """A worker's collate function: ``collate``'s batch packed into a buffer of the worker's pool.

    The pool holds up to ``pool_size`` buffers; a buffer is reused only after the receiver handed it back.
    When all are out, the batch goes in a one-off buffer, so a slow consumer never blocks a worker."""

    def __init__(self, collate: Callable[[list[Any]], Any], releases: list[Any], pool_size: int = 4):
        self.collate, self.releases, self.pool_size = collate, releases, pool_size
        self._pool: list[torch.Tensor] = []
        self._out: set[int] = set()  # buffers the receiver has not handed back
        self._sent: set[int] = set()  # buffers the receiver has mapped

    def __call__(self, samples: list[Any]) -> Any:
        batch = self.collate(samples)
        info = get_worker_info()
        if info is None:  # the training process itself (num_workers=0): nothing to move
            return batch
        layout, placed, nbytes = plan(batch)
        self._take_back(self.releases[info.id])
        index = self._buffer_for(nbytes)
        buffer = self._pool[index] if index is not None else _shared_bytes(nbytes)
        write(placed, buffer)
        if index is None:
            return Shipment(info.id, None, buffer, nbytes, layout)
        self._out.add(index)
        first_trip = index not in self._sent
        self._sent.add(index)
        return Shipment(info.id, index, buffer if first_trip else None, nbytes, layout)

    def _take_back(self, queue: Any) -> None:
        while not queue.empty():
            self._out.discard(queue.get())

    def _buffer_for(self, nbytes: int) -> int | None:
        free = [i for i in range(len(self._pool)) if i not in self._out]
        fitting = [i for i in free if self._pool[i].numel() >= nbytes]
        if fitting:
            return min(fitting, key=lambda i: self._pool[i].numel())
        capacity = nbytes + nbytes // 4  # room for the next, slightly larger batch
        if len(self._pool) < self.pool_size:
            self._pool.append(_shared_bytes(capacity))
            return len(self._pool) - 1
        if not free:
            return None
        index = min(free, key=lambda i: self._pool[i].numel())  # too small: replace it
        self._pool[index] = _shared_bytes(capacity)
        self._sent.discard(index)
        return index


class Receiver:
    """The training process's side: copies each shipment out (into pinned memory when ``pin``), hands the
    buffer back to its worker, returns the batch. One per set of worker processes (their queues and
    buffers are theirs alone); keeps each pool buffer mapped while they live."""

    def __init__(self, releases: list[Any], pin: bool = False):
        self.releases, self.pin = releases, pin
        self._mapped: dict[tuple[int, int], torch.Tensor] = {}
        self.trips = {"first": 0, "reused": 0, "one-off": 0}  # how batches arrived (tests, benchmarks)

    def __call__(self, item: Any) -> Any:
        if not isinstance(item, Shipment):
            return item
        source = item.buffer
        self.trips["one-off" if item.index is None else "first" if item.buffer is not None else "reused"] += 1
        if item.index is not None:
            key = (item.worker, item.index)
            if item.buffer is not None:
                self._mapped[key] = item.buffer
            source = self._mapped.get(key)
        if source is None:
            raise RuntimeError(
                f"DataLoader worker {item.worker} reused buffer {item.index}, which never reached this process "
                "(a worker shared between loaders?)"
            )
        private = torch.empty(item.nbytes, dtype=torch.uint8, pin_memory=self.pin)
        private.copy_(source[: item.nbytes])
        if item.index is not None:
            self.releases[item.worker].put(item.index)
        return unpack(PackedBatch(private, item.layout))


def _shared_bytes(nbytes: int) -> torch.Tensor:
    # As default_collate does in workers: allocated in shared memory, so sending it copies nothing.
    storage = torch.UntypedStorage._new_shared(nbytes)
    return torch.empty(0, dtype=torch.uint8).set_(storage, 0, (nbytes,))
