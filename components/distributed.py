"""Process-group plumbing for ``atmask train`` and a deterministic, resumable, sharded batch sampler.

One process per GPU, launched by ``torchrun`` (or re-executed through ``torch.distributed.run`` by
``atmask train --nproc-per-node N``). NCCL on GPUs, gloo on CPU. Only rank 0 writes files and talks to
MLflow; logged losses are averaged over all ranks.

Data order is a pure function of ``(seed, iteration)``: global batch ``i`` is the ``i``-th slice of an
endless stream of seeded permutations (grouped by aspect ratio), and rank ``r`` takes its contiguous part
of that global batch. A 1-process and an N-process run with the same global batch see the same images at
every step, and a resumed run continues the stream exactly where the checkpoint left it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from components.errors import UserError

# Set in the re-executed children so that they do not re-launch themselves.
_LAUNCHED_ENV = "ATMASK_DISTRIBUTED_LAUNCHED"


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str) -> torch.device:
    """``auto``: the current GPU when CUDA is available, else the CPU; ``cuda`` without a GPU is a UserError."""
    if name not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device {name}: choose one of auto, cpu, cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible to this process; use --device cpu or auto")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group that ``torchrun`` set up (env ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``).

    ``device``: ``auto`` (the local GPU if CUDA is available, else CPU), ``cpu`` or ``cuda``.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def reduce_mean(values: Mapping[str, float], info: DistInfo) -> dict[str, float]:
    """Average scalar values over all ranks (every rank gets the result)."""
    if not info.distributed or not values:
        return dict(values)
    keys = sorted(values)
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=info.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    tensor /= info.world_size
    return dict(zip(keys, tensor.tolist(), strict=True))


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank if ``flag`` is true on any rank (so all ranks take the same branch)."""
    if not info.distributed:
        return flag
    tensor = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item() > 0)


def broadcast_object(obj: object, info: DistInfo) -> object:
    """Rank 0's ``obj`` on every rank."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def collective_check(check: Callable[[], object], info: DistInfo) -> None:
    """Run ``check`` on rank 0; every rank raises its ``UserError`` (no rank is left waiting)."""
    message = None
    if info.is_main:
        try:
            check()
        except UserError as err:
            message = str(err)
    message = broadcast_object(message, info)
    if message:
        raise UserError(str(message))


def relaunch(nproc_per_node: int, nnodes: int, argv: Sequence[str], rdzv_endpoint: str | None = None) -> int:
    """Re-execute ``atmask <argv>`` under ``torch.distributed.run`` and return its exit status.

    Single node: a standalone rendezvous on a free local port. Multi-node: pass ``rdzv_endpoint``
    (``host:port`` of node 0) and run the same command on every node.
    """
    from torch.distributed import run as torchrun

    args = [f"--nproc-per-node={nproc_per_node}", f"--nnodes={nnodes}"]
    if nnodes == 1 and rdzv_endpoint is None:
        args.append("--standalone")
    else:
        if rdzv_endpoint is None:
            raise ValueError("--nnodes > 1 needs --rdzv-endpoint host:port (node 0) on every node")
        args += ["--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}"]
    args += ["-m", "components.cli", *argv]
    previous = os.environ.get(_LAUNCHED_ENV)
    os.environ[_LAUNCHED_ENV] = "1"
    try:
        torchrun.main(args)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    except Exception as err:  # ChildFailedError: the children printed their own messages
        print(f"atmask: distributed launch failed: {type(err).__name__}", file=sys.stderr)
        return _child_exit_status(err)
    finally:
        if previous is None:
            os.environ.pop(_LAUNCHED_ENV, None)
    return 0


def _child_exit_status(err: Exception) -> int:
    """The failed children's exit status (143 stays 143: a preempted run must read as retryable)."""
    codes = [getattr(f, "exitcode", 1) for f in getattr(err, "failures", {}).values()]
    code = next((c for c in codes if c), 1)
    return 128 - code if code < 0 else code  # killed by signal N: 128 + N, as a shell reports it


def launched_by_us() -> bool:
    return os.environ.get(_LAUNCHED_ENV) == "1"


def group_ids(aspect_ratios: Sequence[float]) -> list[int]:
    """Two aspect-ratio groups as torchvision's reference scripts use at their coarsest: wide vs tall."""
    return [0 if ratio >= 1.0 else 1 for ratio in aspect_ratios]


class ShardedBatchSampler:
    """Endless, seeded, aspect-ratio-grouped global batches; yields this rank's share of each.

    ``start_iteration`` resumes the stream: the batches yielded are those of iterations
    ``start_iteration, start_iteration + 1, ...`` — the whole data-order state is ``(seed, iteration)``.
    Each yielded item is a list of ``(dataset_index, sample_seed)``; ``sample_seed`` drives the random
    augmentation of that sample, so augmentation does not depend on worker count or on resuming.
    """

    def __init__(
        self,
        groups: Sequence[int],
        global_batch: int,
        rank: int,
        world_size: int,
        seed: int,
        start_iteration: int = 0,
    ) -> None:
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by {world_size} processes")
        if not groups:
            raise ValueError("the dataset is empty")
        self.groups = list(groups)
        self.global_batch = global_batch
        self.local_batch = global_batch // world_size
        self.rank = rank
        self.seed = seed
        self.start_iteration = start_iteration

    def global_batches(self) -> Iterator[list[int]]:
        """The stream of global batches from iteration 0, each a list of dataset indices."""
        epoch = 0
        buffers: dict[int, list[int]] = {}
        while True:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            for index in torch.randperm(len(self.groups), generator=generator).tolist():
                buffer = buffers.setdefault(self.groups[index], [])
                buffer.append(index)
                if len(buffer) == self.global_batch:
                    yield list(buffer)
                    buffer.clear()
            epoch += 1

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        lo = self.rank * self.local_batch
        for iteration, batch in enumerate(self.global_batches()):
            if iteration < self.start_iteration:
                continue
            yield [
                (index, _sample_seed(self.seed, iteration, lo + slot))
                for slot, index in enumerate(batch[lo : lo + self.local_batch])
            ]


def _sample_seed(seed: int, iteration: int, slot: int) -> int:
    return (seed * 1_000_003 + iteration * 1_009 + slot) % (2**31 - 1)
