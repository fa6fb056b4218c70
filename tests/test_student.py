"""End-to-end student pass from a cache: it learns the teacher, never needs it, and refuses bad input."""

import json
import math
import shutil

import pytest
import torch
from conftest import run_cli
from helpers import tiny_student
from transformers import AutoConfig, AutoModelForCausalLM

TRAIN = ["--batch-size", "8", "--lr", "3e-3", "--seed", "0"]


def train(cache, student, out, *extra):
    result = run_cli(
        "student-train", "--cache", str(cache), "--student", str(student), "--out", str(out), *TRAIN, *extra
    )
    assert result.exit_code == 0, result.output
    return json.loads((out / "training.json").read_text())


@pytest.fixture(scope="module")
def kd_and_ce(train_cache, heldout_cache, student_config_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("students")
    kd = train(
        train_cache,
        student_config_dir,
        root / "kd",
        "--epochs",
        "3",
        "--alpha",
        "1.0",
        "--eval-cache",
        str(heldout_cache),
        "--save-every",
        "20",
    )
    ce = train(
        train_cache,
        student_config_dir,
        root / "ce",
        "--epochs",
        "3",
        "--alpha",
        "0.0",
        "--eval-cache",
        str(heldout_cache),
    )
    return root, kd, ce


def test_distilled_student_is_closer_to_the_teacher_than_a_ce_student(kd_and_ce):
    _, kd, ce = kd_and_ce
    assert kd["steps"] == ce["steps"] > 0
    assert kd["eval"]["kl"] < 0.7 * ce["eval"]["kl"], (kd["eval"], ce["eval"])


def test_final_student_loads_with_transformers(kd_and_ce, heldout_cache):
    from transformers import AutoTokenizer

    root, _, _ = kd_and_ce
    model = AutoModelForCausalLM.from_pretrained(str(root / "kd"))
    tokenizer = AutoTokenizer.from_pretrained(str(root / "kd"))
    assert (root / "kd" / "model.safetensors").exists()
    assert not list((root / "kd").rglob("*.bin")) and not list((root / "kd").rglob("*.pt"))
    ids = tokenizer("the teacher", return_tensors="pt")["input_ids"]
    assert model(ids).logits.shape[-1] == model.config.vocab_size


def test_metrics_are_logged(kd_and_ce):
    root, _, _ = kd_and_ce
    records = [json.loads(line) for line in (root / "kd" / "metrics.jsonl").read_text().splitlines()]
    assert records and {"step", "loss", "kd", "ce", "lr", "tokens_per_s"} <= set(records[0])
    assert records[-1]["loss"] < records[0]["loss"]
    ce_records = [json.loads(line) for line in (root / "ce" / "metrics.jsonl").read_text().splitlines()]
    assert ce_records[0]["kd"] is None


def test_loss_is_the_documented_mix(train_cache, student_config_dir, tmp_path):
    # alpha = 0.5: loss = 0.5 * kd + 0.5 * ce in every logged record.
    train(train_cache, student_config_dir, tmp_path / "mix", "--alpha", "0.5", "--max-steps", "3", "--log-every", "1")
    for line in (tmp_path / "mix" / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        assert record["loss"] == pytest.approx(0.5 * record["kd"] + 0.5 * record["ce"], rel=1e-5)


def test_resume_from_a_checkpoint_continues_the_same_run(train_cache, student_config_dir, tmp_path):
    straight = tmp_path / "straight"
    train(train_cache, student_config_dir, straight, "--max-steps", "6", "--alpha", "0.5")
    resumed = tmp_path / "resumed"
    train(train_cache, student_config_dir, resumed, "--max-steps", "6", "--alpha", "0.5", "--save-every", "3")
    # Throw away the finished model, keep the step-3 checkpoint, and resume from it.
    (resumed / "model.safetensors").unlink()
    shutil.rmtree(resumed / "checkpoints" / "step-0000006", ignore_errors=True)
    assert json.loads((resumed / "checkpoints" / "latest.json").read_text())["step"] == 3
    train(
        train_cache, student_config_dir, resumed, "--max-steps", "6", "--alpha", "0.5", "--save-every", "3", "--resume"
    )
    a = AutoModelForCausalLM.from_pretrained(str(straight)).state_dict()
    b = AutoModelForCausalLM.from_pretrained(str(resumed)).state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4)


def test_student_trains_with_the_teacher_deleted(train_cache, student_config_dir, teacher_dir, tmp_path):
    cache_copy = tmp_path / "cache"
    shutil.copytree(train_cache, cache_copy)
    moved = tmp_path / "teacher-gone"
    shutil.move(str(teacher_dir), moved)
    try:
        train(cache_copy, student_config_dir, tmp_path / "s", "--max-steps", "2")
    finally:
        shutil.move(str(moved), teacher_dir)


def test_a_version_1_cache_still_trains_a_student(student_config_dir, tmp_path):
    """Caches written by the previous release keep training students, evaluation included."""
    from pathlib import Path

    v1_cache = tmp_path / "v1-cache"
    shutil.copytree(Path(__file__).parent / "data" / "v1-cache", v1_cache)
    out = tmp_path / "s"
    train(v1_cache, student_config_dir, out, "--max-steps", "2", "--eval-cache", str(v1_cache))
    report = json.loads((out / "eval.json").read_text())
    assert report["kl"] > 0 and report["ce"] > 0


def test_student_config_overrides_apply(train_cache, student_config_dir, tmp_path):
    train(
        train_cache, student_config_dir, tmp_path / "s", "--max-steps", "1", "--student-config", "num_hidden_layers=1"
    )
    assert json.loads((tmp_path / "s" / "config.json").read_text())["num_hidden_layers"] == 1


def test_pretrained_student_with_weights_is_fine_tuned(train_cache, student_config_dir, tmp_path):
    first = tmp_path / "first"
    train(train_cache, student_config_dir, first, "--max-steps", "1")
    summary = train(train_cache, first, tmp_path / "second", "--max-steps", "1")
    assert summary["student_origin"] == "pretrained"


# ------------------------------------------------------------------ bad input


def student_args(cache, student, out) -> list[str]:
    return ["--cache", str(cache), "--student", str(student), "--out", str(out)]


def bad(*args: str) -> str:
    result = run_cli("student-train", *args)
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_mismatched_tokenizer_is_refused_before_training(
    train_cache, student_config_dir, other_tokenizer_dir, tmp_path
):
    message = bad(
        *student_args(train_cache, student_config_dir, tmp_path / "s"),
        "--tokenizer",
        str(other_tokenizer_dir),
    )
    assert "differs from the teacher's" in message
    assert not (tmp_path / "s").exists()


def test_student_folder_with_another_tokenizer_is_refused(
    train_cache, student_config_dir, other_tokenizer_dir, tmp_path
):
    student = tmp_path / "student"
    shutil.copytree(student_config_dir, student)
    for item in other_tokenizer_dir.iterdir():
        shutil.copy(item, student / item.name)
    assert "differs from the teacher's" in bad(
        "--cache", str(train_cache), "--student", str(student), "--out", str(tmp_path / "s")
    )


def test_cache_without_manifest_is_refused(student_config_dir, tmp_path):
    (tmp_path / "cache").mkdir()
    assert "not a cache" in bad(
        "--cache", str(tmp_path / "cache"), "--student", str(student_config_dir), "--out", str(tmp_path / "s")
    )


def test_missing_cache_is_refused(student_config_dir, tmp_path):
    assert "does not exist" in bad(
        "--cache", str(tmp_path / "nope"), "--student", str(student_config_dir), "--out", str(tmp_path / "s")
    )


def test_non_empty_output_is_refused(train_cache, student_config_dir, tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "notes.txt").write_text("keep")
    assert "not empty" in bad(
        "--cache", str(train_cache), "--student", str(student_config_dir), "--out", str(tmp_path / "s")
    )
    assert "student-train did not write (notes.txt)" in bad(
        "--cache", str(train_cache), "--student", str(student_config_dir), "--out", str(tmp_path / "s"), "--overwrite"
    )
    assert (tmp_path / "s" / "notes.txt").read_text() == "keep"


def test_student_with_too_few_logits_is_refused(train_cache, student_config_dir, tmp_path):
    message = bad(
        *student_args(train_cache, student_config_dir, tmp_path / "s"),
        "--student-config",
        "vocab_size=300",
    )
    assert "vocab_size=320" in message


def test_unknown_override_and_bad_options(train_cache, student_config_dir, tmp_path):
    common = ["--cache", str(train_cache), "--student", str(student_config_dir), "--out", str(tmp_path / "s")]
    assert "no field 'hidden_sizes'" in bad(*common, "--student-config", "hidden_sizes=3")
    assert "key=value" in bad(*common, "--student-config", "hidden_size")
    assert "--alpha" in bad(*common, "--alpha", "1.5")
    assert "--temperature" in bad(*common, "--temperature", "0")
    assert "not both" in bad(*common, "--epochs", "1", "--max-steps", "3")


def test_student_with_its_own_code_needs_trust_remote_code(train_cache, student_config_dir, tmp_path):
    from conftest import with_custom_code

    student = with_custom_code(student_config_dir, tmp_path / "custom-student")
    common = student_args(train_cache, student, tmp_path / "s")
    assert "--trust-remote-code" in bad(*common)
    result = run_cli("student-train", *common, "--max-steps", "1", "--trust-remote-code")
    assert result.exit_code == 0, result.output


def test_missing_student_path_is_refused(train_cache, tmp_path):
    assert "does not exist" in bad(
        "--cache", str(train_cache), "--student", str(tmp_path / "nope/"), "--out", str(tmp_path / "s")
    )


def test_damaged_tokenizer_copy_in_the_cache_is_refused(train_cache, student_config_dir, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(train_cache, cache)
    with open(cache / "tokenizer" / "tokenizer.json", "a") as handle:
        handle.write(" ")
    message = bad(*student_args(cache, student_config_dir, tmp_path / "s"))
    assert "tokenizer file 'tokenizer.json'" in message and "the cache is damaged" in message


# ------------------------------------------------------------------ every capture


def hybrid_rows(count: int, seq_len: int, vocab: int, head: int, draws: int, seed: int):
    """Rows as a hybrid capture decodes them: ``head`` most probable ids, then distinct ids drawn from
    the teacher outside the head (ascending, with counts), padded to the widest position."""
    import numpy as np

    from pipeline.rows import SparseRow

    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        logprobs = torch.log_softmax(torch.randn(seq_len, vocab, generator=generator) * 2, -1)
        top = logprobs.topk(head, dim=-1).indices
        outside = logprobs.exp().scatter(-1, top, 0.0)
        picks = torch.multinomial(outside, draws, replacement=True, generator=generator)
        counts = torch.zeros(seq_len, vocab, dtype=torch.int64).scatter_add_(1, picks, torch.ones_like(picks))
        width = head + int((counts > 0).sum(-1).max())
        ids = np.zeros((seq_len, width), dtype=np.int64)
        slot_counts = np.zeros((seq_len, width), dtype=np.int32)
        slot_logprobs = np.full((seq_len, width), -np.inf, dtype=np.float32)
        tails, lengths = np.zeros(seq_len, dtype=np.float32), np.zeros(seq_len, dtype=np.int32)
        for t in range(seq_len):
            drawn = torch.nonzero(counts[t]).squeeze(-1)
            kept = torch.cat([top[t], drawn])
            lengths[t] = len(kept)
            ids[t, : len(kept)] = kept.numpy()
            slot_counts[t, head : len(kept)] = counts[t, drawn].numpy()
            slot_logprobs[t, : len(kept)] = logprobs[t, kept].numpy()
            tails[t] = float(torch.logsumexp(logprobs[t].index_fill(0, kept, float("-inf")), 0))
        input_ids = torch.randint(0, vocab, (seq_len,), generator=generator).numpy()
        rows.append(SparseRow(input_ids, ids, slot_logprobs, tails, slot_counts, lengths))
    return rows


def hybrid_capture():
    from pipeline.capture_spec import CaptureSpec

    return CaptureSpec("hybrid", k=3, samples=6, sample_temperature=1.0, seed=0)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_chunked_step_on_a_sampled_cache_gives_the_gradient_of_the_full_loss(temperature):
    from pipeline.cache import stack_rows
    from pipeline.losses import loss_parts, next_token_labels, targets_from_batch
    from pipeline.models import LMHead
    from pipeline.student import train_step_loss

    batch = stack_rows(hybrid_rows(2, 8, 40, head=3, draws=6, seed=1))
    assert not bool(batch["valid"].all())
    chunked, full = tiny_student(), tiny_student()
    train_step_loss(LMHead(chunked), batch, 0.3, temperature, 5, 1.0, None, hybrid_capture())
    target = targets_from_batch(batch, hybrid_capture(), temperature)
    labels = next_token_labels(batch["input_ids"]).reshape(-1)
    parts = loss_parts(full(batch["input_ids"]).logits.reshape(-1, 40), labels, target)
    (0.3 * parts.kd_sum / parts.kd_count + 0.7 * parts.ce_sum / parts.ce_count).backward()
    for (name, a), (_, b) in zip(chunked.named_parameters(), full.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)


def without_head(row, head: int):
    """A hybrid row's draws alone, as a sampled capture without log-probabilities holds them."""
    from dataclasses import replace

    ids, counts, lengths = row.ids[:, head:], row.counts[:, head:], row.lengths - head
    return replace(row, ids=ids, counts=counts, lengths=lengths, logprobs=None, tail_logmass=None)


class RowsAsCache:
    """The two things :func:`pipeline.evaluate.evaluate` reads of a cache: its capture and its rows."""

    def __init__(self, rows, capture):
        from types import SimpleNamespace

        self.rows, self.manifest = rows, SimpleNamespace(capture=capture)

    def __iter__(self):
        return iter(self.rows)


def test_held_out_evaluation_of_a_sampled_cache_reports_the_estimators_kl_and_labels_it():
    from pipeline.capture_spec import CaptureSpec
    from pipeline.evaluate import evaluate
    from pipeline.models import LMHead

    rows = hybrid_rows(3, 8, 40, head=3, draws=6, seed=2)
    results = evaluate(LMHead(tiny_student()), RowsAsCache(rows, hybrid_capture()), 7, torch.device("cpu"))
    assert "t_hat" in results["kl_measure"] and results["kl_temperature"] == 1.0
    assert results["kl"] > 0 and results["positions"] == 24 and results["perplexity"] > 1
    # Draws without log-probabilities fix the temperature: evaluated at the draws' own.
    sampled = [without_head(row, 3) for row in rows]
    capture = CaptureSpec("sample", k=None, samples=6, sample_temperature=2.0, seed=0)
    results = evaluate(LMHead(tiny_student()), RowsAsCache(sampled, capture), 7, torch.device("cpu"))
    assert results["kl_temperature"] == 2.0 and "t_hat" in results["kl_measure"] and results["kl"] > 0


def test_top_k_evaluation_is_labelled_as_the_bucket_kl(heldout_cache, student_config_dir):
    from pipeline.cache import open_cache
    from pipeline.evaluate import evaluate
    from pipeline.models import LMHead

    cache = open_cache(heldout_cache)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(student_config_dir)))
    results = evaluate(LMHead(model), cache, 64, torch.device("cpu"))
    assert results["kl_measure"].startswith("KL(teacher || student) over the captured ids")
    assert results["kl_temperature"] == 1.0 and results["kl"] > 0


