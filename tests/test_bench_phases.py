"""Smoke test of bench/teacher_phases.py: every phase of the teacher pass is timed and the shares add up."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_every_phase_is_timed_and_the_shares_add_up(teacher_dir, tmp_path):
    out = tmp_path / "phases.json"
    args = ["--teacher", str(teacher_dir), "--batch", "2", "--seq-len", "16", "--repeats", "1", "--json", str(out)]
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "teacher_phases.py"), *args], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    figures = json.loads(out.read_text())
    assert set(figures["shares"]) == {"backbone forward", "LM head", "capture", "encode", "write"}
    assert sum(figures["shares"].values()) == pytest.approx(1.0)
    assert all(seconds > 0 for seconds in figures["seconds"].values())
    assert "| phase | share of the pass |" in result.stdout
