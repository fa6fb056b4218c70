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
import fcntl
import json
import os
import platform
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import codec
from pipeline.errors import CacheError, CacheLockedError
from pipeline.fingerprint import sha256_file
from pipeline.manifest import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    SHARD_PATTERN,
    Manifest,
    ShardEntry,
    parse_manifest,
    render_manifest,
)

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "MANIFEST_NAME", "Manifest", "ShardEntry"]

RUN_LOG_NAME = "run.json"
JOURNAL_NAME = "progress.json"
LOCK_NAME = ".lock"
TOKENIZER_DIR = "tokenizer"
RECORD_BATCH_ROWS = 16
# float16 rounding can lift a log-probability of -1e-4 to a hair above 0.
LOGPROB_SLACK = 1e-3
CRASH_ENV = "DISTILL_TEST_CRASH_AT"
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
_crash_counts: dict[str, int] = {}
MIN_PYARROW = (14, 0, 1)  # CVE-2023-47248: older pyarrow unpickles extension types in IPC files


def check_pyarrow_version(version: str = pa.__version__) -> None:
    """Refuse a pyarrow that is unsafe to point at an untrusted shard."""
    parts = tuple(int(piece) for piece in version.split(".")[:3] if piece.isdigit())
    if parts < MIN_PYARROW:
        raise CacheError(f"pyarrow {version} is unsafe for reading caches (CVE-2023-47248); upgrade to >= 14.0.1")


def crash_point(name: str) -> None:
    """Fault injection for the crash tests: SIGKILL this process at the n-th pass through ``name``.

    Inert unless the environment variable ``DISTILL_TEST_CRASH_AT`` is ``name:n``.
    """
    target = os.environ.get(CRASH_ENV)
    if not target:
        return
    point, _, count = target.partition(":")
    if point != name:
        return
    _crash_counts[name] = _crash_counts.get(name, 0) + 1
    if _crash_counts[name] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_bytes_atomic(path: Path, payload: bytes, crash_name: str | None = None) -> None:
    """Write ``payload`` to ``path`` via a fsynced temporary file and a rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        half = len(payload) // 2
        handle.write(payload[:half])
        if crash_name:
            handle.flush()
            crash_point(f"{crash_name}-partial")
        handle.write(payload[half:])
        handle.flush()
        os.fsync(handle.fileno())
    if crash_name:
        crash_point(f"{crash_name}-before-rename")
    os.replace(tmp, path)
    fsync_dir(path.parent)
    if crash_name:
        crash_point(f"{crash_name}-after-rename")


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.arrow"


class ShardWriter:
    """Appends encoded rows to numbered shards of ``rows_per_shard`` rows each.

    Usage: ``add(seq_index, frames, n_tokens)`` for each row, then ``close()`` to commit
    the last partial shard; ``shards`` lists what is committed. ``abort()`` removes the
    shard in progress. ``committed`` continues a resumed pass after its shards;
    ``on_commit(shards)`` runs after each shard is renamed into place (the journal).
    """

    def __init__(
        self,
        cache_dir: Path,
        rows_per_shard: int,
        committed: list[ShardEntry] | None = None,
        on_commit: Callable[[list[ShardEntry]], None] | None = None,
    ) -> None:
        self.cache_dir = cache_dir
        self.rows_per_shard = rows_per_shard
        self.shards: list[ShardEntry] = list(committed or [])
        self.on_commit = on_commit
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
        self._sink.flush()  # type: ignore[union-attr]
        crash_point("record-batch")

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
    """Write the manifest (the commit point): sorted keys and its own checksum, so equal inputs give equal bytes."""
    write_bytes_atomic(cache_dir / MANIFEST_NAME, render_manifest(manifest), crash_name="manifest")


def write_journal(cache_dir: Path, header: dict[str, Any], shards: list[ShardEntry]) -> None:
    """Record a pass in progress: the settings that define it and the shards committed so far."""
    journal = {"header": header, "shards": [entry.to_json() for entry in shards]}
    payload = (json.dumps(journal, indent=1, sort_keys=True, ensure_ascii=True) + "\n").encode("ascii")
    write_bytes_atomic(cache_dir / JOURNAL_NAME, payload, crash_name="journal")


def read_journal(cache_dir: Path) -> tuple[dict[str, Any], list[ShardEntry]] | None:
    """The journal of an unfinished pass, or ``None`` if there is none or it is unreadable."""
    path = cache_dir / JOURNAL_NAME
    if not path.is_file():
        return None
    try:
        journal = json.loads(path.read_bytes())
        shards = [ShardEntry(**item) for item in journal["shards"]]
        return journal["header"], shards
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        return None


def tokenizer_file_problems(cache_dir: Path, manifest: Manifest) -> list[str]:
    """Each tokenizer file the manifest lists that is missing or fails its sha256."""
    problems = []
    for item in manifest.raw.get("tokenizer", {}).get("files", []):
        name = Path(str(item.get("name", ""))).name
        path = cache_dir / TOKENIZER_DIR / name
        if not path.is_file() or path.is_symlink():
            problems.append(f"tokenizer file '{name}' is missing")
        elif sha256_file(path) != item.get("sha256"):
            problems.append(f"tokenizer file '{name}' fails its checksum")
    return problems


class CacheLock:
    """An exclusive ``flock`` on ``CACHE/.lock`` for the length of a teacher pass.

    The kernel drops the lock when its process dies, kill -9 included, so a crashed pass
    never blocks the next one; the file's content (pid, host) only names the holder in
    the error message. On a filesystem without ``flock`` support the lock is refused.
    """

    def __init__(self, cache_dir: Path) -> None:
        self.path = cache_dir / LOCK_NAME
        self._handle: Any = None

    def __enter__(self) -> CacheLock:
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise CacheLockedError(
                f"another teacher pass ({holder}) is writing to '{self.path.parent}'; wait for it to finish, "
                f"or, if that process is gone, delete '{self.path}' and retry"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {platform.node()}\n")
        handle.flush()
        self._handle = handle
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._handle.close()


def write_run_log(cache_dir: Path, run: dict[str, Any]) -> None:
    """Timings, host and paths of this run: outside the manifest, so the cache stays deterministic."""
    write_bytes_atomic(
        cache_dir / RUN_LOG_NAME, (json.dumps(run, indent=2, sort_keys=True) + "\n").encode(), crash_name="run-log"
    )


# ----------------------------------------------------------------------------- reading


def read_manifest(cache_dir: str | Path) -> Manifest:
    """Read and validate ``manifest.json``; raise :class:`CacheError` naming the first problem."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        raise CacheError(f"cache folder '{cache_dir}' does not exist; check the path")
    path = cache_dir / MANIFEST_NAME
    if path.is_symlink() or not path.is_file():
        if (cache_dir / JOURNAL_NAME).exists() or any(cache_dir.glob("shard-*.arrow")):
            raise CacheError(
                f"'{cache_dir}' has shards but no {MANIFEST_NAME}: the teacher pass did not finish; "
                "run the same teacher-cache command again to complete it"
            )
        raise CacheError(f"'{cache_dir}' is not a cache (no {MANIFEST_NAME}); run distill teacher-cache first")
    with open(path, "rb") as handle:
        data = handle.read(MAX_MANIFEST_BYTES + 1)
    return parse_manifest(data)


