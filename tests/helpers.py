"""Test helpers for forging caches: rewrite a shard's rows or its Arrow file, then reseal the manifest
so that the hashes match and only the reader's own checks stand between the forgery and the user."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa

from pipeline import codec
from pipeline.fingerprint import sha256_file
from pipeline.manifest import render_manifest
from pipeline.store.layout import MANIFEST_NAME, SCHEMA
from pipeline.store.reader import iter_shard_rows, read_manifest


def reseal_shard(cache: Path, index: int) -> None:
    """Record shard ``index``'s current size and sha256 in the manifest and reseal it."""
    path = cache / read_manifest(cache).shards[index].name
    manifest = json.loads((cache / MANIFEST_NAME).read_text())
    manifest["shards"][index].update(bytes=path.stat().st_size, sha256=sha256_file(path))
    manifest["totals"]["bytes"] = sum(shard["bytes"] for shard in manifest["shards"])
    (cache / MANIFEST_NAME).write_bytes(render_manifest(manifest))


def write_table(path: Path, table: pa.Table, compression: str | None = None) -> None:
    options = pa.ipc.IpcWriteOptions(compression=compression)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema, options=options) as writer:
        writer.write_table(table, max_chunksize=16)


def rewrite_rows(cache: Path, index: int, change: Callable[[int, dict[str, bytes]], dict[str, bytes]]) -> None:
    """Re-encode shard ``index`` with ``change(row_number, frames) -> frames`` applied to each row, and reseal."""
    manifest = read_manifest(cache)
    entry = manifest.shards[index]
    rows = list(iter_shard_rows(cache, entry, manifest))
    columns: dict[str, list] = {"seq_index": [seq for seq, _ in rows]}
    for name in codec.PAYLOAD_COLUMNS:
        columns[name] = []
    for number, (_, row) in enumerate(rows):
        frames = change(number, codec.encode_row(row))
        for name in codec.PAYLOAD_COLUMNS:
            columns[name].append(frames[name])
    write_table(cache / entry.name, pa.table(columns, schema=SCHEMA))
    reseal_shard(cache, index)


def change_first_row(change: Callable[[codec.SparseRow], codec.SparseRow]):
    """A ``rewrite_rows`` change that edits the decoded first row and re-encodes it."""

    def apply(number: int, frames: dict[str, bytes]) -> dict[str, bytes]:
        if number:
            return frames
        row = codec.decode_row(frames, *_shape(frames))
        return codec.encode_row(change(row))

    return apply


def _shape(frames: dict[str, bytes]) -> tuple[int, int]:
    import zstandard

    seq_len = zstandard.frame_content_size(frames["input_ids"]) // 4
    return seq_len, zstandard.frame_content_size(frames["topk_ids"]) // 4 // seq_len


def child_peak_rss(code: str, timeout: float = 120) -> tuple[int, str]:
    """Run ``code`` in a fresh Python; return its peak resident memory in bytes and its output.

    Peak RSS as the operating system counts it sees pyarrow's and zstd's allocations,
    which Python-level tracing misses.
    """
    report = "import resource as _r, sys as _s\n_s.stdout.write(f'\\nPEAK {_r.getrusage(_r.RUSAGE_SELF).ru_maxrss}\\n')"
    script = f"{code}\n{report}\n"
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    peak = [line for line in result.stdout.splitlines() if line.startswith("PEAK ")]
    assert peak, f"child failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    kib = int(peak[-1].split()[1])
    return kib * (1024 if sys.platform != "darwin" else 1), result.stdout + result.stderr
