"""distill recode: another codec mode, a coarser step or fewer ids, without the teacher; refusals; crash and resume."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_cache, run_cli

import pipeline
from pipeline import codec_v2
from pipeline.capture_spec import CaptureSpec
from pipeline.codec_v2 import CodecSettings
from pipeline.config import RecodeConfig
from pipeline.errors import CacheError, ConfigError
from pipeline.recode import on_source_grid, target_capture, target_codec, truncate_row
from pipeline.rows import SparseRow
from pipeline.store.atomic import CRASH_ENV
from pipeline.store.layout import JOURNAL_NAME, MANIFEST_NAME, RUN_LOG_NAME, TOKENIZER_DIR
from pipeline.store.reader import iter_shard_frames, read_manifest

V1_CACHE = Path(__file__).parent / "data" / "v1-cache"
# 8 rows of 32 tokens per shard: several shards from the held-out text.
SOURCE = ["--seq-len", "32", "--top-k", "16", "--shard-tokens", "256", "--batch-size", "4"]
SMALL = ["--seq-len", "16", "--max-tokens", "64", "--batch-size", "4"]
SQRT_STEP = 1 / 128


def files_of(folder: Path) -> dict[str, bytes]:
    """Every file of a cache but the run log, by relative path."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != RUN_LOG_NAME
    }


def recode(source: Path, out: Path, *options: str) -> Path:
    result = run_cli("recode", "--cache", str(source), "--out", str(out), *options)
    assert result.exit_code == 0, result.output
    return out


def rows_of(cache: Path) -> list[SparseRow]:
    return list(pipeline.open_cache(cache))


def by_id(row: SparseRow, position: int) -> dict[int, float]:
    """One position's captured ids and their log-probabilities, whatever their order."""
    valid = row.valid()[position]
    return dict(zip(row.ids[position][valid].tolist(), row.logprobs[position][valid].tolist()))


@pytest.fixture(scope="module")
def sources(teacher_dir, corpus, tmp_path_factory) -> dict[str, Path]:
    """Teacher caches to recode: lossless, quantized and sqrt top-16, and small top-p, sampled and hybrid ones."""
    root = tmp_path_factory.mktemp("recode-sources")
    heldout = corpus["heldout"]
    return {
        "lossless": make_cache(teacher_dir, heldout, root / "lossless", *SOURCE, "--codec-mode", "lossless"),
        "quantized": make_cache(
            teacher_dir, heldout, root / "quantized", *SOURCE, "--codec-mode", "quantized", "--logprob-step", "0.125"
        ),
        "sqrt": make_cache(
            teacher_dir, heldout, root / "sqrt", *SOURCE, "--codec-mode", "sqrt", "--sqrt-step", str(SQRT_STEP)
        ),
        "topp": make_cache(
            teacher_dir, heldout, root / "topp", *SMALL, "--capture", "topp", "--top-p", "0.9", "--min-k", "6"
        ),
        "sample": make_cache(teacher_dir, heldout, root / "sample", *SMALL, "--capture", "sample", "--samples", "8"),
        "hybrid": make_cache(
            teacher_dir, heldout, root / "hybrid", *SMALL, "--capture", "hybrid", "--top-k", "4", "--samples", "8"
        ),
    }


@pytest.fixture(scope="module")
def top4(sources, tmp_path_factory) -> Path:
    """The lossless source recoded to quantized, 4 ids per position: the reference for the crash tests."""
    out = tmp_path_factory.mktemp("recoded") / "top4"
    return recode(sources["lossless"], out, "--codec-mode", "quantized", "--logprob-step", "0.125", "--top-k", "4")


# ---------------------------------------------------------------------------- the row math


def test_truncation_folds_the_dropped_probability_into_the_tail_exactly():
    logprobs = np.log(np.array([[0.5, 0.2, 0.1, 0.05], [0.9, 0.04, 0.03, 0.02]], dtype=np.float64))
    tail = np.log(1 - np.exp(logprobs).sum(axis=1))
    row = SparseRow(np.array([1, 2]), np.array([[7, 3, 9, 4], [5, 6, 1, 2]]), logprobs, tail)
    cut = truncate_row(row, 2)
    assert cut.ids.tolist() == [[7, 3], [5, 6]]
    assert np.array_equal(cut.logprobs, logprobs[:, :2])
    assert np.allclose(cut.tail_logmass, np.log([0.15 + 0.15, 0.01 + 0.05]), rtol=0, atol=1e-12)
    assert np.allclose(np.logaddexp(np.logaddexp.reduce(cut.logprobs, axis=1), cut.tail_logmass), 0.0, atol=1e-12)


