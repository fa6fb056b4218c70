"""Reading a cache from Python: ``open_cache`` and a torch ``IterableDataset``.

Example::

    import pipeline
    cache = pipeline.open_cache("caches/run1")
    print(cache.manifest.k, len(cache))
    for row in cache:          # pipeline.rows.SparseRow, whatever the capture
        row.input_ids       # (T,) int64
        row.ids             # (T, K) int64 captured ids (most probable first for top-k)
        row.logprobs        # (T, K) float32, natural log, temperature 1 (None if not stored)
        row.tail_logmass    # (T,) float32, -inf where nothing is left out (None if not stored)
        row.counts          # (T, K) int32 draws per id for sampled captures, else None
        row.valid()         # (T, K) bool: slots holding an id (top-p and sampled rows vary)

Position ``t`` holds the teacher's distribution over token ``t + 1``.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from pipeline import remote
from pipeline.errors import CacheError
from pipeline.fingerprint import TokenStreamHasher
from pipeline.manifest import Manifest, ShardEntry
from pipeline.rows import SparseRow, stack_numpy
from pipeline.store.reader import (
    ShardRows,
    decode_checked_row,
    decode_hidden,
    iter_shard_frames,
    iter_shard_rows,
    read_manifest,
    read_shard_row_stats,
    tokenizer_file_problems,
)


class Cache:
    """A validated cache folder. Iterating yields :class:`~pipeline.rows.SparseRow` in order.

    Shards are read one at a time and each is checked against its sha256 in the manifest
    before its first row is returned, as are the tokenizer files when the cache is opened,
    unless ``verify=False``. Every decoded row is checked whatever ``verify`` says. A full
    in-order pass also recomputes the token stream's sha256 and raises at its end if it
    differs from the manifest's.

    Memory: one shard's encoded frames (at most its size on disk) plus the decoded rows the
    caller holds; one decoded row is bounded by ``seq_len x k <= 2**23`` entries.
    """

    def __init__(self, path: str | Path, verify: bool = True) -> None:
        # A URL is read through its local mirror (pipeline.remote), checked like any local cache.
        self.source = str(path)
        self.path = remote.local_copy(str(path)) if remote.is_remote(path) else Path(path)
        self.verify = verify
        self.with_hidden = False  # also read the teacher's hidden states (feature distillation)
        self.manifest: Manifest = read_manifest(self.path)
        self._checked: set[str] = set()  # shards whose hash rows_at or row_stats has checked
        problems = tokenizer_file_problems(self.path, self.manifest) if verify else []
        if problems:
            raise CacheError(f"'{self.path}': {problems[0]}; the cache is damaged")

    def __len__(self) -> int:
        return self.manifest.sequences

    def __iter__(self) -> Iterator[SparseRow]:
        hasher = TokenStreamHasher()
        for entry in self.manifest.shards:
            for _, row in self.shard_rows(entry):
                hasher.update(row.input_ids)
                yield row
        if self.verify and hasher.hexdigest() != self.manifest.token_stream_sha256:
            raise CacheError(
                f"'{self.path}': the rows' token stream hashes to {hasher.hexdigest()[:12]}, the manifest says "
                f"{self.manifest.token_stream_sha256[:12]}; the cache is damaged"
            )

    def row_stats(self) -> np.ndarray:
        """``(sequences, 2)`` float32: each row's teacher ``mean_top1_prob`` and ``mean_entropy``
        (:mod:`pipeline.row_stats`), in sequence order, read from the shards' ``row_stats`` column alone.

        Raises :class:`~pipeline.errors.CacheError` when the cache holds none (written before
        the statistics existed, or by another writer).
        """
        if not self.manifest.has_row_stats:
            raise CacheError(
                f"'{self.path}' holds no per-row teacher statistics (it was written before they existed); "
                "make the cache again with this version's teacher-cache"
            )
        parts = []
        for entry in self.manifest.shards:
            parts.append(
                read_shard_row_stats(self.path, entry, self.manifest, self.verify and entry.name not in self._checked)
            )
            self._checked.add(entry.name)  # rows_at will not hash it again
        return np.concatenate(parts)

    def rows_at(self, seq_indices: Iterable[int], open_shards: int = 8) -> Iterator[SparseRow]:
        """The rows of ``seq_indices``, in that order, decoded and checked: random access.

        Up to ``open_shards`` shards stay memory-mapped (the least recently used is closed
        first); each shard's hash is checked the first time it is opened, when ``verify``.
        """
        for shard_name, cells in self.frames_at(seq_indices, open_shards):
            yield self.decode(cells, shard_name)

    def decode(self, cells: dict[str, bytes | int], shard_name: str) -> SparseRow:
        """One row's cells decoded and checked, with its hidden states when :attr:`with_hidden`."""
        row = decode_checked_row(cells, self.manifest, shard_name)
        if self.with_hidden:
            row = dataclasses.replace(row, hidden=decode_hidden(cells, self.manifest))
        return row

    def frames_at(
        self, seq_indices: Iterable[int], open_shards: int = 8
    ) -> Iterator[tuple[str, dict[str, bytes | int]]]:
        """``(shard name, encoded cells)`` of the rows of ``seq_indices``, in that order (see :meth:`rows_at`)."""
        starts = [entry.first_seq for entry in self.manifest.shards]
        opened: OrderedDict[int, ShardRows] = OrderedDict()
        try:
            for seq_index in seq_indices:
                if not 0 <= seq_index < len(self):
                    raise IndexError(f"sequence {seq_index} is outside the cache's {len(self)}")
                shard_index = bisect.bisect_right(starts, seq_index) - 1
                entry = self.manifest.shards[shard_index]
                shard = opened.pop(shard_index, None)
                if shard is None:
                    verify = self.verify and entry.name not in self._checked
                    shard = ShardRows(self.path, entry, self.manifest, verify, self.with_hidden)
                    self._checked.add(entry.name)
                    if len(opened) >= open_shards:
                        opened.popitem(last=False)[1].close()
                opened[shard_index] = shard
                yield entry.name, shard.cells(seq_index - entry.first_seq)
        finally:
            for shard in opened.values():
                shard.close()

    def shard_frames(self, shard_index: int) -> list[dict[str, bytes | int]]:
        """The encoded frames of every row of one shard, in order (the shard checked first when ``verify``)."""
        entry = self.manifest.shards[shard_index]
        return [
            frames
            for _, frames in iter_shard_frames(self.path, entry, self.manifest, self.verify, hidden=self.with_hidden)
        ]

    def shard_rows(self, entry: ShardEntry) -> Iterator[tuple[int, SparseRow]]:
        """``(seq_index, row)`` pairs of one shard."""
        return iter_shard_rows(self.path, entry, self.manifest, verify=self.verify)

    def shuffled_rows(
        self, seed: int, epoch: int = 0, shard_subset: list[int] | None = None, start: int = 0
    ) -> Iterator[SparseRow]:
        """Rows in a seeded order: shards in a random order, rows shuffled within each shard.

        Memory holds one shard's encoded frames at a time; a row is decoded (and checked)
        only when it is yielded. The order depends only on ``(seed, epoch)``. ``start`` rows
        of that order are skipped without reading their shards or decoding their rows, so a
        resumed run continues where it stopped at the cost of the rows it trains on.
        """
        for (row,) in aligned_shuffled_rows([self], seed, epoch, shard_subset, start):
            yield row


