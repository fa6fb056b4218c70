"""docs/FORMAT.md's recipe for reading a cache with pyarrow alone must keep working, and must
refuse the same forged caches the package refuses (every hash resealed to match)."""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from conftest import edit_manifest
from helpers import change_first_row, reseal_shard, rewrite_rows, write_table

import pipeline
from pipeline.store.reader import read_manifest

FORMAT_DOC = Path(__file__).resolve().parents[1] / "docs" / "FORMAT.md"


@pytest.fixture(scope="module")
def recipe() -> dict:
    """The doc's python blocks run in order: ``decode``, ``check_arrow_file``, ``read_cache``."""
    namespace: dict = {}
    for block in re.findall(r"```python\n(.*?)```", FORMAT_DOC.read_text(), re.S):
        exec(block, namespace)
    return namespace


@pytest.fixture()
def cache_copy(train_cache, tmp_path):
    copy = tmp_path / "cache"
    shutil.copytree(train_cache, copy)
    return copy


def test_the_documented_recipe_reads_the_same_rows(recipe, train_cache):
    documented = list(recipe["read_cache"](str(train_cache)))
    packaged = list(pipeline.open_cache(train_cache))
    assert len(documented) == len(packaged) > 1
    for (input_ids, topk_ids, topk_logprobs, tail_logmass), row in zip(documented, packaged):
        np.testing.assert_array_equal(input_ids, row.input_ids)
        np.testing.assert_array_equal(topk_ids, row.topk_ids)
        np.testing.assert_array_equal(topk_logprobs, row.topk_logprobs)
        np.testing.assert_array_equal(tail_logmass, row.tail_logmass)


def _swap_first_two(row):
    ids, logprobs = row.topk_ids.copy(), row.topk_logprobs.copy()
    ids[0, [0, 1]], logprobs[0, [0, 1]] = ids[0, [1, 0]], logprobs[0, [1, 0]]
    return dataclasses.replace(row, ids=ids, logprobs=logprobs)


def _duplicate_id(row):
    ids = row.topk_ids.copy()
    ids[0, 1] = ids[0, 0]
    return dataclasses.replace(row, ids=ids)


def _shift_half_a_nat(row):
    return dataclasses.replace(row, logprobs=row.topk_logprobs - 0.5)


def _nan_tail(row):
    tail = row.tail_logmass.copy()
    tail[2] = np.nan
    return dataclasses.replace(row, tail_logmass=tail)


def _rows(change):
    return lambda cache: rewrite_rows(cache, 0, change_first_row(change))


def _trailing_bytes(cache):
    rewrite_rows(cache, 0, lambda n, f: {**f, "input_ids": f["input_ids"] + b"\0"} if n == 1 else f)


def _arrow_compression(cache):
    path = cache / read_manifest(cache).shards[0].name
    write_table(path, pa.ipc.open_file(pa.BufferReader(path.read_bytes())).read_all(), compression="zstd")
    reseal_shard(cache, 0)


def _token_stream(cache):
    edit_manifest(cache, lambda m: m["dataset"].update(token_stream_sha256="0" * 64))


def _infinite_number(cache):
    edit_manifest(cache, lambda m: m.update(note=float("inf")))


@pytest.mark.parametrize(
    ("forge", "message"),
    [
        (_rows(_swap_first_two), "value invariants"),
        (_rows(_duplicate_id), "value invariants"),
        (_rows(_shift_half_a_nat), "value invariants"),
        (_rows(_nan_tail), "value invariants"),
        (_trailing_bytes, "exactly one frame"),
        (_arrow_compression, "body compression"),
        (_token_stream, "token stream"),
        (_infinite_number, "Out of range float|inf"),
    ],
)
def test_the_documented_recipe_refuses_forged_caches(recipe, cache_copy, forge, message):
    forge(cache_copy)
    with pytest.raises(ValueError, match=message):
        for _ in recipe["read_cache"](str(cache_copy)):
            pass
