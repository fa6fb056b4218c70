"""The only module that reads or writes shard files and the manifest.

A cache is a folder::

    manifest.json            written last: its presence means the cache is complete
    shard-00000.arrow        Arrow IPC *file* format, one row per packed sequence
    shard-00001.arrow
    tokenizer/               the teacher's tokenizer files (hashed in the manifest)
    run.json                 timings and host of the run that wrote it (not hashed)

Every file is written under a temporary name, fsynced and renamed, so a crash leaves
either the old state or the new one, never a torn file under the final name.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import codec
from pipeline.errors import CacheError
from pipeline.fingerprint import sha256_file

FORMAT_NAME = "distill-cache"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
RUN_LOG_NAME = "run.json"
TOKENIZER_DIR = "tokenizer"
SHARD_PATTERN = re.compile(r"^shard-\d{5,}\.arrow$")
MAX_MANIFEST_BYTES = 64 << 20
RECORD_BATCH_ROWS = 16
SCHEMA = pa.schema(
    [
        pa.field("seq_index", pa.int64(), nullable=False),
        pa.field("input_ids", pa.binary(), nullable=False),
        pa.field("topk_ids", pa.binary(), nullable=False),
        pa.field("topk_logprobs", pa.binary(), nullable=False),
        pa.field("tail_logmass", pa.binary(), nullable=False),
    ],
    metadata={
        "distill.format": FORMAT_NAME,
        "distill.format_version": str(FORMAT_VERSION),
        "distill.codec": f"{codec.CODEC_NAME}/{codec.CODEC_VERSION}",
    },
)


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_bytes_atomic(path: Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` via a fsynced temporary file and a rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.arrow"


@dataclass(frozen=True)
class ShardEntry:
    """One shard as the manifest lists it."""

    name: str
    rows: int
    tokens: int
    bytes: int
    sha256: str
    first_seq: int

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "rows": self.rows,
            "tokens": self.tokens,
            "bytes": self.bytes,
            "sha256": self.sha256,
            "first_seq": self.first_seq,
        }


class ShardWriter:
    """Appends encoded rows to numbered shards of ``rows_per_shard`` rows each.

    Usage: ``add(seq_index, frames, n_tokens)`` for each row, then ``close()`` to commit
    the last partial shard; ``shards`` lists what is committed. ``abort()`` removes the
    shard in progress.
    """

    def __init__(self, cache_dir: Path, rows_per_shard: int) -> None:
        self.cache_dir = cache_dir
        self.rows_per_shard = rows_per_shard
        self.shards: list[ShardEntry] = []
        self._pending: list[tuple[int, dict[str, bytes]]] = []
        self._writer: pa.ipc.RecordBatchFileWriter | None = None
        self._sink: pa.OSFile | None = None
        self._rows = 0
        self._tokens = 0
        self._first_seq = 0

    @property
    def _tmp_path(self) -> Path:
        return self.cache_dir / f".{shard_name(len(self.shards))}.tmp"

    def add(self, seq_index: int, frames: dict[str, bytes], n_tokens: int) -> None:
        if self._writer is None:
            self._sink = pa.OSFile(str(self._tmp_path), "wb")
            options = pa.ipc.IpcWriteOptions(compression=None)
            self._writer = pa.ipc.new_file(self._sink, SCHEMA, options=options)
            self._first_seq = seq_index
        self._pending.append((seq_index, frames))
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
        for name in codec.PAYLOAD_COLUMNS:
            columns[name] = pa.array([frames[name] for _, frames in self._pending], type=pa.binary())
        self._writer.write_batch(pa.RecordBatch.from_pydict(columns, schema=SCHEMA))
        self._pending.clear()

    def _commit(self) -> None:
        assert self._writer is not None and self._sink is not None
        self._flush_batch()
        self._writer.close()
        self._sink.flush()
        os.fsync(self._sink.fileno())
        self._sink.close()
        name = shard_name(len(self.shards))
        tmp = self._tmp_path
        entry = ShardEntry(
            name=name,
            rows=self._rows,
            tokens=self._tokens,
            bytes=tmp.stat().st_size,
            sha256=sha256_file(tmp),
            first_seq=self._first_seq,
        )
        os.replace(tmp, self.cache_dir / name)
        fsync_dir(self.cache_dir)
        self.shards.append(entry)
        self._writer = None
        self._sink = None
        self._rows = 0
        self._tokens = 0

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
        self._pending.clear()
        with contextlib.suppress(FileNotFoundError):
            self._tmp_path.unlink()


def write_manifest(cache_dir: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest (the commit point) with sorted keys, so equal inputs give equal bytes."""
    text = json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=True) + "\n"
    write_bytes_atomic(cache_dir / MANIFEST_NAME, text.encode("ascii"))


