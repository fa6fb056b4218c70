"""Property-based fuzzing of the manifest parser and the shard reader: whatever the bytes,
they raise nothing but the project's documented CacheError."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

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


# ------------------------------------------------------------ resealed manifests and forged columns


@pytest.fixture(scope="module")
def small_cache(teacher_dir, corpus, tmp_path_factory):
    """Two shards of a few rows: cheap to read thousands of times."""
    from conftest import make_cache

    out = tmp_path_factory.mktemp("fuzz-small") / "cache"
    return make_cache(
        teacher_dir,
        corpus["heldout"],
        out,
        "--seq-len",
        "16",
        "--top-k",
        "8",
        "--shard-tokens",
        "64",
        "--max-tokens",
        "128",
    )


def test_every_manifest_field_given_every_wrong_json_type_is_accepted_or_refused_cleanly(small_cache, tmp_path):
    from helpers import WRONG_VALUES, manifest_paths, read_everything, set_path

    folder = tmp_path / "cache"
    shutil.copytree(small_cache, folder)
    original = json.loads((folder / MANIFEST_NAME).read_text())
    paths = manifest_paths(original)
    assert len(paths) > 60
    accepted = 0
    for path in paths:
        for value in WRONG_VALUES:
            payload = render_manifest(set_path(original, path, value))
            try:
                parse_manifest(payload)
            except CacheError:
                continue
            (folder / MANIFEST_NAME).write_bytes(payload)
            try:
                read_everything(folder)
                accepted += 1
            except CacheError:
                pass
    # Only fields no reader interprets (names, notes) may take any value.
    assert 0 < accepted < len(paths) * len(WRONG_VALUES) // 4


def test_forged_shard_columns_and_frames_raise_only_cache_errors(small_cache, tmp_path):
    from helpers import fuzz_campaign

    folder = tmp_path / "cache"
    shutil.copytree(small_cache, folder)
    outcomes = fuzz_campaign(folder, cases=150, seed=7)
    assert set(outcomes) <= {"accepted", "CacheError"}, outcomes
    assert outcomes.get("CacheError", 0) > 100


@pytest.mark.slow
def test_ten_thousand_forgeries_never_traceback_and_stay_within_the_memory_bound(small_cache, tmp_path):
    from helpers import child_peak_rss

    folder = tmp_path / "cache"
    shutil.copytree(small_cache, folder)
    tests_dir = str(Path(__file__).resolve().parent)
    peak, output = child_peak_rss(
        f"import json, sys, pathlib; sys.path.insert(0, {tests_dir!r})\n"
        "from helpers import fuzz_campaign\n"
        f"print('OUTCOMES', json.dumps(fuzz_campaign(pathlib.Path({str(folder)!r}), 10_000, seed=2026)))\n",
        timeout=3000,
    )
    outcomes = json.loads(output.split("OUTCOMES ", 1)[1].splitlines()[0])
    assert set(outcomes) <= {"accepted", "CacheError"}, outcomes
    assert sum(outcomes.values()) == 10_000
    baseline, _ = child_peak_rss("import pipeline, pyarrow, zstandard")
    assert peak - baseline < 256 << 20, f"fuzzing grew memory by {(peak - baseline) >> 20} MiB"