def test_truncation_of_top_p_rows_caps_lengths_and_keeps_complete_positions():
    logprobs = np.array([[-0.1, -3.0, -4.0], [-0.01, -np.inf, -np.inf]])
    row = SparseRow(
        np.array([1, 2]),
        np.array([[4, 5, 6], [7, 0, 0]]),
        logprobs,
        np.array([-5.0, -np.inf]),
        lengths=np.array([3, 1], dtype=np.int32),
    )
    cut = truncate_row(row, 2)
    assert cut.lengths.tolist() == [2, 1]
    assert cut.tail_logmass[0] == pytest.approx(np.logaddexp(-5.0, -4.0), abs=1e-12)
    assert cut.tail_logmass[1] == -np.inf  # nothing dropped, nothing left out


def test_sqrt_values_snap_back_onto_their_grid():
    step = 1 / 100
    levels = np.arange(0, 101, 3)
    decoded = codec_v2.sqrt_logprobs(levels, step)[None, :]
    snapped = on_source_grid(decoded, CodecSettings.for_mode("sqrt", step))
    assert np.array_equal(codec_v2.sqrt_levels(snapped[0], step), levels)
    assert np.allclose(np.exp(snapped[0, 1:] / 2), levels[1:] * step, rtol=1e-15)


def test_quantized_values_snap_back_onto_their_grid():
    step = 0.1  # not a power of two: float32 decoding leaves each value off its multiple
    decoded = (-np.arange(0, 5000, 7, dtype=np.float64) * step).astype(np.float32)[None, :]
    snapped = on_source_grid(decoded, CodecSettings.for_mode("quantized", step))
    assert np.array_equal(np.rint(-snapped / step), np.arange(0, 5000, 7)[None, :])


def test_an_even_multiple_of_the_step_would_break_the_readers_mass_check_and_an_odd_one_does_not():
    # A sharp position: the top id at p = 0.84 is stored at 0.125-nat steps as -0.125, a tie for 0.25-nat steps.
    spec = CaptureSpec("topk", k=2)
    logprobs = np.log(np.array([[0.84, 0.06], [0.84, 0.06]], dtype=np.float32))
    row = SparseRow(np.array([1, 2]), np.array([[5, 9], [5, 9]]), logprobs, np.log(np.full(2, 0.1, np.float32)))
    source = CodecSettings.for_mode("quantized", 0.125)
    decoded = codec_v2.decode_row(codec_v2.encode_row(row, spec, source), 2, spec, source, 16)
    on_grid = dataclasses.replace(decoded, logprobs=on_source_grid(decoded.logprobs, source))
    even, odd = CodecSettings.for_mode("quantized", 0.25), CodecSettings.for_mode("quantized", 0.375)
    with pytest.raises(CacheError, match="add up to"):
        codec_v2.decode_row(codec_v2.encode_row(on_grid, spec, even), 2, spec, even, 16)
    recoded = codec_v2.decode_row(codec_v2.encode_row(on_grid, spec, odd), 2, spec, odd, 16)
    assert np.abs(recoded.logprobs - logprobs).max() <= 0.375 / 2  # still within step / 2 of the teacher's
    with pytest.raises(ConfigError, match="not an odd multiple"):
        target_codec(RecodeConfig("a", "b", logprob_step=0.25), source, spec)


