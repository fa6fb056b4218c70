"""The student's batches, decoded and stacked ahead of the loop in DataLoader worker processes.

``--data-workers 0`` (the default) reads in the training process, one batch when the loop
asks for it. With ``N > 0`` workers, a torch ``DataLoader`` runs ``N`` processes that each
walk the run's order of sequence indices (the seeded shuffle of each epoch, a curriculum's
draws, or this rank's share, all known without reading a row), take every ``N``-th batch
(worker ``w`` batches ``w, w + N, ...``), read and decode its rows by random access and
stack them on the CPU; the DataLoader hands them back round-robin, so the loop sees the
very batches, in the very order, that it reads with no worker: the order does not depend
on the number of workers. Each worker keeps ``--prefetch`` batches ready.
"""

from __future__ import annotations

import itertools
import multiprocessing
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.cache import shuffled_seq_indices
from pipeline.teachers import Batch, RowOrder, TeacherSource


def run_indices(teacher: TeacherSource, seed: int, start: int, order: RowOrder | None) -> Iterator[int]:
    """The sequence indices the run reads, forever, from its ``start``-th row on (nothing is read)."""
    if order is not None:
        yield from order.rows(start)
        return
    manifest = teacher.caches[0].manifest
    first_epoch, skip = divmod(start, manifest.sequences)
    for epoch in itertools.count(first_epoch):
        yield from shuffled_seq_indices(manifest, seed, epoch, skip if epoch == first_epoch else 0)


class BatchStream(IterableDataset):
    """Batches of the run's order; in worker ``w`` of ``N``, batches ``w, w + N, ...`` only."""

    def __init__(self, teacher: TeacherSource, seed: int, start: int, batch_size: int, order: RowOrder | None) -> None:
        super().__init__()
        self.teacher, self.seed, self.start, self.batch_size, self.order = teacher, seed, start, batch_size, order

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        indices = run_indices(self.teacher, self.seed, self.start, self.order)
        for number in itertools.count():
            chunk = list(itertools.islice(indices, self.batch_size))
            if number % workers == worker:
                yield self.teacher.batch_at(chunk, torch.device("cpu"))


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {name: _to_device(value, device) for name, value in batch.items()}
    if isinstance(batch, list):
        return [_to_device(value, device) for value in batch]
    return batch


def batches(
    teacher: TeacherSource,
    seed: int,
    start: int,
    batch_size: int,
    device: torch.device,
    order: RowOrder | None = None,
    workers: int = 0,
    prefetch: int = 2,
) -> Iterator[Batch]:
    """The run's batches from its ``start``-th row on, forever; read ahead by ``workers`` processes when > 0."""
    if workers == 0:
        yield from teacher.batches(seed, start, batch_size, device, order)
        return
    methods = multiprocessing.get_all_start_methods()
    loader = DataLoader(
        BatchStream(teacher, seed, start, batch_size, order),
        batch_size=None,
        num_workers=workers,
        prefetch_factor=prefetch,
        pin_memory=device.type == "cuda",
        # fork: the workers inherit the open caches; they never touch the GPU.
        multiprocessing_context="fork" if "fork" in methods else None,
    )
    for batch in loader:
        yield _to_device(batch, device)