def aligned_shuffled_rows(
    caches: list[Cache], seed: int, epoch: int = 0, shard_subset: list[int] | None = None, start: int = 0
) -> Iterator[tuple[SparseRow, ...]]:
    """:meth:`Cache.shuffled_rows` of caches that share a shard layout, in step: one row of each, the same
    sequence, per item (the order is the first cache's, and the same for each).

    The caller checks that the layouts match (:func:`same_layout`); every row's tokens are
    compared with the first cache's as it is read.
    """
    first = caches[0]
    to_skip = start
    for shard_index, row_order in shuffled_layout(first.manifest, seed, epoch, shard_subset):
        entry = first.manifest.shards[shard_index]
        if to_skip >= entry.rows:
            to_skip -= entry.rows
            continue
        frames = [cache.shard_frames(int(shard_index)) for cache in caches]
        for row_index in row_order[to_skip:]:
            rows = tuple(
                cache.decode(shard[int(row_index)], cache.manifest.shards[int(shard_index)].name)
                for cache, shard in zip(caches, frames)
            )
            for cache, row in zip(caches[1:], rows[1:]):
                if not np.array_equal(row.input_ids, rows[0].input_ids):
                    raise CacheError(
                        f"'{cache.path}' holds other tokens than '{first.path}' at sequence "
                        f"{entry.first_seq + int(row_index)}; the caches do not share a token stream"
                    )
            yield rows
        to_skip = 0


