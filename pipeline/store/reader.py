"""Reading a cache: the manifest, each shard's bytes and hash, and every decoded row, all checked.

A cache may come from another team, so everything here treats it as untrusted input.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline import codec
from pipeline.errors import CacheError
from pipeline.fingerprint import sha256_file
from pipeline.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, SHARD_PATTERN, Manifest, ShardEntry, parse_manifest
from pipeline.store.layout import JOURNAL_NAME, SCHEMA, TOKENIZER_DIR

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
