"""Held-out quality of a student against a live teacher (pure tensor math, no files).

The teacher here is the model itself, run on the held-out text: its full-vocabulary
logits, never a cache. :class:`HeldOutMetrics` takes both models' logits a batch (or a
chunk of positions) at a time and keeps running sums, so any split of the positions into
batches gives the same result up to float64 rounding.

What is measured, with ``p`` the teacher's and ``q`` the student's softmax at temperature 1:

- ``kl``: mean full-vocabulary ``KL(p || q)`` per position, in nats, over every position
  given (the teacher has a next-token distribution at every position, labelled or not).
- ``top1_agreement``: the fraction of those positions where ``argmax q == argmax p``.
- ``ce`` and ``perplexity``: mean next-token cross-entropy of the student on the labels,
  and ``exp`` of it, over positions whose label is not ``-100``.
- ``ece``: expected calibration error of the student on the labels (see
  :meth:`HeldOutMetrics.result`).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from pipeline.losses import dense_kl

ECE_BINS = 15
IGNORE_INDEX = -100


class HeldOutMetrics:
    """Running sums of KL, top-1 agreement, cross-entropy and calibration over batches.

    Example::

        metrics = HeldOutMetrics()
        for teacher_logits, student_logits, labels in batches:
            metrics.update(teacher_logits, student_logits, labels)
        metrics.result()  # {"kl": ..., "perplexity": ..., "top1_agreement": ..., "ece": ..., ...}
    """

    def __init__(self, bins: int = ECE_BINS) -> None:
        if bins < 1:
            raise ValueError(f"bins={bins} must be at least 1")
        self.bins = bins
        self.positions = 0
        self.labelled = 0
        self.kl_sum = 0.0
        self.agree_sum = 0
        self.ce_sum = 0.0
        # Per confidence bin: how many labelled positions, their summed confidence, how many correct.
        self.bin_count = torch.zeros(bins, dtype=torch.float64)
        self.bin_confidence = torch.zeros(bins, dtype=torch.float64)
        self.bin_correct = torch.zeros(bins, dtype=torch.float64)

    @torch.no_grad()
    def update(self, teacher_logits: torch.Tensor, student_logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Add ``N`` positions.

        Args:
            teacher_logits: ``(..., V)`` float, any float dtype and device: the live
                teacher's logits over the whole vocabulary.
            student_logits: ``(..., V)`` float, same shape: the student's.
            labels: ``(...)`` int64 next-token ids, ``-100`` where there is none (such
                positions count for ``kl`` and ``top1_agreement`` only).

        The leading dimensions (``(N,)`` or ``(B, T)``) are flattened; everything is computed
        in float32 and summed in float64.
        """
        if teacher_logits.shape != student_logits.shape:
            raise ValueError(
                f"teacher logits {tuple(teacher_logits.shape)} and student logits {tuple(student_logits.shape)} "
                "differ in shape; both models must share the vocabulary"
            )
        if labels.shape != student_logits.shape[:-1]:
            raise ValueError(f"labels {tuple(labels.shape)} must have the logits' leading shape")
        width = student_logits.shape[-1]
        teacher = teacher_logits.reshape(-1, width).float()
        student = student_logits.reshape(-1, width).float().to(teacher.device)
        labels = labels.reshape(-1).to(teacher.device)

        self.positions += teacher.shape[0]
        self.kl_sum += float(dense_kl(teacher, student).double().sum())
        self.agree_sum += int((teacher.argmax(dim=-1) == student.argmax(dim=-1)).sum())

        keep = labels != IGNORE_INDEX
        if not bool(keep.any()):
            return
        student_logprobs = torch.log_softmax(student[keep], dim=-1)
        kept_labels = labels[keep]
        self.labelled += int(kept_labels.shape[0])
        self.ce_sum -= float(student_logprobs.gather(-1, kept_labels.unsqueeze(-1)).double().sum())
        confidence, predicted = student_logprobs.max(dim=-1)
        confidence = confidence.exp().double().cpu()
        correct = (predicted == kept_labels).double().cpu()
        which = self.bin_of(confidence)
        self.bin_count += torch.bincount(which, minlength=self.bins).double()
        self.bin_confidence += torch.bincount(which, weights=confidence, minlength=self.bins)
        self.bin_correct += torch.bincount(which, weights=correct, minlength=self.bins)

    def bin_of(self, confidence: torch.Tensor) -> torch.Tensor:
        """``(M,)`` float in ``[0, 1]`` -> ``(M,)`` int64 bin index: bin ``b`` holds ``(b / B, (b + 1) / B]``.

        Confidence 0 (impossible for a softmax maximum, which is at least ``1 / V``) goes to bin 0.
        """
        return (torch.ceil(confidence * self.bins).long() - 1).clamp_(0, self.bins - 1)

    def result(self) -> dict[str, Any]:
        """The metrics so far.

        Returns a dict of floats: ``kl``, ``top1_agreement`` (over ``positions``), ``ce``,
        ``perplexity``, ``ece``, ``accuracy`` (student argmax equals the label), and the
        counts ``positions`` and ``labelled``; ``nan`` where nothing was counted.

        ``ece`` is the expected calibration error with ``bins`` equal-width bins (Guo et al.,
        2017, "On Calibration of Modern Neural Networks"): each labelled position's
        confidence ``c = max_v q_v`` falls in bin ``b`` with ``b / B < c <= (b + 1) / B``,
        it is correct when ``argmax_v q_v`` equals the label, and
        ``ece = sum_b (n_b / n) * |accuracy_b - mean confidence_b|`` over non-empty bins,
        ``n`` the labelled positions.
        """
        nan = float("nan")
        ce = self.ce_sum / self.labelled if self.labelled else nan
        filled = self.bin_count > 0
        gaps = (self.bin_correct[filled] - self.bin_confidence[filled]).abs()
        return {
            "kl": self.kl_sum / self.positions if self.positions else nan,
            "top1_agreement": self.agree_sum / self.positions if self.positions else nan,
            "ce": ce,
            "perplexity": math.exp(min(ce, 700.0)) if self.labelled else nan,
            "ece": float(gaps.sum()) / self.labelled if self.labelled else nan,
            "accuracy": float(self.bin_correct.sum()) / self.labelled if self.labelled else nan,
            "positions": self.positions,
            "labelled": self.labelled,
        }
