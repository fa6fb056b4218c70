"""Reading a cache: the manifest, each shard's bytes and hash, and every decoded row, all checked.

A cache may come from another team, so everything here treats it as untrusted input.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import codec, codec_v2, row_stats
from pipeline.errors import CacheError, first_line
from pipeline.fingerprint import sha256_file
from pipeline.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, SHARD_PATTERN, Manifest, ShardEntry, parse_manifest
from pipeline.rows import SparseRow
from pipeline.store.ipc import inspect_file
from pipeline.store.layout import INT64_ENCODING, JOURNAL_NAME, SCHEMA, SCHEMA_METADATA, TOKENIZER_DIR, schema_v2

# float16 rounding can lift a log-probability of -1e-4 to a hair above 0.
LOGPROB_SLACK = 1e-3
MIN_PYARROW = (14, 0, 1)  # CVE-2023-47248: older pyarrow unpickles extension types in IPC files


def check_pyarrow_version(version: str = pa.__version__) -> None:
    """Refuse a pyarrow that is unsafe to point at an untrusted shard."""
    parts = tuple(int(piece) for piece in version.split(".")[:3] if piece.isdigit())
    if parts < MIN_PYARROW:
        raise CacheError(f"pyarrow {version} is unsafe for reading caches (CVE-2023-47248); upgrade to >= 14.0.1")


def read_manifest(cache_dir: str | Path) -> Manifest:
    """Read and validate ``manifest.json``; raise :class:`CacheError` naming the first problem."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        raise CacheError(f"cache folder '{cache_dir}' does not exist; check the path")
    path = cache_dir / MANIFEST_NAME
    if path.is_symlink() or not path.is_file():
        if (cache_dir / JOURNAL_NAME).exists() or any(cache_dir.glob("shard-*.arrow")):
            raise CacheError(
                f"'{cache_dir}' has shards but no {MANIFEST_NAME}: the pass writing it (teacher-cache or "
                "recode) did not finish; run the same command again to complete it"
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


def read_columns(manifest: Manifest, hidden: bool = False) -> tuple[str, ...]:
    """The columns a reader takes from each row: version 1's fixed four, or the version 2 registry's
    columns this codec knows (optional columns it does not know are skipped); with ``hidden``, also
    the hidden-state columns (:mod:`pipeline.hidden`), which are large and read only when asked."""
    if manifest.format_version == 1:
        return codec.PAYLOAD_COLUMNS
    registry = codec_v2.columns(
        manifest.capture, codec_settings(manifest), row_stats=True, loss_mask=True, document_starts=True
    )
    if hidden and manifest.hidden is not None:
        registry += manifest.hidden.columns()
    known = {(column["name"], column["encoding"]) for column in registry}
    return tuple(column.name for column in manifest.columns if (column.name, column.encoding) in known)


def codec_settings(manifest: Manifest) -> codec_v2.CodecSettings:
    """A version 2 manifest's codec settings."""
    return codec_v2.CodecSettings.from_json(manifest.codec)


@contextmanager
def open_shard(cache_dir: Path, entry: ShardEntry, manifest: Manifest, verify: bool = True) -> Iterator[Any]:
    r"""A checked shard's Arrow file reader, memory-mapped; the shard's hash is checked first when ``verify``.

    Before pyarrow loads anything, the file's footer and message headers are read
    (:func:`pipeline.store.ipc.inspect_file`): no Arrow body compression, no more rows than
    the manifest's; then the schema must be the manifest's. pyarrow's errors inside the
    block become one-line :class:`CacheError`\ s naming the shard.
    """
    check_pyarrow_version()
    if verify:
        check_shard(cache_dir, entry)
    path = shard_path(cache_dir, entry)
    try:
        with pa.memory_map(str(path), "r") as source:
            inspect_file(memoryview(source.read_buffer()), entry.rows)
            source.seek(0)
            reader = pa.ipc.open_file(source)
            check_schema(reader.schema, entry.name, manifest)
            yield reader
    except CacheError:
        raise
    except (pa.ArrowException, OSError, ValueError, IndexError, KeyError, TypeError) as exc:
        # pyarrow reports malformed files through several builtin exception types.
        raise CacheError(
            f"shard '{entry.name}' is not a readable Arrow file ({first_line(exc, 120)}); the shard is damaged"
        ) from exc


def checked_batch(reader: Any, batch_index: int, entry: ShardEntry, first_row: int) -> pa.RecordBatch:
    """Record batch ``batch_index`` of an :func:`open_shard` reader, whose first row is the shard's
    ``first_row``-th: fully validated, without nulls, its ``seq_index`` the rows' own, within the shard."""
    batch = reader.get_batch(batch_index)
    # Arrow IPC readers trust the offsets in the file; a hostile file with a valid
    # hash could point them out of bounds. Full validation checks them first.
    batch.validate(full=True)
    if first_row + batch.num_rows > entry.rows:
        raise CacheError(f"shard '{entry.name}' holds more rows than the manifest's {entry.rows}")
    if any(column.null_count for column in batch.columns):
        raise CacheError(f"shard '{entry.name}' has null values; the format has none")
    expected = np.arange(batch.num_rows) + entry.first_seq + first_row
    if not np.array_equal(batch.column("seq_index").to_numpy(), expected):
        raise CacheError(f"shard '{entry.name}' has rows out of order; the shard is damaged")
    return batch


def batch_cells(batch: pa.RecordBatch, manifest: Manifest, hidden: bool = False) -> list[dict[str, bytes | int]]:
    """Each row's cells of a checked record batch: :func:`read_columns` -> frame bytes (or int for int64 columns)."""
    names = read_columns(manifest, hidden)
    integers = {column.name for column in manifest.columns if column.encoding == INT64_ENCODING}
    payload = {name: batch.column(name).to_numpy() if name in integers else batch.column(name) for name in names}
    return [
        {name: int(payload[name][row]) if name in integers else payload[name][row].as_py() for name in names}
        for row in range(batch.num_rows)
    ]


def iter_shard_frames(
    cache_dir: Path, entry: ShardEntry, manifest: Manifest, verify: bool = True, hidden: bool = False
) -> Iterator[tuple[int, dict[str, bytes | int]]]:
    """``(seq_index, cells)`` for each row of one shard, still encoded (:func:`open_shard`, :func:`batch_cells`).

    Record batches are read zero-copy from the memory map, one at a time, each checked
    (:func:`checked_batch`). Memory held: the frames of one record batch, plus pages of the
    mapped file (the cache's own bytes).
    """
    seen = 0
    with open_shard(cache_dir, entry, manifest, verify) as reader:
        for batch_index in range(reader.num_record_batches):
            batch = checked_batch(reader, batch_index, entry, seen)
            for cells in batch_cells(batch, manifest, hidden):
                yield entry.first_seq + seen, cells
                seen += 1
    if seen != entry.rows:
        raise CacheError(f"shard '{entry.name}' holds {seen} rows, the manifest says {entry.rows}")


def read_shard_row_stats(cache_dir: Path, entry: ShardEntry, manifest: Manifest, verify: bool = True) -> np.ndarray:
    """``(rows, 2)`` float32: the shard's ``row_stats`` column (:mod:`pipeline.row_stats`), read alone, checked.

    Only that column's buffers are touched (besides the checks' reads of the file), and no payload is decoded.
    """
    cells: list[bytes] = []
    with open_shard(cache_dir, entry, manifest, verify) as reader:
        for batch_index in range(reader.num_record_batches):
            batch = checked_batch(reader, batch_index, entry, len(cells))
            cells.extend(batch.column(row_stats.COLUMN).to_pylist())
    if len(cells) != entry.rows:
        raise CacheError(f"shard '{entry.name}' holds {len(cells)} rows, the manifest says {entry.rows}")
    return row_stats.decode_cells(cells, manifest.logit_width, f"shard '{entry.name}'")


class ShardRows:
    """Random access to one shard's encoded rows: :meth:`cells` of the ``row``-th row.

    The shard stays memory-mapped until :meth:`close`; the record batch last read is kept
    (rows of one batch are often read together).
    """

    def __init__(
        self, cache_dir: Path, entry: ShardEntry, manifest: Manifest, verify: bool, hidden: bool = False
    ) -> None:
        self.hidden = hidden
        self.entry, self.manifest = entry, manifest
        self._stack = ExitStack()
        self._reader = self._stack.enter_context(open_shard(cache_dir, entry, manifest, verify))
        sizes = [self._reader.get_record_batch(index).num_rows for index in range(self._reader.num_record_batches)]
        self._starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        if int(self._starts[-1]) != entry.rows:
            self.close()
            raise CacheError(f"shard '{entry.name}' holds {int(self._starts[-1])} rows, the manifest says {entry.rows}")
        self._batch: tuple[int, list[dict[str, bytes | int]]] | None = None

    def cells(self, row: int) -> dict[str, bytes | int]:
        """The encoded cells of the shard's ``row``-th row (``0 <= row < entry.rows``)."""
        batch_index = int(np.searchsorted(self._starts, row, side="right")) - 1
        if self._batch is None or self._batch[0] != batch_index:
            first = int(self._starts[batch_index])
            try:
                batch = checked_batch(self._reader, batch_index, self.entry, first)
            except CacheError:
                raise
            except (pa.ArrowException, OSError, ValueError, IndexError, KeyError, TypeError) as exc:
                raise CacheError(
                    f"shard '{self.entry.name}' is not a readable Arrow file ({first_line(exc, 120)}); "
                    "the shard is damaged"
                ) from exc
            self._batch = (batch_index, batch_cells(batch, self.manifest, self.hidden))
        return self._batch[1][row - int(self._starts[batch_index])]

    def close(self) -> None:
        self._batch = None
        self._stack.close()


def check_schema(schema: pa.Schema, shard: str, manifest: Manifest) -> None:
    """The shard's schema must be the manifest's: same fields, types and nullability, and the format's metadata keys."""
    if manifest.format_version == 1:
        expected, metadata_expected = SCHEMA, SCHEMA_METADATA
    else:
        expected = schema_v2(manifest.columns, codec_settings(manifest).label)
        metadata_expected = {key.decode(): value.decode() for key, value in expected.metadata.items()}
    if not schema.equals(expected, check_metadata=False):
        raise CacheError(f"shard '{shard}' has an unexpected schema; the cache is damaged")
    metadata = {key.decode("utf-8", "replace"): value for key, value in (schema.metadata or {}).items()}
    for key, value in metadata_expected.items():
        if metadata.get(key) != value.encode():
            raise CacheError(f"shard '{shard}' schema metadata '{key}' is not '{value}'; the cache is damaged")


def decode_checked_row(frames: dict[str, bytes | int], manifest: Manifest, shard: str) -> SparseRow:
    """Decode one row's frames with the manifest's shapes and check every invariant of its values."""
    if manifest.format_version == 1:
        try:
            row = codec.decode_row(frames, manifest.seq_len, manifest.k)  # type: ignore[arg-type]
        except CacheError as exc:
            raise CacheError(f"shard '{shard}': {exc}") from exc
        check_row_values(row, manifest, shard)
        return row
    settings = codec_settings(manifest)
    try:
        return codec_v2.decode_row(frames, manifest.seq_len, manifest.capture, settings, manifest.logit_width)  # type: ignore[arg-type]
    except CacheError as exc:
        message = str(exc)
        suffix = "" if "corrupt" in message or "damaged" in message else "; the shard is damaged"
        raise CacheError(f"shard '{shard}': {message}{suffix}") from exc


def iter_shard_rows(
    cache_dir: Path, entry: ShardEntry, manifest: Manifest, verify: bool = True
) -> Iterator[tuple[int, SparseRow]]:
    """``(seq_index, row)`` for each row of one shard, decoded and checked."""
    for seq_index, frames in iter_shard_frames(cache_dir, entry, manifest, verify):
        yield seq_index, decode_checked_row(frames, manifest, entry.name)


def mass_tolerance(k: int) -> float:
    """How far ``log(captured mass + tail mass)`` may stray from 0 in a valid codec-v1 row.

    float16 rounds each log-probability ``l`` by at most ``2**-11 * |l|`` (``2**-25`` below
    float16's normal range), which moves the total mass by at most ``2**-11`` times the
    captured entropy, itself at most ``ln(k)``; float32 capture adds far less than ``1e-4``.
    """
    return 2.0**-11 * math.log(k + 1) + 1e-4


def row_problem(row: SparseRow, logit_width: int) -> str | None:
    """The first broken invariant of a decoded codec-v1 row, or ``None`` (pure: arrays in, text out).

    Invariants: ids below ``logit_width``; ``k`` distinct captured ids per position,
    most probable first; log-probabilities finite and at most 0; tails not NaN and at most
    0 (``-inf`` when nothing is left out); captured mass plus tail mass equal to 1 within
    :func:`mass_tolerance`.
    """
    if row.ids.size and int(row.ids.max()) >= logit_width:
        return f"a stored id is not below logit_width {logit_width}"
    if row.input_ids.size and int(row.input_ids.max()) >= logit_width:
        return f"an input id is not below logit_width {logit_width}"
    logprobs, tail = row.logprobs, row.tail_logmass
    if not np.isfinite(logprobs).all() or (logprobs > LOGPROB_SLACK).any():
        return "a stored log-probability is not finite or is above 0"
    if np.isnan(tail).any() or (tail > LOGPROB_SLACK).any():
        return "a tail log-mass is NaN or above 0"
    if (np.diff(logprobs, axis=1) > 0).any():
        return "captured log-probabilities are not in most-probable-first order"
    if (np.diff(np.sort(row.ids, axis=1), axis=1) == 0).any():
        return "an id is captured twice at one position"
    peak = logprobs[:, :1].astype(np.float64)
    captured = peak[:, 0] + np.log(np.exp(logprobs.astype(np.float64) - peak).sum(axis=1))
    total = np.logaddexp(captured, tail.astype(np.float64))
    worst = float(np.abs(total).max()) if total.size else 0.0
    if worst > mass_tolerance(logprobs.shape[1]):
        return f"captured and tail probability add up to exp({worst:+.3g}), not 1"
    return None


def check_row_values(row: SparseRow, manifest: Manifest, shard: str) -> None:
    """Raise :class:`CacheError` naming the shard if a decoded row breaks an invariant (see :func:`row_problem`)."""
    problem = row_problem(row, manifest.logit_width)
    if problem is not None:
        raise CacheError(f"shard '{shard}': {problem}; the shard is damaged")


def tokenizer_file_problems(cache_dir: Path, manifest: Manifest) -> list[str]:
    """Each problem with the cache's ``tokenizer/`` copy: the folder a symlink, or a listed file
    missing, not a regular file (a symlink counts as missing), of another size, or failing its sha256."""
    folder = cache_dir / TOKENIZER_DIR
    if not manifest.tokenizer_files:
        return []
    if folder.is_symlink() or not folder.is_dir():
        return [f"the cache's '{TOKENIZER_DIR}' folder is missing or is a symlink"]
    problems = []
    for item in manifest.tokenizer_files:
        path = folder / item.name
        if path.is_symlink() or not path.is_file():
            problems.append(f"tokenizer file '{item.name}' is missing or not a regular file")
        elif path.stat().st_size != item.bytes:
            problems.append(
                f"tokenizer file '{item.name}' has {path.stat().st_size} bytes, the manifest says {item.bytes}"
            )
        elif sha256_file(path) != item.sha256:
            problems.append(f"tokenizer file '{item.name}' fails its checksum")
    return problems


@dataclass(frozen=True)
class StreamPosition:
    """Where the packed stream stands after a cache's first ``sequences`` rows: the next sequence's
    index, and the dataset record and token offset where the last written sequence starts."""

    sequences: int
    source_record: int
    record_offset: int


def written_stream(cache_dir: Path, prefix: list[ShardEntry], seq_len: int, hasher: Any) -> StreamPosition | None:
    """Feed the token ids of shards ``prefix`` (the cache's first shards, in order, already checked
    against their journaled sha256) to ``hasher``; return where the stream stands after them.

    Reading a pass's own shards back costs far less than tokenizing (and downloading) the
    text they came from again, which is what a resumed pass saves by starting from here.
    """
    position = None
    for entry in prefix:
        with pa.OSFile(str(shard_path(cache_dir, entry)), "rb") as source:
            table = pa.ipc.open_file(source).read_all()
        for cell in table.column("input_ids").to_pylist():
            hasher.update(codec.decode_array(cell, "<u4", seq_len))
        records = table.column("source_record").to_pylist()
        offsets = table.column("record_offset").to_pylist()
        position = StreamPosition(entry.first_seq + entry.rows, int(records[-1]), int(offsets[-1]))
    return position


def decode_hidden(cells: dict[str, bytes | int], manifest: Manifest) -> dict[int, np.ndarray]:
    """A row's stored hidden states, layer -> ``(T, D)`` float32 (empty when the cache holds none)."""
    from pipeline import hidden

    spec = manifest.hidden
    if spec is None:
        return {}
    return {
        layer: hidden.decode(cells[hidden.column_name(layer)], spec.encoding, manifest.seq_len, spec.dim)  # type: ignore[arg-type]
        for layer in spec.layers
    }
