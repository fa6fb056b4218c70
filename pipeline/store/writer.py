"""The shard writer: encoded rows -> numbered Arrow IPC files, each committed by a rename."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import row_stats
from pipeline.fingerprint import sha256_file
from pipeline.manifest import MANIFEST_NAME, ShardEntry, render_manifest
from pipeline.store.atomic import crash_point, fsync_dir, write_bytes_atomic
from pipeline.store.layout import RECORD_BATCH_ROWS, SCHEMA, shard_name


class ShardWriter:
    """Appends encoded rows to numbered shards of ``rows_per_shard`` rows each.

    Shard ``i`` holds sequences ``i * rows_per_shard`` onwards, so the processes of a
    data-parallel pass can each write their own shards (rank ``r`` of ``W``: ``r``, ``r + W``, ...).

    A context manager: ``with ShardWriter(...) as writer: writer.add(seq_index, frames, n_tokens)``
    for each row. Leaving the block normally commits the last partial shard; leaving it by an
    exception drops the shard in progress (committed shards stay). ``shards`` lists what is
    committed. ``committed`` continues a resumed pass after its shards; ``on_commit(shards)``
    runs after each shard is renamed into place (the journal). ``schema`` names the columns
    after ``seq_index``: each row's ``cells`` give a frame (binary columns) or an int (int64).
    """

    def __init__(
        self,
        cache_dir: Path,
        rows_per_shard: int,
        committed: list[ShardEntry] | None = None,
        on_commit: Callable[[list[ShardEntry]], None] | None = None,
        schema: pa.Schema = SCHEMA,
    ) -> None:
        self.cache_dir = cache_dir
        self.schema = schema
        self.rows_per_shard = rows_per_shard
        self.shards: list[ShardEntry] = list(committed or [])
        self.on_commit = on_commit
        self._pending: list[tuple[int, dict[str, bytes | int]]] = []
        self._writer: pa.ipc.RecordBatchFileWriter | None = None
        self._sink: pa.OSFile | None = None
        self._rows = 0
        self._tokens = 0
        self._row_stats: list[bytes] = []  # this shard's row_stats cells (pipeline.row_stats)
        self._first_seq = 0

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    @property
    def _name(self) -> str:
        """The shard in progress: shard ``i`` holds sequences from ``i * rows_per_shard`` on."""
        return shard_name(self._first_seq // self.rows_per_shard)

    @property
    def _tmp_path(self) -> Path:
        return self.cache_dir / f".{self._name}.tmp"

    def add(self, seq_index: int, cells: dict[str, bytes | int], n_tokens: int) -> None:
        if self._writer is None:
            if seq_index % self.rows_per_shard:
                raise ValueError(f"a shard starts at a multiple of {self.rows_per_shard} rows, not at {seq_index}")
            self._first_seq = seq_index
            self._sink = pa.OSFile(str(self._tmp_path), "wb")
            options = pa.ipc.IpcWriteOptions(compression=None)
            self._writer = pa.ipc.new_file(self._sink, self.schema, options=options)
        self._pending.append((seq_index, cells))
        if row_stats.COLUMN in cells:
            self._row_stats.append(cells[row_stats.COLUMN])  # type: ignore[arg-type]
        self._rows += 1
        self._tokens += n_tokens
        if len(self._pending) >= RECORD_BATCH_ROWS:
            self._flush_batch()
        if self._rows >= self.rows_per_shard:
            self._commit()

    def _flush_batch(self) -> None:
        if not self._pending or self._writer is None:
            return
        columns = {"seq_index": pa.array([index for index, _ in self._pending], type=pa.int64())}
        for field in self.schema:
            if field.name != "seq_index":
                columns[field.name] = pa.array([cells[field.name] for _, cells in self._pending], type=field.type)
        self._writer.write_batch(pa.RecordBatch.from_pydict(columns, schema=self.schema))
        self._pending.clear()
        self._sink.flush()  # type: ignore[union-attr]
        crash_point("record-batch")

    def _commit(self) -> None:
        assert self._writer is not None and self._sink is not None
        self._flush_batch()
        self._writer.close()
        self._sink.flush()
        os.fsync(self._sink.fileno())
        self._sink.close()
        name = self._name
        tmp = self._tmp_path
        entry = ShardEntry(
            name=name,
            rows=self._rows,
            tokens=self._tokens,
            bytes=tmp.stat().st_size,
            sha256=sha256_file(tmp),
            first_seq=self._first_seq,
            row_stats=self._stats_summary(),
        )
        crash_point("shard-before-rename")
        os.replace(tmp, self.cache_dir / name)
        fsync_dir(self.cache_dir)
        crash_point("shard-after-rename")
        self.shards.append(entry)
        if self.on_commit is not None:
            self.on_commit(self.shards)
        self._writer = None
        self._sink = None
        self._rows = 0
        self._tokens = 0
        self._row_stats = []

    def _stats_summary(self) -> dict[str, float] | None:
        """The shard's ``row_stats`` summary, when its rows carry the statistics."""
        if not self._row_stats:
            return None
        values = np.frombuffer(b"".join(self._row_stats), dtype="<f4").reshape(-1, 2)
        return row_stats.shard_summary(values)

    def close(self) -> list[ShardEntry]:
        """Commit the shard in progress, if any; return every committed shard."""
        if self._writer is not None:
            self._commit()
        return self.shards

    def abort(self) -> None:
        """Drop the shard in progress without committing it."""
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.close()
            with contextlib.suppress(Exception):
                self._sink.close()  # type: ignore[union-attr]
            self._writer = None
            with contextlib.suppress(FileNotFoundError):
                self._tmp_path.unlink()
        self._pending.clear()
        self._row_stats = []


def write_manifest(cache_dir: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest (the commit point): sorted keys and its own checksum, so equal inputs give equal bytes."""
    write_bytes_atomic(cache_dir / MANIFEST_NAME, render_manifest(manifest), crash_name="manifest")