@pytest.mark.parametrize(
    ("source", "asked", "expected"),
    [
        (CodecSettings.for_mode("lossless"), RecodeConfig("a", "b", logprob_step=0.01), ("quantized", 0.01)),
        (CodecSettings.for_mode("quantized", 0.125), RecodeConfig("a", "b"), ("quantized", 0.125)),
        (CodecSettings.for_mode("quantized", 0.1), RecodeConfig("a", "b", logprob_step=0.3), ("quantized", 0.3)),
        (CodecSettings.for_mode("quantized", 0.125), RecodeConfig("a", "b", logprob_step=0.625), ("quantized", 0.625)),
        (CodecSettings.for_mode("lossless"), RecodeConfig("a", "b", codec_mode="quantized"), ("quantized", 0.125)),
        (CodecSettings.for_mode("lossless"), RecodeConfig("a", "b", sqrt_step=0.01), ("sqrt", 0.01)),
        (CodecSettings.for_mode("sqrt", 0.01), RecodeConfig("a", "b", top_k=3), ("sqrt", 0.01)),
        (CodecSettings.for_mode("sqrt", 0.01), RecodeConfig("a", "b", sqrt_step=0.05), ("sqrt", 0.05)),
    ],
)
def test_codec_settings_follow_the_flags_else_the_source(source, asked, expected):
    target = target_codec(asked, source, CaptureSpec("topk", k=4))
    assert (target.mode, target.step) == expected


def test_a_capture_without_log_probabilities_may_take_any_mode():
    spec = CaptureSpec("sample", k=None, samples=8, sample_temperature=1.0, seed=0, sample_logprobs=False)
    asked = RecodeConfig("a", "b", codec_mode="lossless")
    assert target_codec(asked, CodecSettings.for_mode("quantized", 0.125), spec).mode == "lossless"


def test_top_p_captures_record_the_cap_as_max_k():
    spec = CaptureSpec("topp", k=None, top_p=0.9, min_k=6, max_k=64)
    assert target_capture(4, spec) == CaptureSpec("topp", k=None, top_p=0.9, min_k=4, max_k=4)
    assert target_capture(32, spec).max_k == 32 and target_capture(32, spec).min_k == 6


# ---------------------------------------------------------------------------- recoding real caches


def test_lossless_to_quantized_is_smaller_and_within_half_a_step(sources, tmp_path):
    out = recode(sources["lossless"], tmp_path / "q", "--codec-mode", "quantized", "--logprob-step", "0.125")
    assert read_manifest(out).bytes < read_manifest(sources["lossless"]).bytes
    assert read_manifest(out).codec == {
        "name": "sparse-zstd",
        "version": 2,
        "mode": "quantized",
        "logprob_step": 0.125,
        "zstd_level": 3,
    }
    for old, new in zip(rows_of(sources["lossless"]), rows_of(out), strict=True):
        assert np.array_equal(old.input_ids, new.input_ids)
        assert np.array_equal(old.tail_logmass, new.tail_logmass)
        for position in range(old.ids.shape[0]):
            before, after = by_id(old, position), by_id(new, position)
            assert before.keys() == after.keys()
            assert max(abs(before[i] - after[i]) for i in before) <= 0.125 / 2 + 1e-6


def test_top_k_16_to_4_folds_the_dropped_logprobs_into_the_tail(sources, tmp_path):
    out = recode(sources["lossless"], tmp_path / "k4", "--top-k", "4")
    manifest = read_manifest(out)
    assert manifest.k == 4 and manifest.raw["capture"]["k"] == 4 and manifest.codec["mode"] == "lossless"
    for old, new in zip(rows_of(sources["lossless"]), rows_of(out), strict=True):
        assert np.array_equal(new.ids, old.ids[:, :4])
        assert np.array_equal(new.logprobs, old.logprobs[:, :4])
        dropped = old.logprobs[:, 4:].astype(np.float64)
        expected = np.logaddexp(old.tail_logmass.astype(np.float64), np.logaddexp.reduce(dropped, axis=1))
        np.testing.assert_allclose(new.tail_logmass, expected, rtol=1e-6, atol=0)  # stored as float32


def test_recoded_cache_verifies_deeply_and_trains_a_student(sources, top4, student_config_dir, tmp_path):
    verified = run_cli("verify", "--deep", str(top4))
    assert verified.exit_code == 0 and "rows decoded and checked" in verified.output, verified.output
    trained = run_cli(
        "student-train",
        "--cache",
        str(top4),
        "--student",
        str(student_config_dir),
        "--out",
        str(tmp_path / "student"),
        "--max-steps",
        "1",
        "--batch-size",
        "2",
    )
    assert trained.exit_code == 0 and "1 steps" in trained.output, trained.output


