"""Distillation losses over a sparse teacher distribution (pure tensor functions).

Every capture strategy becomes one :class:`Target`: at each position, ``K`` ids with a
target log-probability each, and one *rest* bucket for everything else. The student's
distribution is folded onto the same buckets (its log-probabilities at the ids, from its
full-vocabulary log-softmax, and the log of its mass outside them), and the loss compares
the two. :func:`targets_from_batch` builds the target of a batch once;
:func:`loss_parts` is the one place where a loss meets the student's logits.

What the target holds depends on the capture (``docs/losses.md`` has the maths):

- top-k, top-p: the teacher's captured probabilities and its exact rest mass (``k + 1``
  buckets). At temperature 1 the KL over these buckets is exact for what was captured; at
  another temperature the tempered rest depends on how the mass is spread over the
  uncaptured ids, which the cache does not hold: it is taken as spread evenly over them
  (the maximum-entropy guess, exact at ``T = 1`` and right in the flat limit of high ``T``),
  or as a single logit ``tail_logmass / T`` when the vocabulary size is not given.
- sample: ``t_hat = count / N`` over the drawn ids and nothing in the rest bucket, the
  estimator of Anshumann et al. (2025), "Sparse Logit Sampling" (arXiv:2503.16870): the
  gradient ``p_student - t_hat`` is unbiased for the dense KL's. At a student temperature
  other than the draws', the counts are importance-weighted and self-normalised.
- hybrid: the head's exact probabilities, plus the rest mass shared among the drawn ids
  by their counts.

The loss over the buckets is forward KL unless ``--loss`` picks another member of the
family (:class:`Divergence`: reverse KL, generalised JSD, skew KL, skew reverse KL, total
variation), each a pure function of the two sides' bucket log-probabilities.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F

from pipeline.capture_spec import CaptureSpec
from pipeline.divergences import FORWARD_KL, Divergence, bucket_kl
from pipeline.errors import CacheError, ConfigError

Estimator = Literal["buckets", "sampled"]


def teacher_buckets(
    topk_logprobs: torch.Tensor,
    tail_logmass: torch.Tensor,
    temperature: float = 1.0,
    tail_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Teacher log-probabilities over the ``k + 1`` buckets at ``temperature``.

    Args:
        topk_logprobs: ``(N, k)`` float, natural log at temperature 1 (``-inf`` in padding).
        tail_logmass: ``(N,)`` float, log of the uncaptured mass ``R`` (``-inf`` if none).
        tail_ids: ``(N,)`` int, how many ids the tail spreads over (the vocabulary less the
            captured ids), or ``None``. Given, the tempered tail is ``n^(1 - 1/T) R^(1/T)``:
            ``R`` spread evenly over its ``n`` ids; ``None`` treats it as one logit, ``R^(1/T)``.
            The true value lies between the two; at ``T = 1`` all three agree.

    Returns:
        ``(N, k + 1)`` float32 log-probabilities summing to 1 (last column: rest).
    """
    tail = tail_logmass.float() / temperature
    if tail_ids is not None and temperature != 1.0:
        spread = torch.log(tail_ids.float()) * (1.0 - 1.0 / temperature)
        tail = torch.where((tail_ids > 0) & torch.isfinite(tail), tail + spread, float("-inf"))
    logits = torch.cat([topk_logprobs.float() / temperature, tail.unsqueeze(-1)], dim=-1)
    return torch.log_softmax(logits, dim=-1)


