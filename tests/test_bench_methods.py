"""Smoke test of bench/methods.py: its --fast mode trains every method arm end to end in seconds."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    folder = tmp_path_factory.mktemp("methods")
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "methods.py"), "--fast", "--json", str(folder / "methods.json")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads((folder / "methods.json").read_text()), result.stdout


def test_every_method_is_trained_and_measured_against_forward_kl(fast_run):
    from methods import ARMS

    figures, stdout = fast_run
    assert set(figures["runs"]) == set(ARMS)
    for name, runs in figures["runs"].items():
        assert len(runs) == 1 and all(math.isfinite(runs[0][key]) for key in ("kl", "perplexity")), name
    summary = figures["summary"]
    assert summary["forward_kl"]["kl_minus_forward_kl"][0] == 0.0
    assert "| method | KL(teacher‖student) |" in stdout


def test_each_method_changes_what_the_student_learns(fast_run):
    runs = fast_run[0]["runs"]
    reference = runs["forward_kl"][0]["kl"]
    for name in ("reverse_kl", "tvd", "ensemble-mean_prob", "ensemble-mean_logprob", "curriculum", "t4"):
        assert runs[name][0]["kl"] != pytest.approx(reference, rel=1e-6), name