def test_manifest_carries_the_source_and_names_it(sources, top4):
    source = json.loads((sources["lossless"] / MANIFEST_NAME).read_text())
    recoded = json.loads((top4 / MANIFEST_NAME).read_text())
    for section in ("teacher", "tokenizer", "dataset", "packing", "compute", "seq_len", "logit_width"):
        assert recoded[section] == source[section], section
    assert recoded["recoded_from"] == {
        "manifest_sha256": source["manifest_sha256"],
        "codec": source["codec"],
        "capture": source["capture"],
    }
    assert recoded["capture"]["k"] == 4 and recoded["codec"]["mode"] == "quantized"
    assert [s["rows"] for s in recoded["shards"]] == [s["rows"] for s in source["shards"]]
    copied = {p.name: p.read_bytes() for p in (top4 / TOKENIZER_DIR).iterdir()}
    assert copied == {p.name: p.read_bytes() for p in (sources["lossless"] / TOKENIZER_DIR).iterdir()}


def test_row_provenance_is_carried_over(sources, top4):
    def provenance(cache: Path) -> list[tuple[int, int, int]]:
        manifest = read_manifest(cache)
        return [
            (index, cells["source_record"], cells["record_offset"])
            for entry in manifest.shards
            for index, cells in iter_shard_frames(cache, entry, manifest)
        ]

    assert provenance(top4) == provenance(sources["lossless"])


def test_v1_golden_cache_recodes_to_v2_with_the_same_rows(tmp_path):
    out = recode(V1_CACHE, tmp_path / "v2")
    manifest = read_manifest(out)
    assert manifest.format_version == 2 and manifest.codec["mode"] == "lossless"
    assert [column.name for column in manifest.columns] == ["input_ids", "ids", "logprobs", "tail_logmass"]
    old_rows, new_rows = rows_of(V1_CACHE), rows_of(out)
    assert len(old_rows) == len(new_rows) == 6
    for old, new in zip(old_rows, new_rows, strict=True):
        assert np.array_equal(old.input_ids, new.input_ids)
        assert np.array_equal(old.tail_logmass, new.tail_logmass)
        assert np.array_equal(old.ids, new.ids)
        assert np.array_equal(old.logprobs, new.logprobs)
    assert verify_ok(out)


def test_top_p_cache_keeps_at_most_k_ids_and_records_max_k(sources, tmp_path):
    out = recode(sources["topp"], tmp_path / "topp4", "--top-k", "4")
    capture = read_manifest(out).raw["capture"]
    assert (capture["strategy"], capture["max_k"], capture["min_k"], capture["top_p"]) == ("topp", 4, 4, 0.9)
    for old, new in zip(rows_of(sources["topp"]), rows_of(out), strict=True):
        assert np.array_equal(new.lengths, np.minimum(old.lengths, 4))
        assert np.array_equal(new.ids, old.ids[:, :4])
    assert verify_ok(out)


def test_a_quantized_cache_takes_an_odd_multiple_of_its_step(sources, tmp_path):
    out = recode(sources["quantized"], tmp_path / "coarse", "--logprob-step", "0.375")
    for old, new in zip(rows_of(sources["quantized"]), rows_of(out), strict=True):
        moved = np.abs(np.where(old.valid(), old.logprobs - new.logprobs, 0)).max()
        assert moved <= (0.375 - 0.125) / 2 + 1e-6  # within 0.375 / 2 of the teacher's, as the codec promises
    assert verify_ok(out)


def test_a_sqrt_cache_takes_an_odd_multiple_of_its_step(sources, tmp_path):
    out = recode(sources["sqrt"], tmp_path / "coarse", "--sqrt-step", str(3 * SQRT_STEP))
    assert read_manifest(out).codec["sqrt_step"] == 3 * SQRT_STEP
    for old, new in zip(rows_of(sources["sqrt"]), rows_of(out), strict=True):
        roots = np.exp(np.where(old.valid(), old.logprobs, -np.inf) / 2), np.exp(new.logprobs / 2)
        assert np.abs(roots[0] - roots[1]).max() <= (3 - 1) * SQRT_STEP / 2 + 1e-6
    assert verify_ok(out)


def test_lossless_to_sqrt_is_within_half_a_step_on_the_square_root(sources, tmp_path):
    out = recode(sources["lossless"], tmp_path / "sqrt", "--codec-mode", "sqrt", "--top-k", "8")
    for old, new in zip(rows_of(sources["lossless"]), rows_of(out), strict=True):
        roots = np.exp(old.logprobs[:, :8] / 2), np.exp(new.logprobs / 2)
        assert np.array_equal(np.sort(old.ids[:, :8], axis=1), np.sort(new.ids, axis=1))
        assert np.abs(np.sort(roots[0], axis=1) - np.sort(roots[1], axis=1)).max() <= SQRT_STEP / 2 + 1e-6
    assert verify_ok(out)