def test_a_temperature_the_sampled_cache_cannot_give_is_refused_before_anything_loads(tmp_path):
    from pipeline.capture_spec import CaptureSpec
    from pipeline.config import StudentTrainConfig
    from pipeline.errors import ConfigError
    from pipeline.student_setup import check_capture_fits
    from pipeline.teachers import CaptureTeacher

    capture = CaptureSpec("sample", k=None, samples=16, sample_temperature=1.0, seed=0)
    settings = {"cache": "c", "student": "s", "out": str(tmp_path / "s")}
    with pytest.raises(ConfigError, match=r"^--temperature 2 differs .* --sample-logprobs$"):
        check_capture_fits(StudentTrainConfig(**settings, temperature=2.0), CaptureTeacher(capture))
    check_capture_fits(
        StudentTrainConfig(**settings, temperature=2.0, alpha=0.0), CaptureTeacher(capture)
    )  # cross-entropy alone
    check_capture_fits(StudentTrainConfig(**settings, temperature=1.0), CaptureTeacher(capture))


def test_a_head_chunk_holding_only_unlabelled_positions_is_skipped_under_cross_entropy_alone():
    from pipeline import models
    from pipeline.student import train_step_loss

    model = tiny_student(40).train()
    input_ids = torch.randint(0, 40, (1, 5), generator=torch.Generator().manual_seed(0))
    # Chunks of 4 positions: the second holds only the row's last position, whose label is outside the row.
    parts = train_step_loss(models.LMHead(model), {"input_ids": input_ids}, 0.0, 1.0, 4, 1.0, None)
    model.zero_grad()
    whole = train_step_loss(models.LMHead(model), {"input_ids": input_ids}, 0.0, 1.0, 5, 1.0, None)
    assert parts["ce"] == pytest.approx(whole["ce"]) and math.isnan(parts["kd"])
