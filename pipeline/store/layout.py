"""Names and the Arrow schema of a cache folder (no I/O).

A cache is a folder::

    manifest.json            written last: its presence means the cache is complete
    shard-00000.arrow        Arrow IPC *file* format, one row per packed sequence
    shard-00001.arrow
    tokenizer/               the teacher's tokenizer files (hashed in the manifest)
    run.json                 timings and host of the run that wrote it (not hashed)
    progress.json            only while a pass is unfinished: the journal
    progress.rank-00001.json only while a pass on several processes is unfinished: rank 1's journal
    .lock                    only while a pass runs
"""

from __future__ import annotations

import re

import pyarrow as pa

from pipeline import codec
from pipeline.manifest import FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME, SHARD_PATTERN, Column, shard_name

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "MANIFEST_NAME", "SHARD_PATTERN", "shard_name"]

RUN_LOG_NAME = "run.json"
JOURNAL_NAME = "progress.json"
# Journals of ranks other than 0 in a data-parallel pass: ``progress.rank-00001.json``.
RANK_JOURNAL_PATTERN = re.compile(r"progress\.rank-(\d{5})\.json")
LOCK_NAME = ".lock"
TOKENIZER_DIR = "tokenizer"
# Rows per Arrow record batch as written; readers accept any count up to the shard's rows.
RECORD_BATCH_ROWS = 16
# Registry encodings stored as plain Arrow int64 values; every other column holds one frame per cell.
INT64_ENCODING = "int64"
SCHEMA_METADATA = {
    "distill.format": FORMAT_NAME,
    "distill.format_version": "1",
    "distill.codec": f"{codec.CODEC_NAME}/{codec.CODEC_VERSION}",
}
# The version 1 schema, fixed.
SCHEMA = pa.schema(
    [
        pa.field("seq_index", pa.int64(), nullable=False),
        pa.field("input_ids", pa.binary(), nullable=False),
        pa.field("topk_ids", pa.binary(), nullable=False),
        pa.field("topk_logprobs", pa.binary(), nullable=False),
        pa.field("tail_logmass", pa.binary(), nullable=False),
    ],
    metadata=SCHEMA_METADATA,
)


def journal_name(rank: int) -> str:
    """The journal a process of a teacher pass writes: ``progress.json`` for rank 0 (and a single process)."""
    return JOURNAL_NAME if rank == 0 else f"progress.rank-{rank:05d}.json"


def schema_metadata(format_version: int, codec_label: str) -> dict[str, str]:
    """The metadata keys every shard's schema carries: format, its version, and the codec as ``name/version``."""
    return {"distill.format": FORMAT_NAME, "distill.format_version": str(format_version), "distill.codec": codec_label}


def column_type(column: Column) -> pa.DataType:
    """A registry column's Arrow type: int64 for plain integers, binary (one frame per cell) otherwise."""
    return pa.int64() if column.encoding == INT64_ENCODING else pa.binary()


def schema_v2(columns: tuple[Column, ...] | list[Column], codec_label: str) -> pa.Schema:
    """A version 2 shard's schema: ``seq_index``, then the registry's columns in order, none nullable."""
    fields = [pa.field("seq_index", pa.int64(), nullable=False)]
    fields += [pa.field(column.name, column_type(column), nullable=False) for column in columns]
    return pa.schema(fields, metadata=schema_metadata(2, codec_label))
