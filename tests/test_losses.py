import pytest
import torch

from pipeline.capture import capture_topk
from pipeline.losses import (
    dense_kl,
    distillation_parts,
    next_token_labels,
    sparse_kl,
    student_buckets,
    teacher_buckets,
)


def teacher_and_student(n: int = 6, vocab: int = 40, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    teacher = torch.randn(n, vocab, generator=generator) * 2
    student = torch.randn(n, vocab, generator=generator)
    return teacher, student


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_k_equal_to_vocab_gives_dense_kl(temperature):
    teacher, student = teacher_and_student()
    ids, logprobs, tail = capture_topk(teacher, teacher.shape[-1])
    sparse = sparse_kl(student, ids, logprobs, tail, temperature)
    torch.testing.assert_close(sparse, dense_kl(teacher, student, temperature), atol=1e-5, rtol=1e-5)


def test_buckets_merge_probability_so_sparse_kl_is_below_dense_at_t1():
    teacher, student = teacher_and_student()
    ids, logprobs, tail = capture_topk(teacher, 5)
    sparse = sparse_kl(student, ids, logprobs, tail)
    assert torch.all(sparse <= dense_kl(teacher, student) + 1e-6)
    assert torch.all(sparse >= 0)


def test_student_equal_to_teacher_has_zero_kl():
    teacher, _ = teacher_and_student()
    ids, logprobs, tail = capture_topk(teacher, 5)
    torch.testing.assert_close(sparse_kl(teacher, ids, logprobs, tail), torch.zeros(6), atol=1e-5, rtol=0)


def test_bucket_distributions_are_normalised():
    teacher, student = teacher_and_student()
    ids, logprobs, tail = capture_topk(teacher, 7)
    for temperature in (1.0, 3.0):
        for buckets in (teacher_buckets(logprobs, tail, temperature), student_buckets(student, ids, temperature)):
            torch.testing.assert_close(buckets.exp().sum(-1), torch.ones(6))


def test_gradients_are_finite_with_full_capture():
    teacher, student = teacher_and_student()
    student.requires_grad_(True)
    ids, logprobs, tail = capture_topk(teacher, teacher.shape[-1])
    sparse_kl(student, ids, logprobs, tail, 2.0).sum().backward()
    assert torch.isfinite(student.grad).all()


def test_sparse_gradient_at_full_capture_equals_dense_gradient():
    teacher, student = teacher_and_student()
    ids, logprobs, tail = capture_topk(teacher, teacher.shape[-1])
    a = student.clone().requires_grad_(True)
    b = student.clone().requires_grad_(True)
    sparse_kl(a, ids, logprobs, tail).sum().backward()
    dense_kl(teacher, b).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4)


def test_parts_scale_kd_by_temperature_squared_and_count_labels():
    teacher, student = teacher_and_student()
    ids, logprobs, tail = capture_topk(teacher, 5)
    labels = torch.tensor([3, 4, 5, -100, 1, -100])
    parts = distillation_parts(student, labels, ids, logprobs, tail, temperature=2.0)
    expected_kd = 4.0 * sparse_kl(student, ids, logprobs, tail, 2.0).sum()
    torch.testing.assert_close(parts.kd_sum, expected_kd)
    keep = labels != -100
    expected_ce = torch.nn.functional.cross_entropy(student[keep], labels[keep], reduction="sum")
    torch.testing.assert_close(parts.ce_sum, expected_ce)
    assert parts.ce_count == 4 and parts.kd_count == 6


def test_labels_are_the_next_token_and_the_last_position_has_none():
    labels = next_token_labels(torch.tensor([[5, 6, 7], [8, 9, 10]]))
    assert labels.tolist() == [[6, 7, -100], [9, 10, -100]]


def test_folded_log_softmax_gradient_matches_finite_differences():
    from pipeline.losses import folded_log_softmax

    generator = torch.Generator().manual_seed(3)
    z = torch.randn(4, 12, generator=generator, dtype=torch.float64, requires_grad=True)
    ids = torch.stack([torch.randperm(12, generator=generator)[:5] for _ in range(4)])
    assert torch.autograd.gradcheck(lambda logits: folded_log_softmax(logits, ids), (z,))


def test_folded_log_softmax_equals_the_composed_reference():
    from pipeline.losses import folded_log_softmax

    teacher, student = teacher_and_student()
    ids, _, _ = capture_topk(teacher, 6)
    captured, rest, lse = folded_log_softmax(student, ids)
    reference = torch.log_softmax(student, -1)
    torch.testing.assert_close(captured, reference.gather(-1, ids))
    torch.testing.assert_close(lse, torch.logsumexp(student, -1))
    complement = torch.logsumexp(student.scatter(-1, ids, float("-inf")), -1) - torch.logsumexp(student, -1)
    torch.testing.assert_close(rest, complement)


