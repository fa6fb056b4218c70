"""Keyed sampling of next tokens: the same logits and key draw the same token, on any batch and after any restart.

Pure tensor functions (no I/O). ``distill generate`` keys each draw by (seed, prompt,
return sequence, step), so a resumed run writes the same text as an uninterrupted one,
and the draws come from the same counter-based generator as sampled captures
(:func:`pipeline.capture.draw_uniforms`), never from torch's global generator.
"""

from __future__ import annotations

import torch

from pipeline.capture import draw_uniforms


def draw_keys(
    prompt_index: torch.Tensor, sample_index: torch.Tensor, samples: int, step: int, steps: int
) -> torch.Tensor:
    """One int64 key per row: ``((prompt * samples) + sample) * steps + step``, unique for ``step < steps``.

    Args:
        prompt_index: ``(B,)`` int64, each row's prompt (counted from 0 over the dataset).
        sample_index: ``(B,)`` int64, which of the prompt's ``samples`` return sequences the row is.
    """
    return (prompt_index * samples + sample_index) * steps + step


def keyed_next_tokens(
    logits: torch.Tensor, temperature: float, top_p: float, seed: int, keys: torch.Tensor
) -> torch.Tensor:
    """Draw one token per row from ``softmax(logits / temperature)`` cut to its top-p nucleus.

    Args:
        logits: ``(B, V)`` float, the next-token logits of each row.
        temperature: > 0.
        top_p: in ``(0, 1]``: the smallest set of most probable tokens whose mass reaches it
            is kept (at least one), renormalised.
        seed: the generation seed, ``0 <= seed < 2**63``.
        keys: ``(B,)`` int64 (:func:`draw_keys`).

    Returns:
        ``(B,)`` int64 token ids. Inverse-CDF sampling over the nucleus sorted by probability
        (stable sort, float64 sums), so the draw depends on the logits and the key alone.
    """
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    before = sorted_probs.cumsum(dim=-1) - sorted_probs
    kept = sorted_probs.masked_fill(before >= top_p, 0.0)
    kept[:, 0] = sorted_probs[:, 0]  # the most probable token always stays
    cumulative = kept.cumsum(dim=-1)
    uniforms = draw_uniforms(seed, keys.to(logits.device), 1)[:, 0].to(cumulative.dtype)
    targets = uniforms * cumulative[:, -1]
    index = torch.searchsorted(cumulative, targets.unsqueeze(-1), right=True)
    last_kept = (kept > 0).sum(dim=-1, keepdim=True) - 1  # rounding never picks a token outside the nucleus
    return order.gather(1, torch.minimum(index, last_kept)).squeeze(-1)