def test_sampled_cache_recodes_its_codec(sources, tmp_path):
    out = recode(sources["sample"], tmp_path / "s", "--codec-mode", "lossless")
    for old, new in zip(rows_of(sources["sample"]), rows_of(out), strict=True):
        assert np.array_equal(old.ids, new.ids) and np.array_equal(old.counts, new.counts)


def test_a_finished_recode_run_again_is_left_alone(sources, top4):
    before = files_of(top4)
    result = run_cli(
        "recode", "--cache", str(sources["lossless"]), "--out", str(top4), "--codec-mode", "quantized", "--top-k", "4"
    )
    assert result.exit_code == 0 and "already complete" in result.output, result.output
    assert files_of(top4) == before


def verify_ok(cache: Path) -> bool:
    result = run_cli("verify", "--deep", str(cache))
    assert result.exit_code == 0, result.output
    return True


# ---------------------------------------------------------------------------- refusals


REFUSALS = [
    ("quantized", ["--codec-mode", "lossless"], "--codec-mode lossless cannot restore"),
    ("quantized", ["--logprob-step", "0.0625"], "--logprob-step 0.0625 is finer than the source's 0.125"),
    ("quantized", ["--logprob-step", "0.25"], "--logprob-step 0.25 is not an odd multiple"),
    ("quantized", ["--codec-mode", "sqrt"], "--codec-mode sqrt would round again, on another grid"),
    ("sqrt", ["--logprob-step", "0.125"], "--logprob-step would round again, on another grid"),
    ("sqrt", ["--codec-mode", "lossless"], "keep --codec-mode sqrt with --sqrt-step 0.0078125, 0.0234375"),
    ("sqrt", ["--sqrt-step", str(SQRT_STEP / 2)], "--sqrt-step 0.00390625 is finer than the source's"),
    ("sqrt", ["--sqrt-step", str(SQRT_STEP * 2)], "--sqrt-step 0.015625 is not an odd multiple"),
    ("sqrt", ["--sqrt-step", "0.01", "--logprob-step", "0.1"], "belong to different codec modes"),
    ("lossless", ["--top-k", "32"], "--top-k 32 is more than the 16 ids"),
    ("topp", ["--top-k", "65"], "run teacher-cache again with --max-k 65"),
    ("sample", ["--top-k", "4"], "--top-k cannot shrink a sample capture"),
    ("hybrid", ["--top-k", "2"], "--top-k cannot shrink a hybrid capture"),
    ("lossless", ["--codec-mode", "lossless", "--logprob-step", "0.25"], "--logprob-step applies to"),
    ("lossless", ["--top-k", "0"], "--top-k 0 must be at least 1"),
]


def refused(result, expected: str) -> None:
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.output


@pytest.mark.parametrize(("source", "options", "expected"), REFUSALS)
def test_what_cannot_be_done_is_refused_in_one_line(sources, tmp_path, source, options, expected):
    before = files_of(sources[source])
    out = tmp_path / "out"
    refused(run_cli("recode", "--cache", str(sources[source]), "--out", str(out), *options), expected)
    assert not out.exists()
    assert files_of(sources[source]) == before


def test_recoding_a_cache_onto_itself_is_refused(sources, tmp_path):
    copy = tmp_path / "cache"
    shutil.copytree(sources["lossless"], copy)
    before = files_of(copy)
    refused(run_cli("recode", "--cache", str(copy), "--out", str(copy)), "is the --cache folder itself")
    refused(run_cli("recode", "--cache", str(copy), "--out", str(copy / "inner")), "overlaps --cache")
    assert files_of(copy) == before and not (copy / "inner").exists()


