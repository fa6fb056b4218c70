"""Chat data in the teacher pass: the chat template, one BOS, and the loss mask of the assistant's tokens."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import make_sentences, run_cli

from pipeline import chat
from pipeline.store import reader

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<eos>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
# A template that renders the last turn apart from the others: its prefixes are not prefixes of the whole.
UNSTABLE = (
    "{{ bos_token }}{% for m in messages %}{% if loop.last %}[{{ m['role'] }}]{% else %}<{{ m['role'] }}>"
    "{% endif %}{{ m['content'] }}<eos>{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
)


def with_template(teacher_dir, folder, template):
    shutil.copytree(teacher_dir, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def squeeze(text: str) -> str:
    """Text without spaces or the byte-level space marker, to compare decodings of any tokenizer."""
    return text.replace(" ", "").replace("\u0120", "")


def conversations(count: int, seed: int) -> list[list[dict[str, str]]]:
    texts = make_sentences(count * 3, seed)
    return [
        [
            {"role": "system", "content": texts[3 * i]},
            {"role": "user", "content": texts[3 * i + 1]},
            {"role": "assistant", "content": texts[3 * i + 2]},
        ]
        for i in range(count)
    ]


@pytest.mark.parametrize(("template", "method"), [(TEMPLATE, "prefix_spans"), (UNSTABLE, "content_search")])
def test_the_assistant_tokens_are_found_and_only_they(teacher_dir, tmp_path, template, method):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(with_template(teacher_dir, tmp_path / "t", template)))
    stats = chat.ChatStats()
    for messages in conversations(4, 1):
        ids, mask = chat.tokenize_chat(tokenizer, messages, stats)
        assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
        assert ids[-1] == tokenizer.eos_token_id and not mask[-1]
        assistant = squeeze(tokenizer.decode([i for i, keep in zip(ids, mask, strict=True) if keep]))
        others = squeeze(tokenizer.decode([i for i, keep in zip(ids, mask, strict=True) if not keep]))
        content = squeeze(messages[2]["content"])
        assert assistant.startswith(content)  # the content, then at most the turn's closing token
        assert len(assistant) <= len(content) + len("<eos>")
        assert squeeze(messages[1]["content"]) in others and content not in others
    assert getattr(stats, method) == 4


def test_a_chat_cache_stores_the_mask_of_each_target_token(teacher_dir, tmp_path):
    teacher = with_template(teacher_dir, tmp_path / "teacher", TEMPLATE)
    dataset = tmp_path / "chat.jsonl"
    talks = conversations(12, 2)
    dataset.write_text("".join(json.dumps({"messages": messages}) + "\n" for messages in talks))
    cache = tmp_path / "cache"
    result = run_cli(
        "teacher-cache", "--teacher", str(teacher), "--dataset", str(dataset), "--out", str(cache),
        "--chat-template", "--seq-len", "16", "--top-k", "4", "--shard-tokens", "64",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    manifest = reader.read_manifest(cache)
    assert manifest.raw["packing"]["loss_mask"].startswith("assistant turns")
    rows = [
        reader.decode_checked_row(cells, manifest, entry.name)
        for entry in manifest.shards
        for _, cells in reader.iter_shard_frames(cache, entry, manifest)
    ]
    # The stream the teacher pass packed, rebuilt: every token and its assistant mask, in order.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(teacher))
    stream_ids, stream_mask = [], []
    for messages in talks:
        ids, mask = chat.tokenize_chat(tokenizer, messages, chat.ChatStats())
        stream_ids += ids
        stream_mask += mask
    for number, row in enumerate(rows):
        start = number * 16
        assert row.input_ids.tolist() == stream_ids[start : start + 16]
        following = stream_mask[start + 1 : start + 17]
        expected = following + [False] * (16 - len(following))
        assert row.loss_mask.tolist() == expected  # position t: whether token t + 1 is the assistant's
    assert 0 < np.mean([row.loss_mask.mean() for row in rows]) < 0.6


def test_chat_options_are_refused_without_a_template(teacher_dir, tmp_path):
    dataset = tmp_path / "chat.jsonl"
    dataset.write_text(json.dumps({"messages": conversations(1, 3)[0]}) + "\n")
    result = run_cli(
        "teacher-cache", "--teacher", str(teacher_dir), "--dataset", str(dataset), "--out", str(tmp_path / "c"),
        "--chat-template", "--seq-len", "16",
    )  # fmt: skip
    assert result.exit_code == 1 and "has no chat template" in result.output
    assert not (tmp_path / "c").exists()
    text = tmp_path / "text.jsonl"
    text.write_text(json.dumps({"messages": "not a list"}) + "\n")
    teacher = with_template(teacher_dir, tmp_path / "teacher", TEMPLATE)
    result = run_cli(
        "teacher-cache", "--teacher", str(teacher), "--dataset", str(text), "--out", str(tmp_path / "c"),
        "--chat-template", "--seq-len", "16",
    )  # fmt: skip
    assert result.exit_code == 1 and "not a list of {role, content} messages" in result.output


def test_a_killed_chat_pass_resumes_mid_conversation_to_the_same_bytes(teacher_dir, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from pipeline.store.atomic import CRASH_ENV

    teacher = with_template(teacher_dir, tmp_path / "teacher", TEMPLATE)
    dataset = tmp_path / "chat.jsonl"
    dataset.write_text("".join(json.dumps({"messages": m}) + "\n" for m in conversations(12, 4)))
    args = ["--teacher", str(teacher), "--dataset", str(dataset), "--chat-template", "--seq-len", "16"]
    args += ["--top-k", "4", "--shard-tokens", "48"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert run_cli("teacher-cache", *args, "--out", str(whole)).exit_code == 0
    child = subprocess.run(
        [sys.executable, "-m", "pipeline", "-q", "teacher-cache", *args, "--out", str(resumed)],
        env={**os.environ, CRASH_ENV: "shard-after-rename:3"},
        capture_output=True,
        text=True,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    assert run_cli("teacher-cache", *args, "--out", str(resumed)).exit_code == 0
    for path in [*sorted(whole.glob("shard-*.arrow")), whole / "manifest.json"]:
        assert (resumed / path.name).read_bytes() == path.read_bytes(), path.name


def masked_batch(seed: int, vocab: int = 40) -> dict:
    import torch

    from pipeline.capture import capture_topk

    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (2, 8), generator=generator)
    ids, logprobs, tail = capture_topk(torch.randn(16, vocab, generator=generator) * 3, 4)
    mask = torch.tensor([[0, 0, 1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0, 1, 0]], dtype=torch.bool)
    return {
        "input_ids": input_ids,
        "ids": ids.reshape(2, 8, 4),
        "valid": torch.ones(2, 8, 4, dtype=torch.bool),
        "logprobs": logprobs.reshape(2, 8, 4),
        "tail_logmass": tail.reshape(2, 8),
        "loss_mask": mask,
    }


def test_masked_positions_change_nothing_in_the_student_step():
    import torch
    from helpers import tiny_student

    from pipeline.models import LMHead
    from pipeline.student import train_step_loss

    batch = masked_batch(0)
    other = {name: value.clone() for name, value in batch.items()}
    scrambled = masked_batch(1)  # other teacher targets, everywhere the mask is off
    keep = batch["loss_mask"]
    for name in ("ids", "logprobs"):
        other[name][~keep] = scrambled[name][~keep]
    other["tail_logmass"][~keep] = scrambled["tail_logmass"][~keep]
    results = []
    for values in (batch, other):
        torch.manual_seed(0)
        model = tiny_student()
        losses = train_step_loss(LMHead(model), values, 0.5, 2.0, 5, 1.0, None)
        results.append((losses, [p.grad.clone() for p in model.parameters()]))
    (first, first_grads), (second, second_grads) = results
    assert first == second
    assert all(torch.equal(a, b) for a, b in zip(first_grads, second_grads, strict=True))
    unmasked = {name: value for name, value in other.items() if name != "loss_mask"}
    torch.manual_seed(0)
    assert train_step_loss(LMHead(tiny_student()), unmasked, 0.5, 2.0, 5, 1.0, None) != second


def test_a_student_trains_on_a_chat_cache(teacher_dir, student_config_dir, tmp_path):
    teacher = with_template(teacher_dir, tmp_path / "teacher", TEMPLATE)
    dataset = tmp_path / "chat.jsonl"
    dataset.write_text("".join(json.dumps({"messages": m}) + "\n" for m in conversations(10, 6)))
    cache = tmp_path / "cache"
    result = run_cli(
        "teacher-cache", "--teacher", str(teacher), "--dataset", str(dataset), "--out", str(cache),
        "--chat-template", "--seq-len", "16", "--top-k", "4",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    result = run_cli(
        "student-train", "--cache", str(cache), "--student", str(student_config_dir), "--out", str(tmp_path / "s"),
        "--max-steps", "2", "--batch-size", "2", "--eval-cache", str(cache),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    evaluated = json.loads((tmp_path / "s" / "eval.json").read_text())
    masked = sum(reader.decode_checked_row(cells, manifest, entry.name).loss_mask.sum()
                 for manifest in [reader.read_manifest(cache)] for entry in manifest.shards
                 for _, cells in reader.iter_shard_frames(cache, entry, manifest))  # fmt: skip
    assert evaluated["positions"] == masked  # evaluation counts the assistant's positions alone


@pytest.mark.parametrize("column", ["loss_mask", "document_starts"])
def test_a_bit_column_with_bits_past_the_row_is_refused(column):
    import zstandard

    from pipeline import codec_v2
    from pipeline.capture_spec import CaptureSpec
    from pipeline.errors import CacheError
    from pipeline.rows import SparseRow

    spec = CaptureSpec("topk", k=2)
    settings = codec_v2.CodecSettings.for_mode("lossless")
    row = SparseRow(
        input_ids=np.arange(10),
        ids=np.tile([0, 1], (10, 1)),
        logprobs=np.log(np.tile([0.5, 0.25], (10, 1))).astype(np.float32),
        tail_logmass=np.full(10, np.log(0.25), dtype=np.float32),
        **{column: np.ones(10, dtype=bool)},
    )
    frames = codec_v2.encode_row(row, spec, settings)
    decoded = codec_v2.decode_row(frames, 10, spec, settings, 50)
    assert getattr(decoded, column).all()
    frames[column] = zstandard.ZstdCompressor().compress(bytes([0xFF, 0xFF]))  # bits 10-15 set past T = 10
    with pytest.raises(CacheError, match=f"a {column} frame sets bits past the row's last position"):
        codec_v2.decode_row(frames, 10, spec, settings, 50)
