"""Smoke test of ``bench/codec.py --fast``: a random tiny teacher, every capture and codec mode, in seconds."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from pipeline import codec_v2

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "codec.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_codec", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script runs
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def report(bench, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench-codec") / "codec.json"
    threads = torch.get_num_threads()
    result = bench.main(["--fast", "--repeats", "1", "--json", str(out)])
    assert torch.get_num_threads() == threads, "the benchmark leaves the caller's thread count alone"
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    return result


def test_fast_mode_measures_every_capture_and_every_codec_mode_for_top_64(bench, report: dict) -> None:
    measured = {(r["strategy"], r["params"]) for r in report["results"]}
    assert measured == {(case.name, case.params) for case in bench.CASES}
    top64 = [r for r in report["results"] if (r["strategy"], r["params"]) == ("topk", "k=64")]
    assert {r["codec"]["mode"] for r in top64} == set(codec_v2.MODES)
    steps = {r["codec"].get("logprob_step") for r in top64 if r["codec"]["mode"] == "quantized"}
    assert steps >= set(bench.QUANTIZED_STEPS)
    for case in bench.CASES:
        rows = [r for r in report["results"] if (r["strategy"], r["params"]) == (case.name, case.params)]
        assert sum(r["default_codec"] for r in rows) == 1, f"{case.params}: one row at the default codec"


def test_byte_split_adds_up_to_the_shard_files_and_arrow_overhead_is_positive(report: dict) -> None:
    for result in report["results"]:
        size = result["bytes_per_token"]
        assert size["ids"] + size["values"] + size["rest"] + size["arrow"] == pytest.approx(size["total"])
        assert size["ids"] > 0 and size["arrow"] > 0


def test_reconstruction_is_exact_for_counts_and_within_the_quantisation_bound_for_logprobs(report: dict) -> None:
    for result in report["results"]:
        capture, codec = result["capture"], result["codec"]
        if capture["strategy"] in ("sample", "hybrid"):
            assert result["kl_counts"] == 0
        else:
            assert result["kl_counts"] is None
        if capture["strategy"] == "sample" and not capture.get("sample_logprobs"):
            assert result["kl_logprobs"] is None
            continue
        # A log-probability error of at most step / 2 moves KL by at most step^2 / 2 per position;
        # float16 is far below that; other modes get a loose bound.
        bound = {"quantized": codec.get("logprob_step", 0) ** 2 / 2, "lossless": 1e-4}.get(codec["mode"], 0.05)
        assert 0 <= result["kl_logprobs"] <= result["kl_logprobs_max"] <= bound
        if capture["strategy"] == "topk":
            assert result["ids_per_position"] == capture["k"]


def test_speeds_and_targets_are_reported(report: dict) -> None:
    teacher = report["teacher_forward_tokens_per_s"]
    assert teacher["wall"] > 0 and teacher["at_full_share"] > 0
    assert all(r["encode_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0 for r in report["results"])
    assert {t["target"].split(":")[0] for t in report["targets"]} >= {"sampled N=32 without log-probs"}
    assert all(isinstance(t["met"], bool) for t in report["targets"])