def test_an_occupied_out_is_refused_without_overwrite(sources, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(V1_CACHE, out)
    before = files_of(out)
    refused(run_cli("recode", "--cache", str(sources["lossless"]), "--out", str(out)), "pass --overwrite")
    assert files_of(out) == before
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    refused(
        run_cli("recode", "--cache", str(sources["lossless"]), "--out", str(tmp_path / "notes"), "--overwrite"),
        "not part of a cache",
    )
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"
    recode(sources["lossless"], out, "--overwrite")
    assert (
        read_manifest(out).raw["recoded_from"]["manifest_sha256"]
        == read_manifest(sources["lossless"]).raw["manifest_sha256"]
    )


def test_a_damaged_source_shard_stops_the_recode_naming_it(sources, tmp_path):
    copy = tmp_path / "cache"
    shutil.copytree(sources["lossless"], copy)
    shard = copy / read_manifest(copy).shards[1].name
    data = bytearray(shard.read_bytes())
    data[200] ^= 1
    shard.write_bytes(bytes(data))
    result = run_cli("recode", "--cache", str(copy), "--out", str(tmp_path / "out"))
    assert result.exit_code == 1 and "shard-00001.arrow" in result.output, result.output
    # The first shard was committed before the damage was met: the partial recode is refused as a cache.
    with pytest.raises(CacheError, match="did not finish"):
        read_manifest(tmp_path / "out")


# ---------------------------------------------------------------------------- crash and resume

TOP4 = ["--codec-mode", "quantized", "--logprob-step", "0.125", "--top-k", "4"]
CRASH_POINTS = [("shard-after-rename", 2), ("tokenizer-saved", 1)]
SLOW_CRASH_POINTS = [
    ("record-batch", 1),
    ("record-batch", 3),
    ("shard-before-rename", 1),
    ("shard-before-rename", 3),
    ("journal-partial", 2),
    ("journal-after-rename", 3),
    ("manifest-partial", 1),
    ("manifest-before-rename", 1),
]


def killed_recode(point: str, count: int, source: Path, out: Path) -> subprocess.CompletedProcess:
    """Run the recode in a child process that SIGKILLs itself at ``point`` (the ``count``-th time)."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "-q", "recode", "--cache", str(source), "--out", str(out), *TOP4],
        env={**os.environ, CRASH_ENV: f"{point}:{count}"},
        capture_output=True,
        text=True,
    )


def crash_then_resume(point: str, count: int, source: Path, out: Path, reference: Path) -> None:
    child = killed_recode(point, count, source, out)
    assert child.returncode == -signal.SIGKILL, f"{point}:{count} never reached\n{child.stderr[-2000:]}"
    assert not (out / MANIFEST_NAME).exists()  # never a manifest over part of the shards
    with pytest.raises(CacheError):
        read_manifest(out)
    result = run_cli("recode", "--cache", str(source), "--out", str(out), *TOP4)
    assert result.exit_code == 0, result.output
    assert files_of(out) == files_of(reference)
    assert not (out / JOURNAL_NAME).exists()


@pytest.mark.parametrize(("point", "count"), CRASH_POINTS)
def test_a_killed_recode_resumes_to_the_same_bytes(sources, top4, tmp_path, point, count):
    crash_then_resume(point, count, sources["lossless"], tmp_path / "out", top4)


@pytest.mark.slow
@pytest.mark.parametrize(("point", "count"), SLOW_CRASH_POINTS)
def test_a_recode_killed_anywhere_resumes_to_the_same_bytes(sources, top4, tmp_path, point, count):
    crash_then_resume(point, count, sources["lossless"], tmp_path / "out", top4)


def test_a_killed_recode_resumes_after_its_committed_shards_and_refuses_other_settings(sources, top4, tmp_path):
    out = tmp_path / "out"
    # The journal is written once before the first shard, then after each: the 3rd time records 2 shards.
    assert killed_recode("journal-after-rename", 3, sources["lossless"], out).returncode == -signal.SIGKILL
    other = run_cli("recode", "--cache", str(sources["lossless"]), "--out", str(out), "--top-k", "8")
    refused(other, "unfinished pass of another command")
    result = run_cli("recode", "--cache", str(sources["lossless"]), "--out", str(out), *TOP4)
    assert result.exit_code == 0 and "resumed after 2 committed shard(s)" in result.output, result.output
    assert files_of(out) == files_of(top4)


def test_a_recode_config_refuses_bad_flags_by_name():
    with pytest.raises(ConfigError, match="--logprob-step 2"):
        RecodeConfig("a", "b", logprob_step=2.0)
    with pytest.raises(ConfigError, match="--out is empty"):
        RecodeConfig("a", " ")
