"""Distillation losses over a sparse teacher distribution (pure tensor functions).

The teacher's distribution at a position is ``k + 1`` buckets: the ``k`` captured ids and
one *rest* bucket holding everything else. The student's distribution is folded onto the
same buckets: its log-probabilities at the captured ids (from its full-vocabulary
log-softmax) and the log of its mass outside them. At temperature 1 the KL over these
buckets is exact for what was captured; at another temperature the teacher's captured
log-probabilities are divided by T and the rest bucket is treated as a single logit
``tail_logmass / T`` (an approximation: the true tempered tail depends on how the mass is
spread over the uncaptured ids, which the cache does not hold).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def teacher_buckets(topk_logprobs: torch.Tensor, tail_logmass: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Teacher log-probabilities over the ``k + 1`` buckets at ``temperature``.

    Args:
        topk_logprobs: ``(N, k)`` float, natural log at temperature 1.
        tail_logmass: ``(N,)`` float, log of the uncaptured mass (``-inf`` if none).

    Returns:
        ``(N, k + 1)`` float32 log-probabilities summing to 1 (last column: rest).
    """
    logits = torch.cat([topk_logprobs.float(), tail_logmass.float().unsqueeze(-1)], dim=-1)
    return torch.log_softmax(logits / temperature, dim=-1)


def student_buckets(student_logits: torch.Tensor, topk_ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Student log-probabilities folded onto the teacher's ``k + 1`` buckets.

    Args:
        student_logits: ``(N, V)`` float logits.
        topk_ids: ``(N, k)`` int64 captured ids (below ``V``).

    Returns:
        ``(N, k + 1)`` float32: log-softmax(logits / T) at ``topk_ids``, then the log of
        the mass outside them (a log-sum-exp over the complement, exact even when the
        captured mass is close to 1; ``-inf`` when the ids cover the vocabulary).
    """
    scaled = student_logits.float() / temperature
    log_normalizer = torch.logsumexp(scaled, dim=-1, keepdim=True)
    captured = scaled.gather(-1, topk_ids) - log_normalizer
    rest = torch.logsumexp(scaled.scatter(-1, topk_ids, float("-inf")), dim=-1, keepdim=True) - log_normalizer
    return torch.cat([captured, rest], dim=-1)


def bucket_kl(teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor) -> torch.Tensor:
    """``KL(teacher || student)`` per position over buckets: ``(N, B), (N, B) -> (N,)`` float32.

    Buckets where the teacher has zero probability contribute 0 (even where the student
    has ``-inf``).
    """
    teacher_probs = teacher_logprobs.exp()
    terms = teacher_probs * (teacher_logprobs - student_logprobs)
    terms = torch.where(teacher_probs > 0, terms, torch.zeros_like(terms))
    return terms.sum(dim=-1)


def sparse_kl(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    tail_logmass: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """``KL(teacher_T || student_T)`` over the ``k + 1`` buckets: ``(N,)`` float32."""
    return bucket_kl(
        teacher_buckets(topk_logprobs, tail_logmass, temperature),
        student_buckets(student_logits, topk_ids, temperature),
    )


def dense_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Full-vocabulary ``KL(teacher_T || student_T)``: ``(N, V), (N, V) -> (N,)`` float32 (reference)."""
    teacher = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    student = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    return bucket_kl(teacher, student)


@dataclass(frozen=True)
class LossParts:
    """Sums over positions (divide by the counts for means).

    Attributes:
        kd_sum: sum of ``T^2 * KL`` over distillation positions (a scalar tensor).
        ce_sum: sum of next-token cross-entropy over positions with a label.
        kd_count: number of distillation positions.
        ce_count: number of labelled positions.
    """

    kd_sum: torch.Tensor
    ce_sum: torch.Tensor
    kd_count: int
    ce_count: int


def distillation_parts(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    tail_logmass: torch.Tensor,
    temperature: float = 1.0,
    need_kd: bool = True,
    need_ce: bool = True,
) -> LossParts:
    """Sums of the two terms of the standard recipe over ``N`` positions.

    Args:
        student_logits: ``(N, V)`` float.
        labels: ``(N,)`` int64 next-token ids, ``-100`` where there is none.
        topk_ids, topk_logprobs, tail_logmass: the teacher's ``(N, k)``, ``(N, k)``, ``(N,)``.

    The loss over a batch is ``alpha * kd_sum / kd_count + (1 - alpha) * ce_sum / ce_count``.
    """
    zero = student_logits.new_zeros((), dtype=torch.float32)
    kd_sum = zero
    if need_kd:
        kl = sparse_kl(student_logits, topk_ids, topk_logprobs, tail_logmass, temperature)
        kd_sum = kl.sum() * temperature**2
    ce_sum = zero
    ce_count = int((labels != -100).sum())
    if need_ce and ce_count:
        ce_sum = F.cross_entropy(student_logits.float(), labels, ignore_index=-100, reduction="sum")
    return LossParts(kd_sum=kd_sum, ce_sum=ce_sum, kd_count=student_logits.shape[0], ce_count=ce_count)


def next_token_labels(input_ids: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` -> ``(B, T)`` labels: token ``t + 1`` at position ``t``, ``-100`` at the last position.

    The last position's next token lies in the next row (or nowhere), so cross-entropy
    skips it; distillation can still use it, since the teacher's distribution is stored.
    """
    labels = torch.full_like(input_ids, -100)
    labels[:, :-1] = input_ids[:, 1:]
    return labels
