"""Every capture strategy end to end through the CLI: teacher-cache, verify --deep, inspect --json and
student-train; the refusal of a temperature a sampled cache cannot give; resume and seeding of draws;
and the Makefile's capture variables."""

from __future__ import annotations

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
from helpers import make_dry_run

import pipeline
from pipeline.cli import main
from pipeline.config import TeacherCacheConfig
from pipeline.store.atomic import CRASH_ENV
from pipeline.store.layout import JOURNAL_NAME, MANIFEST_NAME, RUN_LOG_NAME

ROOT = Path(__file__).resolve().parents[1]

# 8 sequences of 16 tokens: a few hundred milliseconds per cache on the tiny teacher.
SMALL = ("--seq-len", "16", "--max-tokens", "128", "--batch-size", "4")

# Each strategy's options, and the capture the manifest records for them (CaptureSpec.to_json()).
STRATEGIES = {
    "topp": (
        ("--capture", "topp", "--top-p", "0.9", "--min-k", "2", "--max-k", "12"),
        {"strategy": "topp", "top_p": 0.9, "min_k": 2, "max_k": 12},
    ),
    "sample": (
        ("--capture", "sample", "--samples", "8", "--seed", "3"),
        {"strategy": "sample", "samples": 8, "sample_temperature": 1.0, "sample_logprobs": False, "seed": 3},
    ),
    "sample-logprobs": (
        ("--capture", "sample", "--samples", "8", "--seed", "3", "--sample-logprobs"),
        {"strategy": "sample", "samples": 8, "sample_temperature": 1.0, "sample_logprobs": True, "seed": 3},
    ),
    "hybrid": (
        ("--capture", "hybrid", "--top-k", "4", "--samples", "8", "--seed", "3", "--codec-mode", "lossless"),
        {"strategy": "hybrid", "k": 4, "samples": 8, "sample_temperature": 1.0, "seed": 3},
    ),
}
# The student's --temperature in the end-to-end run: every strategy at a temperature other than the
# draws' where its cache allows one (bucket approximation, importance weights, hybrid's ratio).
TRAIN_TEMPERATURE = {"topp": "2.0", "sample": "1.0", "sample-logprobs": "2.0", "hybrid": "2.0"}


@pytest.fixture(scope="module")
def caches(teacher_dir, corpus, tmp_path_factory) -> dict[str, Path]:
    """One small cache per strategy, made with ``distill teacher-cache``."""
    folder = tmp_path_factory.mktemp("captures")
    return {
        name: make_cache(teacher_dir, corpus["heldout"], folder / name, *options, *SMALL)
        for name, (options, _) in STRATEGIES.items()
    }


def cache_files(folder: Path) -> dict[str, bytes]:
    """Every file of a cache but the run log (it records times and the command line), by relative path."""
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != RUN_LOG_NAME
    }


def train(cache: Path, student: Path, out: Path, *options: str):
    """``distill student-train`` for two steps of two rows on the CPU."""
    paths = ("--cache", str(cache), "--student", str(student), "--out", str(out))
    return run_cli("-q", "student-train", *paths, "--max-steps", "2", "--batch-size", "2", "--device", "cpu", *options)


