"""The divergence family (``--loss``): each loss over the K + 1 buckets, against dense references."""

import json
import math
from dataclasses import replace

import pytest
import torch
from conftest import run_cli

from pipeline.capture_spec import CaptureSpec
from pipeline.config import LOSSES, StudentTrainConfig
from pipeline.divergences import Divergence, jsd, reverse_kl, skew_kl, skew_reverse_kl
from pipeline.errors import ConfigError
from pipeline.losses import bucket_target, loss_parts, sampled_target, target_problem
from pipeline.student_setup import check_capture_fits
from pipeline.teachers import CaptureTeacher

VOCAB = 24
DIVERGENCES = [Divergence(name, beta=0.3, skew=0.2) for name in LOSSES]


def dense_reference(teacher_logits, student_logits, divergence, temperature):
    """The divergence over the whole vocabulary, written from its definition: ``(N,)``."""
    t = torch.softmax(teacher_logits / temperature, dim=-1)
    s = torch.softmax(student_logits / temperature, dim=-1)
    beta, skew = divergence.beta, divergence.skew

    def kl(p, q):
        return (p * (p.log() - q.log())).sum(-1)

    value = {
        "forward_kl": lambda: kl(t, s),
        "reverse_kl": lambda: kl(s, t),
        "jsd": lambda: beta * kl(t, beta * t + (1 - beta) * s) + (1 - beta) * kl(s, beta * t + (1 - beta) * s),
        "skew_kl": lambda: kl(t, skew * t + (1 - skew) * s),
        "skew_reverse_kl": lambda: kl(s, skew * s + (1 - skew) * t),
        "tvd": lambda: 0.5 * (t - s).abs().sum(-1),
    }[divergence.name]()
    return value if divergence.name == "tvd" else value * temperature**2


def full_capture(teacher_logits):
    """A top-k target holding every id (``K = V``, in a shuffled order), its tail ``-inf``."""
    generator = torch.Generator().manual_seed(1)
    rows = teacher_logits.shape[0]
    ids = torch.stack([torch.randperm(VOCAB, generator=generator) for _ in range(rows)])
    logprobs = torch.log_softmax(teacher_logits, dim=-1).gather(-1, ids)
    return ids, logprobs, torch.full((rows,), float("-inf"))


