"""Attention kept within documents: the mask and positions, the teacher pass's stored boundaries and
distributions against each document run alone, and the student pass keeping to the same boundaries."""

from __future__ import annotations

import itertools
import json
import shutil

import numpy as np
import pytest
import torch
from conftest import run_cli

from pipeline.models import LMHead, document_attention
from pipeline.store import reader

OPTIONS = ("--seq-len", "24", "--top-k", "4", "--max-tokens", "480", "--document-attention")


def test_the_mask_and_positions_restart_at_each_document():
    starts = torch.tensor([[False, False, True, False, False, True]])
    made = document_attention(starts)
    assert made["position_ids"].tolist() == [[0, 1, 0, 1, 2, 0]]
    mask = made["attention_mask"][0, 0]
    assert mask[4].tolist() == [False, False, True, True, True, False]  # its own document, up to itself
    assert mask[1].tolist() == [True, True, False, False, False, False]
    assert mask[5].tolist() == [False] * 5 + [True]


@pytest.fixture(scope="module")
def document_cache(teacher_dir, corpus, tmp_path_factory):
    cache = tmp_path_factory.mktemp("documents") / "cache"
    result = run_cli(
        "teacher-cache", "--teacher", str(teacher_dir), "--dataset", str(corpus["train"]), "--out", str(cache), *OPTIONS
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return cache


def test_each_document_is_captured_as_if_it_were_alone(document_cache, teacher_dir):
    from transformers import AutoModelForCausalLM

    manifest = reader.read_manifest(document_cache)
    assert manifest.raw["packing"]["cross_document_attention"] is False
    model = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32).eval()
    segments = 0
    for entry in manifest.shards:
        for _, cells in reader.iter_shard_frames(document_cache, entry, manifest):
            row = reader.decode_checked_row(cells, manifest, entry.name)
            starts = np.flatnonzero(row.document_starts).tolist()
            bounds = sorted({0, *starts, len(row.input_ids)})
            for begin, end in itertools.pairwise(bounds):
                segments += 1
                with torch.no_grad():
                    alone = model(input_ids=torch.from_numpy(row.input_ids[None, begin:end])).logits[0]
                logprobs = torch.log_softmax(alone.float(), dim=-1)
                ids = torch.from_numpy(row.ids[begin:end])
                fourth = logprobs.topk(4, dim=-1).values[:, -1:]  # the stored ids are the top 4 (up to near-ties)
                assert (logprobs.gather(1, ids) >= fourth - 1e-3).all()
                stored = torch.from_numpy(row.logprobs[begin:end]).exp().sqrt()
                assert torch.allclose(stored, logprobs.gather(1, ids).exp().sqrt(), atol=1 / 256 + 1e-4)
    assert segments > 2 * len(manifest.shards)  # rows do hold several documents


def test_the_student_keeps_to_the_documents_and_trains(document_cache, student_config_dir, tmp_path):
    from helpers import tiny_student

    head = LMHead(tiny_student())
    starts = torch.zeros(1, 10, dtype=torch.bool)
    starts[0, 4] = True
    first, second = torch.randint(0, 40, (1, 10)), torch.randint(0, 40, (1, 10))
    second[0, 4:] = first[0, 4:]  # the same second document after another first one
    with torch.no_grad():
        a, b = head.hidden_states(first, starts), head.hidden_states(second, starts)
        crossing = head.hidden_states(second)
    assert torch.allclose(a[0, 4:], b[0, 4:], atol=1e-6)
    assert not torch.allclose(a[0, 4:], crossing[0, 4:], atol=1e-4)
    result = run_cli(
        "student-train", "--cache", str(document_cache), "--student", str(student_config_dir),
        "--out", str(tmp_path / "s"), "--max-steps", "2", "--batch-size", "2", "--eval-cache", str(document_cache),
    )  # fmt: skip
    assert result.exit_code == 0, result.output


def test_a_sliding_window_shorter_than_the_rows_is_refused(teacher_dir, corpus, tmp_path):
    windowed = tmp_path / "teacher"
    shutil.copytree(teacher_dir, windowed)
    config = json.loads((windowed / "config.json").read_text())
    config["sliding_window"] = 8
    (windowed / "config.json").write_text(json.dumps(config))
    out = tmp_path / "cache"
    result = run_cli(
        "teacher-cache", "--teacher", str(windowed), "--dataset", str(corpus["train"]), "--out", str(out), *OPTIONS
    )  # fmt: skip
    assert result.exit_code == 1 and "window of 8 positions" in result.output
    assert not out.exists()
