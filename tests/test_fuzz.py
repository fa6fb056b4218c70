"""Property-based fuzzing of the manifest parser and the shard reader: whatever the bytes,
they raise nothing but the project's documented CacheError."""

from __future__ import annotations

import contextlib
import json
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pipeline
from pipeline.errors import CacheError
from pipeline.manifest import parse_manifest, render_manifest
from pipeline.store.layout import MANIFEST_NAME
from pipeline.store.reader import read_manifest

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20,
)


@FUZZ
@given(st.binary(max_size=2000))
def test_arbitrary_bytes_never_crash_the_manifest_parser(data):
    with pytest.raises(CacheError):
        parse_manifest(data)


@pytest.fixture(scope="module")
def manifest_json(train_cache):
    return json.loads((train_cache / MANIFEST_NAME).read_text())


@FUZZ
@given(
    path=st.lists(
        st.sampled_from(
            [
                "shards",
                0,
                1,
                "totals",
                "capture",
                "tokenizer",
                "codec",
                "k",
                "rows",
                "name",
                "bytes",
                "sha256",
                "first_seq",
                "tokens",
                "seq_len",
                "logit_width",
                "sequences",
                "fingerprint",
                "version",
                "format_version",
            ]
        ),
        min_size=1,
        max_size=3,
    ),
    value=json_values,
)
def test_mutated_manifests_are_accepted_or_refused_cleanly(manifest_json, path, value):
    mutated = json.loads(json.dumps(manifest_json))
    target = mutated
    for key in path[:-1]:
        if (isinstance(target, dict) and isinstance(key, str) and key in target) or (
            isinstance(target, list) and isinstance(key, int) and key < len(target)
        ):
            target = target[key]
    last = path[-1]
    if (isinstance(target, dict) and isinstance(last, str)) or (
        isinstance(target, list) and isinstance(last, int) and last < len(target)
    ):
        target[last] = value
    with contextlib.suppress(CacheError):
        parse_manifest(render_manifest(mutated))


@FUZZ
@given(offset=st.integers(min_value=0), replacement=st.binary(min_size=1, max_size=8))
def test_mutated_shards_with_matching_hashes_raise_only_cache_errors(
    train_cache, tmp_path_factory, offset, replacement
):
    """A hostile cache can carry correct hashes for bad bytes: the reader must still refuse cleanly."""
    from conftest import edit_manifest

    from pipeline.fingerprint import sha256_file

    folder = tmp_path_factory.mktemp("fuzz") / "cache"
    shutil.copytree(train_cache, folder)
    entry = read_manifest(folder).shards[0]
    path = folder / entry.name
    data = bytearray(path.read_bytes())
    start = offset % len(data)
    data[start : start + len(replacement)] = replacement
    path.write_bytes(bytes(data))
    size, digest = path.stat().st_size, sha256_file(path)

    def rehash(manifest):
        manifest["shards"][0].update(bytes=size, sha256=digest)
        manifest["totals"]["bytes"] = sum(s["bytes"] for s in manifest["shards"])

    edit_manifest(folder, rehash)
    try:
        for _ in pipeline.open_cache(folder):
            pass
    except CacheError:
        pass
    shutil.rmtree(folder.parent)