def shard_path(cache_dir: Path, entry: ShardEntry) -> Path:
    """The shard's path, refusing anything that would leave the cache folder."""
    if not SHARD_PATTERN.fullmatch(entry.name):
        raise CacheError(f"shard name {entry.name[:80]!r} is not of the form shard-NNNNN.arrow")
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
    check_pyarrow_version()
    if verify:
        check_shard(cache_dir, entry)
    path = shard_path(cache_dir, entry)
    try:
        with pa.memory_map(str(path), "r") as source:
            reader = pa.ipc.open_file(source)
            if not reader.schema.equals(SCHEMA, check_metadata=False):
                raise CacheError(f"shard '{entry.name}' has an unexpected schema; the cache is damaged")
            if reader.num_record_batches > entry.rows:
                raise CacheError(f"shard '{entry.name}' has more record batches than rows; the shard is damaged")
            seen = 0
            for batch_index in range(reader.num_record_batches):
                batch = reader.get_batch(batch_index)
                # Arrow IPC readers trust the offsets in the file; a hostile file with a valid
                # hash could point them out of bounds. Full validation checks them first.
                batch.validate(full=True)
                if seen + batch.num_rows > entry.rows:
                    raise CacheError(f"shard '{entry.name}' holds more rows than the manifest's {entry.rows}")
                seq_index = batch.column("seq_index").to_numpy()
                payload = {name: batch.column(name) for name in codec.PAYLOAD_COLUMNS}
                for row in range(batch.num_rows):
                    if int(seq_index[row]) != entry.first_seq + seen:
                        raise CacheError(f"shard '{entry.name}' has rows out of order; the shard is damaged")
                    frames = {name: payload[name][row].as_py() for name in codec.PAYLOAD_COLUMNS}
                    decoded = codec.decode_row(frames, manifest.seq_len, manifest.k)
                    check_row_values(decoded, manifest, entry.name)
                    yield int(seq_index[row]), decoded
                    seen += 1
    except CacheError:
        raise
    except (pa.ArrowException, OSError, ValueError, IndexError, KeyError, TypeError) as exc:
        # pyarrow reports malformed files through several builtin exception types.
        message = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise CacheError(
            f"shard '{entry.name}' is not a readable Arrow file ({message}); the shard is damaged"
        ) from None
    if seen != entry.rows:
        raise CacheError(f"shard '{entry.name}' holds {seen} rows, the manifest says {entry.rows}")


def check_row_values(row: codec.SparseRow, manifest: Manifest, shard: str) -> None:
    """Check one decoded row: ids below the logit width, log-probabilities finite and at most 0,
    tails not NaN or positive (``-inf``, nothing left out, is allowed)."""
    if row.topk_ids.size and int(row.topk_ids.max()) >= manifest.logit_width:
        raise CacheError(f"shard '{shard}': a stored id is not below logit_width {manifest.logit_width}")
    if row.input_ids.size and int(row.input_ids.max()) >= manifest.logit_width:
        raise CacheError(f"shard '{shard}': an input id is not below logit_width {manifest.logit_width}")
    if not np.isfinite(row.topk_logprobs).all() or (row.topk_logprobs > LOGPROB_SLACK).any():
        raise CacheError(f"shard '{shard}': a stored log-probability is not finite or is above 0")
    if np.isnan(row.tail_logmass).any() or (row.tail_logmass > LOGPROB_SLACK).any():
        raise CacheError(f"shard '{shard}': a tail log-mass is NaN or above 0")
