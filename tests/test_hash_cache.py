"""Remembered weight hashes: a file is read once while it is unchanged, and again after any change."""

import json
import os

import pytest

from pipeline import hash_cache
from pipeline.fingerprint import sha256_file


@pytest.fixture
def store(tmp_path, monkeypatch):
    path = tmp_path / "store" / "hashes.json"
    monkeypatch.setenv("DISTILL_HASH_CACHE", str(path))
    return path


@pytest.fixture
def reads(monkeypatch):
    """How many times the store's module read a file through."""
    count = []

    def counting(path):
        count.append(path)
        return sha256_file(path)

    monkeypatch.setattr(hash_cache, "sha256_file", counting)
    return count


def test_an_unchanged_file_is_read_once(store, reads, tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"weights" * 1000)
    first = hash_cache.cached_sha256(weights)
    assert hash_cache.cached_sha256(weights) == first == sha256_file(weights)
    assert len(reads) == 1 and store.is_file()


@pytest.mark.parametrize("change", ["same_size_content", "touch", "replaced_by_a_copy"])
def test_any_change_to_the_file_makes_it_read_again(change, store, reads, tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"a" * 4096)
    hash_cache.cached_sha256(weights)
    if change == "same_size_content":
        stat = weights.stat()
        weights.write_bytes(b"b" * 4096)
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with the old mtime put back
    elif change == "touch":
        os.utime(weights)
    else:
        copy = tmp_path / "copy"
        copy.write_bytes(b"c" * 4096)
        copy.replace(weights)
    digest = hash_cache.cached_sha256(weights)
    assert len(reads) == 2 and digest == sha256_file(weights)


@pytest.mark.parametrize("content", ["not json", "[1, 2]", json.dumps({"x": {"stamp": 1, "sha256": 3}})])
def test_a_damaged_store_is_ignored_and_rewritten(content, store, reads, tmp_path):
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"x" * 100)
    store.parent.mkdir(parents=True)
    store.write_text(content)
    assert hash_cache.cached_sha256(weights) == sha256_file(weights)
    assert hash_cache.cached_sha256(weights) == sha256_file(weights)
    assert len(reads) == 1


def test_a_forged_entry_for_another_stamp_is_not_trusted(store, reads, tmp_path):
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"x" * 100)
    hash_cache.cached_sha256(weights)
    entries = json.loads(store.read_text())
    entry = entries[str(weights.resolve())]
    entry["stamp"]["ino"] += 1
    entry["sha256"] = "0" * 64
    store.write_text(json.dumps(entries))
    assert hash_cache.cached_sha256(weights) == sha256_file(weights)


def test_off_turns_the_store_off(monkeypatch, reads, tmp_path):
    monkeypatch.setenv("DISTILL_HASH_CACHE", "off")
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"x")
    hash_cache.cached_sha256(weights)
    hash_cache.cached_sha256(weights)
    assert len(reads) == 2 and hash_cache.store_path() is None


def test_the_teacher_identity_uses_the_store(store, reads, teacher_dir):
    from pipeline import models

    source = models.resolve_source(str(teacher_dir), "teacher")
    config = models.load_config(source, "teacher")
    first = models.teacher_identity(source, config)
    second = models.teacher_identity(source, config)
    assert first == second and len(reads) == 1
