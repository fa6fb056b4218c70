"""Training monitors: the logged KL, entropies and agreement are the quantities they name, and the
warnings fire once, when they should."""

import itertools
import json
import math

import pytest
import torch
from conftest import run_cli
from helpers import tiny_student

from pipeline.capture_spec import CaptureSpec
from pipeline.config import StudentTrainConfig
from pipeline.divergences import bucket_kl
from pipeline.errors import ConfigError
from pipeline.losses import bucket_target, student_buckets, targets_from_batch
from pipeline.models import LMHead
from pipeline.monitor import (
    MONITOR_FIELDS,
    MonitorSums,
    MonitorWarnings,
    TemperatureSchedule,
    add_chunk_stats,
    bucket_entropy,
    monitor_targets,
)
from pipeline.student import train_step_loss
from pipeline.teachers import CaptureTeacher

VOCAB, K = 40, 5


def topk_batch(batch: int = 2, seq: int = 8, seed: int = 1) -> dict[str, torch.Tensor]:
    """A top-k batch from a random teacher, the last two slots padding at every other position."""
    generator = torch.Generator().manual_seed(seed)
    teacher = torch.log_softmax(torch.randn(batch, seq, VOCAB, generator=generator) * 2, dim=-1)
    logprobs, ids = teacher.topk(K, dim=-1)
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[:, ::2, -2:] = False
    kept = teacher.scatter(-1, torch.where(valid, ids, ids[..., :1]), float("-inf"))
    return {
        "input_ids": torch.randint(0, VOCAB, (batch, seq), generator=generator),
        "ids": ids,
        "valid": valid,
        "logprobs": torch.where(valid, logprobs, 0.0),
        "tail_logmass": torch.logsumexp(kept, dim=-1),
    }


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_logged_kl_equals_the_bucket_kl_computed_independently_on_the_same_batch(temperature):
    batch, capture = topk_batch(), CaptureSpec("topk")
    model = tiny_student()
    stats = MonitorSums()
    parts = train_step_loss(LMHead(model), batch, 0.5, temperature, 5, 1.0, None, capture, stats=stats)
    means = stats.means()
    with torch.no_grad():
        logits = model(batch["input_ids"]).logits.reshape(-1, VOCAB)
    expected = {}
    for name, at in (("kl_t1", 1.0), ("kl_t", temperature)):
        target = targets_from_batch(batch, capture, at)
        expected[name] = float(bucket_kl(target.buckets(), student_buckets(logits, target.ids, at)).mean())
    assert means["kl_t1"] == pytest.approx(expected["kl_t1"], rel=1e-5)
    assert means["kl_t"] == pytest.approx(expected["kl_t"], rel=1e-5)
    if temperature == 1.0:
        assert means["kl_t"] == means["kl_t1"]
        assert parts["kd"] == pytest.approx(means["kl_t"], rel=1e-5)  # forward KL at T = 1 is the kd term
    else:
        assert means["kl_t"] != pytest.approx(means["kl_t1"])
    assert stats.positions == batch["input_ids"].numel()


def test_chunks_and_micro_batches_add_up_to_the_whole():
    batch, capture = topk_batch(), CaptureSpec("topk")
    logits = torch.randn(16, VOCAB, generator=torch.Generator().manual_seed(3))
    target_t1, target_t = monitor_targets(batch, CaptureTeacher(capture), 2.0)
    whole, pieces = MonitorSums(), MonitorSums()
    add_chunk_stats(whole, logits, target_t1, target_t, 2.0)
    for positions in (slice(0, 5), slice(5, 16)):
        add_chunk_stats(pieces, logits[positions], target_t1.chunk(positions), target_t.chunk(positions), 2.0)
    for name, value in whole.means().items():
        assert pieces.means()[name] == pytest.approx(value, rel=1e-5), name


