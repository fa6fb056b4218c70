"""Caches forged by someone who can also reseal the manifest: every hash matches, so only the
reader's own checks stand between the forgery and the user. Each must be refused with the
shard named, by ``open_cache``, ``verify --deep`` and ``inspect`` alike, within the memory bound."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from conftest import edit_manifest, run_cli
from helpers import Coder, change_first_row, child_peak_rss, reseal_shard, rewrite_rows, write_table

import pipeline
from pipeline.errors import CacheError
from pipeline.store.layout import TOKENIZER_DIR
from pipeline.store.reader import mass_tolerance, read_manifest, row_problem

V1_CACHE = Path(__file__).parent / "data" / "v1-cache"


@pytest.fixture()
def cache_copy(train_cache, tmp_path):
    copy = tmp_path / "cache"
    shutil.copytree(train_cache, copy)
    return copy


@pytest.fixture()
def v1_copy(tmp_path):
    """A copy of the format version 1 cache kept in tests/data (written by the first release's teacher pass)."""
    copy = tmp_path / "v1-cache"
    shutil.copytree(V1_CACHE, copy)
    return copy


@pytest.fixture(params=["v2", "v1"])
def any_copy(request, train_cache, tmp_path):
    """A copy of a cache of each format version this reader reads."""
    copy = tmp_path / "cache"
    shutil.copytree(train_cache if request.param == "v2" else V1_CACHE, copy)
    return copy


def refused_everywhere(cache, message: str) -> None:
    """open_cache, verify --deep and inspect all refuse ``cache`` with ``message``, in one line, exit 1."""
    with pytest.raises(CacheError, match=message):
        for _ in pipeline.open_cache(cache):
            pass
    for command in (("verify", "--deep"), ("inspect",)):
        result = run_cli(*command, str(cache))
        assert result.exit_code == 1, result.output
        assert "Traceback" not in result.output
        assert any(
            message.replace("\\", "") in line or __import__("re").search(message, line)
            for line in result.output.splitlines()
        ), result.output


def reorder(row):
    ids, logprobs = row.topk_ids.copy(), row.topk_logprobs.copy()
    ids[0, [0, 1]], logprobs[0, [0, 1]] = ids[0, [1, 0]], logprobs[0, [1, 0]]
    return dataclasses.replace(row, ids=ids, logprobs=logprobs)


def duplicate(row):
    ids = row.topk_ids.copy()
    ids[0, 1] = ids[0, 0]
    return dataclasses.replace(row, ids=ids)


def inflate_mass(row):
    logprobs = row.topk_logprobs.copy()
    logprobs[0, :] = -0.01  # k ids each at p = 0.99: a captured mass near k
    return dataclasses.replace(row, logprobs=logprobs)


def shift_half_a_nat(row):
    return dataclasses.replace(row, logprobs=row.topk_logprobs - 0.5)


def out_of_range(row):
    ids = row.topk_ids.copy()
    ids[3, -1] = 10**6
    return dataclasses.replace(row, ids=ids)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (inflate_mass, "add up to exp"),
        (shift_half_a_nat, "add up to exp"),
        (out_of_range, "not below logit_width"),
    ],
)
def test_rows_that_break_an_invariant_are_refused_with_the_shard_named(any_copy, change, message):
    rewrite_rows(any_copy, 0, change_first_row(change))
    refused_everywhere(any_copy, message)
    assert "shard-00000.arrow" in run_cli("verify", "--deep", str(any_copy)).output


@pytest.mark.parametrize(
    ("change", "message"),
    [(reorder, "not in most-probable-first order"), (duplicate, "captured twice at one position")],
)
def test_version_1_rows_out_of_order_or_with_repeats_are_refused(v1_copy, change, message):
    # Version 2 stores ids as ascending gaps, so neither can be written; the decoder orders rows itself.
    rewrite_rows(v1_copy, 0, change_first_row(change))
    refused_everywhere(v1_copy, message)


def test_bytes_after_a_frame_are_refused(any_copy):
    def pad(number, frames):
        return {**frames, "tail_logmass": frames["tail_logmass"] + b"\0"} if number == 2 else frames

    rewrite_rows(any_copy, 0, pad)
    refused_everywhere(any_copy, "followed by extra bytes")


def test_wrong_token_stream_hash_is_refused_by_a_full_read(cache_copy):
    edit_manifest(cache_copy, lambda m: m["dataset"].update(token_stream_sha256="0" * 64))
    with pytest.raises(CacheError, match="token stream hashes to"):
        for _ in pipeline.open_cache(cache_copy):
            pass
    result = run_cli("verify", "--deep", str(cache_copy))
    assert result.exit_code == 1 and "token_stream_sha256" in result.output


