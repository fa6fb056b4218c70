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


class _FoldedLogSoftmax(torch.autograd.Function):
    """Log-softmax folded onto captured ids and one rest bucket, in one pass over the vocabulary.

    Forward: ``z (N, V)``, ``ids (N, k)`` (unique within a row) ->
    ``captured (N, k)`` log-probabilities, ``rest (N,)`` log of the mass outside ``ids``,
    ``lse (N,)`` the log-normaliser. The rest mass is summed directly over the complement
    (the captured entries of ``exp(z - max)`` are zeroed, then summed), so it is exact
    even when the captured mass is within 1e-9 of 1; no ``log(1 - sum p)``.

    Backward reuses the saved ``exp(z - max)``: one write of an ``(N, V)`` gradient,
    where composing log_softmax, gather, scatter and logsumexp costs several.
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, ids: torch.Tensor):  # type: ignore[override]
        shift = z.max(dim=-1, keepdim=True).values
        exp = torch.exp(z - shift)
        total = exp.sum(dim=-1, keepdim=True)
        captured_exp = exp.gather(-1, ids)
        exp.scatter_(-1, ids, 0.0)
        rest = exp.sum(dim=-1, keepdim=True)
        lse = shift + torch.log(total)
        captured = z.gather(-1, ids) - lse
        rest_logprob = torch.log(rest) - torch.log(total)
        ctx.save_for_backward(exp, ids, captured_exp, total, rest)
        return captured, rest_logprob.squeeze(-1), lse.squeeze(-1)

    @staticmethod
    def backward(ctx, grad_captured: torch.Tensor, grad_rest: torch.Tensor, grad_lse: torch.Tensor):  # type: ignore[override]
        exp, ids, captured_exp, total, rest = ctx.saved_tensors
        grad_rest = grad_rest.unsqueeze(-1)
        # Every output depends on z_v through p_v = exp_v / total with this coefficient ...
        softmax_coef = (grad_lse.unsqueeze(-1) - grad_captured.sum(-1, keepdim=True) - grad_rest) / total
        # ... and the rest bucket also through exp_v / rest for v outside ids.
        rest_coef = torch.where(rest > 0, grad_rest / rest.clamp_min(torch.finfo(rest.dtype).tiny), 0.0)
        grad = exp * (softmax_coef + rest_coef)  # captured columns of exp are zero here
        grad.scatter_add_(-1, ids, grad_captured + captured_exp * softmax_coef)
        return grad, None


def folded_log_softmax(z: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``log_softmax(z)`` at ``ids``, the log of the mass outside them, and ``logsumexp(z)``.

    Args:
        z: ``(N, V)`` float32 logits.
        ids: ``(N, k)`` int64, unique within each row.

    Returns:
        ``(N, k)``, ``(N,)``, ``(N,)`` float32; the rest is ``-inf`` where ``ids`` cover the row.
    """
    return _FoldedLogSoftmax.apply(z, ids)


def student_buckets(student_logits: torch.Tensor, topk_ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Student log-probabilities folded onto the teacher's ``k + 1`` buckets.

    Args:
        student_logits: ``(N, V)`` float logits.
        topk_ids: ``(N, k)`` int64 captured ids (below ``V``, unique within a row).

    Returns:
        ``(N, k + 1)`` float32: log-softmax(logits / T) at ``topk_ids``, then the log of
        the mass outside them (exact even when the captured mass is close to 1; ``-inf``
        when the ids cover the vocabulary).
    """
    scaled = student_logits.float()
    if temperature != 1.0:
        scaled = scaled / temperature
    captured, rest, _ = folded_log_softmax(scaled, topk_ids)
    return torch.cat([captured, rest.unsqueeze(-1)], dim=-1)


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
    logits = student_logits.float()
    kd_sum = ce_sum = zero
    ce_count = int((labels != -100).sum())
    labelled = labels != -100
    log_normalizer = None
    if need_kd:
        scaled = logits if temperature == 1.0 else logits / temperature
        captured, rest, lse = folded_log_softmax(scaled, topk_ids)
        student = torch.cat([captured, rest.unsqueeze(-1)], dim=-1)
        kl = bucket_kl(teacher_buckets(topk_logprobs, tail_logmass, temperature), student)
        kd_sum = kl.sum() * temperature**2
        if temperature == 1.0:
            log_normalizer = lse  # cross-entropy shares the one pass over the vocabulary
    if need_ce and ce_count:
        if log_normalizer is None:
            ce_sum = F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
        else:
            target = logits.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
            ce_sum = ((log_normalizer - target) * labelled).sum()
    return LossParts(kd_sum=kd_sum, ce_sum=ce_sum, kd_count=student_logits.shape[0], ce_count=ce_count)


def next_token_labels(input_ids: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` -> ``(B, T)`` labels: token ``t + 1`` at position ``t``, ``-100`` at the last position.

    The last position's next token lies in the next row (or nowhere), so cross-entropy
    skips it; distillation can still use it, since the teacher's distribution is stored.
    """
    labels = torch.full_like(input_ids, -100)
    labels[:, :-1] = input_ids[:, 1:]
    return labels


def flatten_targets(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch of top-k rows as per-position targets: ``labels (N,)``, ``ids (N, k)``,
    ``logprobs (N, k)``, ``tail_logmass (N,)`` with ``N = B * T``, in row-major order."""
    k = batch["ids"].shape[-1]
    return (
        next_token_labels(batch["input_ids"]).reshape(-1),
        batch["ids"].reshape(-1, k),
        batch["logprobs"].reshape(-1, k),
        batch["tail_logmass"].reshape(-1),
    )
