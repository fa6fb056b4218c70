"""``distill inspect`` and ``distill verify``, and the Python reading API."""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import run_cli
from torch.utils.data import DataLoader

import pipeline
from pipeline.store.reader import read_manifest


def test_inspect_json_reports_totals(train_cache):
    result = run_cli("inspect", str(train_cache), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    manifest = read_manifest(train_cache)
    assert report["tokens"] == manifest.tokens and report["sequences"] == manifest.sequences
    assert report["shards"] == len(manifest.shards) and report["k"] == 16
    assert report["bytes_per_token"] == manifest.bytes / manifest.tokens
    assert 0.0 < report["mean_captured_mass"] < 1.0
    # The captured mass agrees with the stored tails.
    tails = np.concatenate([row.tail_logmass for row in pipeline.open_cache(train_cache)])
    assert abs(report["mean_captured_mass"] - (1 - np.exp(tails).mean())) < 2e-3
    assert report["format_version"] == 2 and report["codec"]["mode"] == "sqrt"
    assert report["mean_ids_per_position"] == 16
    columns = report["column_bytes_per_token"]
    assert set(columns) == {
        "input_ids",
        "ids",
        "logprobs",
        "tail_logmass",
        "source_record",
        "record_offset",
        "row_stats",
    }
    assert 0 < report["teacher_mean_top1_prob"] <= 1 and report["teacher_mean_entropy"] > 0
    assert 0 < sum(columns.values()) < report["bytes_per_token"]  # Arrow's own bytes are the rest


def test_inspect_text(train_cache):
    result = run_cli("inspect", str(train_cache))
    assert result.exit_code == 0 and "bytes_per_token" in result.output
    assert "strategy=topk, k=16" in result.output and "mode=sqrt" in result.output


def test_verify_passes_on_a_good_cache(train_cache):
    result = run_cli("verify", str(train_cache))
    assert result.exit_code == 0 and result.output.startswith("ok:")


def test_verify_names_every_bad_shard(train_cache, tmp_path):
    copy = tmp_path / "cache"
    shutil.copytree(train_cache, copy)
    names = [entry.name for entry in read_manifest(copy).shards]
    for name in (names[0], names[2]):
        data = bytearray((copy / name).read_bytes())
        data[-40] ^= 1
        (copy / name).write_bytes(bytes(data))
    result = run_cli("verify", str(copy))
    assert result.exit_code == 1
    bad_lines = [line for line in result.output.splitlines() if line.startswith("BAD")]
    assert len(bad_lines) == 2
    assert names[0] in bad_lines[0] and names[2] in bad_lines[1]


def test_verify_refuses_a_folder_without_manifest(tmp_path):
    result = run_cli("verify", str(tmp_path))
    assert result.exit_code == 1 and "not a cache" in result.output


def test_open_cache_rows_have_documented_shapes_and_dtypes(train_cache):
    cache = pipeline.open_cache(train_cache)
    rows = list(cache)
    assert len(rows) == len(cache) == cache.manifest.sequences
    row = rows[0]
    assert row.input_ids.shape == (32,) and row.input_ids.dtype == np.int64
    assert row.topk_ids.shape == (32, 16) and row.topk_ids.dtype == np.int64
    assert row.topk_logprobs.shape == (32, 16) and row.topk_logprobs.dtype == np.float32
    assert row.tail_logmass.shape == (32,) and row.tail_logmass.dtype == np.float32


def test_torch_dataset_batches_and_shuffles_by_seed(train_cache):
    def first_ids(seed, epoch):
        dataset = pipeline.CacheDataset(train_cache, shuffle=True, seed=seed)
        dataset.set_epoch(epoch)
        return [batch["input_ids"] for batch in DataLoader(dataset, batch_size=4)]

    batches = first_ids(0, 0)
    assert batches[0].shape == (4, 32)
    assert torch.equal(torch.cat(batches)[:8], torch.cat(first_ids(0, 0))[:8])
    assert not torch.equal(torch.cat(batches)[:8], torch.cat(first_ids(0, 1))[:8])
    everything = torch.cat(batches)
    assert everything.shape[0] == len(pipeline.open_cache(train_cache))


def test_torch_dataset_splits_shards_across_workers(train_cache):
    dataset = pipeline.CacheDataset(train_cache, shuffle=False)
    loader = DataLoader(dataset, batch_size=None, num_workers=2)
    seen = sorted(tuple(item["input_ids"][:4].tolist()) for item in loader)
    expected = sorted(tuple(row.input_ids[:4].tolist()) for row in pipeline.open_cache(train_cache))
    assert seen == expected


def test_inspect_sample_reads_only_some_rows_and_agrees_with_a_full_read(train_cache):
    import pipeline
    from pipeline.report import cache_report

    full = cache_report(train_cache)
    rows = len(pipeline.open_cache(train_cache))
    everything = cache_report(train_cache, sample=rows + 10)
    assert full["sampled_rows"] is None and everything["sampled_rows"] == rows
    assert everything["mean_captured_mass"] == pytest.approx(full["mean_captured_mass"], rel=1e-9)
    assert everything["column_bytes_per_token"] == pytest.approx(full["column_bytes_per_token"])
    result = run_cli("inspect", str(train_cache), "--sample", "5", "--json")
    assert result.exit_code == 0, result.output
    sampled = json.loads(result.output)
    assert sampled["sampled_rows"] == 5 and sampled["tokens"] == full["tokens"]
    assert sampled["mean_captured_mass"] == pytest.approx(full["mean_captured_mass"], abs=0.05)
    assert run_cli("inspect", str(train_cache), "--sample", "0").exit_code == 2