def shuffled_layout(
    manifest: Manifest, seed: int, epoch: int = 0, shard_subset: list[int] | None = None
) -> Iterator[tuple[int, np.ndarray]]:
    """The seeded order of one epoch (:meth:`Cache.shuffled_rows`): ``(shard index, (rows,) int64 row order
    within it)`` for each shard in turn. It depends only on ``(seed, epoch)`` and the subset; every shard of
    the subset draws its row order, so skipping rows never changes the order of the rest."""
    generator = np.random.default_rng([seed, epoch])
    shard_order = generator.permutation(len(manifest.shards))
    wanted = None if shard_subset is None else set(shard_subset)
    for shard_index in shard_order:
        if wanted is not None and int(shard_index) not in wanted:
            continue
        yield int(shard_index), generator.permutation(manifest.shards[int(shard_index)].rows)


def shuffled_seq_indices(manifest: Manifest, seed: int, epoch: int = 0, start: int = 0) -> Iterator[int]:
    """The sequence indices :meth:`Cache.shuffled_rows` reads, in its order, from the ``start``-th on;
    nothing is read or decoded (the student pass splits this order between processes)."""
    to_skip = start
    for shard_index, row_order in shuffled_layout(manifest, seed, epoch):
        entry = manifest.shards[shard_index]
        if to_skip >= entry.rows:
            to_skip -= entry.rows
            continue
        for row_index in row_order[to_skip:]:
            yield entry.first_seq + int(row_index)
        to_skip = 0


def aligned_rows_at(caches: list[Cache], seq_indices: Iterable[int]) -> Iterator[tuple[SparseRow, ...]]:
    """:meth:`Cache.rows_at` of several caches of one token stream, in step: one row of each per item;
    every row's tokens are compared with the first cache's as it is read."""
    *streams, named = itertools.tee(seq_indices, len(caches) + 1)
    readers = [cache.rows_at(stream) for cache, stream in zip(caches, streams, strict=True)]
    for seq_index, rows in zip(named, zip(*readers)):
        for cache, row in zip(caches[1:], rows[1:]):
            if not np.array_equal(row.input_ids, rows[0].input_ids):
                raise CacheError(
                    f"'{cache.path}' holds other tokens than '{caches[0].path}' at sequence {seq_index}; "
                    "the caches do not share a token stream"
                )
        yield rows


def same_layout(a: Manifest, b: Manifest) -> bool:
    """Whether two caches cut the same sequences into the same shards (rows per shard, first sequence)."""
    return [(s.first_seq, s.rows) for s in a.shards] == [(s.first_seq, s.rows) for s in b.shards]


def open_cache(path: str | Path, verify: bool = True) -> Cache:
    """Open a cache folder; raises :class:`~pipeline.errors.CacheError` if it is incomplete or malformed."""
    return Cache(path, verify=verify)


def row_tensors(row: SparseRow) -> dict[str, torch.Tensor]:
    """A row as torch tensors, keyed as :func:`stack_rows` keys a batch (without the batch dimension)."""
    return {name: torch.from_numpy(values[0]) for name, values in stack_numpy([row]).items()}


def stack_rows(rows: list[SparseRow], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Stack rows into a batch of tensors on ``device``: ``input_ids (B, T)`` int64, ``ids (B, T, K)`` int64,
    ``valid (B, T, K)`` bool, and where the rows hold them ``logprobs (B, T, K)`` float32,
    ``tail_logmass (B, T)`` float32, ``counts (B, T, K)`` int32 (see :func:`pipeline.rows.stack_numpy`)."""
    return {name: torch.from_numpy(values).to(device) for name, values in stack_numpy(rows).items()}


class CacheDataset(IterableDataset):
    """A torch ``IterableDataset`` over a cache, for your own training loop.

    Yields dicts of tensors: ``input_ids (T,) int64``, ``ids (T, K) int64``,
    ``valid (T, K) bool``, and where the capture stores them ``logprobs (T, K) float32``,
    ``tail_logmass (T,) float32`` and ``counts (T, K) int32``; a ``DataLoader`` stacks
    them into batches (rows of one cache have one ``K``). With ``shuffle=True`` the order is seeded by
    ``(seed, epoch)``: call :meth:`set_epoch` between epochs. With several DataLoader
    workers each takes a disjoint set of shards.
    """

    def __init__(self, path: str | Path, shuffle: bool = True, seed: int = 0, verify: bool = True) -> None:
        super().__init__()
        self.cache = open_cache(path, verify=verify)
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        worker = get_worker_info()
        n_shards = len(self.cache.manifest.shards)
        subset = list(range(n_shards))
        if worker is not None:
            subset = subset[worker.id :: worker.num_workers]
        if self.shuffle:
            rows = self.cache.shuffled_rows(self.seed, self.epoch, shard_subset=subset)
        else:
            rows = (row for index in subset for _, row in self.cache.shard_rows(self.cache.manifest.shards[index]))
        for row in rows:
            yield row_tensors(row)
