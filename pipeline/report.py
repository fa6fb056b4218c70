"""Read-only reports on a cache: ``inspect`` and ``verify``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cache import open_cache
from pipeline.errors import CacheError
from pipeline.fingerprint import TokenStreamHasher
from pipeline.store.reader import check_shard, iter_shard_rows, read_manifest, tokenizer_file_problems


def cache_report(path: str | Path) -> dict[str, Any]:
    """Totals and settings from the manifest, plus the mean captured mass over every position."""
    cache = open_cache(path)
    manifest = cache.manifest
    captured_sum, positions = 0.0, 0
    for row in cache:
        captured_sum += float(np.exp(row.logprobs.astype(np.float64)).sum())
        positions += row.logprobs.shape[0]
    raw = manifest.raw
    return {
        "path": str(path),
        "teacher": raw.get("teacher", {}).get("source"),
        "dataset": raw.get("dataset", {}).get("source"),
        "tokens": manifest.tokens,
        "sequences": manifest.sequences,
        "seq_len": manifest.seq_len,
        "shards": len(manifest.shards),
        "k": manifest.k,
        "logit_width": manifest.logit_width,
        "bytes": manifest.bytes,
        "bytes_per_token": manifest.bytes / manifest.tokens,
        "mean_captured_mass": captured_sum / max(positions, 1),
    }


def verify_report(path: str | Path, deep: bool = False) -> tuple[list[str], int]:
    """Every problem found (shards and tokenizer files), and how many shards (or, with ``deep``, rows) were checked.

    ``deep`` also decodes every row of every intact shard, checks its ids and values, and,
    when every shard reads, recomputes the token stream's sha256.
    """
    cache_dir = Path(path)
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
        except CacheError as exc:
            problems.append(str(exc))
    if deep and not problems and hasher.hexdigest() != manifest.token_stream_sha256:
        problems.append(
            f"the rows' token stream hashes to {hasher.hexdigest()}, "
            f"the manifest's dataset.token_stream_sha256 is {manifest.token_stream_sha256}"
        )
    problems += tokenizer_file_problems(cache_dir, manifest)
    return problems, rows if deep else len(manifest.shards)
