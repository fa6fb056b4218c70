"""Caches on object storage through fsspec URLs: written through local staging with the manifest last, read
through a checked local mirror that a second run reuses; tested on fsspec's memory filesystem and on an S3
server on loopback."""

import json
import os
import uuid

import numpy as np
import pytest
from conftest import make_cache, run_cli

import pipeline
from pipeline import remote
from pipeline.errors import CacheError

OPTIONS = ("--seq-len", "16", "--top-k", "4", "--max-tokens", "256", "--shard-tokens", "64")


def memory_url() -> str:
    return f"memory://bucket-{uuid.uuid4().hex[:8]}/cache"


@pytest.fixture(scope="module")
def local_cache(teacher_dir, corpus, tmp_path_factory):
    return make_cache(teacher_dir, corpus["heldout"], tmp_path_factory.mktemp("remote") / "local", *OPTIONS)


@pytest.fixture(scope="module")
def remote_cache(teacher_dir, corpus):
    url = memory_url()
    result = run_cli(
        "teacher-cache", "--teacher", str(teacher_dir), "--dataset", str(corpus["heldout"]), "--out", url, *OPTIONS
    )
    assert result.exit_code == 0, result.output
    return url


def test_a_cache_written_to_a_url_is_the_cache_written_locally(remote_cache, local_cache):
    fs, root = remote.filesystem(remote_cache)
    assert fs.cat_file(f"{root}/manifest.json") == (local_cache / "manifest.json").read_bytes()
    names = sorted(path.rsplit("/", 1)[-1] for path in fs.ls(root, detail=False))
    assert names == sorted(["manifest.json", "tokenizer", *(p.name for p in local_cache.glob("shard-*.arrow"))])
    assert not remote.staging_folder(remote_cache).exists()  # the staging folder is gone after the upload


def test_a_remote_cache_reads_as_the_local_one_and_a_second_read_downloads_nothing(
    remote_cache, local_cache, monkeypatch
):
    rows = list(pipeline.open_cache(remote_cache))
    expected = list(pipeline.open_cache(local_cache))
    assert len(rows) == len(expected) > 0
    for a, b in zip(rows, expected, strict=True):
        assert np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.logprobs, b.logprobs)
    fetched = []
    monkeypatch.setattr(remote, "_fetch", lambda *args: fetched.append(args))
    assert len(list(pipeline.open_cache(remote_cache))) == len(rows)
    assert fetched == []


def test_inspect_verify_and_student_train_take_a_url(remote_cache, student_config_dir, tmp_path):
    assert run_cli("verify", remote_cache, "--deep").exit_code == 0
    report = json.loads(run_cli("inspect", remote_cache, "--json").output)
    assert report["tokens"] == 256
    args = [
        "--cache",
        remote_cache,
        "--student",
        str(student_config_dir),
        "--out",
        str(tmp_path / "s"),
        "--max-steps",
        "2",
    ]
    result = run_cli("student-train", *args, "--batch-size", "2")
    assert result.exit_code == 0, result.output


