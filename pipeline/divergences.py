"""The divergences a student is distilled with, over buckets (pure tensor functions; ``--loss``).

Each takes the student's and the target's log-probabilities over the same ``B`` buckets
(``(N, B)`` float, ``-inf`` where a side has no mass) and returns a loss per position
``(N,)`` float32. ``docs/losses.md`` has the formulas, their sources and which captures
each fits; :class:`Divergence` picks one from the student pass's flags.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pipeline.config import LOSSES, LossName
from pipeline.errors import ConfigError


def bucket_kl(teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor) -> torch.Tensor:
    """``KL(teacher || student)`` per position over buckets: ``(N, B), (N, B) -> (N,)`` float32.

    Buckets where the teacher has zero probability contribute 0 (even where the student
    has ``-inf``), and no gradient.
    """
    teacher_probs = teacher_logprobs.exp()
    terms = teacher_probs * (teacher_logprobs - student_logprobs)
    terms = torch.where(teacher_probs > 0, terms, torch.zeros_like(terms))
    return terms.sum(dim=-1)


def _live(
    student_logprobs: torch.Tensor, target_logprobs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both sides with 0 in the buckets where neither has mass, and the mask of those buckets.

    A bucket both sides give ``-inf`` contributes 0 to every divergence; replacing its
    log-probabilities by 0 (and masking its term) keeps ``-inf - -inf`` out of the forward
    pass and NaN out of the backward pass (``0 * nan``).
    """
    dead = (student_logprobs == float("-inf")) & (target_logprobs == float("-inf"))
    return torch.where(dead, 0.0, student_logprobs), torch.where(dead, 0.0, target_logprobs), dead


def _kl_terms(log_a: torch.Tensor, log_m: torch.Tensor) -> torch.Tensor:
    """Per-bucket ``a_b (log a_b - log m_b)``: ``(N, B)``; 0 (and no gradient) where ``a_b = 0``."""
    has_a = log_a > float("-inf")
    safe_a = torch.where(has_a, log_a, 0.0)
    safe_m = torch.where(has_a, log_m, 0.0)
    return torch.where(has_a, safe_a.exp() * (safe_a - safe_m), 0.0)


def _log_weight(weight: float) -> float:
    return math.log(weight) if weight > 0 else float("-inf")


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, weight: float) -> torch.Tensor:
    """``log(weight * a + (1 - weight) * b)`` per bucket, for ``weight`` in ``[0, 1)``."""
    return torch.logaddexp(log_a + _log_weight(weight), log_b + math.log1p(-weight))


def forward_kl(student_logprobs: torch.Tensor, target_logprobs: torch.Tensor) -> torch.Tensor:
    """``KL(t || s)`` per position: ``(N, B), (N, B) -> (N,)`` float32 (:func:`bucket_kl`)."""
    return bucket_kl(target_logprobs, student_logprobs)


def reverse_kl(student_logprobs: torch.Tensor, target_logprobs: torch.Tensor) -> torch.Tensor:
    """``KL(s || t)`` per position (Gu et al., 2024, MiniLLM, arXiv:2306.08543): ``(N,)`` float32.

    Infinite where the student has mass in a bucket the target gives 0, so it needs a target
    with mass wherever the student can put some (:func:`target_problem` refuses sampled ones).
    """
    student, target, dead = _live(student_logprobs, target_logprobs)
    return torch.where(dead, 0.0, _kl_terms(student, target)).sum(dim=-1)


