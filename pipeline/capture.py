"""Teacher logits -> sparse next-token distribution (pure tensor math).

Position ``t`` of a sequence holds the teacher's distribution over token ``t + 1``.
"""

from __future__ import annotations

import torch


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
    scores = logits.float() if overwrite else logits.float().clone()
    topk_logits, topk_ids = torch.topk(scores, k, dim=-1)
    shift = topk_logits[:, :1]  # the row maximum
    # exp(logit - max) in place; the captured entries are then zeroed, so the second sum is
    # the complement's mass on its own, with no subtraction to lose digits in.
    exp = scores.sub_(shift).exp_()
    log_total = torch.log(exp.sum(dim=-1))
    exp.scatter_(-1, topk_ids, 0.0)
    tail_logmass = torch.log(exp.sum(dim=-1)) - log_total
    topk_logprobs = topk_logits - shift - log_total.unsqueeze(-1)
    return topk_ids, topk_logprobs, tail_logmass
