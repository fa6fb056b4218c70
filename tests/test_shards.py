"""Manifest validation and shard integrity checks."""

import json
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
        (lambda m: m["codec"].update(version=7), "codec sparse-zstd/7 is not supported"),
        (lambda m: m["codec"].update(mode="fractal"), "codec.mode 'fractal' is not one of"),
        (lambda m: m["codec"].update(sqrt_step=4.0), "sqrt_step 4.0 is outside"),
        (lambda m: m["codec"].update(logprob_step=0.125), "logprob_step does not belong to the sqrt mode"),
        (lambda m: m["columns"][1].update(encoding="u64-raw"), "column 'ids' is ids/u64-raw, expected"),
        (lambda m: m["columns"].pop(2), "columns lack 'logprobs'"),
        (lambda m: m["columns"].append(dict(m["columns"][0])), "column 'input_ids' is listed twice"),
        (
            lambda m: m["columns"].append({"name": "future", "kind": "x", "encoding": "y/1", "required": True}),
            "required column 'future' .* is unknown to this reader",
        ),
        (lambda m: m["columns"][0].update(name="Input-Ids"), "not a lowercase identifier"),
        (lambda m: m["columns"][0].update(required="yes"), r"columns\[0\].required' should be true or false"),
        (lambda m: m["capture"].update(strategy="sample"), "capture.samples"),
        (
            lambda m: m["dataset"].update(files=[{"name": "a", "first_record": 5}, {"name": "b", "first_record": 1}]),
            "goes backwards",
        ),
        (lambda m: m.update(format_version=1), "codec sparse-zstd/2 is not supported"),
        (lambda m: m.pop("seq_len"), "missing field 'seq_len'"),
        (lambda m: m.update(seq_len="32"), "'seq_len' should be an integer, got a string"),
        (lambda m: m["shards"].insert(1, dict(m["shards"][0])), "named 'shard-00000.arrow', expected 'shard-00001"),
        (lambda m: m["totals"].update(tokens=1), "totals.tokens"),
        (lambda m: m["shards"][0].update(tokens=5), "expected rows x seq_len"),
        (lambda m: m["shards"][0].update(name="../escape.arrow"), "expected 'shard-00000.arrow'"),
        (lambda m: m["capture"].update(k=10**9), r"'capture.k' = 1000000000 is outside"),
        (lambda m: m["shards"][1].update(first_seq=0), "starts at sequence 0, expected"),
        (lambda m: m["tokenizer"].update(fingerprint="x"), "not 64 lowercase hex"),
        (lambda m: m["shards"][0].update(rows=True), "should be an integer, got a boolean"),
        (lambda m: m.update(shards=[]), "no shards"),
        (lambda m: m["tokenizer"].update(files="tokenizer.json"), "'tokenizer.files' should be a list"),
        (lambda m: m["tokenizer"].update(files=["tokenizer.json"]), r"tokenizer.files\[0\] should be an object"),
        (lambda m: m["tokenizer"]["files"][0].update(name="../../etc/passwd"), "not a plain file name"),
        (lambda m: m["tokenizer"]["files"][0].update(name=".hidden"), "not a plain file name"),
        (lambda m: m["tokenizer"]["files"].append(dict(m["tokenizer"]["files"][0])), "listed twice"),
        (lambda m: m["tokenizer"].update(fingerprint_version=9), "fingerprint_version' = 9 is outside"),
        (lambda m: m.update(teacher="gemma"), "'teacher' should be an object, got a string"),
        (lambda m: m.update(dataset=["x"]), "'dataset' should be an object, got a list"),
        (lambda m: m["dataset"].update(token_stream_sha256=None), "token_stream_sha256' should be a string"),
        (lambda m: m["teacher"].update(revision=7), "'teacher.revision' should be a string or null"),
        (lambda m: m["packing"].update(eos_after_document="yes"), "should be true or false"),
        (lambda m: m.update(compute=None), "'compute' should be an object, got null"),
        (lambda m: m["capture"].update(logprob_temperature=2.0), "temperature"),
        (lambda m: (m.update(seq_len=2**18), m["capture"].update(k=256)), "seq_len x k"),
        (lambda m: m["shards"][0].update(rows=m["rows_per_shard"] - 1), "every shard but the last"),
        (lambda m: m["totals"].update(bytes=2**64), "does not fit in 64 bits"),
        (lambda m: m["capture"].update(strategy={"deep": [1]}), "strategy"),
    ],
)
def test_malformed_manifests_are_refused_with_a_clear_error(cache_copy, change, message):
    edit_manifest(cache_copy, change)
    with pytest.raises(CacheError, match=message):
        read_manifest(cache_copy)


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_numbers_in_the_manifest_are_refused(cache_copy, constant):
    from pipeline.manifest import CHECKSUM_FIELD, content_checksum

    path = cache_copy / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    manifest["packing"]["extra"] = 0.5
    manifest[CHECKSUM_FIELD] = content_checksum(manifest)  # sealed with a finite placeholder
    path.write_text(json.dumps(manifest).replace("0.5", constant))
    with pytest.raises(CacheError, match="finite"):
        read_manifest(cache_copy)


def test_unknown_fields_are_allowed_and_covered_by_the_checksum(cache_copy):
    edit_manifest(cache_copy, lambda m: m.update(future_field={"any": [1, "two"]}))
    assert read_manifest(cache_copy).raw["future_field"] == {"any": [1, "two"]}
    edit_manifest(cache_copy, lambda m: m.update(future_field=2), reseal=False)
    with pytest.raises(CacheError, match="fails its own checksum"):
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


V1_CACHE = __import__("pathlib").Path(__file__).parent / "data" / "v1-cache"


def test_version_1_caches_still_read():
    manifest = read_manifest(V1_CACHE)
    assert manifest.format_version == 1 and manifest.capture.strategy == "topk" and manifest.k == 4
    assert manifest.columns == ()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m["codec"].update(version=7), "codec shuffle-zstd/7 is not supported"),
        (lambda m: m["codec"].update(columns={"topk_ids": "<u8"}), "codec.columns"),
        (lambda m: m["capture"].update(strategy="sample"), "not part of format version 1"),
        (lambda m: m.update(logit_width=2**25), "logit_width' = 33554432 is outside"),
    ],
)
def test_malformed_version_1_manifests_are_refused(tmp_path, change, message):
    copy = tmp_path / "v1"
    shutil.copytree(V1_CACHE, copy)
    edit_manifest(copy, change)
    with pytest.raises(CacheError, match=message):
        read_manifest(copy)