def jsd(student_logprobs: torch.Tensor, target_logprobs: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """Generalised Jensen-Shannon divergence per position: ``(N,)`` float32.

    ``m = beta * t + (1 - beta) * s`` and ``beta * KL(t || m) + (1 - beta) * KL(s || m)``
    (Agarwal et al., 2024, "On-Policy Distillation of Language Models", arXiv:2306.13649; TRL's
    ``generalized_jsd_loss``). The formula vanishes at both ends, so, as in TRL, ``beta = 0``
    is :func:`forward_kl` and ``beta = 1`` is :func:`reverse_kl`.
    """
    if beta == 0.0:
        return forward_kl(student_logprobs, target_logprobs)
    if beta == 1.0:
        return reverse_kl(student_logprobs, target_logprobs)
    student, target, dead = _live(student_logprobs, target_logprobs)
    log_mix = _log_mix(target, student, beta)
    terms = beta * _kl_terms(target, log_mix) + (1 - beta) * _kl_terms(student, log_mix)
    return torch.where(dead, 0.0, terms).sum(dim=-1)


def skew_kl(student_logprobs: torch.Tensor, target_logprobs: torch.Tensor, skew: float = 0.1) -> torch.Tensor:
    """``KL(t || skew * t + (1 - skew) * s)`` per position (Ko et al., 2024, DistiLLM, arXiv:2402.03898).

    ``skew`` in ``[0, 1)``; at 0 it is :func:`forward_kl`. Returns ``(N,)`` float32.
    """
    student, target, dead = _live(student_logprobs, target_logprobs)
    terms = _kl_terms(target, _log_mix(target, student, skew))
    return torch.where(dead, 0.0, terms).sum(dim=-1)


def skew_reverse_kl(student_logprobs: torch.Tensor, target_logprobs: torch.Tensor, skew: float = 0.1) -> torch.Tensor:
    """``KL(s || skew * s + (1 - skew) * t)`` per position (DistiLLM's skew reverse KL).

    ``skew`` in ``[0, 1)``; at 0 it is :func:`reverse_kl`. Returns ``(N,)`` float32.
    """
    student, target, dead = _live(student_logprobs, target_logprobs)
    terms = _kl_terms(student, _log_mix(student, target, skew))
    return torch.where(dead, 0.0, terms).sum(dim=-1)


def tvd(student_logprobs: torch.Tensor, target_logprobs: torch.Tensor) -> torch.Tensor:
    """Total variation distance ``0.5 * sum_b |t_b - s_b|`` per position: ``(N,)`` float32."""
    return 0.5 * (target_logprobs.exp() - student_logprobs.exp()).abs().sum(dim=-1)


@dataclass(frozen=True)
class Divergence:
    """The distillation loss between the student's and the target's buckets (``--loss``).

    Attributes:
        name: which divergence (``--loss``).
        beta: ``jsd``'s weight of the target in the mixture (``--beta``), in ``[0, 1]``.
        skew: ``skew_kl`` and ``skew_reverse_kl``'s weight of the first side in the mixture
            (``--skew``), in ``[0, 1)``.
        renormalize: compare the two sides renormalised over the captured ids, without the
            rest bucket (``--renormalize``); see :meth:`sides`.
    """

    name: LossName = "forward_kl"
    beta: float = 0.5
    skew: float = 0.1
    renormalize: bool = False

    def sides(self, student_logprobs: torch.Tensor, target_logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two ``(N, B)`` bucket distributions compared: as given (the rest bucket last), or, with
        ``renormalize`` (``--renormalize``), each side's captured buckets renormalised and the rest dropped
        (``(N, B - 1)``)."""
        if not self.renormalize:
            return student_logprobs, target_logprobs
        student, target = student_logprobs[:, :-1], target_logprobs[:, :-1]
        return (
            student - torch.logsumexp(student, dim=-1, keepdim=True),
            target - torch.logsumexp(target, dim=-1, keepdim=True),
        )

    def __call__(self, student_logprobs: torch.Tensor, target_logprobs: torch.Tensor) -> torch.Tensor:
        """Per-position loss over buckets: ``(N, B)`` student, ``(N, B)`` target log-probabilities -> ``(N,)``."""
        if self.name == "forward_kl":
            return forward_kl(student_logprobs, target_logprobs)
        if self.name == "reverse_kl":
            return reverse_kl(student_logprobs, target_logprobs)
        if self.name == "jsd":
            return jsd(student_logprobs, target_logprobs, self.beta)
        if self.name == "skew_kl":
            return skew_kl(student_logprobs, target_logprobs, self.skew)
        if self.name == "skew_reverse_kl":
            return skew_reverse_kl(student_logprobs, target_logprobs, self.skew)
        if self.name == "tvd":
            return tvd(student_logprobs, target_logprobs)
        raise ConfigError(f"--loss {self.name!r} is not one of {', '.join(LOSSES)}")

    def temperature_scale(self, temperature: float) -> float:
        """``T^2`` for the KL family (Hinton et al., 2015), 1 for ``tvd`` (a bounded distance, not a KL)."""
        return 1.0 if self.name == "tvd" else temperature**2

    @property
    def needs_target_support(self) -> bool:
        """Whether the loss is infinite where the student has mass the target lacks (reverse-type losses,
        unless both sides are renormalised over the captured ids, where the target has mass)."""
        reverse = self.name in ("reverse_kl", "skew_reverse_kl") or (self.name == "jsd" and self.beta == 1.0)
        return reverse and not self.renormalize


FORWARD_KL = Divergence()
