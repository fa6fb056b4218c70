"""``distill generate``: keyed sampling, the output dataset, resume after kill -9, chat prompts, refusals."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_sentences, run_cli

from pipeline.generate import DATA_DIR, INFO_NAME
from pipeline.sampling import draw_keys, keyed_next_tokens
from pipeline.store.atomic import CRASH_ENV

SETTINGS = ("--max-prompts", "7", "--num-return-sequences", "2", "--max-new-tokens", "6")
LAYOUT = ("--prompts-per-part", "3", "--batch-size", "4")


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    texts = make_sentences(9, seed=5)
    texts.insert(2, "   ")  # a blank record: counted as a record, never a prompt
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    return path


def generate(teacher: Path, dataset: Path, out: Path, *options: str):
    return run_cli("generate", "--teacher", str(teacher), "--dataset", str(dataset), "--out", str(out), *options)


def parts(out: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted((out / DATA_DIR).iterdir())}


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for data in parts(out).values() for line in data.decode().splitlines()]


@pytest.fixture(scope="module")
def reference(teacher_dir, prompts, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("generated") / "out"
    result = generate(teacher_dir, prompts, out, *SETTINGS, *LAYOUT)
    assert result.exit_code == 0, result.output
    return out


def test_keyed_draws_follow_the_distribution_and_stay_in_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(20_000, 1)
    keys = draw_keys(torch.arange(20_000), torch.zeros(20_000, dtype=torch.int64), 1, 0, 1)
    drawn = keyed_next_tokens(logits, 1.0, 1.0, 7, keys)
    frequencies = torch.bincount(drawn, minlength=4).double() / 20_000
    assert torch.allclose(frequencies, torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64), atol=0.015)
    nucleus = keyed_next_tokens(logits, 1.0, 0.7, 7, keys)  # 0.5 + 0.3 reach 0.7: ids 0 and 1 only
    assert set(nucleus.tolist()) == {0, 1}
    assert abs(float((nucleus == 0).double().mean()) - 0.5 / 0.8) < 0.015
    assert torch.equal(keyed_next_tokens(logits[:5], 1.0, 1.0, 7, keys[:5]), drawn[:5])  # any batch: same draws
    assert not torch.equal(keyed_next_tokens(logits, 1.0, 1.0, 8, keys), drawn)  # another seed: other draws
    assert set(keyed_next_tokens(logits, 1.0, 1e-9, 7, keys).tolist()) == {0}  # a tiny nucleus is greedy


def test_generate_writes_a_dataset_that_datasets_and_the_teacher_pass_read(reference, teacher_dir, tmp_path):
    info = json.loads((reference / INFO_NAME).read_bytes())
    assert info["complete"] and len(info["parts"]) == 3  # 7 records, 3 per part
    written = rows(reference)
    assert len(written) == 2 * 6 == info["totals"]["rows"]  # the blank record is no prompt
    assert sorted({row["prompt_index"] for row in written}) == [0, 1, 3, 4, 5, 6]
    for row in written:
        assert row["text"] == row["prompt"] + row["response"]
        assert row["finish_reason"] in ("eos", "length") and 1 <= row["response_tokens"] <= 6
        assert row["gen_temperature"] == 1.0 and row["seed"] == 0
    from datasets import load_dataset

    loaded = load_dataset("json", data_dir=str(reference / DATA_DIR), split="train")
    assert loaded.num_rows == 12 and "response" in loaded.column_names
    result = run_cli(
        "teacher-cache", "--teacher", str(teacher_dir), "--dataset", str(reference / DATA_DIR),
        "--out", str(tmp_path / "cache"), "--seq-len", "8", "--top-k", "4",
    )  # fmt: skip
    assert result.exit_code == 0, result.output


def test_the_same_seed_writes_the_same_text_and_another_seed_other_text(reference, teacher_dir, prompts, tmp_path):
    again = tmp_path / "again"
    assert generate(teacher_dir, prompts, again, *SETTINGS, *LAYOUT).exit_code == 0
    assert parts(again) == parts(reference)
    other = tmp_path / "other"
    assert generate(teacher_dir, prompts, other, *SETTINGS, *LAYOUT, "--seed", "1").exit_code == 0
    assert [row["response"] for row in rows(other)] != [row["response"] for row in rows(reference)]


def test_a_killed_generate_resumes_to_identical_output(reference, teacher_dir, prompts, tmp_path):
    out = tmp_path / "out"
    args = ["--teacher", str(teacher_dir), "--dataset", str(prompts), "--out", str(out), *SETTINGS, *LAYOUT]
    child = subprocess.run(
        [sys.executable, "-m", "pipeline", "-q", "generate", *args],
        env={**os.environ, CRASH_ENV: "generate-part:2"},
        capture_output=True,
        text=True,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    assert len(json.loads((out / INFO_NAME).read_bytes())["parts"]) == 2
    result = run_cli("generate", *args)
    assert result.exit_code == 0, result.output
    assert parts(out) == parts(reference)
    again = run_cli("generate", *args)
    assert again.exit_code == 0 and "already complete" in again.output


def test_chat_prompts_are_rendered_with_one_bos_and_answered_as_the_assistant(teacher_dir, tmp_path):
    chat_teacher = tmp_path / "chat-teacher"
    shutil.copytree(teacher_dir, chat_teacher)
    config_path = chat_teacher / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = (
        "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    config_path.write_text(json.dumps(config))
    dataset = tmp_path / "chat.jsonl"
    conversations = [[{"role": "user", "content": text}] for text in make_sentences(3, seed=8)]
    dataset.write_text("".join(json.dumps({"messages": messages}) + "\n" for messages in conversations))
    out = tmp_path / "out"
    result = generate(chat_teacher, dataset, out, "--messages-column", "messages", "--max-new-tokens", "4")
    assert result.exit_code == 0, result.output
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(chat_teacher))
    for row, messages in zip(rows(out), conversations, strict=True):
        assert row["messages"][:-1] == messages and row["messages"][-1]["role"] == "assistant"
        assert row["messages"][-1]["content"] == row["response"]
        ids = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        (("--gen-temperature", "0"), "--gen-temperature must be > 0"),
        (("--gen-top-p", "1.5"), "--gen-top-p must be in (0, 1]"),
        (("--num-return-sequences", "0"), "--num-return-sequences must be at least 1"),
        (("--messages-column", "text"), "has no chat template"),
        (("--max-new-tokens", "500"), "leaves no room for a prompt"),
    ],
)
def test_bad_settings_are_refused_in_one_line(teacher_dir, prompts, tmp_path, options, fragment):
    result = generate(teacher_dir, prompts, tmp_path / "out", *options)
    assert result.exit_code == 1
    assert fragment in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_other_settings_on_an_output_are_refused_and_overwrite_replaces_it(reference, teacher_dir, prompts, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    result = generate(teacher_dir, prompts, out, *SETTINGS, *LAYOUT, "--seed", "3")
    assert result.exit_code == 1 and "other settings" in result.output
    assert parts(out) == parts(reference)
    assert generate(teacher_dir, prompts, out, *SETTINGS, *LAYOUT, "--seed", "3", "--overwrite").exit_code == 0
    assert parts(out) != parts(reference)
    (tmp_path / "stranger").mkdir()
    (tmp_path / "stranger" / "notes.txt").write_text("mine")
    refused = generate(teacher_dir, prompts, tmp_path / "stranger", *SETTINGS, "--overwrite")
    assert refused.exit_code == 1 and "did not write" in refused.output
    assert (tmp_path / "stranger" / "notes.txt").read_text() == "mine"


CAPTURE = ("--capture-top-k", "5", "--capture-seq-len", "40", "--capture-shard-tokens", "120")


def cache_rows(cache: Path):
    from pipeline.store import reader

    manifest = reader.read_manifest(cache)
    return [
        (cells, reader.decode_checked_row(cells, manifest, entry.name))
        for entry in manifest.shards
        for _, cells in reader.iter_shard_frames(cache, entry, manifest)
    ]


@pytest.fixture(scope="module")
def captured(teacher_dir, prompts, tmp_path_factory) -> tuple[Path, Path]:
    work = tmp_path_factory.mktemp("captured")
    out, cache = work / "out", work / "cache"
    result = generate(teacher_dir, prompts, out, *SETTINGS, *LAYOUT, "--capture-out", str(cache), *CAPTURE)
    assert result.exit_code == 0, result.output
    return out, cache


def test_the_capture_cache_holds_the_teachers_distributions_over_each_sample(captured, reference, teacher_dir):
    out, cache = captured
    assert parts(out) == parts(reference)  # capturing changes nothing in the generated text
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(teacher_dir))
    written, stored = rows(out), cache_rows(cache)
    assert len(stored) == len(written) == 12
    for sample, (cells, row) in zip(written, stored, strict=True):
        assert (cells["source_record"], cells["record_offset"]) == (sample["prompt_index"], sample["sample_index"])
        prompt = tokenizer(sample["prompt"])["input_ids"]
        length, count = len(prompt), sample["response_tokens"]
        assert row.input_ids[:length].tolist() == prompt
        assert row.loss_mask.sum() == count and row.loss_mask[length - 1 : length + count - 1].all()
        with torch.no_grad():
            logits = model(input_ids=torch.from_numpy(row.input_ids[None, : length + count])).logits[0]
        reference_logprobs = torch.log_softmax(logits.float(), dim=-1)
        for position in range(length + count - 1):
            ids = torch.from_numpy(row.ids[position])
            # The stored ids are the teacher's top 5 (up to near-ties between the cached and full forward).
            assert reference_logprobs[position][ids].min() >= reference_logprobs[position].topk(5).values[-1] - 1e-3
            stored_root = torch.from_numpy(row.logprobs[position]).exp().sqrt()
            # The codec's default sqrt mode keeps each probability's square root within 1/256.
            assert torch.allclose(stored_root, reference_logprobs[position][ids].exp().sqrt(), atol=1 / 256 + 1e-4)


@pytest.mark.parametrize("point", ["generate-part:2", "shard-after-rename:1"])
def test_a_killed_capturing_generate_resumes_both_outputs_to_the_same_bytes(
    captured, teacher_dir, prompts, tmp_path, point
):
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = ["--teacher", str(teacher_dir), "--dataset", str(prompts), "--out", str(out), *SETTINGS, *LAYOUT]
    args += ["--capture-out", str(cache), *CAPTURE]
    child = subprocess.run(
        [sys.executable, "-m", "pipeline", "-q", "generate", *args],
        env={**os.environ, CRASH_ENV: point},
        capture_output=True,
        text=True,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    result = run_cli("generate", *args)
    assert result.exit_code == 0, result.output
    assert parts(out) == parts(captured[0])
    for path in [*sorted(captured[1].glob("shard-*.arrow")), captured[1] / "manifest.json"]:
        assert (cache / path.name).read_bytes() == path.read_bytes(), path.name


def test_make_generate_passes_its_variables():
    from helpers import make_dry_run

    settings = {"TEACHER": "models/t", "PROMPTS": "p.jsonl", "SYNTHETIC": "out/s", "NUM_RETURN": "3"}
    left_out = {"TEACHER", "PROMPTS", "SYNTHETIC", "NUM_RETURN", "MAKEFLAGS", "MFLAGS", "MAKELEVEL"}
    (command,), output = make_dry_run("generate", {**settings, "GENERATE_ARGS": "--seed 4"}, left_out)
    assert command[:7] == ["generate", "--teacher", "models/t", "--dataset", "p.jsonl", "--out", "out/s"], output
    assert command[command.index("--num-return-sequences") + 1] == "3" and command[-2:] == ["--seed", "4"]
