"""Teacher ensembles: several teachers' targets at the same positions combined into one (pure tensor functions).

Each teacher ``j`` captured its own ids ``S_j`` (with a rest bucket ``R_j`` for the
``n_j = V_j - |S_j|`` ids it left out). The ensemble's target runs over the union ``U`` of
the captured ids plus one rest bucket:

- an id of ``U`` that teacher ``j`` did not capture takes its share of ``j``'s rest,
  ``R_j / n_j`` (the rest spread evenly: the only guess the cache allows);
- ``j``'s rest outside ``U`` is what is left, ``R_j (n_j - |U \\ S_j|) / n_j``;
- ``mean_prob``: ``q = sum_j w_j p_j`` per bucket, a distribution as it stands;
- ``mean_logprob``: ``q ~ prod_j p_j^w_j`` per id (a weighted geometric mean), the rest
  bucket holding ``V - |U|`` ids of per-id value ``prod_j (R_j / n_j)^w_j``, renormalised.

The teachers' targets come in at the training temperature, so each teacher is softened
first and the softened distributions are combined (the usual ensemble distillation).
``docs/losses.md`` ("Teacher ensembles") has the maths.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from pipeline.config import EnsembleMode
from pipeline.losses import Target

SENTINEL = torch.iinfo(torch.int64).max  # sorts after every id


def union_ids(id_sets: Sequence[torch.Tensor], valid_sets: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The union of several id sets per position, sorted, padding last.

    Args:
        id_sets: ``(N, K_j)`` int64 each.
        valid_sets: ``(N, K_j)`` bool each: the slots holding an id.

    Returns:
        ``ids (N, M)`` int64 with ``M = sum K_j``: each position's distinct valid ids in
        ascending order, then padding slots repeating the first id; ``valid (N, M)`` bool.
    """
    ids = torch.cat(list(id_sets), dim=-1)
    valid = torch.cat(list(valid_sets), dim=-1)
    # Invalid slots sort last (pushed past every id), duplicates become invalid.
    ordered, _ = torch.sort(torch.where(valid, ids, SENTINEL), dim=-1)
    repeated = torch.zeros_like(ordered, dtype=torch.bool)
    repeated[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    union_valid = (ordered != SENTINEL) & ~repeated
    # Distinct ids first (stable sort on the padding flag keeps them ascending).
    order = torch.sort((~union_valid).to(torch.int8), dim=-1, stable=True).indices
    ordered = ordered.gather(-1, order)
    union_valid = union_valid.gather(-1, order)
    return torch.where(union_valid, ordered, ordered[:, :1]), union_valid


def member_on_union(
    target: Target, tail_ids: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One teacher's target spread over the union's ids.

    Args:
        target: the teacher's :class:`~pipeline.losses.Target` at ``N`` positions.
        tail_ids: ``(N,)`` int64, how many ids its rest bucket covers (``V_j`` less its captured ids).
        ids, valid: ``(N, M)`` the union (:func:`union_ids`).

    Returns:
        ``logprobs (N, M)`` float32 at the union's ids (``-inf`` in padding), ``rest (N,)``
        float32 the log of its mass outside the union, and ``share (N,)`` float32 the log
        of the mass one uncaptured id takes (``-inf`` where the rest is empty).
    """
    # Look each union id up in the teacher's ids, sorted: O(N (M + K_j) log K_j), no (N, M, K_j) table.
    member_valid = target.logprobs > float("-inf")
    sorted_ids, order = torch.sort(torch.where(member_valid, target.ids, SENTINEL), dim=-1)
    slot = torch.searchsorted(sorted_ids.contiguous(), ids.contiguous()).clamp_max(sorted_ids.shape[-1] - 1)
    captured = valid & (sorted_ids.gather(-1, slot) == ids)
    at_ids = target.logprobs.gather(-1, order).gather(-1, slot)
    has_rest = (tail_ids > 0) & (target.rest_logprob > float("-inf"))
    share = torch.where(has_rest, target.rest_logprob - torch.log(tail_ids.clamp_min(1).float()), float("-inf"))
    logprobs = torch.where(captured, at_ids, share.unsqueeze(-1))
    logprobs = torch.where(valid, logprobs, float("-inf"))
    taken = (valid & ~captured).sum(dim=-1)  # union ids this teacher left in its rest
    left = tail_ids - taken
    rest = torch.where(
        has_rest & (left > 0),
        target.rest_logprob + torch.log(left.clamp_min(1).float()) - torch.log(tail_ids.clamp_min(1).float()),
        float("-inf"),
    )
    return logprobs, rest, share


def combine_targets(
    targets: Sequence[Target],
    tail_ids: Sequence[torch.Tensor],
    weights: Sequence[float],
    mode: EnsembleMode,
    vocab_size: int,
) -> Target:
    """The ensemble's target: ``targets`` of the same ``N`` positions combined by ``mode``.

    Args:
        targets: one :class:`~pipeline.losses.Target` per teacher, all at one temperature.
        tail_ids: ``(N,)`` int64 per teacher: ids its rest bucket covers.
        weights: one non-negative weight per teacher (normalised here).
        mode: ``"mean_prob"`` or ``"mean_logprob"``.
        vocab_size: the ids the ensemble ranges over (the smallest teacher's logit width:
            the ids every teacher can give mass).

    Returns:
        A :class:`~pipeline.losses.Target` over the union of the captured ids, estimator
        ``"sampled"`` if any teacher's is.
    """
    total = sum(weights)
    log_weights = [math.log(weight / total) if weight > 0 else float("-inf") for weight in weights]
    ids, valid = union_ids([target.ids for target in targets], [target.logprobs > float("-inf") for target in targets])
    spread = [member_on_union(target, tails, ids, valid) for target, tails in zip(targets, tail_ids)]
    if mode == "mean_prob":
        logprobs = torch.logsumexp(torch.stack([lp + w for (lp, _, _), w in zip(spread, log_weights)]), dim=0)
        rest = torch.logsumexp(torch.stack([r + w for (_, r, _), w in zip(spread, log_weights)]), dim=0)
    else:
        fractions = [weight / total for weight in weights]
        geometric = sum(f * lp for (lp, _, _), f in zip(spread, fractions) if f > 0)
        per_id_rest = sum(f * share for (_, _, share), f in zip(spread, fractions) if f > 0)
        outside = vocab_size - valid.sum(dim=-1)
        rest = torch.where(outside > 0, per_id_rest + torch.log(outside.clamp_min(1).float()), float("-inf"))
        logprobs = torch.where(valid, geometric, float("-inf"))
        normaliser = torch.logsumexp(torch.cat([logprobs, rest.unsqueeze(-1)], dim=-1), dim=-1)
        logprobs = logprobs - normaliser.unsqueeze(-1)
        rest = rest - normaliser
    logprobs = torch.where(valid, logprobs, float("-inf"))
    estimator = "sampled" if any(target.estimator == "sampled" for target in targets) else "buckets"
    return Target(ids, logprobs, rest, targets[0].temperature, estimator)