def test_student_rest_bucket_is_exact_when_captured_mass_is_nearly_one():
    logits = torch.zeros(1, 50)
    logits[0, 7] = 25.0
    rest = student_buckets(logits, torch.tensor([[7]]))[0, -1]
    expected = (
        torch.log(torch.tensor(49.0, dtype=torch.float64))
        - 25.0
        - torch.log1p(torch.tensor(49 * 2.718281828459045**-25, dtype=torch.float64))
    )
    assert rest.item() == pytest.approx(expected.item(), abs=1e-4)


def test_shared_normaliser_gives_the_same_cross_entropy_and_gradient():
    teacher, student = teacher_and_student()
    ids, logprobs, tail = capture_topk(teacher, 5)
    labels = torch.tensor([3, 4, 5, -100, 1, -100])
    a = student.clone().requires_grad_(True)
    b = student.clone().requires_grad_(True)
    with_kd = distillation_parts(a, labels, ids, logprobs, tail, need_kd=True)
    ce_only = distillation_parts(b, labels, ids, logprobs, tail, need_kd=False)
    torch.testing.assert_close(with_kd.ce_sum, ce_only.ce_sum)
    with_kd.ce_sum.backward()
    ce_only.ce_sum.backward()
    torch.testing.assert_close(a.grad, b.grad)


def test_folded_log_softmax_counts_a_repeated_id_once_and_its_gradient_matches_finite_differences():
    from pipeline.losses import folded_log_softmax

    generator = torch.Generator().manual_seed(4)
    z = torch.randn(3, 10, generator=generator, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[4, 7, 4, 4], [0, 1, 2, 0], [9, 9, 9, 9]])
    captured, rest, _ = folded_log_softmax(z, ids)
    reference = torch.log_softmax(z, -1)
    torch.testing.assert_close(captured, reference.gather(-1, ids))
    outside = torch.ones(3, 10, dtype=torch.bool).scatter(-1, ids, False)
    torch.testing.assert_close(rest, torch.logsumexp(reference.masked_fill(~outside, float("-inf")), -1))
    assert torch.autograd.gradcheck(lambda logits: folded_log_softmax(logits, ids), (z,))


def topp_batch(teacher: torch.Tensor, lengths: list[int], width: int) -> dict[str, torch.Tensor]:
    """Top-p style rows: ``lengths[n]`` most probable ids per position, padded to ``width`` (id 0, ``-inf``)."""
    ids, logprobs, _ = capture_topk(teacher, width)
    valid = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    logprob_all = torch.log_softmax(teacher, -1)
    kept = torch.zeros_like(teacher, dtype=torch.bool).scatter(-1, torch.where(valid, ids, ids[:, :1]), True)
    return {
        "input_ids": torch.zeros(1, teacher.shape[0], dtype=torch.int64),
        "ids": torch.where(valid, ids, 0).unsqueeze(0),
        "valid": valid.unsqueeze(0),
        "logprobs": torch.where(valid, logprobs, float("-inf")).unsqueeze(0),
        "tail_logmass": torch.logsumexp(logprob_all.masked_fill(kept, float("-inf")), -1).unsqueeze(0),
    }


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_top_p_with_padding_equals_the_bucket_kl_of_the_valid_ids_alone(temperature):
    from pipeline.capture_spec import CaptureSpec
    from pipeline.losses import loss_parts, targets_from_batch

    teacher, student = teacher_and_student()
    teacher[2, 0] = 30.0  # id 0 is captured at a position that also has padding (id 0 again)
    lengths = [1, 3, 2, 7, 5, 4]
    batch = topp_batch(teacher, lengths, width=7)
    capture = CaptureSpec("topp", k=None, top_p=0.9, min_k=1, max_k=7)
    target = targets_from_batch(batch, capture, temperature)
    logits = student.clone().requires_grad_(True)
    per_position = [
        loss_parts(logits[n : n + 1], torch.tensor([-100]), target.chunk(slice(n, n + 1))).kd_sum for n in range(6)
    ]
    sum(per_position).backward()
    alone = student.clone().requires_grad_(True)
    expected = []
    for n, length in enumerate(lengths):
        ids = batch["ids"][0, n, :length].unsqueeze(0)
        logprobs = batch["logprobs"][0, n, :length].unsqueeze(0)
        tail = batch["tail_logmass"][0, n].unsqueeze(0)
        expected.append(temperature**2 * sparse_kl(alone[n : n + 1], ids, logprobs, tail, temperature)[0])
    sum(expected).backward()
    torch.testing.assert_close(torch.stack(per_position), torch.stack(expected))
    torch.testing.assert_close(logits.grad, alone.grad)