def test_entropy_of_uniform_buckets_is_log_of_their_number():
    uniform = torch.full((3, K + 1), -math.log(K + 1))
    assert bucket_entropy(uniform).tolist() == pytest.approx([math.log(K + 1)] * 3)
    # Empty buckets (-inf) add nothing: a certain outcome has entropy 0.
    certain = torch.tensor([[0.0, float("-inf"), float("-inf")]])
    assert bucket_entropy(certain).tolist() == [0.0]
    ids = torch.arange(K).expand(4, K)
    target = bucket_target(ids, None, uniform[:1, :K].expand(4, K), uniform[:1, K].expand(4), 1.0)
    stats = MonitorSums()
    add_chunk_stats(stats, torch.randn(4, VOCAB), target, target, 1.0)
    assert stats.means()["teacher_entropy"] == pytest.approx(math.log(K + 1))


def test_a_student_equal_to_the_teacher_agrees_everywhere_with_zero_kl():
    logits = torch.randn(12, VOCAB, generator=torch.Generator().manual_seed(4)) * 3
    teacher = torch.log_softmax(logits, dim=-1)
    logprobs, ids = teacher.topk(K, dim=-1)
    kept = teacher.scatter(-1, ids, float("-inf"))
    # Shuffle the slots so agreement compares ids, not slot positions.
    order = torch.randperm(K, generator=torch.Generator().manual_seed(5))
    target = bucket_target(ids[:, order], None, logprobs[:, order], torch.logsumexp(kept, dim=-1), 1.0)
    stats = MonitorSums()
    add_chunk_stats(stats, logits, target, target, 1.0)
    means = stats.means()
    assert means["top1_agreement"] == 1.0
    assert means["kl_t1"] == pytest.approx(0.0, abs=1e-6)
    assert means["student_entropy"] == pytest.approx(means["teacher_entropy"], rel=1e-5)
    stats = MonitorSums()
    add_chunk_stats(stats, -logits, target, target, 1.0)  # the reversed student prefers the least likely id
    assert stats.means()["top1_agreement"] == 0.0


def test_low_kl_warning_fires_after_three_low_updates_and_once():
    warnings = MonitorWarnings(temperature=8.0)
    losses = iter(range(100, 0, -1))  # falling, so no plateau

    def update(kl):
        return warnings.update({"step": 1, "loss": float(next(losses)), "kl_t": kl})

    assert update(0.001) == [] and update(0.002) == []
    assert update(0.5) == []  # a higher KL restarts the count
    assert update(0.001) == [] and update(0.001) == []
    fired = update(0.003)
    assert len(fired) == 1 and "T=8" in fired[0] and "--temperature" in fired[0] and "0.003" in fired[0]
    assert all(update(0.001) == [] for _ in range(5))


def test_plateau_warning_fires_after_the_window_and_once():
    warnings = MonitorWarnings(temperature=1.0, plateau_window=10)
    for step, loss in enumerate([3.0, 2.0, 1.0], start=1):
        assert warnings.update({"step": step, "loss": loss, "kl_t": 0.5}) == []
    for step in range(4, 13):  # nine steps without a new minimum
        assert warnings.update({"step": step, "loss": 1.5, "kl_t": 0.5}) == []
    fired = warnings.update({"step": 13, "loss": 1.0, "kl_t": 0.5})  # equal is not a new minimum
    assert len(fired) == 1 and "plateau" in fired[0] and "step 3" in fired[0] and "--lr" in fired[0]
    assert all(warnings.update({"step": 14 + i, "loss": 2.0, "kl_t": 0.5}) == [] for i in range(12))


def test_a_record_without_kl_never_counts_as_low():
    warnings = MonitorWarnings(temperature=1.0)
    assert all(warnings.update({"step": i, "loss": float(-i)}) == [] for i in range(10))


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def student_train(train_cache, student_config_dir, out, *extra):
    common = ["--cache", str(train_cache), "--student", str(student_config_dir), "--batch-size", "4"]
    common += ["--max-steps", "4", "--log-every", "1", "--seed", "0", "--alpha", "0.5"]
    return run_cli("student-train", *common, "--out", str(out), *extra)


