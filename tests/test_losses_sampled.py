"""Sampled and hybrid targets: their gradients estimate the dense KL gradient as docs/losses.md says.

Captures are simulated here with ``torch.multinomial`` from a fixed teacher over a small
vocabulary, laid out as a cache batch lays them out (distinct ids, counts, padding with id 0).
"""

import math

import pytest
import torch

from pipeline.capture_spec import CaptureSpec
from pipeline.errors import ConfigError
from pipeline.losses import dense_kl, loss_parts, targets_from_batch

VOCAB = 24


def fixed_teacher_and_student(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(V,)`` teacher logits (peaked, with a long tail) and ``(V,)`` student logits."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(VOCAB, generator=generator) * 2.0, torch.randn(VOCAB, generator=generator)


def tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(logits / temperature, dim=-1)


def draw_counts(probs: torch.Tensor, replicates: int, draws: int, seed: int) -> torch.Tensor:
    """``(replicates, V)`` int64: ``draws`` draws with replacement from ``probs`` per replicate."""
    generator = torch.Generator().manual_seed(seed)
    picks = torch.multinomial(probs.expand(replicates, -1), draws, replacement=True, generator=generator)
    return torch.zeros(replicates, probs.shape[-1], dtype=torch.int64).scatter_add_(1, picks, torch.ones_like(picks))


def as_batch(counts: torch.Tensor, teacher_logits: torch.Tensor, head: torch.Tensor | None = None) -> dict:
    """One position per replicate, laid out as a cache batch: ``(M, 1, K)`` with the head (most probable
    first), then the drawn ids ascending, then padding (id 0, log-probability ``-inf``, count 0)."""
    replicates, vocab = counts.shape
    logprobs = torch.log_softmax(teacher_logits.float(), -1).expand(replicates, -1)
    ids = torch.arange(vocab).expand(replicates, -1)
    order_key = torch.where(counts > 0, vocab + ids, 2 * vocab + ids)
    in_head = torch.zeros(replicates, vocab, dtype=torch.bool)
    if head is not None:
        order_key = order_key.scatter(1, head.expand(replicates, -1), torch.arange(len(head)).expand(replicates, -1))
        in_head[:, head] = True
    kept = (counts > 0) | in_head
    width = int(kept.sum(1).max())
    slots = order_key.argsort(dim=1)[:, :width]
    valid = kept.gather(1, slots)
    outside = torch.where(kept, float("-inf"), logprobs)
    return {
        "input_ids": torch.zeros(replicates, 1, dtype=torch.int64),
        "ids": torch.where(valid, slots, 0).unsqueeze(1),
        "valid": valid.unsqueeze(1),
        "logprobs": torch.where(valid, logprobs.gather(1, slots), float("-inf")).unsqueeze(1),
        "tail_logmass": torch.logsumexp(outside, -1).unsqueeze(1),
        "counts": torch.where(valid, counts.gather(1, slots), 0).to(torch.int32).unsqueeze(1),
    }


def mean_gradient(batch: dict, capture: CaptureSpec, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``(V,)``: the gradient of ``T^2 * KL(t_hat || student)`` wrt the student's logits, averaged over positions."""
    replicates = batch["ids"].shape[0]
    logits = student_logits.expand(replicates, -1).clone().requires_grad_(True)
    target = targets_from_batch(batch, capture, temperature)
    parts = loss_parts(logits, torch.full((replicates,), -100), target, need_ce=False)
    parts.kd_sum.backward()
    return logits.grad.sum(0) / replicates


def dense_gradient(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``(V,)``: the gradient of ``T^2 * dense KL(teacher_T || student_T)`` wrt the student's logits."""
    logits = student_logits.clone().unsqueeze(0).requires_grad_(True)
    (dense_kl(teacher_logits.unsqueeze(0), logits, temperature).sum() * temperature**2).backward()
    return logits.grad[0]


def noise_bound(target: torch.Tensor, temperature: float, draws: int, replicates: int, sigmas: float = 5.0):
    """``(V,)``: ``sigmas`` standard errors of the mean gradient, ``T * (p - mean t_hat)``, when ``t_hat``
    is a multinomial frequency (variance ``t (1 - t) / N`` per replicate)."""
    return sigmas * temperature * torch.sqrt(target * (1 - target) / (draws * replicates)) + 1e-6


def sample_capture(draws: int, sample_temperature: float, logprobs: bool = False) -> CaptureSpec:
    return CaptureSpec(
        "sample", k=None, samples=draws, sample_temperature=sample_temperature, sample_logprobs=logprobs, seed=0
    )


def hybrid_capture(head: int, draws: int, sample_temperature: float) -> CaptureSpec:
    return CaptureSpec("hybrid", k=head, samples=draws, sample_temperature=sample_temperature, seed=0)


def hybrid_draws(teacher_logits, head_size, sample_temperature, replicates, draws, seed):
    """The head (top ``head_size`` ids) and counts drawn from the teacher at ``sample_temperature``
    restricted to the ids outside the head."""
    head = teacher_logits.topk(head_size).indices
    outside = tempered(teacher_logits, sample_temperature).clone()
    outside[head] = 0.0
    return head, draw_counts(outside / outside.sum(), replicates, draws, seed)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sampled_gradient_is_unbiased_for_the_dense_kl_gradient(temperature):
    teacher, student = fixed_teacher_and_student()
    replicates, draws = 4000, 16
    counts = draw_counts(tempered(teacher, temperature), replicates, draws, seed=1)
    capture = sample_capture(draws, sample_temperature=temperature)
    estimate = mean_gradient(as_batch(counts, teacher), capture, student, temperature)
    expected = dense_gradient(teacher, student, temperature)
    bound = noise_bound(tempered(teacher, temperature), temperature, draws, replicates)
    assert torch.all((estimate - expected).abs() <= bound), (estimate - expected).abs() / bound


def test_a_single_sampled_capture_is_noisy_but_its_gradient_sums_to_zero():
    teacher, student = fixed_teacher_and_student()
    counts = draw_counts(tempered(teacher, 1.0), 1, 8, seed=2)
    gradient = mean_gradient(as_batch(counts, teacher), sample_capture(8, 1.0), student, 1.0)
    assert gradient.sum().abs() < 1e-5  # p_student - t_hat: both sum to one
    assert not torch.allclose(gradient, dense_gradient(teacher, student, 1.0), atol=1e-2)


def test_top_k_gradient_is_biased_where_sampling_is_not():
    # The same check the sampled estimators pass fails for a top-k capture of the same size:
    # the test can tell a biased estimator from an unbiased one.
    from pipeline.capture import capture_topk

    teacher, student = fixed_teacher_and_student()
    ids, logprobs, tail = capture_topk(teacher.unsqueeze(0), 6)
    batch = {"input_ids": torch.zeros(1, 1, dtype=torch.int64), "ids": ids.unsqueeze(0)}
    batch.update(logprobs=logprobs.unsqueeze(0), tail_logmass=tail.unsqueeze(0))
    estimate = mean_gradient(batch, CaptureSpec("topk", k=6), student, 1.0)
    expected = dense_gradient(teacher, student, 1.0)
    bound = noise_bound(tempered(teacher, 1.0), 1.0, draws=16, replicates=4000)
    assert ((estimate - expected).abs() > 2 * bound).any()


def test_hybrid_gradient_at_temperature_one_is_unbiased():
    teacher, student = fixed_teacher_and_student()
    replicates, draws = 4000, 8
    head, counts = hybrid_draws(teacher, 4, 1.0, replicates, draws, seed=3)
    capture = hybrid_capture(4, draws, 1.0)
    estimate = mean_gradient(as_batch(counts, teacher, head), capture, student, 1.0)
    expected = dense_gradient(teacher, student, 1.0)
    bound = noise_bound(tempered(teacher, 1.0), 1.0, draws, replicates)
    assert torch.all((estimate - expected).abs() <= bound), (estimate - expected).abs() / bound
    # The head's coordinates are exact up to rounding: only the drawn ids are estimated.
    torch.testing.assert_close(estimate[head], expected[head], atol=1e-5, rtol=0)


def bias(estimate: torch.Tensor, expected: torch.Tensor) -> float:
    return float((estimate - expected).abs().sum())


@pytest.mark.parametrize("kind", ["sample", "hybrid"])
def test_importance_weighted_gradient_is_consistent_its_bias_shrinking_with_more_draws(kind):
    # Draws at sample temperature 1, student at temperature 2: self-normalised importance
    # weights. Biased for few draws, the bias falls roughly as 1/N.
    teacher, student = fixed_teacher_and_student()
    temperature, sample_temperature, replicates = 2.0, 1.0, 6000
    expected = dense_gradient(teacher, student, temperature)
    errors = {}
    for draws in (2, 64):
        if kind == "sample":
            counts = draw_counts(tempered(teacher, sample_temperature), replicates, draws, seed=4)
            batch, capture = as_batch(counts, teacher), sample_capture(draws, sample_temperature, logprobs=True)
        else:
            head, counts = hybrid_draws(teacher, 3, sample_temperature, replicates, draws, seed=4)
            batch, capture = as_batch(counts, teacher, head), hybrid_capture(3, draws, sample_temperature)
        errors[draws] = bias(mean_gradient(batch, capture, student, temperature), expected)
    noise = float(noise_bound(tempered(teacher, temperature), temperature, 64, replicates, sigmas=3.0).sum())
    assert errors[2] > 3 * noise, errors  # finite-N bias is visible ...
    assert errors[64] < errors[2] / 4, errors  # ... and shrinks with N
    assert errors[64] < noise + errors[2] * 4 / 64, errors


@pytest.mark.parametrize("temperature", [2.0, 3.0])
def test_hybrid_gradient_at_the_draws_temperature_other_than_one_is_consistent(temperature):
    teacher, student = fixed_teacher_and_student(seed=5)
    replicates, draws = 2000, 256
    head, counts = hybrid_draws(teacher, 4, temperature, replicates, draws, seed=6)
    capture = hybrid_capture(4, draws, temperature)
    estimate = mean_gradient(as_batch(counts, teacher, head), capture, student, temperature)
    expected = dense_gradient(teacher, student, temperature)
    # The rest's tempered mass is a ratio of estimates: an O(1/N) bias on top of the noise.
    bound = noise_bound(tempered(teacher, temperature), temperature, draws, replicates) + temperature / draws
    assert torch.all((estimate - expected).abs() <= bound)


def exact_counts(probs: torch.Tensor, draws: int) -> torch.Tensor:
    """``(1, V)`` counts exactly ``draws * probs`` (``probs`` chosen so that they are integers)."""
    counts = torch.round(probs * draws).to(torch.int64)
    assert int(counts.sum()) == draws
    return counts.unsqueeze(0)


def teacher_from_draw_shares(shares: list[int], sample_temperature: float) -> torch.Tensor:
    """``(V,)`` teacher logits whose distribution at ``sample_temperature`` is ``shares / sum(shares)``."""
    weights = torch.tensor(shares, dtype=torch.float64)
    return (sample_temperature * torch.log(weights / weights.sum())).float()


@pytest.mark.parametrize(("temperature", "sample_temperature"), [(1.0, 1.0), (2.0, 2.0), (2.0, 1.0), (0.7, 1.5)])
def test_draws_in_exact_proportion_give_the_dense_kl_value(temperature, sample_temperature):
    shares = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 14]  # sums to 80; every id drawn
    teacher = teacher_from_draw_shares(shares, sample_temperature)
    _, student = fixed_teacher_and_student()
    student = student[: len(shares)]
    counts = exact_counts(tempered(teacher, sample_temperature), 80)
    capture = sample_capture(80, sample_temperature, logprobs=True)
    target = targets_from_batch(as_batch(counts, teacher), capture, temperature)
    parts = loss_parts(student.unsqueeze(0), torch.tensor([-100]), target, need_ce=False)
    expected = dense_kl(teacher.unsqueeze(0), student.unsqueeze(0), temperature) * temperature**2
    torch.testing.assert_close(parts.kd_sum, expected[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("temperature", "sample_temperature"), [(1.0, 1.0), (2.0, 1.0), (0.5, 0.5), (1.0, 3.0)])
def test_hybrid_draws_in_exact_proportion_give_the_dense_kl_value(temperature, sample_temperature):
    # The head (ids 12 and 13) is exact; the rest's draws are exactly in proportion to q.
    shares = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 14]  # outside the head, sums to 80
    rest = teacher_from_draw_shares(shares, sample_temperature)  # log q at temperature 1 up to a constant
    teacher = torch.cat([rest, torch.tensor([rest.max() + 3.0, rest.max() + 2.0])])
    head = torch.tensor([12, 13])
    _, student = fixed_teacher_and_student()
    student = student[: len(teacher)]
    counts = torch.cat([exact_counts(tempered(rest, sample_temperature), 80), torch.zeros(1, 2, dtype=torch.int64)], 1)
    target = targets_from_batch(as_batch(counts, teacher, head), hybrid_capture(2, 80, sample_temperature), temperature)
    parts = loss_parts(student.unsqueeze(0), torch.tensor([-100]), target, need_ce=False)
    expected = dense_kl(teacher.unsqueeze(0), student.unsqueeze(0), temperature) * temperature**2
    torch.testing.assert_close(parts.kd_sum, expected[0], atol=1e-5, rtol=1e-5)


def test_sampled_target_is_a_distribution_that_ignores_padding():
    teacher, _ = fixed_teacher_and_student()
    counts = draw_counts(tempered(teacher, 1.0), 50, 5, seed=7)
    batch = as_batch(counts, teacher)
    assert not bool(batch["valid"].all())  # positions drew different numbers of distinct ids
    for temperature, logprobs in ((1.0, False), (3.0, True)):
        capture = sample_capture(5, 1.0, logprobs=logprobs)
        target = targets_from_batch(batch, capture, temperature)
        torch.testing.assert_close(target.buckets().exp().sum(-1), torch.ones(50))
        assert torch.all(target.logprobs[~batch["valid"].reshape(50, -1)] == float("-inf"))
        assert torch.all(target.rest_logprob == float("-inf"))


def test_sampled_target_at_the_draws_temperature_is_counts_over_n():
    teacher, _ = fixed_teacher_and_student()
    counts = draw_counts(tempered(teacher, 1.5), 3, 10, seed=8)
    batch = as_batch(counts, teacher)
    target = targets_from_batch(batch, sample_capture(10, 1.5), 1.5)
    valid = batch["valid"].reshape(3, -1)
    expected = batch["counts"].reshape(3, -1).double() / 10
    torch.testing.assert_close(target.logprobs.exp()[valid].double(), expected[valid])


def test_temperature_other_than_the_draws_without_logprobs_is_refused_naming_both_flags():
    teacher, _ = fixed_teacher_and_student()
    counts = draw_counts(tempered(teacher, 1.0), 2, 4, seed=9)
    batch = as_batch(counts, teacher)
    del batch["logprobs"], batch["tail_logmass"]
    with pytest.raises(ConfigError) as refused:
        targets_from_batch(batch, sample_capture(4, 1.0), 2.0)
    message = str(refused.value)
    assert "--temperature 2" in message and "--sample-logprobs" in message and "--sample-temperature 1" in message
    assert "\n" not in message
    targets_from_batch(batch, sample_capture(4, 1.0), 1.0)  # the draws' own temperature needs no log-probabilities


def test_chunks_of_a_sampled_target_sum_to_the_whole():
    teacher, student = fixed_teacher_and_student()
    head, counts = hybrid_draws(teacher, 3, 1.0, 10, 6, seed=10)
    target = targets_from_batch(as_batch(counts, teacher, head), hybrid_capture(3, 6, 1.0), 2.0)
    logits = student.expand(10, -1) + torch.randn(10, VOCAB, generator=torch.Generator().manual_seed(11))
    labels = torch.randint(0, VOCAB, (10,), generator=torch.Generator().manual_seed(12))
    whole = loss_parts(logits, labels, target)
    chunks = [loss_parts(logits[part], labels[part], target.chunk(part)) for part in (slice(0, 3), slice(3, 10))]
    torch.testing.assert_close(sum(c.kd_sum for c in chunks), whole.kd_sum)
    torch.testing.assert_close(sum(c.ce_sum for c in chunks), whole.ce_sum)
    assert sum(c.kd_count for c in chunks) == whole.kd_count == 10
    assert math.isfinite(float(whole.kd_sum))