def test_top_p_that_holds_every_id_gives_the_dense_kl():
    from pipeline.capture_spec import CaptureSpec
    from pipeline.losses import loss_parts, targets_from_batch

    teacher, student = teacher_and_student(vocab=12)
    batch = topp_batch(teacher, [12, 12, 12, 12, 12, 12], width=12)
    target = targets_from_batch(batch, CaptureSpec("topp", k=None, top_p=1.0, min_k=1, max_k=12), 1.0)
    parts = loss_parts(student, torch.full((6,), -100), target)
    torch.testing.assert_close(parts.kd_sum, dense_kl(teacher, student).sum(), atol=1e-5, rtol=1e-5)


def test_loss_parts_without_a_target_is_cross_entropy_alone():
    from pipeline.losses import loss_parts

    _, student = teacher_and_student()
    labels = torch.tensor([3, 4, 5, -100, 1, -100])
    parts = loss_parts(student, labels, None)
    assert parts.kd_count == 0 and float(parts.kd_sum) == 0.0 and parts.ce_count == 4
    keep = labels != -100
    torch.testing.assert_close(
        parts.ce_sum, torch.nn.functional.cross_entropy(student[keep], labels[keep], reduction="sum")
    )


def test_losses_that_do_not_fit_the_capture_are_refused_in_one_line():
    from pipeline.capture_spec import CaptureSpec
    from pipeline.errors import ConfigError
    from pipeline.losses import check_target_fits, evaluation_temperature, target_problem

    no_logprobs = CaptureSpec("sample", k=None, samples=32, sample_temperature=1.5, seed=0)
    with_logprobs = CaptureSpec("sample", k=None, samples=32, sample_temperature=1.5, sample_logprobs=True, seed=0)
    hybrid = CaptureSpec("hybrid", k=4, samples=32, sample_temperature=1.5, seed=0)
    problem = target_problem(no_logprobs, 1.0)
    assert problem == (
        "--temperature 1 differs from the cache's --sample-temperature 1.5, and the cache holds no teacher "
        "log-probabilities to reweight its draws with; train with --temperature 1.5, or make the cache with "
        "--sample-logprobs"
    )
    with pytest.raises(ConfigError, match="--sample-logprobs"):
        check_target_fits(no_logprobs, 2.0)
    assert target_problem(no_logprobs, 1.5) is None
    for capture in (with_logprobs, hybrid, CaptureSpec("topk", k=8)):
        assert target_problem(capture, 3.0) is None
    assert "upgrade" in target_problem(CaptureSpec("future", k=1), 1.0)  # type: ignore[arg-type]
    assert evaluation_temperature(no_logprobs) == 1.5
    assert evaluation_temperature(with_logprobs) == evaluation_temperature(hybrid) == 1.0


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd", "tvd"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_masked_positions_contribute_nothing_to_any_loss_term(name, temperature):
    from pipeline.divergences import Divergence
    from pipeline.losses import bucket_target, loss_parts

    torch.manual_seed(3)
    student = torch.randn(12, 30, requires_grad=True)
    teacher = torch.randn(12, 30)
    ids, logprobs, tail = capture_topk(teacher, 5)
    labels = torch.randint(0, 30, (12,))
    mask = torch.tensor([1, 0, 0, 1, 1, 0, 1, 0, 1, 1, 0, 1], dtype=torch.bool)
    target = bucket_target(ids, None, logprobs, tail, temperature)
    masked = loss_parts(student, labels, target, divergence=Divergence(name), loss_mask=mask)
    kept = bucket_target(ids[mask], None, logprobs[mask], tail[mask], temperature)
    subset = loss_parts(student[mask], labels[mask], kept, divergence=Divergence(name))
    assert torch.allclose(masked.kd_sum, subset.kd_sum, atol=1e-5) and torch.allclose(masked.ce_sum, subset.ce_sum)
    assert (masked.kd_count, masked.ce_count) == (subset.kd_count, subset.ce_count) == (7, 7)
    (masked.kd_sum + masked.ce_sum).backward()
    assert torch.all(student.grad[~mask] == 0) and torch.any(student.grad[mask] != 0)
