"""Read-only reports on a cache: ``inspect`` and ``verify``."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import remote, row_stats
from pipeline.cache import Cache, open_cache
from pipeline.errors import CacheError
from pipeline.fingerprint import TokenStreamHasher
from pipeline.manifest import Manifest, ShardEntry
from pipeline.store.reader import (
    check_shard,
    decode_checked_row,
    iter_shard_frames,
    iter_shard_rows,
    read_manifest,
    read_shard_row_stats,
    tokenizer_file_problems,
)

MASS_BINS = 50
ENTROPY_BINS = 40


def cache_report(path: str | Path, histograms: bool = False, sample: int | None = None) -> dict[str, Any]:
    """Totals and settings from the manifest, plus what every row holds.

    Reads every row: the mean number of ids per position (distinct ids for sampled
    captures), the mean captured probability mass where rows carry log-probabilities
    (``None`` otherwise), and each column's bytes per token (its cells, without Arrow's
    own overhead, which is ``bytes`` minus their sum). With ``histograms``, also
    ``captured_mass_histogram`` (per position, 50 bins over [0, 1]) and
    ``teacher_entropy_histogram`` (per row, from the row statistics), each
    ``{"edges", "counts"}`` or ``None``. With ``sample``, only that many rows, drawn evenly
    at random (seed 0) and read by random access, give the row figures (``sampled_rows``
    says how many), so a huge cache reports in seconds.
    """
    cache = open_cache(path)
    manifest = cache.manifest
    captured_sum, ids_sum, positions = 0.0, 0, 0
    mass_edges = np.linspace(0.0, 1.0, MASS_BINS + 1)
    mass_counts = np.zeros(MASS_BINS, dtype=np.int64)
    column_bytes: dict[str, int] = {}
    for shard_name, cells in report_frames(cache, sample):
        for name, cell in cells.items():
            column_bytes[name] = column_bytes.get(name, 0) + (len(cell) if isinstance(cell, bytes) else 8)
        row = decode_checked_row(cells, manifest, shard_name)
        valid = row.valid()
        ids_sum += int(valid.sum())
        positions += valid.shape[0]
        if row.logprobs is not None:
            masses = np.where(valid, np.exp(row.logprobs.astype(np.float64)), 0.0).sum(axis=1)
            captured_sum += float(masses.sum())
            if histograms:
                mass_counts += np.histogram(np.clip(masses, 0.0, 1.0), bins=mass_edges)[0]
    raw = manifest.raw
    tokens = max(manifest.tokens, 1)
    read_tokens = max(positions, 1)
    return {
        "path": str(path),
        "teacher": raw.get("teacher", {}).get("source"),
        "dataset": raw.get("dataset", {}).get("source"),
        "format_version": raw.get("format_version", 1),
        "tokens": manifest.tokens,
        "sequences": manifest.sequences,
        "seq_len": manifest.seq_len,
        "shards": len(manifest.shards),
        "capture": manifest.capture.to_json(),
        "codec": raw.get("codec"),
        "k": manifest.k,
        "logit_width": manifest.logit_width,
        "bytes": manifest.bytes,
        "bytes_per_token": manifest.bytes / tokens,
        "column_bytes_per_token": {name: size / read_tokens for name, size in column_bytes.items()},
        "sampled_rows": None if sample is None else positions // manifest.seq_len,
        "mean_ids_per_position": ids_sum / max(positions, 1),
        "mean_captured_mass": captured_sum / max(positions, 1) if manifest.capture.has_logprobs else None,
        **teacher_confidence(manifest),
        **(distributions(cache, mass_edges, mass_counts) if histograms else {}),
    }


def report_frames(cache: Cache, sample: int | None) -> Iterator[tuple[str, dict[str, bytes | int]]]:
    """``(shard name, cells)`` of every row in order, or of ``sample`` rows drawn at random (seed 0)."""
    if sample is None:
        for entry in cache.manifest.shards:
            for _, cells in iter_shard_frames(cache.path, entry, cache.manifest):
                yield entry.name, cells
        return
    chosen = np.random.default_rng(0).choice(len(cache), size=min(sample, len(cache)), replace=False)
    yield from cache.frames_at(sorted(int(index) for index in chosen))


def distributions(cache: Cache, mass_edges: np.ndarray, mass_counts: np.ndarray) -> dict[str, Any]:
    """The histograms of :func:`cache_report` (``None`` where the cache holds no such values)."""
    has_mass = cache.manifest.capture.has_logprobs
    mass = {"edges": mass_edges.tolist(), "counts": mass_counts.tolist()} if has_mass else None
    entropy = None
    if cache.manifest.has_row_stats:
        counts, edges = np.histogram(cache.row_stats()[:, 1], bins=ENTROPY_BINS)
        entropy = {"edges": edges.tolist(), "counts": counts.tolist()}
    return {"captured_mass_histogram": mass, "teacher_entropy_histogram": entropy}


def row_stats_problems(cache_dir: Path, entry: ShardEntry, manifest: Manifest) -> list[str]:
    """A shard's ``row_stats`` column against the summary its manifest entry lists (reads the column alone)."""
    values = read_shard_row_stats(cache_dir, entry, manifest, verify=False)
    own = row_stats.shard_summary(values)
    listed = entry.row_stats or {}
    if all(abs(own[name] - listed.get(name, math.inf)) <= 1e-5 for name in own):
        return []
    return [f"shard '{entry.name}': its row_stats column averages {own}, the manifest lists {listed}"]


def teacher_confidence(manifest: Manifest) -> dict[str, float | None]:
    """The teacher's mean top-1 probability and entropy over the cache, from the shards' ``row_stats``
    summaries in the manifest (``None`` for caches without them)."""
    if not manifest.has_row_stats:
        return {"teacher_mean_top1_prob": None, "teacher_mean_entropy": None}
    rows = sum(entry.rows for entry in manifest.shards)
    return {
        f"teacher_{name}": sum(entry.rows * entry.row_stats[name] for entry in manifest.shards) / rows  # type: ignore[index]
        for name in ("mean_top1_prob", "mean_entropy")
    }


def verify_report(path: str | Path, deep: bool = False) -> tuple[list[str], int]:
    """Every problem found (shards and tokenizer files), and how many shards (or, with ``deep``, rows) were checked.

    ``deep`` also decodes every row of every intact shard, checks its ids and values and its
    ``row_stats`` cell against the shard's summary, and, when every shard reads, recomputes the
    token stream's sha256.
    """
    cache_dir = remote.local_copy(str(path)) if remote.is_remote(path) else Path(path)
    manifest = read_manifest(cache_dir)
    problems = []
    rows = 0
    hasher = TokenStreamHasher()
    for entry in manifest.shards:
        try:
            check_shard(cache_dir, entry)
            if deep:
                for _, row in iter_shard_rows(cache_dir, entry, manifest, verify=False):
                    hasher.update(row.input_ids)
                    rows += 1
                if manifest.has_row_stats:
                    problems += row_stats_problems(cache_dir, entry, manifest)
        except CacheError as exc:
            problems.append(str(exc))
    if deep and not problems and hasher.hexdigest() != manifest.token_stream_sha256:
        problems.append(
            f"the rows' token stream hashes to {hasher.hexdigest()}, "
            f"the manifest's dataset.token_stream_sha256 is {manifest.token_stream_sha256}"
        )
    problems += tokenizer_file_problems(cache_dir, manifest)
    return problems, rows if deep else len(manifest.shards)
