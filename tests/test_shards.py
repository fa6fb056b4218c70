"""Manifest validation and shard integrity checks."""

import shutil

import pytest
from conftest import edit_manifest

from pipeline.errors import CacheError
from pipeline.store.layout import MANIFEST_NAME
from pipeline.store.reader import check_shard, read_manifest


@pytest.fixture()
def cache_copy(train_cache, tmp_path):
    copy = tmp_path / "cache"
    shutil.copytree(train_cache, copy)
    return copy


def test_valid_manifest_reads(train_cache):
    manifest = read_manifest(train_cache)
    assert manifest.k == 16 and manifest.seq_len == 32
    assert manifest.tokens == manifest.sequences * 32


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m.update(format_version=99), "version 99 is not supported"),
        (lambda m: m["codec"].update(version=7), "codec shuffle-zstd/7 is not supported"),
        (lambda m: m.pop("seq_len"), "missing field 'seq_len'"),
        (lambda m: m.update(seq_len="32"), "'seq_len' should be int"),
        (lambda m: m["shards"].append(dict(m["shards"][0])), "listed twice"),
        (lambda m: m["totals"].update(tokens=1), "totals.tokens"),
        (lambda m: m["shards"][0].update(tokens=5), "expected rows x seq_len"),
        (lambda m: m["shards"][0].update(name="../escape.arrow"), "not of the form"),
        (lambda m: m["capture"].update(k=10**9), r"'capture.k' = 1000000000 is outside"),
        (lambda m: m["shards"][1].update(first_seq=0), "starts at sequence 0, expected"),
        (lambda m: m["tokenizer"].update(fingerprint="x"), "not 64 hex"),
        (lambda m: m["shards"][0].update(rows=True), "should be int, got bool"),
        (lambda m: m.update(shards=[]), "no shards"),
    ],
)
def test_malformed_manifests_are_refused_with_a_clear_error(cache_copy, change, message):
    edit_manifest(cache_copy, change)
    with pytest.raises(CacheError, match=message):
        read_manifest(cache_copy)


def test_edit_without_resealing_fails_the_manifest_checksum(cache_copy):
    edit_manifest(cache_copy, lambda m: m["packing"].update(bos="never"), reseal=False)
    with pytest.raises(CacheError, match="fails its own checksum"):
        read_manifest(cache_copy)


def test_shard_count_limit(cache_copy, monkeypatch):
    import pipeline.manifest

    monkeypatch.setattr(pipeline.manifest, "MAX_SHARDS", 4)
    with pytest.raises(CacheError, match="more than the 4 a reader accepts"):
        read_manifest(cache_copy)


def test_oversized_manifest_is_refused_before_parsing(cache_copy, monkeypatch):
    import pipeline.manifest

    monkeypatch.setattr(pipeline.manifest, "MAX_MANIFEST_BYTES", 100)
    with pytest.raises(CacheError, match="larger than 100 bytes"):
        read_manifest(cache_copy)


def test_empty_manifest_is_refused(cache_copy):
    (cache_copy / MANIFEST_NAME).write_bytes(b"")
    with pytest.raises(CacheError, match="not valid JSON"):
        read_manifest(cache_copy)


def test_duplicate_keys_are_refused(cache_copy):
    path = cache_copy / MANIFEST_NAME
    path.write_bytes(path.read_bytes().replace(b'"seq_len": 32', b'"seq_len": 32, "seq_len": 32', 1))
    with pytest.raises(CacheError, match="appears twice"):
        read_manifest(cache_copy)


def test_truncated_manifest_is_refused(cache_copy):
    path = cache_copy / MANIFEST_NAME
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CacheError, match="not valid JSON"):
        read_manifest(cache_copy)


def test_flipped_bit_is_named_with_both_hashes(cache_copy):
    manifest = read_manifest(cache_copy)
    entry = manifest.shards[1]
    path = cache_copy / entry.name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(
        CacheError,
        match=rf"shard '{entry.name}' fails its checksum \(expected sha256 {entry.sha256}, got [0-9a-f]{{64}}\)",
    ):
        check_shard(cache_copy, entry)


def test_truncated_shard_is_named(cache_copy):
    entry = read_manifest(cache_copy).shards[0]
    path = cache_copy / entry.name
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CacheError, match=f"shard '{entry.name}' has"):
        check_shard(cache_copy, entry)


def test_symlinked_shard_pointing_outside_is_refused(cache_copy, tmp_path):
    entry = read_manifest(cache_copy).shards[0]
    outside = tmp_path / "outside.arrow"
    shutil.move(cache_copy / entry.name, outside)
    (cache_copy / entry.name).symlink_to(outside)
    with pytest.raises(CacheError, match="outside the cache folder"):
        check_shard(cache_copy, entry)
