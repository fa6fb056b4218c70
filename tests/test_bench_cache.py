"""Smoke test of bench/bench_cache.py's teacher-pass measurement on a tiny model."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def test_the_teacher_pass_is_measured_against_a_bare_forward():
    from bench_cache import bench_teacher
    from helpers import tiny_student

    figures = bench_teacher(tiny_student(), torch.randint(0, 40, (2, 16)), k=4, repeats=1)
    assert figures["throughput_ratio"] > 0 and figures["tokens_per_batch"] == 32
    assert figures["bytes_per_token"] > 0
