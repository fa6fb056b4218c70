"""Smoke test of bench/quality.py: its --fast mode runs every arm end to end in seconds."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CACHE_ARMS = ("topk-8", "topk-64", "topp-0.99", "sample-8", "sample-32", "hybrid-8+24", "full-cache")


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    folder = tmp_path_factory.mktemp("quality")
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "quality.py"),
            "--fast",
            "--arms",
            "standard,full-cache",
            "--work",
            str(folder / "work"),
            "--json",
            str(folder / "quality.json"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads((folder / "quality.json").read_text()), result.stdout


def test_every_arm_is_trained_and_measured_against_the_live_teacher(fast_run):
    figures, _ = fast_run
    assert set(figures["runs"]) == {"ce", "online", *CACHE_ARMS}
    for name, runs in figures["runs"].items():
        assert len(runs) == 1, name
        run = runs[0]
        for key in ("kl", "perplexity", "top1_agreement", "ece"):
            assert math.isfinite(run[key]), (name, key)
        assert run["kl"] > 0 and run["perplexity"] > 1 and 0 <= run["top1_agreement"] <= 1 and 0 <= run["ece"] <= 1
    for name in CACHE_ARMS:
        assert figures["summary"][name]["bytes_per_token"] > 0, name


def test_the_gain_is_measured_from_ce_to_online(fast_run):
    summary = fast_run[0]["summary"]
    assert summary["ce"]["recovered"][0] == pytest.approx(0.0)
    assert summary["online"]["recovered"][0] == pytest.approx(1.0)
    assert summary["online"]["kl_minus_online"][0] == 0.0


def test_a_lossless_cache_of_the_whole_distribution_trains_the_online_student(fast_run):
    # Same initialisation, rows, order and optimizer: only the path of the target differs.
    runs = fast_run[0]["runs"]
    assert runs["full-cache"][0]["kl"] == pytest.approx(runs["online"][0]["kl"], rel=2e-3)


def test_the_report_prints_the_table_and_a_verdict_per_cache(fast_run):
    _, stdout = fast_run
    assert "| method | bytes/token |" in stdout and "gain recovered" in stdout
    for name in CACHE_ARMS:
        assert f"\n{name}: recovers" in stdout, name
    assert "target >= 99% at fewer bytes than top-64" in stdout
