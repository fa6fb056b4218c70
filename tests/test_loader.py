"""Batches read ahead in DataLoader workers: the same batches, in the same order, whatever the number of workers."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import run_cli

import pipeline
from pipeline.cache import shuffled_seq_indices
from pipeline.loader import batches, run_indices
from pipeline.teachers import OneTeacher, TeacherEnsemble


def take(stream, count: int) -> list[dict]:
    return list(itertools.islice(stream, count))


def same(first, second) -> bool:
    if isinstance(first, torch.Tensor):
        return torch.equal(first, second)
    if isinstance(first, dict):
        return first.keys() == second.keys() and all(same(first[key], second[key]) for key in first)
    if isinstance(first, list):
        return len(first) == len(second) and all(same(a, b) for a, b in zip(first, second, strict=True))
    return first == second


def test_the_run_indices_are_the_rows_the_in_process_reader_reads(train_cache):
    cache = pipeline.open_cache(train_cache)
    teacher = OneTeacher(cache)
    rows = len(cache)
    expected = [*shuffled_seq_indices(cache.manifest, 5, 0), *shuffled_seq_indices(cache.manifest, 5, 1)]
    assert list(itertools.islice(run_indices(teacher, 5, 0, None), 2 * rows)) == expected
    assert list(itertools.islice(run_indices(teacher, 5, rows - 3, None), 6)) == expected[rows - 3 : rows + 3]


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("workers", [1, 3])
@pytest.mark.parametrize("start", [0, 13])
def test_workers_give_the_batches_of_the_in_process_reader(train_cache, workers, start):
    teacher = OneTeacher(pipeline.open_cache(train_cache))
    cpu = torch.device("cpu")
    count = 2 * len(teacher.cache) // 3 + 2  # past an epoch's end
    reference = take(batches(teacher, 7, start, 3, cpu), count)
    ahead = take(batches(teacher, 7, start, 3, cpu, workers=workers, prefetch=2), count)
    assert len(ahead) == count and all(same(a, b) for a, b in zip(reference, ahead, strict=True))


def test_workers_serve_an_ensemble_as_it_reads_itself(train_cache):
    cache = pipeline.open_cache(train_cache)
    teacher = TeacherEnsemble((OneTeacher(cache), OneTeacher(cache)), (0.5, 0.5), "mean_prob")
    cpu = torch.device("cpu")
    reference = take(teacher.batches(1, 0, 4, cpu), 5)
    ahead = take(batches(teacher, 1, 0, 4, cpu, workers=2), 5)
    assert all(same(a, b) for a, b in zip(reference, ahead, strict=True))


def test_a_student_trained_with_data_workers_equals_one_trained_without(train_cache, student_config_dir, tmp_path):
    import json

    runs = {}
    for workers in ("0", "2"):
        out = tmp_path / f"workers-{workers}"
        result = run_cli(
            "student-train", "--cache", str(train_cache), "--student", str(student_config_dir), "--out", str(out),
            "--max-steps", "4", "--batch-size", "2", "--log-every", "1", "--data-workers", workers,
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        runs[workers] = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert runs["0"] == runs["2"]
