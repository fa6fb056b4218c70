"""Where this process stands in a torchrun launch: rank, world size, and the few collectives the passes use.

Both passes run unchanged in a single process (``World()``: rank 0 of 1, every collective
a no-op) and under ``torchrun``, which sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``;
:func:`current_world` reads them and joins the process group. Coordination (barriers,
small integer broadcasts and sums) runs on CPU tensors over gloo, so it needs no GPU and
pickles nothing; on CUDA devices the group also carries NCCL for the student's gradients.

torchrun's agent stops every worker when one fails, so a rank that raises (a refused
setting, a full disk) never leaves the others waiting at a barrier.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

# How long a rank waits at a barrier for the others (a slow rank's whole shard, a teacher's load).
BARRIER_TIMEOUT = datetime.timedelta(hours=6)
ENVIRONMENT = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class World:
    """This process's place among ``size`` processes; ``World()`` is a single process."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1  # processes on this node

    @property
    def is_main(self) -> bool:
        """Whether this process writes what is written once (manifest, logs, the student's files)."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.size > 1

    def device(self, device: torch.device) -> torch.device:
        """``device`` for this rank: under torchrun a bare ``cuda`` becomes the first GPU of :meth:`gpus`."""
        if self.is_distributed and device.type == "cuda" and device.index is None:
            return torch.device("cuda", self.gpus()[0])
        return device

    def gpus(self) -> list[int]:
        """The CUDA devices this process uses: its equal slice of the node's GPUs (:func:`gpu_slice`)."""
        return gpu_slice(self.local_rank, self.local_size, torch.cuda.device_count())

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.is_distributed:
            dist.barrier(group=_cpu_group())

    def broadcast_int(self, value: int) -> int:
        """Rank 0's ``value`` on every rank."""
        if not self.is_distributed:
            return value
        tensor = torch.tensor([value], dtype=torch.int64)
        dist.broadcast(tensor, src=0, group=_cpu_group())
        return int(tensor.item())

    def sum_floats(self, values: list[float]) -> list[float]:
        """Element-wise sum of every rank's ``values`` (same length on every rank), in float64."""
        if not self.is_distributed:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor, group=_cpu_group())
        return tensor.tolist()

    def max_int(self, value: int) -> int:
        """The largest of every rank's ``value``."""
        if not self.is_distributed:
            return value
        tensor = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=_cpu_group())
        return int(tensor.item())


def gpu_slice(local_rank: int, local_size: int, gpu_count: int) -> list[int]:
    """GPUs ``[local_rank * G, (local_rank + 1) * G)`` with ``G = gpu_count // local_size``.

    One process per GPU gives each its own; fewer processes than GPUs give each several,
    over which a teacher too large for one GPU is spread (``device_map``); GPUs left over by
    an uneven split stay idle.
    """
    per_process = gpu_count // local_size
    if per_process == 0:
        raise ConfigError(
            f"{local_size} processes on this node but {gpu_count} visible GPU(s); "
            f"run at most {gpu_count} per node (--nproc-per-node), or use --device cpu"
        )
    return list(range(local_rank * per_process, (local_rank + 1) * per_process))


_CPU_GROUP: dist.ProcessGroup | None = None


def _cpu_group() -> dist.ProcessGroup | None:
    """The gloo group for coordination (``None``: the default group, when it is gloo already)."""
    return _CPU_GROUP


def launched_as_main() -> bool:
    """Whether this process is rank 0 of its launch (or not launched by torchrun at all)."""
    return os.environ.get("RANK", "0") in ("0", "")


def _environment_int(name: str) -> int:
    raw = os.environ[name]
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer; launch with torchrun") from None


def current_world(device_type: str = "cpu") -> World:
    """The launch this process belongs to, joining its process group on first call.

    Outside torchrun (no ``WORLD_SIZE``, or ``WORLD_SIZE=1``) this is ``World()`` and nothing
    is initialised. ``device_type`` ``cuda`` adds NCCL to the group for tensors on the GPU.
    """
    global _CPU_GROUP
    if int(os.environ.get("WORLD_SIZE", "1") or "1") <= 1:
        return World()
    missing = [name for name in ENVIRONMENT if name not in os.environ]
    if missing:
        raise ConfigError(
            f"WORLD_SIZE is set but {', '.join(missing)} is not; launch with torchrun, or unset WORLD_SIZE"
        )
    world = World(
        _environment_int("RANK"),
        _environment_int("WORLD_SIZE"),
        _environment_int("LOCAL_RANK"),
        int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0) or _environment_int("WORLD_SIZE"),
    )
    if not 0 <= world.rank < world.size:
        raise ConfigError(f"RANK={world.rank} is outside WORLD_SIZE={world.size}; launch with torchrun")
    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=BARRIER_TIMEOUT)
        _CPU_GROUP = None if backend == "gloo" else dist.new_group(backend="gloo", timeout=BARRIER_TIMEOUT)
        log.info("rank %d of %d joined the process group (%s)", world.rank, world.size, backend)
    return world


def leave() -> None:
    """Leave the process group, if this process joined one."""
    global _CPU_GROUP
    if dist.is_initialized():
        dist.destroy_process_group()
    _CPU_GROUP = None


def any_rank(world: World, flags: list[bool]) -> list[bool]:
    """Element-wise: whether any rank's ``flags`` (same length on every rank) is true."""
    if not world.is_distributed:
        return list(flags)
    tensor = torch.tensor(flags, dtype=torch.int32)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=_cpu_group())
    return [bool(flag) for flag in tensor.tolist()]