def kd_and_grad(student_logits, target, divergence):
    logits = student_logits.clone().requires_grad_(True)
    labels = torch.full((logits.shape[0],), -100)
    parts = loss_parts(logits, labels, target, need_ce=False, divergence=divergence)
    parts.kd_sum.backward()
    return parts.kd_sum.detach(), logits.grad


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("divergence", DIVERGENCES, ids=LOSSES)
def test_every_loss_with_every_id_cached_equals_its_dense_reference_in_value_and_gradient(divergence, temperature):
    torch.manual_seed(0)
    teacher_logits = torch.randn(6, VOCAB, dtype=torch.float64).float() * 2
    student_logits = torch.randn(6, VOCAB) * 2
    ids, logprobs, tail = full_capture(teacher_logits)
    target = bucket_target(ids, None, logprobs, tail, temperature)
    kd, grad = kd_and_grad(student_logits, target, divergence)

    dense_logits = student_logits.clone().requires_grad_(True)
    dense = dense_reference(teacher_logits, dense_logits, divergence, temperature).sum()
    dense.backward()
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(kd, dense.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad, dense_logits.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("divergence", DIVERGENCES, ids=LOSSES)
def test_merging_ids_into_the_rest_bucket_can_only_lower_every_loss_at_t1(divergence):
    torch.manual_seed(7)
    teacher_logits = torch.randn(8, VOCAB) * 2
    student_logits = torch.randn(8, VOCAB) * 2
    teacher = torch.log_softmax(teacher_logits, dim=-1)
    ids = teacher.topk(6, dim=-1).indices
    tail = torch.logsumexp(teacher.scatter(-1, ids, float("-inf")), dim=-1)
    target = bucket_target(ids, None, teacher.gather(-1, ids), tail, 1.0)
    labels = torch.full((8,), -100)
    buckets = loss_parts(student_logits, labels, target, need_ce=False, divergence=divergence).kd_sum
    assert 0 < buckets <= dense_reference(teacher_logits, student_logits, divergence, 1.0).sum() + 1e-5


def random_buckets(rows: int, buckets: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(rows, buckets, generator=generator) * 2, dim=-1)


def test_jsd_at_beta_zero_and_one_is_forward_and_reverse_kl():
    student, target = random_buckets(5, 9, 0), random_buckets(5, 9, 1)
    forward = Divergence("forward_kl")(student, target)
    torch.testing.assert_close(jsd(student, target, 0.0), forward)
    torch.testing.assert_close(jsd(student, target, 1.0), reverse_kl(student, target))
    # Inside (0, 1) the formula vanishes towards both ends: the endpoints are a jump, as in TRL.
    assert jsd(student, target, 1e-6).max() < 1e-4 < forward.min()


def test_skew_zero_is_forward_and_reverse_kl():
    student, target = random_buckets(5, 9, 2), random_buckets(5, 9, 3)
    torch.testing.assert_close(skew_kl(student, target, 0.0), Divergence("forward_kl")(student, target))
    torch.testing.assert_close(skew_reverse_kl(student, target, 0.0), reverse_kl(student, target))


@pytest.mark.parametrize("divergence", DIVERGENCES, ids=LOSSES)
def test_every_loss_is_zero_at_the_target_and_positive_elsewhere(divergence):
    target = random_buckets(8, 7, 4)
    assert divergence(target, target).abs().max() < 1e-6
    other = random_buckets(8, 7, 5)
    assert (divergence(other, target) > 0).all()
    # An empty rest bucket on both sides (ids covering the vocabulary) adds nothing.
    target[:, -1] = float("-inf")
    target = torch.log_softmax(target, dim=-1)
    assert divergence(target, target).abs().max() < 1e-6


def padded_and_unpadded(strategy: str):
    """A batch of 4 positions padded to 6 slots, and each position's valid slots alone."""
    torch.manual_seed(6)
    teacher = torch.log_softmax(torch.randn(4, VOCAB) * 2, dim=-1)
    order = teacher.argsort(dim=-1, descending=True)
    kept = [6, 2, 4, 1]
    valid = torch.arange(6) < torch.tensor(kept).unsqueeze(-1)
    ids = torch.where(valid, order[:, :6], 0)
    logprobs = teacher.gather(-1, order[:, :6])
    counts = torch.where(valid, torch.randint(1, 5, (4, 6)), 0)
    outside = teacher.scatter(-1, torch.where(valid, order[:, :6], order[:, :1]), float("-inf"))
    tails = torch.logsumexp(outside, dim=-1)

    def target(rows, width, mask):
        if strategy == "topp":
            return bucket_target(ids[rows, :width], mask, logprobs[rows, :width], tails[rows], 1.5)
        return sampled_target(ids[rows, :width], mask, counts[rows, :width], None, 1.0, 1.0)

    padded = target(slice(None), 6, valid)
    alone = [
        target(slice(i, i + 1), n, None if strategy == "topp" else valid[i : i + 1, :n]) for i, n in enumerate(kept)
    ]
    return padded, alone


@pytest.mark.parametrize("strategy", ["topp", "sample"])
@pytest.mark.parametrize("divergence", DIVERGENCES, ids=LOSSES)
def test_padding_contributes_nothing_to_any_loss(divergence, strategy):
    if strategy == "sample" and divergence.needs_target_support:
        pytest.skip("reverse-type losses are refused on sampled targets")
    padded, alone = padded_and_unpadded(strategy)
    student_logits = torch.randn(4, VOCAB)
    kd, grad = kd_and_grad(student_logits, padded, divergence)
    per_row = [kd_and_grad(student_logits[i : i + 1], target, divergence) for i, target in enumerate(alone)]
    assert torch.isfinite(kd)
    torch.testing.assert_close(kd, sum(value for value, _ in per_row))
    torch.testing.assert_close(grad, torch.cat([row_grad for _, row_grad in per_row]))


@pytest.mark.parametrize("divergence", DIVERGENCES, ids=LOSSES)
def test_chunks_over_positions_sum_to_the_whole(divergence):
    padded, _ = padded_and_unpadded("topp")
    student_logits = torch.randn(4, VOCAB)
    whole, whole_grad = kd_and_grad(student_logits, padded, divergence)
    chunks = [kd_and_grad(student_logits[part], padded.chunk(part), divergence) for part in (slice(0, 3), slice(3, 4))]
    torch.testing.assert_close(whole, chunks[0][0] + chunks[1][0])
    torch.testing.assert_close(whole_grad, torch.cat([chunks[0][1], chunks[1][1]]))


def test_default_loss_keeps_the_forward_kl_numbers():
    padded, _ = padded_and_unpadded("topp")
    student_logits = torch.randn(4, VOCAB)
    labels = torch.full((4,), -100)
    default = loss_parts(student_logits, labels, padded, need_ce=False)
    assert torch.equal(default.kd_sum, loss_parts(student_logits, labels, padded, False, Divergence()).kd_sum)


SAMPLE = CaptureSpec("sample", k=None, samples=32, sample_temperature=1.0, seed=0)
HYBRID = CaptureSpec("hybrid", k=4, samples=32, sample_temperature=1.0, seed=0)


@pytest.mark.parametrize("capture", [SAMPLE, HYBRID], ids=["sample", "hybrid"])
@pytest.mark.parametrize(
    "divergence", [Divergence("reverse_kl"), Divergence("skew_reverse_kl"), Divergence("jsd", beta=1.0)]
)
def test_reverse_type_losses_on_a_sampled_capture_are_refused_in_one_line_naming_loss(capture, divergence):
    problem = target_problem(capture, 1.0, divergence)
    assert problem is not None and "\n" not in problem and "--loss" in problem
    cfg = StudentTrainConfig(cache="c", student="s", out="o", loss=divergence.name, beta=divergence.beta)
    with pytest.raises(ConfigError, match="--loss"):
        check_capture_fits(cfg, CaptureTeacher(capture))


def test_sampled_captures_take_the_losses_that_stay_finite_and_bucket_captures_take_all():
    for name in ("forward_kl", "skew_kl", "tvd", "jsd"):
        assert target_problem(SAMPLE, 1.0, Divergence(name)) is None
    for divergence in DIVERGENCES:
        assert target_problem(CaptureSpec("topk", k=8), 1.0, divergence) is None


@pytest.mark.parametrize(
    ("options", "flag"),
    [({"loss": "kl"}, "--loss"), ({"beta": 1.5}, "--beta"), ({"skew": 1.0}, "--skew"), ({"skew": -0.1}, "--skew")],
)
def test_bad_loss_settings_are_refused_naming_the_flag(options, flag):
    with pytest.raises(ConfigError, match=flag):
        StudentTrainConfig(cache="c", student="s", out="o", **options)


@pytest.mark.parametrize("loss", LOSSES)
def test_student_train_runs_a_step_with_each_loss(loss, train_cache, student_config_dir, tmp_path):
    out = tmp_path / loss
    result = run_cli(
        "student-train",
        *("--cache", str(train_cache), "--student", str(student_config_dir), "--out", str(out)),
        *("--loss", loss, "--max-steps", "1", "--batch-size", "2", "--alpha", "1.0", "--temperature", "2.0"),
    )
    assert result.exit_code == 0, result.output
    training = json.loads((out / "training.json").read_text())
    assert training["config"]["loss"] == loss
    assert math.isfinite(training["final"]["kd"]) and training["final"]["kd"] >= 0


def top_k_target(teacher_logits, k, temperature=1.0):
    """A top-k target of ``k`` ids with its true tail, and those ids."""
    logprobs = torch.log_softmax(teacher_logits, dim=-1)
    top, ids = logprobs.topk(k, dim=-1)
    tail = torch.log1p(-top.exp().sum(-1).clamp(max=1 - 1e-7))
    return bucket_target(ids, None, top, tail, temperature), ids


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("divergence", DIVERGENCES, ids=LOSSES)
def test_renormalised_losses_equal_the_dense_loss_between_the_distributions_restricted_to_the_captured_ids(
    divergence, temperature
):
    generator = torch.Generator().manual_seed(7)
    teacher_logits = torch.randn(5, VOCAB, generator=generator) * 2
    student_logits = torch.randn(5, VOCAB, generator=generator)
    target, ids = top_k_target(teacher_logits, 6, temperature)
    renormalized = replace(divergence, renormalize=True)
    value, grad = kd_and_grad(student_logits, target, renormalized)
    # Reference: both models restricted to the captured ids, where the student's other logits get no gradient.
    logits = student_logits.clone().requires_grad_(True)
    reference = dense_reference(teacher_logits.gather(-1, ids), logits.gather(-1, ids), divergence, temperature).sum()
    reference.backward()
    torch.testing.assert_close(value, reference.detach(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grad, logits.grad, atol=1e-5, rtol=1e-4)


def test_renormalised_loss_ignores_the_tail_and_the_bucket_loss_does_not():
    generator = torch.Generator().manual_seed(8)
    teacher_logits = torch.randn(4, VOCAB, generator=generator)
    student_logits = torch.randn(4, VOCAB, generator=generator)
    target, ids = top_k_target(teacher_logits, 5)
    heavier = bucket_target(ids, None, target.logprobs, target.rest_logprob + 0.5)
    for divergence, same in ((Divergence(renormalize=True), True), (Divergence(), False)):
        a, _ = kd_and_grad(student_logits, target, divergence)
        b, _ = kd_and_grad(student_logits, heavier, divergence)
        assert torch.isclose(a, b).item() is same


def test_renormalised_reverse_losses_fit_sampled_captures():
    capture = CaptureSpec(strategy="sample", k=None, samples=8, sample_temperature=1.0, seed=0)
    assert target_problem(capture, 1.0, Divergence("reverse_kl")) is not None
    assert target_problem(capture, 1.0, Divergence("reverse_kl", renormalize=True)) is None


def test_student_train_runs_a_renormalised_step(train_cache, student_config_dir, tmp_path):
    out = tmp_path / "renormalized"
    result = run_cli(
        "student-train",
        *("--cache", str(train_cache), "--student", str(student_config_dir), "--out", str(out)),
        *("--loss", "reverse_kl", "--renormalize", "--max-steps", "1", "--batch-size", "2"),
    )
    assert result.exit_code == 0, result.output
    training = json.loads((out / "training.json").read_text())
    assert training["config"]["renormalize"] is True and math.isfinite(training["final"]["kd"])
