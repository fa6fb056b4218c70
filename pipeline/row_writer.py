"""Rows on their way from the teacher to the shards: encoded on worker threads, written on a writer thread.

The teacher pass only computes: :class:`RowEncoder` encodes each captured row on a pool of
threads (zstd and numpy release the GIL), and :class:`BackgroundWriter` appends the encoded
rows to the shard writer on its own thread, in order, fed by a bounded queue, so the
teacher's next batches run while the last ones are compressed, written, fsynced and hashed.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from pipeline import codec_v2, row_stats
from pipeline import hidden as hidden_states
from pipeline.capture_spec import CaptureSpec
from pipeline.data import PackedSequence
from pipeline.rows import SparseRow
from pipeline.store import writer

# Threads encoding rows while the teacher runs (the encoder measured ~150k+ tokens/s per core at top-64).
ENCODE_THREADS = max(1, min(4, (os.cpu_count() or 1) - 1))
# Batches of captured rows that may wait for the writer before the teacher waits for it.
WRITE_QUEUE_BATCHES = 4


@dataclass(frozen=True)
class PendingRow:
    """A captured row on its way to the shard writer: where it goes, and its frames being encoded."""

    seq_index: int
    source_record: int
    record_offset: int
    stats_cell: bytes | None
    frames: Future[dict[str, bytes]]

    def cells(self) -> dict[str, bytes | int]:
        """The row's cells, once its frames are encoded (waits for them)."""
        cells: dict[str, bytes | int] = {**self.frames.result()}
        cells["source_record"] = self.source_record
        cells["record_offset"] = self.record_offset
        if self.stats_cell is not None:
            cells[row_stats.COLUMN] = self.stats_cell
        return cells


class RowEncoder:
    """Encodes captured rows on worker threads (zstd and numpy release the GIL); the output is the
    same whatever the number of threads."""

    def __init__(
        self,
        spec: CaptureSpec,
        settings: codec_v2.CodecSettings,
        threads: int | None = None,
        hidden: hidden_states.HiddenEncoding = "bf16",
    ) -> None:
        self.spec, self.settings, self.hidden = spec, settings, hidden
        self.pool = ThreadPoolExecutor(max_workers=threads or ENCODE_THREADS, thread_name_prefix="encode")

    def _encode(self, row: SparseRow, packed: PackedSequence | None = None) -> dict[str, bytes]:
        if packed is not None:
            row = dataclasses.replace(row, loss_mask=packed.target_mask, document_starts=packed.document_starts)
        frames = codec_v2.encode_row(row, self.spec, self.settings)
        for layer, states in (row.hidden or {}).items():
            frames[hidden_states.column_name(layer)] = hidden_states.encode(states, self.hidden, self.settings.level)
        return frames

    def encode(
        self, first_seq: int, batch: list[PackedSequence], rows: list[SparseRow], stats: list[bytes] | None
    ) -> list[PendingRow]:
        """Start encoding a batch (sequences ``first_seq`` on) with its ``row_stats`` cells (``None``: none)."""
        cells = stats if stats is not None else [None] * len(rows)
        pending = [
            PendingRow(
                first_seq + offset,
                packed.source_record,
                packed.record_offset,
                cell,
                self.pool.submit(self._encode, row, packed),
            )
            for offset, (packed, row, cell) in enumerate(zip(batch, rows, cells, strict=True))
        ]
        return pending

    def __enter__(self) -> RowEncoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class BackgroundWriter:
    """Writes rows to a :class:`~pipeline.store.writer.ShardWriter` on its own thread, fed by a bounded queue.

    :meth:`put` returns at once unless ``max_rows`` rows are already waiting (memory stays
    bounded); the thread waits for each row's frames and appends it in order, so the
    teacher's next batch runs while the last one is encoded, compressed, written, fsynced and
    hashed. A failure on the thread (a full disk) is raised by the next :meth:`put` or by
    :meth:`close`. Leaving the block by an exception (the teacher failed, an interrupt) first
    writes the rows already put, as the synchronous loop would have, so what a resumed pass
    keeps does not depend on the thread's timing; the shard in progress is then the shard
    writer's to drop.
    """

    def __init__(self, shard_writer: writer.ShardWriter, tokens_per_row: int, max_rows: int) -> None:
        self.shard_writer, self.tokens_per_row = shard_writer, tokens_per_row
        self.queue: queue.Queue[PendingRow | None] = queue.Queue(maxsize=max(1, max_rows))
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="shard-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (row := self.queue.get()) is not None:
            if self.error is not None:
                continue  # drain without writing, so a blocked put returns
            try:
                self.shard_writer.add(row.seq_index, row.cells(), self.tokens_per_row)
            except BaseException as exc:  # raised again on the teacher's thread
                self.error = exc

    def _raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def put(self, rows: list[PendingRow]) -> None:
        for row in rows:
            self._raise_error()
            self.queue.put(row)

    def close(self) -> None:
        """Wait until every row put is written; raise the thread's error, if any."""
        self.queue.put(None)
        self.thread.join()
        self._raise_error()

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            self.close()
            return
        self.queue.put(None)  # the rows already put are written (unless the thread failed)
        self.thread.join()
