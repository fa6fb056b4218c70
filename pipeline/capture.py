"""Teacher logits -> sparse next-token distribution (pure tensor math).

Position ``t`` of a sequence holds the teacher's distribution over token ``t + 1``.
:func:`capture` implements every strategy of :class:`~pipeline.capture_spec.CaptureSpec`;
:func:`capture_topk` is the top-k strategy on its own.

Draws (``sample`` and ``hybrid``)
---------------------------------
Every draw is a pure function of ``(seed, position, j)``: the capture seed, the global
position index (``sequence_index * seq_len + t``) and the draw's index ``j`` in
``0 .. samples - 1``. Nothing else (batch size, which positions share a batch, resumption,
world size, device) enters, so a position draws the same ids wherever it is computed.

All arithmetic is on unsigned 64-bit integers, modulo ``2**64``; ``>>`` is a logical shift::

    GOLDEN = 0x9E3779B97F4A7C15

    def mix64(z):                       # the splitmix64 finaliser
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB
        return z ^ (z >> 31)

    def step(h, value):
        return mix64((h ^ value) + GOLDEN)

    def uniform(seed, position, j):     # a float64 in [0, 1)
        h = step(step(step(0, seed), position), j)
        return (h >> 11) * 2.0**-53     # the top 53 bits, exact in float64

A uniform ``u`` becomes an id by inversion of the cumulative distribution, in float64:

1. The eligible ids are the whole vocabulary for ``sample``, and every id outside the
   top-``k`` head for ``hybrid``. ``l_i`` is the logit converted to float64, ``m`` the
   largest ``l_i`` over eligible ids, ``T`` the sample temperature, and
   ``w_i = exp((l_i - m) / T)`` for eligible ids, ``w_i = 0`` for the others.
2. ``C_i = w_0 + ... + w_i`` is the running sum in id order.
3. The draw is the smallest ``i`` with ``C_i > u * C_{V-1}``, and at most the smallest ``i``
   with ``C_i >= C_{V-1}`` (which rounding may otherwise overshoot). Either way ``C`` grows
   at the draw, so an id with ``w_i = 0`` is never drawn.

This is a draw from ``softmax(l / T)`` restricted to the eligible ids and renormalised
there. The uniforms are bit-exact on any device; the ids are too, unless ``u * C_{V-1}``
falls within rounding of a bucket's edge (about one draw in ``2**50``) or the teacher's
logits themselves differ.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.capture_spec import CaptureSpec
from pipeline.errors import TeacherError

# The float64 (positions, vocab) buffer that sampling fills at once stays under this size.
SAMPLE_BUFFER_BYTES = 256 * 2**20


def _signed(value: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    return value - 2**64 if value >= 2**63 else value


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)


@dataclass(frozen=True)
class CapturedBatch:
    """What :func:`capture` keeps of ``N`` positions, on the logits' device.

    Attributes:
        ids: ``(N, K)`` int64, ``K = spec.slots``; padding slots hold 0. Order as in
            :class:`~pipeline.rows.SparseRow`.
        lengths: ``(N,)`` int32 valid slots per position; ``None`` for top-k (all ``K`` valid).
        logprobs: ``(N, K)`` float32 natural-log teacher probabilities at temperature 1,
            ``-inf`` in padding; ``None`` for ``sample`` without ``sample_logprobs``.
        tail_logmass: ``(N,)`` float32 log of the probability outside the valid ids
            (``-inf`` when nothing is left); ``None`` when ``logprobs`` is.
        counts: ``(N, K)`` int32 draws per slot (0 on padding and on the hybrid head);
            ``None`` for top-k and top-p.
        top1_prob, entropy: ``(N,)`` float32, the teacher's largest probability and its
            entropy (nats) over the full distribution, measured on the way
            (:mod:`pipeline.row_stats`); ``None`` for ``sample`` without ``sample_logprobs``.
    """

    ids: torch.Tensor
    lengths: torch.Tensor | None
    logprobs: torch.Tensor | None
    tail_logmass: torch.Tensor | None
    counts: torch.Tensor | None = None
    top1_prob: torch.Tensor | None = None
    entropy: torch.Tensor | None = None


def capture(
    logits: torch.Tensor, spec: CaptureSpec, positions: torch.Tensor, overwrite: bool = False, measure: bool = False
) -> CapturedBatch:
    """Capture ``N`` positions' next-token distributions as ``spec`` asks.

    Args:
        logits: ``(N, V)`` teacher logits, any float dtype, any device.
        spec: a valid capture spec (``spec.problem()`` is the caller's to check).
        positions: ``(N,)`` int64 global position indices (``seq_index * seq_len + t``);
            they only key the draws of ``sample`` and ``hybrid``.
        overwrite: allow reuse of ``logits``' memory (when it is float32); ``logits`` is
            garbage afterwards.
        measure: also measure each position's top-1 probability and entropy on the way
            (``top1_prob``, ``entropy``; not for ``sample`` without ``sample_logprobs``).

    Returns:
        A :class:`CapturedBatch` on ``logits``' device.
    """
    assert logits.dim() == 2, f"logits must be (N, V), got {tuple(logits.shape)}"
    assert positions.shape == logits.shape[:1], f"positions must be ({logits.shape[0]},)"
    if spec.strategy == "topk":
        scores = _float_scores(logits, overwrite)
        ids = torch.topk(scores, int(spec.k), dim=-1).indices
        logprobs, tail, (top1, entropy) = _logprobs_and_tail(scores, ids, measure=measure)
        return CapturedBatch(ids, None, logprobs, tail, None, top1, entropy)
    if spec.strategy == "topp":
        return _capture_topp(logits, spec, overwrite, measure)
    if spec.strategy == "sample":
        return _capture_sample(logits, spec, positions, overwrite, measure)
    if spec.strategy == "hybrid":
        return _capture_hybrid(logits, spec, positions, overwrite, measure)
    raise AssertionError(f"unknown capture strategy {spec.strategy!r}")


def capture_topk(
    logits: torch.Tensor, k: int, overwrite: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``k`` most probable next tokens, their log-probabilities and the uncaptured mass.

    Args:
        logits: ``(N, V)`` teacher logits for ``N`` positions, any float dtype.
        k: number of ids to keep, ``1 <= k <= V``.
        overwrite: allow the function to reuse ``logits``' memory (when it is float32),
            so no second ``(N, V)`` buffer is allocated. ``logits`` is garbage afterwards.

    Returns:
        topk_ids: ``(N, k)`` int64, most probable first.
        topk_logprobs: ``(N, k)`` float32, natural log, softmax at temperature 1.
        tail_logmass: ``(N,)`` float32, log of the probability outside ``topk_ids``,
            summed directly over the complement (never ``log(1 - sum p)``, which cancels
            when the captured mass is close to 1); ``-inf`` when ``k == V``.
    """
    scores = _float_scores(logits, overwrite)
    topk_ids = torch.topk(scores, k, dim=-1).indices
    topk_logprobs, tail_logmass, _ = _logprobs_and_tail(scores, topk_ids)
    return topk_ids, topk_logprobs, tail_logmass


def draw_uniforms(seed: int, positions: torch.Tensor, samples: int) -> torch.Tensor:
    """The uniforms of draws ``0 .. samples - 1`` at each position (the module docstring's ``uniform``).

    Args:
        seed: the capture seed, ``0 <= seed < 2**63``.
        positions: ``(N,)`` int64 global position indices, non-negative.
        samples: draws per position.

    Returns:
        ``(N, samples)`` float64 in ``[0, 1)``, on ``positions``' device.
    """
    positions = positions.to(torch.int64)
    keyed = _step(_step(torch.zeros_like(positions), seed), positions)
    draws = torch.arange(samples, dtype=torch.int64, device=positions.device)
    hashed = _step(keyed.unsqueeze(-1), draws.unsqueeze(0))
    return _shift_right(hashed, 11).to(torch.float64) * 2.0**-53


def _capture_topp(logits: torch.Tensor, spec: CaptureSpec, overwrite: bool, measure: bool = False) -> CapturedBatch:
    """The smallest most-probable prefix reaching ``top_p``, clamped to ``[min_k, max_k]``."""
    scores = _float_scores(logits, overwrite)
    ids = torch.topk(scores, int(spec.max_k), dim=-1).indices
    logprobs, tail, stats = _logprobs_and_tail(scores, ids, measure=measure)
    # The prefix sums run in float64 so that top_p close to 1 is not decided by float32 rounding.
    cumulative = logprobs.double().exp().cumsum(dim=-1)
    lengths = (cumulative < spec.top_p).sum(dim=-1) + 1
    lengths = lengths.clamp(int(spec.min_k), int(spec.max_k)).to(torch.int32)
    valid = _valid_slots(lengths, ids.shape[1])
    # Candidates past the prefix join the tail: a sum of positive terms, so nothing cancels.
    dropped = logprobs.masked_fill(valid, float("-inf"))
    tail = torch.logsumexp(torch.cat([tail.unsqueeze(-1), dropped], dim=-1), dim=-1)
    return CapturedBatch(
        ids=ids.masked_fill(~valid, 0),
        lengths=lengths,
        logprobs=logprobs.masked_fill(~valid, float("-inf")),
        tail_logmass=tail,
        top1_prob=stats[0],
        entropy=stats[1],
    )


def _capture_sample(
    logits: torch.Tensor, spec: CaptureSpec, positions: torch.Tensor, overwrite: bool, measure: bool = False
) -> CapturedBatch:
    """``samples`` draws per position from ``softmax(logits / T)``: distinct ids ascending, with counts."""
    draws = _sample(logits, positions, spec, exclude=None)
    ids, counts, lengths = _count_distinct(draws)
    if not spec.sample_logprobs:
        return CapturedBatch(ids=ids, lengths=lengths, logprobs=None, tail_logmass=None, counts=counts)
    valid = _valid_slots(lengths, ids.shape[1])
    logprobs, tail, (top1, entropy) = _logprobs_and_tail(_float_scores(logits, overwrite), ids, valid, measure)
    return CapturedBatch(ids, lengths, logprobs, tail, counts, top1, entropy)


def _capture_hybrid(
    logits: torch.Tensor, spec: CaptureSpec, positions: torch.Tensor, overwrite: bool, measure: bool = False
) -> CapturedBatch:
    """The top-``k`` head, then ``samples`` draws from the rest, renormalised outside the head."""
    scores = _float_scores(logits, overwrite)
    head_ids = torch.topk(scores, int(spec.k), dim=-1).indices
    # Sampling reads the logits before _logprobs_and_tail may overwrite them.
    sampled_ids, sampled_counts, sampled_lengths = _count_distinct(_sample(logits, positions, spec, exclude=head_ids))
    ids = torch.cat([head_ids, sampled_ids], dim=-1)
    counts = torch.cat([torch.zeros_like(head_ids, dtype=torch.int32), sampled_counts], dim=-1)
    lengths = sampled_lengths + int(spec.k)
    valid = _valid_slots(lengths, ids.shape[1])
    logprobs, tail, (top1, entropy) = _logprobs_and_tail(scores, ids, valid, measure)
    return CapturedBatch(ids, lengths, logprobs, tail, counts, top1, entropy)


def _float_scores(logits: torch.Tensor, overwrite: bool) -> torch.Tensor:
    """``(N, V)`` float32 logits that the caller may modify in place."""
    return logits.float() if overwrite else logits.float().clone()


# Rows of exp(logit - max) made at a time beside the centred logits (64 MiB of float32).
STATS_BLOCK_ELEMENTS = 1 << 24


def _logprobs_and_tail(
    scores: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor | None = None, measure: bool = False
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor | None, torch.Tensor | None]]:
    """Temperature-1 log-probabilities of ``ids``, the log-mass outside the valid ones, and each
    position's top-1 probability and entropy over the full distribution (on the way: one more pass).

    Args:
        scores: ``(N, V)`` float32 logits, overwritten.
        ids: ``(N, K)`` int64; slot 0 must be valid.
        valid: ``(N, K)`` bool, or ``None`` when every slot is.

    Returns:
        logprobs: ``(N, K)`` float32, ``-inf`` where not valid.
        tail_logmass: ``(N,)`` float32, summed directly over the complement (never
            ``log(1 - sum p)``, which cancels when the captured mass is close to 1).
        stats: with ``measure``, ``(top1_prob, entropy)``, ``(N,)`` float32 each: with
            ``e = exp(z - max z)`` and ``S = sum e``, ``1 / S`` and ``log S - sum(e log e) / S``;
            else ``(None, None)``.
    """
    shift = scores.amax(dim=-1, keepdim=True)
    captured_logits = scores.gather(-1, ids)
    # exp(logit - max), in place a block of rows at a time: each block's centred logits (log e)
    # still sit beside its exp for the entropy's sum(e log e), a batched dot product, and the
    # temporary stays one block (64 MiB). The captured entries are then zeroed, so the second
    # sum is the complement's mass on its own, with no subtraction to lose digits in.
    exp = scores.sub_(shift)
    if not measure:
        exp.exp_()
        log_total = torch.log(exp.sum(dim=-1))
        return _captured_and_tail(exp, ids, valid, captured_logits, shift, log_total, (None, None))
    totals, e_log_e = [], []
    for block in exp.split(max(1, STATS_BLOCK_ELEMENTS // max(1, exp.shape[-1])), dim=0):
        block_exp = block.exp()
        totals.append(block_exp.sum(dim=-1))
        e_log_e.append(torch.bmm(block_exp.unsqueeze(1), block.unsqueeze(2)).reshape(-1))
        block.copy_(block_exp)
    total = torch.cat(totals) if totals else exp.new_zeros(0)
    log_total = torch.log(total)
    entropy = log_total - (torch.cat(e_log_e) if e_log_e else exp.new_zeros(0)) / total
    stats = (1.0 / total, entropy.clamp_min(0.0))
    return _captured_and_tail(exp, ids, valid, captured_logits, shift, log_total, stats)


def _captured_and_tail(
    exp: torch.Tensor,
    ids: torch.Tensor,
    valid: torch.Tensor | None,
    captured_logits: torch.Tensor,
    shift: torch.Tensor,
    log_total: torch.Tensor,
    stats: tuple[torch.Tensor | None, torch.Tensor | None],
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor | None, torch.Tensor | None]]:
    """The end of :func:`_logprobs_and_tail`, from ``exp = exp(z - max)`` (overwritten)."""
    # Padding slots repeat slot 0's id, so zeroing them leaves the complement alone.
    zeroed = ids if valid is None else torch.where(valid, ids, ids[:, :1])
    exp.scatter_(-1, zeroed, 0.0)
    tail_logmass = torch.log(exp.sum(dim=-1)) - log_total
    logprobs = captured_logits - shift - log_total.unsqueeze(-1)
    if valid is not None:
        logprobs = logprobs.masked_fill(~valid, float("-inf"))
    return logprobs, tail_logmass, stats


def _valid_slots(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """``(N, width)`` bool: slot ``s`` of position ``n`` is valid when ``s < lengths[n]``."""
    return torch.arange(width, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(-1)


def _sample(
    logits: torch.Tensor, positions: torch.Tensor, spec: CaptureSpec, exclude: torch.Tensor | None
) -> torch.Tensor:
    """``(N, samples)`` int64 draws, as the module docstring defines them.

    Args:
        logits: ``(N, V)`` any float dtype; not modified.
        positions: ``(N,)`` int64 global position indices.
        spec: gives ``samples``, ``sample_temperature`` and ``seed``.
        exclude: ``(N, k)`` int64 ids never to draw (the hybrid head), or ``None``.
    """
    count, vocab = logits.shape
    positions = positions.to(device=logits.device, dtype=torch.int64)
    draws = torch.empty((count, int(spec.samples)), dtype=torch.int64, device=logits.device)
    rows = max(1, SAMPLE_BUFFER_BYTES // (8 * vocab))
    for start in range(0, count, rows):
        chunk = slice(start, start + rows)
        weights = _tempered_weights(
            logits[chunk], float(spec.sample_temperature), exclude[chunk] if exclude is not None else None
        )
        uniforms = draw_uniforms(int(spec.seed), positions[chunk], int(spec.samples))
        draws[chunk] = _invert_cdf(weights, uniforms)
    return draws


def _tempered_weights(logits: torch.Tensor, temperature: float, exclude: torch.Tensor | None) -> torch.Tensor:
    """``(n, V)`` float64 ``exp((l - m) / T)`` over eligible ids, 0 on ``exclude``; ``m`` the eligible max."""
    weights = logits.to(torch.float64, copy=True)
    if exclude is not None:
        weights.scatter_(-1, exclude, float("-inf"))
    # Shifting by the eligible maximum keeps its weight at exactly 1, so no row underflows to 0.
    peak = weights.amax(dim=-1, keepdim=True)
    if not torch.isfinite(peak).all():
        raise TeacherError(
            "the teacher's logits leave nothing finite to sample from at some position "
            "(all eligible logits are -inf, or one is +inf or NaN); check the model's outputs"
        )
    return weights.sub_(peak).div_(temperature).exp_()


def _invert_cdf(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """``(n, S)`` int64 ids: the smallest ``i`` with ``C_i > u * C_{V-1}``, at most the first ``C_i >= C_{V-1}``.

    Args:
        weights: ``(n, V)`` float64, non-negative, some positive per row; overwritten with ``C``.
        uniforms: ``(n, S)`` float64 in ``[0, 1)``.
    """
    cumulative = weights.cumsum_(dim=-1)
    total = cumulative[:, -1:].contiguous()
    draws = torch.searchsorted(cumulative, uniforms * total, right=True)
    # The first i with C_i >= C_{V-1}: C grows there, so its weight is positive; later ids add nothing to C.
    last_positive = torch.searchsorted(cumulative, total, right=False)
    return torch.minimum(draws, last_positive)


def _count_distinct(draws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Distinct ids per row, ascending, with how often each was drawn.

    Args:
        draws: ``(N, S)`` int64.

    Returns:
        ids: ``(N, S)`` int64, distinct ids ascending, then 0.
        counts: ``(N, S)`` int32 draws per id, then 0; each row sums to ``S``.
        lengths: ``(N,)`` int32 distinct ids per row.
    """
    ordered = draws.sort(dim=-1).values
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    slots = starts.cumsum(dim=-1) - 1  # each draw's slot: the index of its run
    ids = torch.zeros_like(ordered).scatter_(-1, slots, ordered)  # a run's draws all write its id
    counts = torch.zeros_like(ordered, dtype=torch.int32).scatter_add_(
        -1, slots, torch.ones_like(ordered, dtype=torch.int32)
    )
    return ids, counts, starts.sum(dim=-1, dtype=torch.int32)


def _mix64(z: torch.Tensor) -> torch.Tensor:
    """The splitmix64 finaliser on int64 bits (multiplication wraps modulo 2**64)."""
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    return z ^ _shift_right(z, 31)


def _step(hashed: torch.Tensor, value: torch.Tensor | int) -> torch.Tensor:
    """``mix64((hashed ^ value) + GOLDEN)``: fold one key into the hash."""
    return _mix64((hashed ^ value) + _GOLDEN)


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bits (``>>`` on int64 is arithmetic, so mask the sign copies)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)