def test_monitor_fields_appear_in_every_logged_record(train_cache, student_config_dir, tmp_path):
    result = student_train(train_cache, student_config_dir, tmp_path / "t4", "--temperature", "4")
    assert result.exit_code == 0, result.output
    records = read_metrics(tmp_path / "t4")
    assert len(records) == 4
    for record in records:
        assert set(MONITOR_FIELDS) <= set(record), record
        assert record["kl_t1"] > 0 and record["kl_t"] > 0 and record["kl_t"] != record["kl_t1"]
        assert 0 <= record["top1_agreement"] <= 1
        assert 0 <= record["teacher_entropy"] <= math.log(17) + 1e-6  # top-k 16 + the rest bucket
        assert 0 <= record["student_entropy"] <= math.log(17) + 1e-6
        assert {"loss", "kd", "ce"} <= set(record)
    result = student_train(train_cache, student_config_dir, tmp_path / "t1", "--alpha", "0.0")
    assert result.exit_code == 0, result.output
    for record in read_metrics(tmp_path / "t1"):
        assert record["kd"] is None  # no distillation term, yet the KL is still watched
        assert record["kl_t"] == record["kl_t1"] > 0


def test_temperature_schedule_lowers_by_a_tenth_per_low_kl_step_and_stops_at_one():
    schedule = TemperatureSchedule(temperature=2.0)
    assert schedule.update({"kl_t": 0.5}) is None and schedule.temperature == 2.0
    assert schedule.update({"loss": 1.0}) is None  # no KL measured: no change
    assert schedule.update({"kl_t": 0.001}) == pytest.approx(1.8)
    assert schedule.update({"kl_t": 0.009}) == pytest.approx(1.62)
    lowered = [schedule.update({"kl_t": 0.0}) for _ in range(10)]
    assert lowered[4] == 1.0 and all(value is None for value in lowered[5:])  # 1.62 * 0.9^5 < 1: floored
    assert schedule.temperature == 1.0


@pytest.mark.parametrize("temperature", [0.5, 25.0])
def test_adapt_temperature_refuses_a_start_outside_its_bounds(temperature):
    with pytest.raises(ConfigError, match=r"--adapt-temperature keeps the temperature within \[1, 20\]"):
        StudentTrainConfig(cache="c", student="s", out="o", temperature=temperature, adapt_temperature=True)


def test_adapt_temperature_lowers_records_and_checkpoints_the_temperature(train_cache, student_config_dir, tmp_path):
    out = tmp_path / "adapt"
    hot = ("--temperature", "20", "--adapt-temperature")
    result = student_train(train_cache, student_config_dir, out, *hot, "--save-every", "2", "--max-steps", "3")
    assert result.exit_code == 0, result.output
    records = read_metrics(out)
    assert records[0]["temperature"] == 20.0
    for before, after in itertools.pairwise(records):  # at T=20 everything is flat: each step lowers T
        assert before["kl_t"] < 0.01
        assert before["temperature_next"] == pytest.approx(before["temperature"] * 0.9)
        assert after["temperature"] == before["temperature_next"]
    state = json.loads((out / "checkpoints" / "step-0000002" / "state.json").read_text())
    assert state["temperature"] == records[1]["temperature_next"]

    resumed = tmp_path / "resumed"
    first = student_train(train_cache, student_config_dir, resumed, *hot, "--save-every", "1", "--max-steps", "2")
    assert first.exit_code == 0, first.output
    saved = json.loads((resumed / "checkpoints" / "step-0000001" / "state.json").read_text())["temperature"]
    assert saved < 20.0
    again = student_train(
        train_cache, student_config_dir, resumed, *hot, "--save-every", "1", "--max-steps", "3", "--resume"
    )
    assert again.exit_code == 0, again.output
    continued = [record for record in read_metrics(resumed) if record["step"] == 2][-1]
    assert continued["temperature"] == saved  # the run continued at the saved temperature, not at 20


def test_a_checkpoint_temperature_outside_the_bounds_is_refused(train_cache, student_config_dir, tmp_path):
    out = tmp_path / "damaged"
    hot = ("--temperature", "4", "--adapt-temperature", "--save-every", "1")
    result = student_train(train_cache, student_config_dir, out, *hot, "--max-steps", "2")
    assert result.exit_code == 0, result.output
    state_file = out / "checkpoints" / "step-0000001" / "state.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "temperature": 0.2}))
    again = student_train(train_cache, student_config_dir, out, *hot, "--max-steps", "3", "--resume")
    assert again.exit_code != 0
    assert "field 'temperature' is not a number in [1, 20]" in again.output
