"""Sparse teacher distribution <-> bytes (codec ``shuffle-zstd`` version 1).

Pure functions: arrays in, bytes out, and back. Nothing here opens a file.

Each array of a row is stored as one zstandard frame of its little-endian bytes after a
*byte shuffle*: the i-th byte of every element is grouped together (byte plane 0 of all
elements, then plane 1, ...). Token ids rarely use their high bytes and log-probabilities
share their exponent bytes, so grouping the planes lets zstd find the runs. Decoding is
``zstd.decompress -> reshape (itemsize, n) -> transpose -> view dtype``; FORMAT.md gives the
same recipe for readers with numpy alone.

Column dtypes (fixed by the codec version, recorded in the manifest):

========================  =============  ===========
column                    shape          stored as
========================  =============  ===========
``input_ids``             ``[T]``        ``<u4``
``topk_ids``              ``[T, k]``     ``<u4``
``topk_logprobs``         ``[T, k]``     ``<f2``
``tail_logmass``          ``[T]``        ``<f4``
========================  =============  ===========

``topk_logprobs`` are rounded to float16: a relative error of at most 2**-11 on each
log-probability, which moves the reconstructed distribution by well under 1e-4 nats of KL.
``tail_logmass`` keeps float32 because a nearly complete capture leaves a tail of 1e-9
whose log must survive.
"""

from __future__ import annotations

import numpy as np
import zstandard

from pipeline.errors import CacheError
from pipeline.rows import SparseRow

CODEC_NAME = "shuffle-zstd"
CODEC_VERSION = 1
COLUMN_DTYPES: dict[str, str] = {
    "input_ids": "<u4",
    "topk_ids": "<u4",
    "topk_logprobs": "<f2",
    "tail_logmass": "<f4",
}
PAYLOAD_COLUMNS: tuple[str, ...] = tuple(COLUMN_DTYPES)
ZSTD_LEVEL = 3


def shuffle_bytes(values: np.ndarray) -> bytes:
    """Little-endian bytes of ``values`` grouped by byte plane: ``(n * itemsize,)``."""
    flat = np.ascontiguousarray(values).reshape(-1)
    planes = flat.view(np.uint8).reshape(flat.size, flat.itemsize)
    return planes.T.tobytes()


def unshuffle_bytes(raw: bytes, dtype: str, count: int) -> np.ndarray:
    """Inverse of :func:`shuffle_bytes`: ``(count,)`` array of ``dtype``."""
    itemsize = np.dtype(dtype).itemsize
    planes = np.frombuffer(raw, dtype=np.uint8).reshape(itemsize, count)
    return np.ascontiguousarray(planes.T).view(dtype).reshape(count)


def encode_array(values: np.ndarray, dtype: str, level: int = ZSTD_LEVEL) -> bytes:
    """Cast ``values`` to ``dtype``, byte-shuffle and compress into one zstd frame."""
    cast = np.asarray(values).astype(dtype, copy=False)
    compressor = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return compressor.compress(shuffle_bytes(cast))


def frame_length(frame: bytes) -> int:
    """Bytes taken by the zstd frame at the start of ``frame``: header, blocks and checksum.

    Walks the block headers (RFC 8878, section 3.1.1.2) without decompressing anything,
    so bytes after the frame can be refused. Raises :class:`CacheError` if the blocks run
    past the end.
    """
    try:
        position = zstandard.frame_header_size(frame)
        has_checksum = zstandard.get_frame_parameters(frame).has_checksum
    except zstandard.ZstdError as exc:
        raise CacheError(f"not a zstd frame ({exc}); the shard is corrupt") from exc
    while True:
        if position + 3 > len(frame):
            raise CacheError("zstd frame is truncated; the shard is corrupt")
        header = int.from_bytes(frame[position : position + 3], "little")
        last, block_type, size = header & 1, (header >> 1) & 3, header >> 3
        if block_type == 3:
            raise CacheError("zstd frame has a reserved block type; the shard is corrupt")
        position += 3 + (1 if block_type == 1 else size)  # an RLE block stores one byte
        if last:
            return position + (4 if has_checksum else 0)


def decode_array(frame: bytes, dtype: str, count: int) -> np.ndarray:
    """Decompress one frame holding exactly ``count`` values of ``dtype``.

    The frame's declared size is checked before anything is allocated, and the
    decompressor is capped at the expected size, so a hostile frame cannot make the reader
    allocate more than the manifest promises. A frame must fill its cell exactly: bytes
    after it are refused, so equal rows always have equal bytes.
    """
    expected = count * np.dtype(dtype).itemsize
    try:
        declared = zstandard.frame_content_size(frame)
    except zstandard.ZstdError as exc:
        raise CacheError(f"not a zstd frame ({exc}); the shard is corrupt") from exc
    if declared != expected:
        raise CacheError(
            f"zstd frame declares {declared} bytes where {expected} are expected; "
            "the shard is corrupt or was written with other settings"
        )
    if frame_length(frame) != len(frame):
        raise CacheError("zstd frame is followed by extra bytes, or is truncated; the shard is corrupt")
    try:
        raw = zstandard.ZstdDecompressor().decompress(frame, max_output_size=expected)
    except zstandard.ZstdError as exc:
        raise CacheError(f"zstd frame does not decompress ({exc}); the shard is corrupt") from exc
    if len(raw) != expected:
        raise CacheError(f"zstd frame holds {len(raw)} bytes, expected {expected}")
    return unshuffle_bytes(raw, dtype, count)


def encode_row(row: SparseRow) -> dict[str, bytes]:
    """Encode one top-k row (every slot valid, log-probabilities and tail present) into a frame per column."""
    return {
        "input_ids": encode_array(row.input_ids, COLUMN_DTYPES["input_ids"]),
        "topk_ids": encode_array(row.ids, COLUMN_DTYPES["topk_ids"]),
        "topk_logprobs": encode_array(row.logprobs, COLUMN_DTYPES["topk_logprobs"]),
        "tail_logmass": encode_array(row.tail_logmass, COLUMN_DTYPES["tail_logmass"]),
    }


def decode_row(frames: dict[str, bytes], seq_len: int, k: int) -> SparseRow:
    """Decode one row's frames; shapes come from the manifest, never from the data."""
    positions = seq_len * k
    input_ids = decode_array(frames["input_ids"], COLUMN_DTYPES["input_ids"], seq_len)
    topk_ids = decode_array(frames["topk_ids"], COLUMN_DTYPES["topk_ids"], positions)
    topk_logprobs = decode_array(frames["topk_logprobs"], COLUMN_DTYPES["topk_logprobs"], positions)
    tail_logmass = decode_array(frames["tail_logmass"], COLUMN_DTYPES["tail_logmass"], seq_len)
    return SparseRow(
        input_ids=input_ids.astype(np.int64),
        ids=topk_ids.astype(np.int64).reshape(seq_len, k),
        logprobs=topk_logprobs.astype(np.float32).reshape(seq_len, k),
        tail_logmass=tail_logmass.astype(np.float32),
    )
