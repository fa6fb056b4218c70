import math

import pytest
import torch

from pipeline.capture import capture_topk


def test_topk_matches_softmax_and_tail_completes_the_mass():
    torch.manual_seed(0)
    logits = torch.randn(7, 50) * 3
    ids, logprobs, tail = capture_topk(logits, 8)
    reference = torch.log_softmax(logits, dim=-1)
    assert ids.shape == (7, 8) and ids.dtype == torch.int64
    torch.testing.assert_close(logprobs, reference.gather(-1, ids))
    assert torch.all(logprobs[:, :-1] >= logprobs[:, 1:])  # most probable first
    total = torch.logaddexp(torch.logsumexp(logprobs, -1), tail)
    torch.testing.assert_close(total, torch.zeros(7), atol=1e-6, rtol=0)


def test_tail_keeps_its_digits_when_captured_mass_is_nearly_one():
    # One dominant logit: the uncaptured mass is about 49 * exp(-30) ~ 4.6e-12.
    logits = torch.zeros(1, 50)
    logits[0, 3] = 30.0
    _, logprobs, tail = capture_topk(logits, 1)
    expected = math.log(49) - 30.0 - math.log1p(49 * math.exp(-30.0))
    assert tail.item() == pytest.approx(expected, abs=1e-4)
    naive = torch.log1p(-logprobs.exp().sum(-1))  # what cancellation would give
    assert not math.isfinite(naive.item()) or abs(naive.item() - expected) > 1.0


def test_full_capture_leaves_no_tail():
    _, logprobs, tail = capture_topk(torch.randn(3, 10), 10)
    assert torch.isneginf(tail).all()
    torch.testing.assert_close(logprobs.exp().sum(-1), torch.ones(3))


def test_half_precision_logits_are_captured_in_fp32():
    logits = (torch.randn(4, 64) * 4).to(torch.bfloat16)
    _, logprobs, tail = capture_topk(logits, 4)
    assert logprobs.dtype == torch.float32 and tail.dtype == torch.float32


def test_overwriting_the_logits_gives_the_same_capture():
    logits = torch.randn(5, 300) * 5
    expected = capture_topk(logits, 12)
    scratch = logits.clone()
    for got, want in zip(capture_topk(scratch, 12, overwrite=True), expected):
        torch.testing.assert_close(got, want)


def test_default_leaves_the_logits_untouched():
    logits = torch.randn(3, 40)
    before = logits.clone()
    capture_topk(logits, 4)
    assert torch.equal(logits, before)
