"""The student pass on several processes (``torchrun``): which rows each rank reads, and how the ranks agree.

**Data.** Every rank computes the same global order of the cache's sequences: the seeded
shuffle of each epoch (:func:`pipeline.cache.shuffled_seq_indices`, the order a single
process reads), or the ``--curriculum`` draws. The order is cut into global micro-batches of
``--batch-size x W`` rows (``W`` processes); rank ``r`` reads rows ``[r B, (r + 1) B)`` of
each (:class:`RankOrder`), decoding only those. An optimizer step reads ``--grad-accum``
global micro-batches, so the effective batch is ``batch size x grad accum x W`` and the rows
a step trains on are those of a single process run with ``--batch-size B x W``: the data
read does not depend on how it is split.

**Gradients.** :func:`average_gradients` averages each gradient across ranks once per
optimizer step, after the ``--grad-accum`` micro-batches, with ``torch.distributed``
all-reduces over flat buckets of gradients, as ``DistributedDataParallel``'s reducer does
(its default hook too divides by the world size and sums; a parameter no rank used keeps no
gradient, as DDP leaves globally unused parameters alone). DDP's wrapper itself is not used
because the training step (:func:`pipeline.student.train_step_loss`) does not fit its
contract: the backbone runs once, but the LM head runs chunk by chunk on a detached copy of
the hidden states with a backward per chunk, then one backward through the backbone, so a
parameter of the head (and a tied embedding, used by both) receives its gradient over
several backwards, some of them outside any forward through the wrapper. DDP would have
to be fed every backward but one under ``no_sync()``, and the head of an untied model, absent
from the backbone's forward, would stall its reducer (or, with ``find_unused_parameters``,
be marked unused and its accumulated gradient left unreduced). One reduction after
accumulation is what DDP does under ``no_sync()`` anyway; it
gives up DDP's overlap of communication with the backward, which matters little next to
the chunked head's own cost. Rank 0's weights are broadcast to every rank at the start
(:func:`broadcast_parameters`), as DDP's constructor does.

**Metrics.** Each rank's step losses and monitors are means over its rows, and every rank
holds as many positions, so their mean across ranks (:func:`mean_across_ranks`) is the
global one. Only rank 0 writes files.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pipeline.cache import shuffled_seq_indices
from pipeline.distributed import World, any_rank
from pipeline.manifest import Manifest
from pipeline.teachers import RowOrder, epoch_rows

# Bytes of gradients per all-reduce: DistributedDataParallel's default bucket_cap_mb.
BUCKET_BYTES = 25 * 1024 * 1024


@dataclass(frozen=True)
class ShuffledOrder:
    """The seeded shuffle of each epoch, as sequence indices: the order a single process reads."""

    manifest: Manifest
    seed: int

    def rows(self, start: int) -> Iterator[int]:
        return epoch_rows(
            lambda epoch, skip: shuffled_seq_indices(self.manifest, self.seed, epoch, skip),
            self.manifest.sequences,
            start,
        )


@dataclass(frozen=True)
class RankOrder:
    """One rank's rows: its ``batch_size`` rows of each global micro-batch of ``batch_size x world.size``
    rows of ``global_order``."""

    global_order: RowOrder
    batch_size: int
    world: World

    def rows(self, start: int) -> Iterator[int]:
        """This rank's rows, ``start`` counting the rows every rank has read (a multiple of a global micro-batch)."""
        global_rows = self.global_order.rows(start)
        first = self.world.rank * self.batch_size
        while True:
            micro_batch = list(itertools.islice(global_rows, self.batch_size * self.world.size))
            yield from micro_batch[first : first + self.batch_size]


def rank_order(
    curriculum: RowOrder | None, manifest: Manifest, seed: int, batch_size: int, world: World
) -> RowOrder | None:
    """The rows this rank reads: ``curriculum`` (``None``: the shuffled epochs) as it is in a single process,
    else this rank's share of it (or of the shuffled epochs of ``manifest``, the first training cache's)."""
    if not world.is_distributed:
        return curriculum
    return RankOrder(curriculum or ShuffledOrder(manifest, seed), batch_size, world)


def broadcast_parameters(model: torch.nn.Module, world: World) -> None:
    """Give every rank rank 0's parameters and buffers (tied parameters once)."""
    if not world.is_distributed:
        return
    with torch.no_grad():
        for tensor in itertools.chain(model.parameters(), model.buffers()):
            dist.broadcast(tensor.data, src=0)


def average_gradients(model: torch.nn.Module, world: World, bucket_bytes: int = BUCKET_BYTES) -> None:
    """Replace each parameter's gradient by its mean over the ranks, as ``DistributedDataParallel`` does.

    A parameter without a gradient on this rank but with one elsewhere takes zeros here (its
    rows did not use it); one without a gradient on every rank keeps none, so the optimizer
    skips it as a single process would.
    """
    if not world.is_distributed:
        return
    params = [param for param in model.parameters() if param.requires_grad]
    used = any_rank(world, [param.grad is not None for param in params])
    for param, anywhere in zip(params, used, strict=True):
        if anywhere and param.grad is None:
            param.grad = torch.zeros_like(param)
    grads = [param.grad for param in params if param.grad is not None]
    for bucket in _buckets(grads, bucket_bytes):
        flat = torch.cat([grad.reshape(-1) for grad in bucket])
        flat.div_(world.size)
        dist.all_reduce(flat)  # the default group: gloo for CPU tensors, NCCL for CUDA ones
        offset = 0
        for grad in bucket:
            grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
            offset += grad.numel()


def _buckets(grads: list[torch.Tensor], bucket_bytes: int) -> Iterator[list[torch.Tensor]]:
    """Consecutive gradients of one device and dtype, up to ``bucket_bytes`` each (at least one tensor)."""
    bucket: list[torch.Tensor] = []
    size = 0
    for grad in grads:
        fits = bucket and (grad.device, grad.dtype) == (bucket[0].device, bucket[0].dtype)
        if bucket and (not fits or size + grad.numel() * grad.element_size() > bucket_bytes):
            yield bucket
            bucket, size = [], 0
        bucket.append(grad)
        size += grad.numel() * grad.element_size()
    if bucket:
        yield bucket


def mean_across_ranks(values: dict[str, float], world: World) -> dict[str, float]:
    """Each value's mean over the ranks (every rank holds the same keys); NaN stays NaN."""
    if not world.is_distributed:
        return values
    names = sorted(values)
    sums = world.sum_floats([float(values[name]) for name in names])
    return {name: total / world.size for name, total in zip(names, sums, strict=True)}
