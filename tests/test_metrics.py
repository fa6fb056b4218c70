import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.losses import dense_kl
from pipeline.metrics import HeldOutMetrics


def logits_and_labels(batch: int = 3, seq: int = 10, vocab: int = 50, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    teacher = torch.randn(batch, seq, vocab, generator=generator) * 3
    student = torch.randn(batch, seq, vocab, generator=generator) * 2
    labels = torch.randint(0, vocab, (batch, seq), generator=generator)
    labels[:, -1] = -100  # the last position's next token lies outside the row
    return teacher, student, labels


def two_way_logits(confidences: list[float]) -> torch.Tensor:
    """``(N, 2)`` logits whose softmax is ``[c, 1 - c]``: the student predicts id 0 with confidence ``c``."""
    probs = torch.tensor([[c, 1 - c] for c in confidences], dtype=torch.float64)
    return probs.log().float()


def test_a_student_identical_to_the_teacher_has_zero_kl_and_full_agreement():
    teacher, _, labels = logits_and_labels()
    metrics = HeldOutMetrics()
    metrics.update(teacher, teacher.clone(), labels)
    result = metrics.result()
    assert result["kl"] == pytest.approx(0.0, abs=1e-6)
    assert result["top1_agreement"] == 1.0
    assert result["positions"] == teacher.shape[0] * teacher.shape[1]


def test_kl_agreement_and_cross_entropy_match_their_definitions():
    teacher, student, labels = logits_and_labels()
    metrics = HeldOutMetrics()
    metrics.update(teacher, student, labels)
    result = metrics.result()
    flat_teacher, flat_student = teacher.reshape(-1, 50), student.reshape(-1, 50)
    assert result["kl"] == pytest.approx(float(dense_kl(flat_teacher, flat_student).mean()), rel=1e-5)
    agreement = (flat_teacher.argmax(-1) == flat_student.argmax(-1)).float().mean()
    assert result["top1_agreement"] == pytest.approx(float(agreement))
    ce = F.cross_entropy(flat_student, labels.reshape(-1), ignore_index=-100)
    assert result["ce"] == pytest.approx(float(ce), rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(float(ce)), rel=1e-5)
    assert result["labelled"] == int((labels != -100).sum())


def test_ece_on_a_hand_built_case():
    # Four positions at confidence 0.9 (bin (13/15, 14/15]), three right: gap |0.75 - 0.9| = 0.15.
    # Two at 0.7 (bin (10/15, 11/15]), one right: gap |0.5 - 0.7| = 0.2. One unlabelled, ignored.
    student = two_way_logits([0.9, 0.9, 0.9, 0.9, 0.7, 0.7, 0.55])
    labels = torch.tensor([0, 0, 0, 1, 0, 1, -100])
    metrics = HeldOutMetrics()
    metrics.update(student.clone(), student, labels)
    result = metrics.result()
    assert result["ece"] == pytest.approx((4 * 0.15 + 2 * 0.2) / 6, abs=1e-6)
    assert result["accuracy"] == pytest.approx(4 / 6)
    assert result["labelled"] == 6 and result["positions"] == 7


def test_a_perfectly_calibrated_bin_has_no_error():
    # Confidence 0.75 (bin (11/15, 12/15]), right three times in four.
    student = two_way_logits([0.75] * 4)
    metrics = HeldOutMetrics()
    metrics.update(student, student, torch.tensor([0, 0, 0, 1]))
    assert metrics.result()["ece"] == pytest.approx(0.0, abs=1e-6)


def test_confidence_bins_are_closed_on_the_right():
    metrics = HeldOutMetrics(bins=15)
    edges = torch.tensor([0.0, 1 / 15 - 1e-9, 1 / 30, 0.5, 0.999, 1.0], dtype=torch.float64)
    assert metrics.bin_of(edges).tolist() == [0, 0, 0, 7, 14, 14]


def test_accumulating_over_batches_equals_one_big_batch():
    teacher, student, labels = logits_and_labels(batch=6, seq=12)
    whole = HeldOutMetrics()
    whole.update(teacher, student, labels)
    split = HeldOutMetrics()
    for rows in (slice(0, 1), slice(1, 4), slice(4, 6)):
        split.update(teacher[rows], student[rows], labels[rows])
    # Flattened chunks of positions, as a chunked LM head gives them, add up the same way.
    chunked = HeldOutMetrics()
    flat = teacher.reshape(-1, 50), student.reshape(-1, 50), labels.reshape(-1)
    for start in range(0, flat[0].shape[0], 17):
        chunked.update(*(part[start : start + 17] for part in flat))
    expected = whole.result()
    for result in (split.result(), chunked.result()):
        assert result.keys() == expected.keys()
        for key, value in expected.items():
            assert result[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_nothing_counted_gives_nan_not_an_error():
    result = HeldOutMetrics().result()
    assert math.isnan(result["kl"]) and math.isnan(result["ece"]) and result["positions"] == 0


def test_logits_of_different_widths_are_refused():
    teacher, student, labels = logits_and_labels()
    with pytest.raises(ValueError, match="share the vocabulary"):
        HeldOutMetrics().update(teacher, student[..., :40], labels)