class _FoldedLogSoftmax(torch.autograd.Function):
    """Log-softmax folded onto captured ids and one rest bucket, in one pass over the vocabulary.

    Forward: ``z (N, V)``, ``ids (N, k)`` ->
    ``captured (N, k)`` log-probabilities, ``rest (N,)`` log of the mass outside ``ids``,
    ``lse (N,)`` the log-normaliser. The rest mass is summed directly over the complement
    (the captured entries of ``exp(z - max)`` are zeroed, then summed), so it is exact
    even when the captured mass is within 1e-9 of 1; no ``log(1 - sum p)``.

    An id may repeat within a row (padding slots point at a captured id): each slot gets
    its log-probability, and the rest is the mass outside the *set* of ids.

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
        # Written, not added: a repeated id writes the same value twice, so it counts once ...
        grad.scatter_(-1, ids, captured_exp * softmax_coef)
        # ... while each slot's own log-probability adds its gradient.
        grad.scatter_add_(-1, ids, grad_captured)
        return grad, None


def folded_log_softmax(z: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``log_softmax(z)`` at ``ids``, the log of the mass outside them, and ``logsumexp(z)``.

    Args:
        z: ``(N, V)`` float32 logits.
        ids: ``(N, k)`` int64; a repeated id counts once in the rest.

    Returns:
        ``(N, k)``, ``(N,)``, ``(N,)`` float32; the rest is ``-inf`` where ``ids`` cover the row.
    """
    return _FoldedLogSoftmax.apply(z, ids)


