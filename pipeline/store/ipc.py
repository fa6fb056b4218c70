"""What an Arrow IPC file will cost to read, found out before pyarrow reads it.

pyarrow inflates IPC body compression (LZ4 or zstd buffers) while it loads a record
batch, before any check of ours can run: a 30 KB shard can become gigabytes. This module
reads the file's footer and each record batch's message header (FlatBuffers, per the
Arrow columnar format's ``File.fbs`` and ``Message.fbs``) straight from the bytes, and
refuses compressed bodies, dictionary batches, batches with more rows than the manifest
allows, and bodies that reach outside the file. What passes is read zero-copy from a
memory map, so reading a record batch costs no more memory than its bytes on disk.

Only the few fields needed are decoded; every offset is bounds-checked.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pipeline.errors import CacheError

MAGIC = b"ARROW1"
CONTINUATION = 0xFFFFFFFF
RECORD_BATCH_HEADER = 3  # MessageHeader union: Schema=1, DictionaryBatch=2, RecordBatch=3
BLOCK_BYTES = 24  # struct Block { offset: long; metaDataLength: int; (pad 4); bodyLength: long }
FIELD_NODE_BYTES = 16  # struct FieldNode { length: long; null_count: long }
BUFFER_BYTES = 16  # struct Buffer { offset: long; length: long }


@dataclass(frozen=True)
class BatchLayout:
    """One record batch as its message header describes it."""

    offset: int
    rows: int
    body_bytes: int


class _Table:
    """A FlatBuffers table inside ``data`` at ``position``; every read is bounds-checked."""

    def __init__(self, data: memoryview, position: int, what: str) -> None:
        self.data, self.position, self.what = data, position, what
        vtable = position - self._unpack("<i", position)
        self.vtable = vtable
        self.vtable_bytes = self._unpack("<H", vtable)

    def _unpack(self, fmt: str, position: int) -> int:
        size = struct.calcsize(fmt)
        if position < 0 or position + size > len(self.data):
            raise CacheError(f"{self.what} points outside the file; the shard is damaged")
        return struct.unpack_from(fmt, self.data, position)[0]

    def _field_position(self, index: int) -> int | None:
        slot = 4 + 2 * index
        if slot + 2 > self.vtable_bytes:
            return None
        offset = self._unpack("<H", self.vtable + slot)
        return self.position + offset if offset else None

    def scalar(self, index: int, fmt: str, default: int = 0) -> int:
        position = self._field_position(index)
        return default if position is None else self._unpack(fmt, position)

    def present(self, index: int) -> bool:
        return self._field_position(index) is not None

    def _target(self, index: int) -> int | None:
        position = self._field_position(index)
        return None if position is None else position + self._unpack("<I", position)

    def table(self, index: int) -> _Table | None:
        target = self._target(index)
        return None if target is None else _Table(self.data, target, self.what)

    def vector(self, index: int, element_bytes: int) -> tuple[int, int]:
        """``(start, count)`` of a vector of structs; ``(0, 0)`` when absent."""
        target = self._target(index)
        if target is None:
            return 0, 0
        count = self._unpack("<I", target)
        start = target + 4
        if start + count * element_bytes > len(self.data):
            raise CacheError(f"{self.what} has a vector running past the end of the file; the shard is damaged")
        return start, count


def _root(data: memoryview, start: int, length: int, what: str) -> _Table:
    if length < 4 or start + length > len(data):
        raise CacheError(f"{what} runs past the end of the file; the shard is damaged")
    return _Table(data[start : start + length], struct.unpack_from("<I", data, start)[0], what)


def inspect_file(data: memoryview | bytes, max_rows: int) -> list[BatchLayout]:
    """The record batches of an Arrow IPC file, refusing what would inflate in memory.

    Args:
        data: the whole file (a memory map is fine: nothing is copied).
        max_rows: the most rows the file may hold in all (from the manifest).

    Returns:
        One :class:`BatchLayout` per record batch, in file order.
    """
    data = memoryview(data)
    size = len(data)
    if size < 2 * len(MAGIC) + 6 or bytes(data[:6]) != MAGIC or bytes(data[-6:]) != MAGIC:
        raise CacheError("not an Arrow IPC file (magic bytes missing); the shard is damaged")
    footer_length = struct.unpack_from("<i", data, size - 10)[0]
    footer_start = size - 10 - footer_length
    if footer_length <= 0 or footer_start < 8:
        raise CacheError("Arrow footer length is out of range; the shard is damaged")
    footer = _root(data, footer_start, footer_length, "Arrow footer")
    _, dictionaries = footer.vector(2, BLOCK_BYTES)
    if dictionaries:
        raise CacheError("shard has dictionary batches, which the format does not use; the shard is damaged")
    start, count = footer.vector(3, BLOCK_BYTES)
    if count > max_rows:
        raise CacheError(f"shard has {count} record batches for at most {max_rows} rows; the shard is damaged")
    batches, total_rows = [], 0
    for number in range(count):
        offset, metadata_length, _, body_length = struct.unpack_from("<qiiq", footer.data, start + number * 24)
        batch = _record_batch(data, offset, metadata_length, body_length, footer_start)
        total_rows += batch.rows
        if total_rows > max_rows:
            raise CacheError(f"shard's record batches hold more than the manifest's {max_rows} rows")
        batches.append(batch)
    return batches


def _record_batch(data: memoryview, offset: int, metadata_length: int, body_length: int, end: int) -> BatchLayout:
    what = f"record batch message at byte {offset}"
    if offset < 8 or metadata_length < 8 or body_length < 0 or offset + metadata_length + body_length > end:
        raise CacheError(f"{what} lies outside the file's data; the shard is damaged")
    prefix = struct.unpack_from("<I", data, offset)[0]
    if prefix == CONTINUATION:
        flatbuffer_start, flatbuffer_length = offset + 8, struct.unpack_from("<i", data, offset + 4)[0]
    else:  # pre-1.0 files: the length alone
        flatbuffer_start, flatbuffer_length = offset + 4, prefix
    if flatbuffer_start + flatbuffer_length > offset + metadata_length:
        raise CacheError(f"{what} is longer than its block; the shard is damaged")
    message = _root(data, flatbuffer_start, flatbuffer_length, what)
    if message.scalar(1, "<B") != RECORD_BATCH_HEADER:
        raise CacheError(f"{what} is not a record batch; the shard is damaged")
    declared_body = message.scalar(3, "<q")
    if declared_body != body_length:
        raise CacheError(f"{what} declares a body of {declared_body} bytes, its block {body_length}")
    header = message.table(2)
    if header is None:
        raise CacheError(f"{what} has no header; the shard is damaged")
    if header.present(3):
        raise CacheError(
            "shard uses Arrow IPC body compression, which inflates before any check can run; "
            "the format stores payloads uncompressed at the Arrow level: rewrite the shard without it"
        )
    rows = header.scalar(0, "<q")
    if rows < 0:
        raise CacheError(f"{what} has a negative row count; the shard is damaged")
    nodes_start, nodes = header.vector(1, FIELD_NODE_BYTES)
    for node in range(nodes):
        length = struct.unpack_from("<q", header.data, nodes_start + node * FIELD_NODE_BYTES)[0]
        if length != rows:
            raise CacheError(f"{what} has a column of {length} values for {rows} rows; the shard is damaged")
    buffers_start, buffers = header.vector(2, BUFFER_BYTES)
    for buffer in range(buffers):
        position, length = struct.unpack_from("<qq", header.data, buffers_start + buffer * BUFFER_BYTES)
        if position < 0 or length < 0 or position + length > body_length:
            raise CacheError(f"{what} has a buffer outside its body; the shard is damaged")
    return BatchLayout(offset=offset, rows=rows, body_bytes=body_length)