# -- every strategy, end to end ----------------------------------------------------------


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_each_capture_is_recorded_verifies_deeply_and_trains_a_student(name, caches, student_config_dir, tmp_path):
    cache = caches[name]
    manifest = pipeline.open_cache(cache).manifest
    assert manifest.capture.to_json() == STRATEGIES[name][1]
    assert manifest.sequences == 8 and manifest.tokens == 128

    verified = run_cli("verify", str(cache), "--deep")
    assert verified.exit_code == 0, verified.output
    assert verified.output.strip() == "ok: 8 rows decoded and checked"

    temperature = TRAIN_TEMPERATURE[name]
    result = train(cache, student_config_dir, tmp_path / "student", "--temperature", temperature)
    assert result.exit_code == 0, result.output
    assert "2 steps" in result.output
    metrics = [json.loads(line) for line in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 2 and np.isfinite(metrics[-1]["loss"])
    settings = json.loads((tmp_path / "student" / "training.json").read_text())["config"]
    assert settings["temperature"] == float(temperature)


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_inspect_json_shows_the_capture(name, caches):
    result = run_cli("inspect", str(caches[name]), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["capture"] == STRATEGIES[name][1]
    assert report["tokens"] == 128 and report["sequences"] == 8
    if name == "sample":  # counts alone: the captured mass is unknown
        assert report["mean_captured_mass"] is None
    else:
        assert 0.0 < report["mean_captured_mass"] <= 1.0


def test_sampled_cache_draws_are_what_the_manifest_says(caches):
    # Counts sum to --samples at every position; hybrid's head comes first, with no draws.
    for name, head in (("sample", 0), ("sample-logprobs", 0), ("hybrid", 4)):
        for row in pipeline.open_cache(caches[name]):
            assert np.all(row.counts.sum(axis=1) == 8)
            assert np.all(row.counts[:, :head] == 0)
            assert (row.logprobs is None) == (name == "sample")


# -- refusal ------------------------------------------------------------------------------


def test_sampled_cache_without_logprobs_refuses_another_temperature_and_writes_nothing(
    caches, student_config_dir, tmp_path
):
    out = tmp_path / "student"
    command = [
        *(sys.executable, "-m", "pipeline.cli", "student-train", "--cache", str(caches["sample"])),
        *("--student", str(student_config_dir), "--out", str(out), "--temperature", "2", "--device", "cpu"),
    ]
    refused = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert refused.returncode == 1, refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1, refused.stderr
    assert lines[0].startswith("error: --temperature 2 differs from the cache's --sample-temperature 1")
    assert "--sample-logprobs" in lines[0]
    assert not out.exists()
    # An existing empty --out stays empty.
    out.mkdir()
    assert train(caches["sample"], student_config_dir, out, "--temperature", "2").exit_code == 1
    assert list(out.iterdir()) == []
    # Cross-entropy alone fits the cache at any temperature (its draws' own is trained above).
    alone = train(caches["sample"], student_config_dir, tmp_path / "alone", "--temperature", "2", "--alpha", "0")
    assert alone.exit_code == 0, alone.output


# -- resume and seeding -------------------------------------------------------------------


# A sampled pass of 12 sequences in three shards of 4.
SAMPLED = (
    *("--capture", "sample", "--samples", "16", "--seed", "11", "--sample-temperature", "1.5"),
    *("--seq-len", "16", "--max-tokens", "192", "--shard-tokens", "64"),
)


def pass_args(teacher_dir, corpus, out: Path, *options: str) -> list[str]:
    return ["--teacher", str(teacher_dir), "--dataset", str(corpus["heldout"]), "--out", str(out), *options]


# A child process that loads the teacher: about 15 s on a 2-core machine, so one variant runs by default.
@pytest.mark.parametrize(
    "extra", [(), pytest.param(("--sample-logprobs",), marks=pytest.mark.slow)], ids=["counts", "logprobs"]
)
def test_killed_sampled_pass_resumes_to_a_byte_identical_cache(extra, teacher_dir, corpus, tmp_path):
    reference = make_cache(teacher_dir, corpus["heldout"], tmp_path / "reference", *SAMPLED, *extra)
    out = tmp_path / "cache"
    command = [sys.executable, "-m", "pipeline.cli", "-q", "teacher-cache", *pass_args(teacher_dir, corpus, out)]
    child = subprocess.run(
        [*command, *SAMPLED, *extra],
        env={**os.environ, CRASH_ENV: "shard-after-rename:2"},
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    assert not (out / MANIFEST_NAME).exists()
    assert len(list(out.glob("shard-*.arrow"))) == 2
    resumed = run_cli("teacher-cache", *pass_args(teacher_dir, corpus, out, *SAMPLED, *extra))
    assert resumed.exit_code == 0, resumed.output
    assert "resumed after" in resumed.output
    assert cache_files(out) == cache_files(reference)
    assert not (out / JOURNAL_NAME).exists()


def drawn(cache: Path) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    return [(row.input_ids, row.ids, row.counts) for row in pipeline.open_cache(cache)]


def test_same_seed_draws_the_same_ids_at_another_batch_size(teacher_dir, corpus, tmp_path):
    first = make_cache(teacher_dir, corpus["heldout"], tmp_path / "b4", *SAMPLED, "--batch-size", "4")
    second = make_cache(teacher_dir, corpus["heldout"], tmp_path / "b3", *SAMPLED, "--batch-size", "3")
    assert pipeline.open_cache(second).manifest.raw["compute"]["batch_size"] == 3
    for (tokens_a, ids_a, counts_a), (tokens_b, ids_b, counts_b) in zip(drawn(first), drawn(second), strict=True):
        assert np.array_equal(tokens_a, tokens_b)
        assert np.array_equal(ids_a, ids_b) and np.array_equal(counts_a, counts_b)
    # The seed is what fixes the draws: another seed draws other ids.
    options = list(SAMPLED)
    options[options.index("--seed") + 1] = "12"
    other = make_cache(teacher_dir, corpus["heldout"], tmp_path / "seed12", *options, "--batch-size", "4")
    assert any(not np.array_equal(a[1], b[1]) for a, b in zip(drawn(first), drawn(other), strict=True))


# -- the Makefile ---------------------------------------------------------------------------

needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")

# Every capture variable the Makefile knows, set; the two codec steps belong to different modes.
EVERY_VARIABLE = {
    "TOPK": "4",
    "TOP_P": "0.9",
    "MIN_K": "2",
    "MAX_K": "12",
    "SAMPLES": "8",
    "SAMPLE_TEMPERATURE": "1.5",
    "SAMPLE_LOGPROBS": "1",
    "CAPTURE_SEED": "7",
    "LOGPROB_STEP": "0.25",
}
CODEC_VARIABLES = {
    "codec-default": {},
    "lossless": {"CODEC_MODE": "lossless"},
    "logprob-step": {"LOGPROB_STEP": "0.25"},
    "sqrt-step": {"SQRT_STEP": "0.01"},
    "quantized-and-step": {"CODEC_MODE": "quantized", "LOGPROB_STEP": "0.25"},
}


# Left out of make's environment, so that a caller's settings (or a make running pytest) change nothing.
MAKE_ENV_LEFT_OUT = {
    *EVERY_VARIABLE,
    "SQRT_STEP",
    "CODEC_MODE",
    "CAPTURE",
    "TEACHER",
    "DATASET",
    "EVAL_DATASET",
    "MAKEFLAGS",
    "MFLAGS",
    "MAKELEVEL",
}


def make_teacher_commands(**variables: str) -> list[list[str]]:
    """The ``distill teacher-cache`` argument lists that ``make -n teacher-cache`` prints, after ``teacher-cache``."""
    settings = {"TEACHER": "models/t", "DATASET": "d.jsonl", "EVAL_DATASET": "e.jsonl", **variables}
    printed, output = make_dry_run("teacher-cache", settings, MAKE_ENV_LEFT_OUT)
    commands = [words[1:] for words in printed if words[0] == "teacher-cache"]
    assert len(commands) == 2, output  # the training cache and the held-out one
    return commands


def option(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args else None


@needs_make
def test_make_passes_the_capture_variables_to_both_teacher_passes():
    variables = {
        "CAPTURE": "sample",
        "SAMPLES": "8",
        "SAMPLE_TEMPERATURE": "1.5",
        "SAMPLE_LOGPROBS": "1",
        "CAPTURE_SEED": "7",
        "CODEC_MODE": "lossless",
    }
    for args in make_teacher_commands(**variables):
        assert option(args, "--capture") == "sample" and option(args, "--samples") == "8"
        assert option(args, "--sample-temperature") == "1.5" and option(args, "--seed") == "7"
        assert option(args, "--codec-mode") == "lossless" and "--sample-logprobs" in args
        for unset in ("--top-k", "--top-p", "--min-k", "--max-k", "--logprob-step", "--sqrt-step"):
            assert unset not in args, (unset, args)


@needs_make
def test_make_defaults_are_the_top_64_capture_and_nothing_else():
    for args in make_teacher_commands():
        assert option(args, "--capture") == "topk" and option(args, "--top-k") == "64"
        for unset in (
            "--top-p",
            "--samples",
            "--sample-logprobs",
            "--seed",
            "--codec-mode",
            "--logprob-step",
            "--sqrt-step",
        ):
            assert unset not in args, (unset, args)
    assert option(make_teacher_commands(CAPTURE="hybrid")[0], "--top-k") is None  # hybrid's own head of 16
    assert "--sample-logprobs" not in make_teacher_commands(CAPTURE="sample", SAMPLE_LOGPROBS="0")[0]


def accepted_settings(args: list[str]) -> TeacherCacheConfig:
    """The settings ``distill teacher-cache args`` resolves to; raises what the CLI would refuse with."""
    return TeacherCacheConfig(**main.commands["teacher-cache"].make_context("teacher-cache", list(args)).params)


@needs_make
@pytest.mark.parametrize("variables", [{}, EVERY_VARIABLE], ids=["defaults", "every-variable"])
@pytest.mark.parametrize("strategy", ["topk", "topp", "sample", "hybrid"])
def test_every_capture_command_the_makefile_writes_is_accepted_by_the_cli(strategy, variables):
    for args in make_teacher_commands(CAPTURE=strategy, **variables):
        spec = accepted_settings(args).capture_spec()
        assert spec.strategy == strategy
        if strategy in ("topk", "hybrid"):
            assert spec.k == (4 if variables else {"topk": 64, "hybrid": 16}[strategy])
        if variables and strategy in ("sample", "hybrid"):
            assert (spec.samples, spec.sample_temperature, spec.seed) == (8, 1.5, 7)
        if variables and strategy == "sample":
            assert spec.sample_logprobs
        if variables and strategy == "topp":
            assert (spec.top_p, spec.min_k, spec.max_k) == (0.9, 2, 12)


@needs_make
@pytest.mark.parametrize("variables", list(CODEC_VARIABLES.values()), ids=list(CODEC_VARIABLES))
def test_every_codec_command_the_makefile_writes_is_accepted_by_the_cli(variables):
    for args in make_teacher_commands(**variables):
        codec = accepted_settings(args).codec_settings()
        if "CODEC_MODE" in variables:
            assert codec.mode == variables["CODEC_MODE"]
        if "LOGPROB_STEP" in variables:  # a step alone brings its own mode
            assert (codec.mode, codec.logprob_step) == ("quantized", 0.25)
        if "SQRT_STEP" in variables:
            assert (codec.mode, codec.sqrt_step) == ("sqrt", 0.01)


@needs_make
def test_make_nproc_runs_both_teacher_passes_through_torchrun():
    settings = {"TEACHER": "models/t", "DATASET": "d.jsonl", "EVAL_DATASET": "e.jsonl", "NPROC": "2"}
    printed, output = make_dry_run("teacher-cache", settings, MAKE_ENV_LEFT_OUT | {"NPROC"})
    assert printed == []  # no plain distill command left
    assert output.count("/torchrun --nproc-per-node 2 -m pipeline teacher-cache --teacher models/t") == 2, output
    single, _ = make_dry_run("teacher-cache", {**settings, "NPROC": "1"}, MAKE_ENV_LEFT_OUT | {"NPROC"})
    assert [args[0] for args in single] == ["teacher-cache", "teacher-cache"]
