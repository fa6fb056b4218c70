"""Crash safety, resume, locking, corruption and hostile input.

The kill -9 tests run the teacher pass in a child process that SIGKILLs itself at a named
point (``DISTILL_TEST_CRASH_AT=point:n``), then resume it in this process and compare
every byte with an uninterrupted run. A few points run by default; ``-m slow`` runs 20.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zstandard
from conftest import edit_manifest, run_cli

import pipeline
from pipeline import codec
from pipeline.errors import CacheError
from pipeline.report import verify_report
from pipeline.store.atomic import CRASH_ENV
from pipeline.store.journal import CacheLock
from pipeline.store.layout import JOURNAL_NAME, MANIFEST_NAME, RUN_LOG_NAME
from pipeline.store.reader import read_manifest

# 30 rows per shard (three shards, the last partial), record batches of 16 rows inside.
ARGS = ["--seq-len", "16", "--top-k", "8", "--shard-tokens", "480", "--batch-size", "7"]
FAST_POINTS = [("record-batch", 2), ("shard-after-rename", 1), ("manifest-before-rename", 1)]
SLOW_POINTS = [
    ("teacher-loaded", 1),
    ("record-batch", 1),
    ("record-batch", 3),
    ("record-batch", 5),
    ("shard-before-rename", 1),
    ("shard-before-rename", 2),
    ("shard-before-rename", 3),
    ("shard-after-rename", 2),
    ("shard-after-rename", 3),
    ("journal-partial", 1),
    ("journal-partial", 3),
    ("journal-before-rename", 2),
    ("journal-after-rename", 1),
    ("journal-after-rename", 3),
    ("tokenizer-saved", 1),
    ("manifest-partial", 1),
    ("manifest-after-rename", 1),
]


def cache_args(teacher_dir, corpus, out):
    return ["--teacher", str(teacher_dir), "--dataset", str(corpus["heldout"]), "--out", str(out), *ARGS]


def cache_files(folder: Path) -> dict[str, bytes]:
    """Every file of a cache but the run log, by relative path."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != RUN_LOG_NAME
    }