def write_run_log(cache_dir: Path, run: dict[str, Any]) -> None:
    """Timings, host and paths of this run: outside the manifest, so the cache stays deterministic."""
    write_bytes_atomic(cache_dir / RUN_LOG_NAME, (json.dumps(run, indent=2, sort_keys=True) + "\n").encode())


# ----------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Manifest:
    """A validated manifest. ``raw`` is the parsed JSON; the fields are what readers need."""

    raw: dict[str, Any]
    seq_len: int
    k: int
    logit_width: int
    tokenizer_fingerprint: str
    shards: tuple[ShardEntry, ...]

    @property
    def sequences(self) -> int:
        return sum(shard.rows for shard in self.shards)

    @property
    def tokens(self) -> int:
        return sum(shard.tokens for shard in self.shards)

    @property
    def bytes(self) -> int:
        return sum(shard.bytes for shard in self.shards)


def _field(container: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in container:
        raise CacheError(f"manifest: missing field '{where}{key}'; the cache is damaged or not a cache")
    value = container[key]
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
        raise CacheError(
            f"manifest: field '{where}{key}' should be {getattr(kind, '__name__', kind)}, got {type(value).__name__}"
        )
    return value


def _positive(value: int, where: str) -> int:
    if value <= 0:
        raise CacheError(f"manifest: field '{where}' must be positive, got {value}")
    return value


def read_manifest(cache_dir: str | Path) -> Manifest:
    """Read and validate ``manifest.json``; raise :class:`CacheError` naming the first problem."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        raise CacheError(f"cache folder '{cache_dir}' does not exist; check the path")
    path = cache_dir / MANIFEST_NAME
    if not path.is_file():
        if any(cache_dir.glob("shard-*.arrow")):
            raise CacheError(
                f"'{cache_dir}' has shards but no {MANIFEST_NAME}: the teacher pass did not finish; "
                "run it again to complete the cache"
            )
        raise CacheError(f"'{cache_dir}' is not a cache (no {MANIFEST_NAME}); run distill teacher-cache first")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise CacheError(f"{MANIFEST_NAME} is larger than {MAX_MANIFEST_BYTES} bytes; refusing to parse it")
    try:
        raw = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CacheError(f"{MANIFEST_NAME} is not valid JSON ({exc}); the cache is damaged") from None
    if not isinstance(raw, dict):
        raise CacheError(f"{MANIFEST_NAME} is not a JSON object; the cache is damaged")
    if raw.get("format") != FORMAT_NAME:
        raise CacheError(f"{MANIFEST_NAME} is not a {FORMAT_NAME} manifest")
    version = _field(raw, "format_version", int, "")
    if version != FORMAT_VERSION:
        raise CacheError(
            f"cache format version {version} is not supported (this reader knows {FORMAT_VERSION}); "
            "upgrade the package to read it"
        )
    codec_info = _field(raw, "codec", dict, "")
    if codec_info.get("name") != codec.CODEC_NAME or codec_info.get("version") != codec.CODEC_VERSION:
        raise CacheError(
            f"codec {codec_info.get('name')}/{codec_info.get('version')} is not supported "
            f"(this reader knows {codec.CODEC_NAME}/{codec.CODEC_VERSION}); upgrade the package"
        )
    capture = _field(raw, "capture", dict, "")
    k = _positive(_field(capture, "k", int, "capture."), "capture.k")
    seq_len = _positive(_field(raw, "seq_len", int, ""), "seq_len")
    width = _positive(_field(raw, "logit_width", int, ""), "logit_width")
    if k > width:
        raise CacheError(f"manifest: capture.k={k} exceeds logit_width={width}")
    tokenizer = _field(raw, "tokenizer", dict, "")
    fingerprint = _field(tokenizer, "fingerprint", str, "tokenizer.")
    shards = []
    seen: set[str] = set()
    for number, item in enumerate(_field(raw, "shards", list, "")):
        where = f"shards[{number}]."
        if not isinstance(item, dict):
            raise CacheError(f"manifest: {where[:-1]} is not an object")
        name = _field(item, "name", str, where)
        if not SHARD_PATTERN.match(name):
            raise CacheError(f"manifest: shard name '{name}' is not of the form shard-NNNNN.arrow")
        if name in seen:
            raise CacheError(f"manifest: shard '{name}' is listed twice")
        seen.add(name)
        rows = _positive(_field(item, "rows", int, where), where + "rows")
        tokens = _field(item, "tokens", int, where)
        if tokens != rows * seq_len:
            raise CacheError(
                f"manifest: shard '{name}' has {tokens} tokens, expected rows x seq_len = {rows * seq_len}"
            )
        digest = _field(item, "sha256", str, where)
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise CacheError(f"manifest: shard '{name}' sha256 is not 64 hex digits")
        shards.append(
            ShardEntry(
                name=name,
                rows=rows,
                tokens=tokens,
                bytes=_positive(_field(item, "bytes", int, where), where + "bytes"),
                sha256=digest,
                first_seq=_field(item, "first_seq", int, where),
            )
        )
    if not shards:
        raise CacheError("manifest lists no shards; the cache is empty")
    totals = _field(raw, "totals", dict, "")
    if _field(totals, "sequences", int, "totals.") != sum(s.rows for s in shards):
        raise CacheError("manifest: totals.sequences does not equal the sum of shard rows")
    if _field(totals, "tokens", int, "totals.") != sum(s.tokens for s in shards):
        raise CacheError("manifest: totals.tokens does not equal the sum of shard tokens")
    return Manifest(
        raw=raw, seq_len=seq_len, k=k, logit_width=width, tokenizer_fingerprint=fingerprint, shards=tuple(shards)
    )


def shard_path(cache_dir: Path, entry: ShardEntry) -> Path:
    """The shard's path, refusing anything that would leave the cache folder."""
    path = cache_dir / entry.name
    if path.is_symlink() or path.resolve().parent != cache_dir.resolve():
        raise CacheError(f"shard '{entry.name}' points outside the cache folder; refusing to read it")
    return path


def check_shard(cache_dir: Path, entry: ShardEntry) -> None:
    """Compare a shard's size and sha256 with the manifest; raise naming the shard if they differ."""
    path = shard_path(cache_dir, entry)
    if not path.is_file():
        raise CacheError(f"shard '{entry.name}' is missing from the cache")
    size = path.stat().st_size
    if size != entry.bytes:
        raise CacheError(
            f"shard '{entry.name}' has {size} bytes, the manifest says {entry.bytes}; the shard is damaged"
        )
    actual = sha256_file(path)
    if actual != entry.sha256:
        raise CacheError(
            f"shard '{entry.name}' fails its checksum (expected sha256 {entry.sha256}, got {actual}); "
            "the shard is damaged"
        )


def iter_shard_rows(
    cache_dir: Path, entry: ShardEntry, manifest: Manifest, verify: bool = True
) -> Iterator[tuple[int, codec.SparseRow]]:
    """``(seq_index, row)`` for each row of one shard, decoded; the shard is checked first when ``verify``."""
    if verify:
        check_shard(cache_dir, entry)
    path = shard_path(cache_dir, entry)
    try:
        with pa.memory_map(str(path), "r") as source:
            reader = pa.ipc.open_file(source)
            if not reader.schema.equals(SCHEMA, check_metadata=False):
                raise CacheError(f"shard '{entry.name}' has an unexpected schema; the cache is damaged")
            seen = 0
            for batch_index in range(reader.num_record_batches):
                batch = reader.get_batch(batch_index)
                seq_index = batch.column("seq_index").to_numpy()
                payload = {name: batch.column(name) for name in codec.PAYLOAD_COLUMNS}
                for row in range(batch.num_rows):
                    frames = {name: payload[name][row].as_py() for name in codec.PAYLOAD_COLUMNS}
                    yield int(seq_index[row]), codec.decode_row(frames, manifest.seq_len, manifest.k)
                    seen += 1
    except pa.ArrowException as exc:
        raise CacheError(f"shard '{entry.name}' is not a readable Arrow file ({exc}); the shard is damaged") from None
    if seen != entry.rows:
        raise CacheError(f"shard '{entry.name}' holds {seen} rows, the manifest says {entry.rows}")


def decode_rows_checked(row: codec.SparseRow, manifest: Manifest, shard: str) -> None:
    """Deep check of one decoded row: ids below the logit width, values finite."""
    if row.topk_ids.size and int(row.topk_ids.max()) >= manifest.logit_width:
        raise CacheError(f"shard '{shard}': a stored id is not below logit_width {manifest.logit_width}")
    if row.input_ids.size and int(row.input_ids.max()) >= manifest.logit_width:
        raise CacheError(f"shard '{shard}': an input id is not below logit_width {manifest.logit_width}")
    if not np.isfinite(row.topk_logprobs).all():
        raise CacheError(f"shard '{shard}': a stored log-probability is not finite")
    if np.isnan(row.tail_logmass).any() or np.isposinf(row.tail_logmass).any():
        raise CacheError(f"shard '{shard}': a tail log-mass is NaN or +inf")