def test_null_values_are_refused(any_copy):
    manifest = read_manifest(any_copy)
    schema = Coder(manifest).schema
    ids_column = schema.names[2]  # topk_ids (version 1), ids (version 2)
    path = any_copy / manifest.shards[0].name
    table = pa.ipc.open_file(pa.BufferReader(path.read_bytes())).read_all()
    nulled = table.column(ids_column).to_pylist()
    nulled[1] = None
    nullable = pa.schema([field.with_nullable(True) for field in schema], metadata=schema.metadata)
    table = pa.table({**{name: table.column(name) for name in table.column_names}, ids_column: nulled}, nullable)
    write_table(path, table)
    reseal_shard(any_copy, 0)
    refused_everywhere(any_copy, "unexpected schema|null values")


@pytest.mark.parametrize("compression", ["zstd", "lz4"])
def test_arrow_body_compression_is_refused_before_inflating(cache_copy, compression):
    entry = read_manifest(cache_copy).shards[0]
    path = cache_copy / entry.name
    table = pa.ipc.open_file(pa.BufferReader(path.read_bytes())).read_all()
    write_table(path, table, compression=compression)
    reseal_shard(cache_copy, 0)
    refused_everywhere(cache_copy, "Arrow IPC body compression")


def test_compressed_shard_inflating_to_gigabytes_stays_within_the_memory_bound(cache_copy):
    """A 256 MiB column that compresses to a few hundred KB: the reader must refuse it from the
    message header, before pyarrow allocates the inflated buffers (peak RSS of a child process)."""
    manifest = read_manifest(cache_copy)
    entry = manifest.shards[0]
    path = cache_copy / entry.name
    rows = entry.rows
    frame = b"\0" * ((256 << 20) // rows)
    schema = Coder(manifest).schema
    columns = {"seq_index": pa.array(range(entry.first_seq, entry.first_seq + rows), pa.int64())}
    for field in schema:
        if field.name != "seq_index":
            filler = [0] * rows if field.type == pa.int64() else [frame if field.name == "ids" else b""] * rows
            columns[field.name] = pa.array(filler, field.type)
    write_table(path, pa.table(columns, schema=schema), compression="zstd")
    del columns, frame
    assert path.stat().st_size < 4 << 20
    reseal_shard(cache_copy, 0)
    baseline, _ = child_peak_rss(f"import pipeline; list(pipeline.open_cache({str(cache_copy)!r}).manifest.shards)")
    peak, output = child_peak_rss(
        "import pipeline\n"
        "from pipeline.errors import CacheError\n"
        "try:\n"
        f"    list(pipeline.open_cache({str(cache_copy)!r}))\n"
        "except CacheError as exc:\n"
        "    print('REFUSED', exc)\n"
    )
    assert "REFUSED" in output and "body compression" in output
    assert peak - baseline < 64 << 20, f"grew by {(peak - baseline) >> 20} MiB"


def test_resealed_manifest_promising_huge_rows_is_refused_before_reading(cache_copy):
    """seq_len 2^18 and k 2^8 would make one row decode to gigabytes from a 14 KB shard."""
    edit_manifest(cache_copy, lambda m: (m.update(seq_len=2**18), m["capture"].update(k=256)))
    for command in (("verify", "--deep"), ("inspect",)):
        result = run_cli(*command, str(cache_copy))
        assert result.exit_code == 1 and "seq_len x k" in result.output


def test_symlinked_tokenizer_folder_is_refused(cache_copy, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    shutil.move(str(cache_copy / TOKENIZER_DIR), elsewhere)
    os.symlink(elsewhere, cache_copy / TOKENIZER_DIR)
    with pytest.raises(CacheError, match="missing or is a symlink"):
        pipeline.open_cache(cache_copy)
    result = run_cli("verify", str(cache_copy))
    assert result.exit_code == 1 and "symlink" in result.output


def test_symlinked_tokenizer_file_is_refused(cache_copy):
    target = cache_copy / TOKENIZER_DIR / "tokenizer.json"
    moved = cache_copy.parent / "real-tokenizer.json"
    shutil.move(str(target), moved)
    os.symlink(moved, target)
    with pytest.raises(CacheError, match="not a regular file"):
        pipeline.open_cache(cache_copy)


def test_open_cache_checks_the_tokenizer_files(cache_copy):
    path = cache_copy / TOKENIZER_DIR / "tokenizer_config.json"
    path.write_text(path.read_text().replace("}", ' , "x": 1}', 1))
    with pytest.raises(CacheError, match=r"tokenizer file 'tokenizer_config\.json'"):
        pipeline.open_cache(cache_copy)
    pipeline.open_cache(cache_copy, verify=False)  # skipping checks stays possible


def test_real_caches_sit_well_inside_the_mass_tolerance():
    manifest = read_manifest(V1_CACHE)
    worst = 0.0
    for row in pipeline.open_cache(V1_CACHE):
        assert row_problem(row, manifest.logit_width) is None
        logprobs = row.topk_logprobs.astype(np.float64)
        total = np.logaddexp(np.log(np.exp(logprobs).sum(axis=1)), row.tail_logmass.astype(np.float64))
        worst = max(worst, float(np.abs(total).max()))
    assert worst < mass_tolerance(manifest.k) / 4
