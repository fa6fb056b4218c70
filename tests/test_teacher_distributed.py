"""The teacher pass under torchrun: ranks write disjoint shards, one manifest, bytes independent of the world size.

Each case launches ``torchrun --standalone -m pipeline teacher-cache`` in a subprocess on
CPU (gloo), one thread per process (CPU kernels' bits can depend on the thread count, and
torchrun changes it), and compares the cache with one written by a single process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.store import layout

OPTIONS = ("--seq-len", "16", "--shard-tokens", "64", "--batch-size", "3", "--max-tokens", "1200")


def torchrun(nproc: int, *args: str, env: dict[str, str] | None = None, timeout: float = 240):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    inherited = {name: value for name, value in os.environ.items() if name != "DISTILL_TEST_CRASH_AT"}
    environment = {**inherited, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return subprocess.run(
        [*command, "-m", "pipeline", *args], capture_output=True, text=True, env=environment, timeout=timeout
    )


def write_cache(nproc: int, teacher: Path, dataset: Path, out: Path | str, *options: str, env=None) -> Path | str:
    result = torchrun(
        nproc, "teacher-cache", "--teacher", str(teacher), "--dataset", str(dataset), "--out", str(out), *options,
        env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


def content(cache: Path) -> dict[str, bytes]:
    """The cache's identity: manifest and shards (the run log is not part of it)."""
    names = [layout.MANIFEST_NAME, *sorted(p.name for p in cache.glob("shard-*.arrow"))]
    return {name: (cache / name).read_bytes() for name in names}


@pytest.fixture(scope="module")
def single(tmp_path_factory, teacher_dir, corpus) -> Path:
    out = tmp_path_factory.mktemp("dp") / "world1"
    return write_cache(1, teacher_dir, corpus["train"], out, *OPTIONS)


def test_the_reference_cache_has_a_partial_last_shard_and_more_shards_than_ranks(single):
    manifest = json.loads((single / layout.MANIFEST_NAME).read_bytes())
    rows = [shard["rows"] for shard in manifest["shards"]]
    assert len(rows) >= 5 and len(rows) % 2 == 1
    assert rows[-1] < manifest["rows_per_shard"]


def test_two_processes_write_the_same_bytes_as_one(single, teacher_dir, corpus, tmp_path):
    out = write_cache(2, teacher_dir, corpus["train"], tmp_path / "world2", *OPTIONS)
    assert content(out) == content(single)
    assert not list(out.glob("progress*")) and not (out / ".lock").exists()
    run = json.loads((out / layout.RUN_LOG_NAME).read_bytes())
    assert run["world_size"] == 2


@pytest.mark.slow
def test_four_processes_write_the_same_bytes_as_one(single, teacher_dir, corpus, tmp_path):
    out = write_cache(4, teacher_dir, corpus["train"], tmp_path / "world4", *OPTIONS)
    assert content(out) == content(single)


@pytest.mark.slow
def test_sampled_captures_draw_the_same_ids_on_two_processes(teacher_dir, corpus, tmp_path):
    sample = ("--capture", "sample", "--samples", "8", "--seed", "5")
    one = write_cache(1, teacher_dir, corpus["train"], tmp_path / "one", *OPTIONS, *sample)
    two = write_cache(2, teacher_dir, corpus["train"], tmp_path / "two", *OPTIONS, *sample)
    assert content(two) == content(one)


def test_a_killed_two_process_pass_resumes_on_one_process_to_the_same_bytes(single, teacher_dir, corpus, tmp_path):
    out = tmp_path / "cache"
    args = ("teacher-cache", "--teacher", str(teacher_dir), "--dataset", str(corpus["train"]), "--out", str(out))
    crashed = torchrun(2, *args, *OPTIONS, env={"DISTILL_TEST_CRASH_AT": "shard-after-rename:2"})
    assert crashed.returncode != 0
    assert not (out / layout.MANIFEST_NAME).exists()
    assert (out / layout.JOURNAL_NAME).exists()  # rank 1's journal too, if it committed before it was stopped
    write_cache(1, teacher_dir, corpus["train"], out, *OPTIONS)
    assert content(out) == content(single)
    # Rank 0 journals its first shard before it dies at its second; how far rank 1 got depends on timing.
    assert json.loads((out / layout.RUN_LOG_NAME).read_bytes())["resumed_shards"] >= 1


@pytest.mark.slow
def test_a_second_run_on_two_processes_finds_the_cache_complete(single, teacher_dir, corpus, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(single, out)
    before = content(out)
    args = ("teacher-cache", "--teacher", str(teacher_dir), "--dataset", str(corpus["train"]), "--out", str(out))
    result = torchrun(2, *args, *OPTIONS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "already complete" in result.stdout
    assert content(out) == before


@pytest.mark.slow
def test_two_processes_write_a_url_through_one_staging_folder(single, teacher_dir, corpus, tmp_path):
    url = f"file://{tmp_path / 'bucket' / 'cache'}"
    env = {"DISTILL_REMOTE_CACHE": str(tmp_path / "store")}
    write_cache(2, teacher_dir, corpus["train"], url, *OPTIONS, env=env)
    assert content(tmp_path / "bucket" / "cache") == content(single)
    assert not any((tmp_path / "store" / "staging").iterdir())  # staging removed once uploaded