def test_a_damaged_remote_shard_is_refused_and_nothing_is_kept(local_cache, monkeypatch, tmp_path):
    monkeypatch.setenv("DISTILL_REMOTE_CACHE", str(tmp_path / "store"))  # no verified copy to fall back on
    url = memory_url()
    fs, root = remote.filesystem(url)
    fs.put(str(local_cache), root, recursive=True)
    shard = f"{root}/shard-00001.arrow"
    data = bytearray(fs.cat_file(shard))
    data[len(data) // 2] ^= 0xFF
    fs.pipe_file(shard, bytes(data))
    with pytest.raises(CacheError, match=r"downloaded 'shard-00001\.arrow' .* the remote cache is damaged"):
        pipeline.open_cache(url)
    mirrors = remote.store_root() / "mirrors"
    assert not mirrors.exists() or not list(mirrors.iterdir())
    assert not (remote.store_root() / "blobs" / pipeline.open_cache(local_cache).manifest.shards[1].sha256).exists()


def test_a_url_without_a_manifest_is_not_a_cache():
    with pytest.raises(CacheError, match="is not a cache"):
        pipeline.open_cache(memory_url())


def test_an_out_url_holding_a_cache_is_refused_without_overwrite_and_replaced_with_it(teacher_dir, corpus):
    url = memory_url()
    dataset = ["--teacher", str(teacher_dir), "--dataset", str(corpus["heldout"]), "--out", url]
    assert run_cli("teacher-cache", *dataset, *OPTIONS).exit_code == 0
    fs, root = remote.filesystem(url)
    before = sorted(fs.glob(f"{root}/shard-*.arrow"))
    again = run_cli("teacher-cache", *dataset, *OPTIONS)
    assert again.exit_code == 1 and "already holds a cache; pass --overwrite" in again.output
    bigger = [*OPTIONS[:-1], "128"]  # fewer, larger shards
    replaced = run_cli("teacher-cache", *dataset, *bigger, "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    after = sorted(fs.glob(f"{root}/shard-*.arrow"))
    assert len(after) < len(before)  # the stale shards are gone
    assert pipeline.open_cache(url).manifest.raw["rows_per_shard"] == 8


def test_the_store_drops_the_least_recently_used_mirror_past_its_bound(
    local_cache, teacher_dir, corpus, monkeypatch, tmp_path
):
    other = make_cache(teacher_dir, corpus["heldout"], tmp_path / "other", *OPTIONS[:3], "2", *OPTIONS[4:])
    store = tmp_path / "store"
    monkeypatch.setenv("DISTILL_REMOTE_CACHE", str(store))
    urls = []
    for folder in (local_cache, other):
        urls.append(memory_url())
        fs, root = remote.filesystem(urls[-1])
        fs.put(str(folder), root, recursive=True)
    first = pipeline.open_cache(urls[0]).path
    first_size = sum(path.stat().st_size for path in (store / "blobs").iterdir())
    monkeypatch.setenv("DISTILL_REMOTE_CACHE_BYTES", str(first_size + 1))
    second = pipeline.open_cache(urls[1]).path
    assert second.is_dir() and not first.exists()  # the older mirror made room
    kept = sum(path.stat().st_size for path in (store / "blobs").iterdir())
    assert kept < first_size + sum(p.stat().st_size for p in other.glob("shard-*.arrow")) + 1
    assert len(list(pipeline.open_cache(urls[1]))) == 16  # the kept mirror still reads


def test_an_s3_round_trip_through_a_loopback_server(teacher_dir, corpus, monkeypatch, tmp_path):
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    import fsspec

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            monkeypatch.setenv(name, "testing")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": f"http://{host}:{port}"})
        fs, _ = remote.filesystem("s3://distill-test")
        fs.mkdir("distill-test")
        url = "s3://distill-test/caches/run1"
        args = ["--teacher", str(teacher_dir), "--dataset", str(corpus["heldout"]), "--out", url, *OPTIONS]
        result = run_cli("teacher-cache", *args)
        assert result.exit_code == 0, result.output
        assert run_cli("verify", url, "--deep").exit_code == 0
        assert len(list(pipeline.open_cache(url))) == 16
    finally:
        server.stop()
        fs.invalidate_cache() if "fs" in dir() else None
    assert os.environ["AWS_ACCESS_KEY_ID"] == "testing"


def test_recode_reads_and_writes_urls(remote_cache):
    out = memory_url()
    result = run_cli("recode", "--cache", remote_cache, "--out", out, "--top-k", "2")
    assert result.exit_code == 0, result.output
    recoded = pipeline.open_cache(out)
    assert recoded.manifest.k == 2 and len(list(recoded)) == 16
    assert (
        recoded.manifest.raw["recoded_from"]["manifest_sha256"]
        == pipeline.open_cache(remote_cache).manifest.raw["manifest_sha256"]
    )
