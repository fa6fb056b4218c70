"""Teacher logits -> sparse next-token distribution (pure tensor math).

Position ``t`` of a sequence holds the teacher's distribution over token ``t + 1``.
"""

from __future__ import annotations

import torch


def capture_topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``k`` most probable next tokens, their log-probabilities and the uncaptured mass.

    Args:
        logits: ``(N, V)`` teacher logits for ``N`` positions, any float dtype.
        k: number of ids to keep, ``1 <= k <= V``.

    Returns:
        topk_ids: ``(N, k)`` int64, most probable first.
        topk_logprobs: ``(N, k)`` float32, natural log, softmax at temperature 1.
        tail_logmass: ``(N,)`` float32, log of the probability outside ``topk_ids``,
            computed as a log-sum-exp over the complement (never ``log(1 - sum p)``, which
            cancels when the captured mass is close to 1); ``-inf`` when ``k == V``.
    """
    logits = logits.float()
    log_normalizer = torch.logsumexp(logits, dim=-1)
    topk_logits, topk_ids = torch.topk(logits, k, dim=-1)
    topk_logprobs = topk_logits - log_normalizer.unsqueeze(-1)
    # Mask the captured ids in place of a copy-and-subtract: the complement's mass is
    # summed directly, so a tail of 1e-12 keeps its digits.
    complement = logits.scatter(-1, topk_ids, float("-inf"))
    tail_logmass = torch.logsumexp(complement, dim=-1) - log_normalizer
    return topk_ids, topk_logprobs, tail_logmass