@pytest.fixture(scope="module")
def reference(teacher_dir, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "cache"
    result = run_cli("teacher-cache", *cache_args(teacher_dir, corpus, out))
    assert result.exit_code == 0, result.output
    assert len(read_manifest(out).shards) == 3
    return cache_files(out)


def killed_run(point: str, count: int, teacher_dir, corpus, out: Path) -> subprocess.CompletedProcess:
    """Run the teacher pass in a child process that SIGKILLs itself at ``point`` (n-th time)."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "-q", "teacher-cache", *cache_args(teacher_dir, corpus, out)],
        env={**os.environ, CRASH_ENV: f"{point}:{count}"},
        capture_output=True,
        text=True,
    )


def crash_then_resume(point, count, teacher_dir, corpus, out, reference):
    child = killed_run(point, count, teacher_dir, corpus, out)
    assert child.returncode == -signal.SIGKILL, f"{point}:{count} never reached\n{child.stderr[-2000:]}"
    if point != "manifest-after-rename":
        assert not (out / MANIFEST_NAME).exists() or point.startswith("run-log")
    result = run_cli("teacher-cache", *cache_args(teacher_dir, corpus, out))
    assert result.exit_code == 0, result.output
    assert cache_files(out) == reference
    assert not (out / JOURNAL_NAME).exists()


@pytest.mark.parametrize(("point", "count"), FAST_POINTS)
def test_kill_then_resume_gives_a_byte_identical_cache(point, count, teacher_dir, corpus, tmp_path, reference):
    crash_then_resume(point, count, teacher_dir, corpus, tmp_path / "cache", reference)


@pytest.mark.slow
@pytest.mark.parametrize(("point", "count"), SLOW_POINTS)
def test_kill_anywhere_then_resume_gives_a_byte_identical_cache(point, count, teacher_dir, corpus, tmp_path, reference):
    crash_then_resume(point, count, teacher_dir, corpus, tmp_path / "cache", reference)


def test_resume_skips_the_committed_shards(teacher_dir, corpus, tmp_path, reference, monkeypatch):
    out = tmp_path / "cache"
    assert killed_run("journal-after-rename", 3, teacher_dir, corpus, out).returncode == -signal.SIGKILL
    from pipeline import teacher

    calls, tokenized = [], []
    original, tokenize = teacher.capture_batch, teacher.tokenize_records
    monkeypatch.setattr(
        teacher, "capture_batch", lambda head, ids, *a: calls.append(ids.shape[0]) or original(head, ids, *a)
    )

    def counting(*args, **kwargs):
        for record, ids in tokenize(*args, **kwargs):
            tokenized.append(record)
            yield record, ids

    monkeypatch.setattr(teacher, "tokenize_records", counting)
    result = run_cli("teacher-cache", *cache_args(teacher_dir, corpus, out))
    assert result.exit_code == 0 and "resumed after 960 cached tokens" in result.output
    assert sum(calls) == read_manifest(out).shards[2].rows  # only the third shard was computed
    assert cache_files(out) == reference
    # The text of the first two shards was not tokenized again: the stream restarted at the
    # record holding the last written sequence (its ids were read back from the shards).
    import pyarrow as pa

    second_shard = pa.ipc.open_file(str(out / "shard-00001.arrow")).read_all()
    assert tokenized[0] == second_shard.column("source_record")[-1].as_py() > 0


def test_damaged_committed_shard_is_recomputed_on_resume(teacher_dir, corpus, tmp_path, reference):
    out = tmp_path / "cache"
    assert killed_run("shard-after-rename", 3, teacher_dir, corpus, out).returncode == -signal.SIGKILL
    shard = out / "shard-00001.arrow"
    data = bytearray(shard.read_bytes())
    data[100] ^= 4
    shard.write_bytes(bytes(data))
    assert run_cli("teacher-cache", *cache_args(teacher_dir, corpus, out)).exit_code == 0
    assert cache_files(out) == reference


def test_other_command_on_a_partial_cache_is_refused(teacher_dir, corpus, tmp_path):
    out = tmp_path / "cache"
    assert killed_run("shard-after-rename", 1, teacher_dir, corpus, out).returncode == -signal.SIGKILL
    other = [a if a != "8" else "4" for a in cache_args(teacher_dir, corpus, out)]
    result = run_cli("teacher-cache", *other)
    assert result.exit_code == 1
    assert "unfinished pass of another command" in result.output and "capture.k: 8 there, 4 asked" in result.output
    assert run_cli("teacher-cache", *other, "--overwrite").exit_code == 0
    assert pipeline.open_cache(out).manifest.k == 4


def test_second_writer_is_refused_naming_the_first(teacher_dir, corpus, tmp_path):
    out = tmp_path / "cache"
    out.mkdir()
    with CacheLock(out):
        result = run_cli("teacher-cache", *cache_args(teacher_dir, corpus, out))
    assert result.exit_code == 1
    assert f"pid {os.getpid()}" in result.output and ".lock" in result.output
    assert run_cli("teacher-cache", *cache_args(teacher_dir, corpus, out)).exit_code == 0


def test_lock_of_a_killed_process_does_not_block(tmp_path):
    out = tmp_path / "cache"
    out.mkdir()
    code = (
        "import os, signal, sys; from pathlib import Path; from pipeline.store.journal import CacheLock; "
        f"lock = CacheLock(Path({str(out)!r})).__enter__(); os.kill(os.getpid(), signal.SIGKILL)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == -signal.SIGKILL
    assert (out / ".lock").exists()
    with CacheLock(out):
        pass


def test_exception_inside_the_writer_commits_nothing(tmp_path):
    from pipeline.store.writer import ShardWriter

    writer = ShardWriter(tmp_path, rows_per_shard=100)
    frames = codec.encode_row(
        codec.SparseRow(np.arange(4), np.zeros((4, 2), int), np.zeros((4, 2), np.float32), np.zeros(4, np.float32))
    )
    with pytest.raises(RuntimeError):
        try:
            for index in range(20):
                writer.add(index, frames, 4)
            raise RuntimeError("boom")
        except BaseException:
            writer.abort()
            raise
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------- corruption


@pytest.fixture()
def cache_copy(train_cache, tmp_path):
    copy = tmp_path / "cache"
    shutil.copytree(train_cache, copy)
    return copy


def detected(folder: Path) -> bool:
    """Whether reading the cache as a student would raises a CacheError."""
    try:
        problems, _ = verify_report(folder)
        if problems:
            return True
        for _ in pipeline.open_cache(folder):
            pass
    except CacheError:
        return True
    return False


def flip_and_check(files: list[Path], flips: int, seed: int) -> int:
    rng = random.Random(seed)
    caught = 0
    for _ in range(flips):
        path = rng.choice(files)
        data = bytearray(path.read_bytes())
        offset = rng.randrange(len(data))
        bit = 1 << rng.randrange(8)
        data[offset] ^= bit
        path.write_bytes(bytes(data))
        caught += detected(path.parent if path.parent.name != "tokenizer" else path.parent.parent)
        data[offset] ^= bit
        path.write_bytes(bytes(data))
    return caught


def cache_payload_files(folder: Path) -> list[Path]:
    return [*sorted(folder.glob("shard-*.arrow")), folder / MANIFEST_NAME]


def test_random_bit_flips_are_all_detected(cache_copy):
    files = cache_payload_files(cache_copy) + sorted((cache_copy / "tokenizer").iterdir())
    assert flip_and_check(files, 60, seed=0) == 60


@pytest.mark.slow
def test_a_thousand_bit_flips_are_all_detected(cache_copy):
    files = cache_payload_files(cache_copy) + sorted((cache_copy / "tokenizer").iterdir())
    assert flip_and_check(files, 1000, seed=1) == 1000


@pytest.mark.parametrize("points", [8, pytest.param(64, marks=pytest.mark.slow)])
def test_truncation_anywhere_is_detected(cache_copy, points):
    rng = random.Random(points)
    for _ in range(points):
        path = rng.choice(cache_payload_files(cache_copy))
        original = path.read_bytes()
        path.write_bytes(original[: rng.randrange(len(original))])
        assert detected(cache_copy), path.name
        path.write_bytes(original)


def test_verify_reports_every_problem_and_deep_checks_rows(cache_copy):
    names = [entry.name for entry in read_manifest(cache_copy).shards]
    (cache_copy / names[0]).unlink()
    truncated = cache_copy / names[1]
    truncated.write_bytes(truncated.read_bytes()[:-1])
    result = run_cli("verify", str(cache_copy))
    assert result.exit_code == 1
    assert f"'{names[0]}' is missing" in result.output and f"'{names[1]}' has" in result.output


def test_deep_verify_decodes_every_row(train_cache):
    result = run_cli("verify", "--deep", str(train_cache))
    assert result.exit_code == 0 and "rows decoded" in result.output


# ----------------------------------------------------------------- hostile caches


def test_frame_declaring_a_terabyte_is_refused_without_allocating():
    import tracemalloc

    # A frame header declaring 1 TiB of content: magic, descriptor 0xE0 (8-byte content size,
    # single segment), the size, then one empty raw block marked last.
    forged = bytearray(b"\x28\xb5\x2f\xfd\xe0") + (1 << 40).to_bytes(8, "little") + b"\x01\x00\x00"
    assert zstandard.frame_content_size(bytes(forged)) == 1 << 40
    tracemalloc.start()
    with pytest.raises(CacheError, match="declares 1099511627776 bytes"):
        codec.decode_array(bytes(forged), "<u4", 16)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 1 << 20


def test_small_frame_inflating_to_512_mib_is_refused_under_a_memory_cap():
    import resource

    bomb = zstandard.ZstdCompressor(level=19).compress(b"\0" * (512 << 20))
    assert len(bomb) < 64 << 10
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CacheError, match="declares 536870912 bytes"):
        codec.decode_array(bomb, "<u4", 1024)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 64 << 10  # far below the 512 MiB the frame would inflate to


@pytest.mark.parametrize(
    "name", ["../outside.arrow", "/etc/passwd", "shard-00000.arrow/../x", "s3://b/k", "shard-00000.arrow\0"]
)
def test_shard_names_that_escape_are_refused(cache_copy, name):
    edit_manifest(cache_copy, lambda m: m["shards"][0].update(name=name))
    with pytest.raises(CacheError, match=r"expected 'shard-00000\.arrow'"):
        read_manifest(cache_copy)


def test_out_of_range_ids_are_refused(cache_copy, monkeypatch):
    import pipeline.cache

    manifest = read_manifest(cache_copy)
    narrow = type(manifest)(**{**manifest.__dict__, "logit_width": 10})
    monkeypatch.setattr(pipeline.cache, "read_manifest", lambda folder: narrow)
    with pytest.raises(CacheError, match="not below logit_width 10"):
        for _ in pipeline.open_cache(cache_copy):
            pass


def test_no_read_path_unpickles():
    sources = {path.name: path.read_text() for path in Path(pipeline.__file__).parent.rglob("*.py")}
    assert "reader.py" in sources
    for name, text in sources.items():
        for forbidden in ("import pickle", "torch.load(", "weights_only=False", "pickle.load", "allow_pickle=True"):
            assert forbidden not in text, f"{name} uses {forbidden}"


def test_old_pyarrow_is_refused():
    from pipeline.store.reader import check_pyarrow_version

    with pytest.raises(CacheError, match="CVE-2023-47248"):
        check_pyarrow_version("14.0.0")
    check_pyarrow_version("14.0.1")
    check_pyarrow_version("26.0.1")


def test_extension_type_columns_are_refused(cache_copy):
    import pyarrow as pa

    from pipeline.fingerprint import sha256_file

    entry = read_manifest(cache_copy).shards[0]
    path = cache_copy / entry.name
    table = pa.ipc.open_file(pa.BufferReader(path.read_bytes())).read_all()
    uuid_type = pa.uuid() if hasattr(pa, "uuid") else pa.binary(16)
    swapped = table.set_column(0, pa.field("seq_index", uuid_type), pa.array([b"\0" * 16] * table.num_rows, uuid_type))
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, swapped.schema) as writer:
        writer.write_table(swapped)
    size, digest = path.stat().st_size, sha256_file(path)

    def rehash(manifest):
        manifest["shards"][0].update(bytes=size, sha256=digest)
        manifest["totals"]["bytes"] = sum(s["bytes"] for s in manifest["shards"])

    edit_manifest(cache_copy, rehash)
    with pytest.raises(CacheError, match="unexpected schema"):
        for _ in pipeline.open_cache(cache_copy):
            pass


def test_rows_per_shard_limit(cache_copy, monkeypatch):
    import pipeline.manifest

    monkeypatch.setattr(pipeline.manifest, "MAX_ROWS_PER_SHARD", 3)
    with pytest.raises(CacheError, match="rows_per_shard' = 16 is outside"):
        read_manifest(cache_copy)


def test_checksums_can_be_skipped_on_request(cache_copy):
    edit_manifest(cache_copy, lambda m: m["shards"][0].update(sha256="0" * 64))
    with pytest.raises(CacheError, match="fails its checksum"):
        next(iter(pipeline.open_cache(cache_copy)))
    assert len(list(pipeline.open_cache(cache_copy, verify=False))) == read_manifest(cache_copy).sequences