def student_buckets(student_logits: torch.Tensor, topk_ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Student log-probabilities folded onto the teacher's ``k + 1`` buckets.

    Args:
        student_logits: ``(N, V)`` float logits.
        topk_ids: ``(N, k)`` int64 captured ids (below ``V``).

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


def sparse_kl(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    tail_logmass: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """``KL(teacher_T || student_T)`` over the ``k + 1`` buckets of a top-k capture: ``(N,)`` float32."""
    return bucket_kl(
        teacher_buckets(topk_logprobs, tail_logmass, temperature),
        student_buckets(student_logits, topk_ids, temperature),
    )


def dense_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Full-vocabulary ``KL(teacher_T || student_T)``: ``(N, V), (N, V) -> (N,)`` float32 (reference)."""
    teacher = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    student = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    return bucket_kl(teacher, student)


def padding_slots(ids: torch.Tensor) -> torch.Tensor:
    """``(N, K)`` bool: the slots that repeat slot 0's id (padding; a target's valid ids are distinct)."""
    repeats = ids == ids[:, :1]
    repeats[:, 0] = False
    return repeats


@dataclass(frozen=True)
class Target:
    """What the student is distilled towards at ``N`` positions: ``K + 1`` buckets per position.

    Attributes:
        ids: ``(N, K)`` int64 ids. Padding slots repeat the position's first id, which
            :func:`folded_log_softmax` counts once, so the student's rest bucket is its mass
            outside the valid ids.
        logprobs: ``(N, K)`` float32 target log-probabilities at ``temperature``; ``-inf``
            in padding.
        rest_logprob: ``(N,)`` float32 target log-probability of everything outside ``ids``;
            ``-inf`` where the target puts nothing there (sampled estimators, or ids that
            cover the vocabulary).
        temperature: the temperature of the target, and of the student's side of the loss.
        estimator: ``"buckets"``: the teacher's own probabilities over captured ids and
            the rest (top-k, top-p); ``"sampled"``: ``t_hat``, an estimate of the teacher
            built from draws (sample, hybrid).
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    rest_logprob: torch.Tensor
    temperature: float
    estimator: Estimator

    def __len__(self) -> int:
        return self.ids.shape[0]

    def chunk(self, positions: slice) -> Target:
        """The target at a slice of the positions (for the chunked LM head)."""
        return replace(
            self, ids=self.ids[positions], logprobs=self.logprobs[positions], rest_logprob=self.rest_logprob[positions]
        )

    def buckets(self) -> torch.Tensor:
        """``(N, K + 1)`` float32 target log-probabilities, the rest bucket last."""
        return torch.cat([self.logprobs, self.rest_logprob.unsqueeze(-1)], dim=-1)


def _padding_at_first_id(ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``(N, K)`` ids with padding slots pointing at slot 0's id (every capture fills slot 0)."""
    return torch.where(valid, ids, ids[:, :1])


def _masked(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``values`` as float32 where ``keep``, ``-inf`` elsewhere (never ``0 * inf``)."""
    return torch.where(keep, values.float(), float("-inf"))


def bucket_target(
    ids: torch.Tensor,
    valid: torch.Tensor | None,
    logprobs: torch.Tensor,
    tail_logmass: torch.Tensor,
    temperature: float = 1.0,
    vocab_size: int | None = None,
) -> Target:
    """Top-k and top-p: the teacher's captured probabilities and its rest mass at ``temperature``.

    Args:
        ids: ``(N, K)`` int64; valid slots distinct.
        valid: ``(N, K)`` bool, or ``None`` when every slot is valid.
        logprobs: ``(N, K)`` float, teacher log-probabilities at temperature 1.
        tail_logmass: ``(N,)`` float, log of the teacher's mass outside the valid ids.
        vocab_size: the teacher's logit width (``manifest.logit_width``): at ``T != 1`` the
            tail is tempered as spread evenly over the uncaptured ids (:func:`teacher_buckets`).
    """
    valid = torch.ones_like(ids, dtype=torch.bool) if valid is None else valid
    tail_ids = None if vocab_size is None else (vocab_size - valid.sum(dim=-1)).clamp_min(0)
    buckets = teacher_buckets(_masked(logprobs, valid), tail_logmass, temperature, tail_ids)
    return Target(_padding_at_first_id(ids, valid), buckets[:, :-1], buckets[:, -1], temperature, "buckets")


def sampled_target(
    ids: torch.Tensor,
    valid: torch.Tensor,
    counts: torch.Tensor,
    logprobs: torch.Tensor | None,
    temperature: float,
    sample_temperature: float,
) -> Target:
    """Sampled capture: ``t_hat_i = count_i / N`` over the drawn ids, nothing in the rest bucket.

    When ``temperature`` differs from ``sample_temperature`` (the draws came from
    ``q ~ p^(1 / sample_temperature)``, the target is ``p^(1 / temperature)``), each count is
    weighted by ``w_i = p_i^(1/temperature - 1/sample_temperature)``, proportional to
    ``p_i^(1/T) / q_i``, and the weights are self-normalised:
    ``t_hat_i = count_i w_i / sum_j count_j w_j`` (consistent, biased by O(1/N)).

    Args:
        ids: ``(N, K)`` int64 distinct drawn ids (padding after them).
        valid: ``(N, K)`` bool.
        counts: ``(N, K)`` int draws per id, summing to the number of draws.
        logprobs: ``(N, K)`` float teacher log-probabilities at temperature 1, or ``None``;
            needed only when the temperatures differ.
    """
    drawn = valid & (counts > 0)
    log_weights = _masked(counts.float().log(), drawn)
    if not same_temperature(temperature, sample_temperature):
        if logprobs is None:
            raise ConfigError(temperature_problem(temperature, sample_temperature))
        exponent = 1.0 / temperature - 1.0 / sample_temperature
        log_weights = log_weights + _masked(logprobs.float() * exponent, drawn)
    target = log_weights - torch.logsumexp(log_weights, dim=-1, keepdim=True)
    rest = torch.full_like(target[:, 0], float("-inf"))
    return Target(_padding_at_first_id(ids, valid), target, rest, temperature, "sampled")


def hybrid_target(
    ids: torch.Tensor,
    valid: torch.Tensor,
    counts: torch.Tensor,
    logprobs: torch.Tensor,
    tail_logmass: torch.Tensor,
    head_size: int,
    temperature: float,
    sample_temperature: float,
) -> Target:
    """Hybrid capture: the head's exact probabilities, the rest mass shared among the drawn ids.

    With ``T = temperature``, ``s = sample_temperature``, ``p`` the teacher at temperature 1,
    ``R = sum of p outside the head`` (exact: ``logsumexp`` of the drawn ids' log-probabilities
    and the tail) and draws from ``q ~ p^(1/s)`` restricted to outside the head:

    - head id: ``t_i = p_i^(1/T) / Z``;
    - drawn id: ``t_v = S * c_v a_v / sum_j c_j a_j / Z`` with ``a_v = p_v^(1/T - 1/s)``;
    - ``S = R * sum_j c_j a_j / sum_j c_j b_j``, ``b_v = p_v^(1 - 1/s)``, estimates the rest's
      tempered mass ``sum p_v^(1/T)`` (``R`` anchors the unknown normaliser of ``q``);
      ``Z = sum_head p_i^(1/T) + S``.

    At ``T = s = 1`` this is ``t_v = R c_v / N``, unbiased; otherwise it is a ratio of
    estimates: consistent, biased by O(1/N). A position without draws keeps its head alone.

    Args:
        ids: ``(N, K)`` int64: ``head_size`` head ids, then distinct drawn ids, then padding.
        valid: ``(N, K)`` bool.
        counts: ``(N, K)`` int draws per id (0 on the head).
        logprobs: ``(N, K)`` float teacher log-probabilities at temperature 1.
        tail_logmass: ``(N,)`` float log of the mass outside head and drawn ids.
    """
    slot = torch.arange(ids.shape[1], device=ids.device)
    head = valid & (slot < head_size)
    drawn = valid & (slot >= head_size) & (counts > 0)
    head_tempered = _masked(logprobs, head) / temperature
    drawn_logprobs = _masked(logprobs, drawn)
    log_counts = _masked(counts.float().log(), drawn)
    log_a = log_counts + _masked(logprobs.float() * (1.0 / temperature - 1.0 / sample_temperature), drawn)
    log_b = log_counts + _masked(logprobs.float() * (1.0 - 1.0 / sample_temperature), drawn)
    log_rest_mass = torch.logsumexp(torch.cat([drawn_logprobs, tail_logmass.float().unsqueeze(-1)], -1), -1)
    lse_a = torch.logsumexp(log_a, dim=-1)
    has_draws = drawn.any(dim=-1)
    log_rest_tempered = torch.where(has_draws, log_rest_mass + lse_a - torch.logsumexp(log_b, dim=-1), float("-inf"))
    log_z = torch.logaddexp(torch.logsumexp(head_tempered, dim=-1), log_rest_tempered)
    drawn_target = log_a - lse_a.unsqueeze(-1) + (log_rest_tempered - log_z).unsqueeze(-1)
    target = torch.where(head, head_tempered - log_z.unsqueeze(-1), _masked(drawn_target, drawn))
    rest = torch.full_like(log_z, float("-inf"))
    return Target(_padding_at_first_id(ids, valid), target, rest, temperature, "sampled")


def same_temperature(a: float, b: float) -> bool:
    """Whether two temperatures are the same setting (up to float formatting)."""
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)


def temperature_problem(temperature: float, sample_temperature: float) -> str:
    """The refusal for a sampled cache without log-probabilities at a temperature other than its draws'."""
    return (
        f"--temperature {temperature:g} differs from the cache's --sample-temperature {sample_temperature:g}, and "
        "the cache holds no teacher log-probabilities to reweight its draws with; train with "
        f"--temperature {sample_temperature:g}, or make the cache with --sample-logprobs"
    )


def target_problem(capture: CaptureSpec, temperature: float, divergence: Divergence = FORWARD_KL) -> str | None:
    """Why a distillation loss at ``temperature`` does not fit caches of ``capture``, or ``None``."""
    if capture.strategy not in ("topk", "topp", "sample", "hybrid"):
        return f"capture strategy {capture.strategy!r} has no distillation loss in this version; upgrade the package"
    if divergence.needs_target_support and capture.strategy in ("sample", "hybrid"):
        # t_hat is 0 outside the drawn ids, where the student has mass: KL(s || t_hat) is infinite.
        loss = "jsd --beta 1" if divergence.name == "jsd" else divergence.name
        return (
            f"--loss {loss} needs the teacher's mass wherever the student has some, but a {capture.strategy} "
            "cache's estimate has none outside the drawn ids (the loss would be infinite); use --loss forward_kl, "
            "skew_kl, tvd or jsd with --beta below 1, add --renormalize, or use a topk or topp cache"
        )
    sample_temperature = capture.sample_temperature or 1.0
    if (
        capture.strategy == "sample"
        and not capture.has_logprobs
        and not same_temperature(temperature, sample_temperature)
    ):
        return temperature_problem(temperature, sample_temperature)
    return None


def check_target_fits(capture: CaptureSpec, temperature: float, divergence: Divergence = FORWARD_KL) -> None:
    """Raise :class:`~pipeline.errors.ConfigError` when :func:`target_problem` finds one."""
    problem = target_problem(capture, temperature, divergence)
    if problem:
        raise ConfigError(problem)


def evaluation_temperature(capture: CaptureSpec) -> float:
    """1, unless the cache's draws allow only their own temperature (sampled without log-probabilities)."""
    if target_problem(capture, 1.0) is None:
        return 1.0
    return float(capture.sample_temperature or 1.0)


def targets_from_batch(
    batch: dict[str, torch.Tensor], capture: CaptureSpec, temperature: float = 1.0, vocab_size: int | None = None
) -> Target:
    """The distillation target of a batch, flattened to ``N = B * T`` positions in row-major order.

    Args:
        batch: as :func:`pipeline.cache.stack_rows` builds it: ``ids (B, T, K)`` int64,
            ``valid (B, T, K)`` bool (all valid when absent), and as the capture stores them
            ``logprobs (B, T, K)`` float32, ``tail_logmass (B, T)`` float32,
            ``counts (B, T, K)`` int32.
        capture: the cache's capture strategy (``cache.manifest.capture``).
        temperature: the distillation temperature (``--temperature``).
        vocab_size: the teacher's logit width, for the tempered tail of top-k and top-p
            targets (:func:`bucket_target`); ``None`` tempers the tail as one logit.

    Raises:
        ConfigError: the loss does not fit the capture (:func:`target_problem`).
        CacheError: the batch lacks a field its capture stores.
    """
    check_target_fits(capture, temperature)
    width = batch["ids"].shape[-1]
    ids = batch["ids"].reshape(-1, width).long()
    valid = batch["valid"].reshape(-1, width) if "valid" in batch else torch.ones_like(ids, dtype=torch.bool)

    def field(name: str, needed: bool = True) -> torch.Tensor | None:
        if name not in batch:
            if needed:
                raise CacheError(f"rows of a {capture.strategy} cache lack '{name}'; the cache is damaged")
            return None
        values = batch[name]
        return values.reshape(-1) if name == "tail_logmass" else values.reshape(-1, width)

    sample_temperature = capture.sample_temperature or 1.0
    if capture.strategy in ("topk", "topp"):
        return bucket_target(ids, valid, field("logprobs"), field("tail_logmass"), temperature, vocab_size)
    if capture.strategy == "sample":
        logprobs = field("logprobs", needed=capture.has_logprobs)
        return sampled_target(ids, valid, field("counts"), logprobs, temperature, sample_temperature)
    head_size = int(capture.k or 0)
    return hybrid_target(
        ids,
        valid,
        field("counts"),
        field("logprobs"),
        field("tail_logmass"),
        head_size,
        temperature,
        sample_temperature,
    )


@dataclass(frozen=True)
class LossParts:
    """Sums over positions (divide by the counts for means).

    Attributes:
        kd_sum: sum of ``T^2 * KL`` (of the chosen :class:`Divergence`, scaled as
            :meth:`Divergence.temperature_scale` says) over distillation positions (a scalar tensor).
        ce_sum: sum of next-token cross-entropy over positions with a label.
        kd_count: number of distillation positions (0 without a target).
        ce_count: number of labelled positions.
    """

    kd_sum: torch.Tensor
    ce_sum: torch.Tensor
    kd_count: int
    ce_count: int


def loss_parts(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    target: Target | None,
    need_ce: bool = True,
    divergence: Divergence = FORWARD_KL,
    loss_mask: torch.Tensor | None = None,
) -> LossParts:
    """Sums of the two terms of the standard recipe over ``N`` positions: ``T^2 * KL(target || student)``
    (or another ``divergence``) and cross-entropy.

    Args:
        student_logits: ``(N, V)`` float, a chunk of the student's logits.
        labels: ``(N,)`` int64 next-token ids, ``-100`` where there is none.
        target: the same ``N`` positions of the batch's :class:`Target`, or ``None`` for
            cross-entropy alone.
        need_ce: compute the cross-entropy (at temperature 1, on the raw logits).
        divergence: the distillation loss over the buckets (``--loss``); padding slots
            (:func:`padding_slots`) get student log-probability ``-inf``, so they add 0 to every one.
        loss_mask: ``(N,)`` bool, the positions whose target counts (chat data: the
            assistant's tokens), or ``None`` for all. A masked position adds nothing to either
            term, nor to its count.

    The loss over a batch is ``alpha * kd_sum / kd_count + (1 - alpha) * ce_sum / ce_count``.
    For a ``"sampled"`` target the KL is to ``t_hat``: its gradient, not its value, is the
    unbiased estimate.
    """
    zero = student_logits.new_zeros((), dtype=torch.float32)
    logits = student_logits.float()
    kd_sum = ce_sum = zero
    if loss_mask is not None:
        labels = labels.masked_fill(~loss_mask, -100)
    labelled = labels != -100
    ce_count = int(labelled.sum())
    log_normalizer = None
    if target is not None:
        temperature = target.temperature
        scaled = logits if temperature == 1.0 else logits / temperature
        captured, rest, lse = folded_log_softmax(scaled, target.ids)
        captured = torch.where(padding_slots(target.ids), float("-inf"), captured)
        student = torch.cat([captured, rest.unsqueeze(-1)], dim=-1)
        compared = divergence.sides(student, target.buckets())
        per_position = divergence(*compared)
        if loss_mask is not None:  # where, not a product: a masked position's NaN or inf stays out too
            per_position = torch.where(loss_mask, per_position, per_position.new_zeros(()))
        kd_sum = per_position.sum() * divergence.temperature_scale(temperature)
        if temperature == 1.0:
            log_normalizer = lse  # cross-entropy shares the one pass over the vocabulary
    if need_ce and ce_count:
        if log_normalizer is None:
            ce_sum = F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
        else:
            label_logits = logits.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
            ce_sum = ((log_normalizer - label_logits) * labelled).sum()
    kd_count = 0 if target is None else student_logits.shape[0] if loss_mask is None else int(loss_mask.sum())
    return LossParts(kd_sum=kd_sum, ce_sum=ce_sum, kd_count=kd_count, ce_count=ce_count)


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
    """:func:`loss_parts` for a top-k capture held as plain tensors.

    Args:
        student_logits: ``(N, V)`` float.
        labels: ``(N,)`` int64 next-token ids, ``-100`` where there is none.
        topk_ids, topk_logprobs, tail_logmass: the teacher's ``(N, k)``, ``(N, k)``, ``(N,)``.
    """
    target = bucket_target(topk_ids, None, topk_logprobs, tail_logmass, temperature) if need_kd else None
    return loss_parts(student_logits, labels, target, need_ce)


def next_token_labels(input_ids: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` -> ``(B, T)`` labels: token ``t + 1`` at position ``t``, ``-100`` at the last position.

    The last position's next token lies in the next row (or nowhere), so cross-entropy
    skips it; distillation can still use it, since the teacher's distribution is stored.
    """
    labels = torch.full_like(input_ids, -100)
    labels[:, :-1] = input_ids[:, 1:]
    return labels
