"""Held-out evaluation of a student against a cache: KL to the teacher, cross-entropy, perplexity."""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import TYPE_CHECKING

import torch

from pipeline.cache import stack_rows
from pipeline.losses import distillation_parts, flatten_targets

if TYPE_CHECKING:
    from pipeline.cache import Cache
    from pipeline.models import LMHead

# Upper bound on student logits held at once in a chunk (elements).
HEAD_CHUNK_ELEMENTS = 1 << 25


def head_chunk_positions(width: int) -> int:
    """Positions per LM-head chunk so a chunk's logits stay near 128 MiB in fp32."""
    return max(1, HEAD_CHUNK_ELEMENTS // width)


@torch.no_grad()
def evaluate(
    head: LMHead,
    cache: Cache,
    chunk_positions: int,
    device: torch.device,
    autocast: torch.autocast | None = None,
    batch_size: int = 8,
) -> dict[str, float]:
    """Mean ``KL(teacher || student)`` at temperature 1 over the ``k + 1`` buckets (all positions),
    mean next-token cross-entropy (positions whose label is in the row) and its perplexity.
    """
    was_training = head.model.training
    head.model.eval()
    kl_sum = ce_sum = 0.0
    kl_count = ce_count = 0
    rows = iter(cache)
    while batch_rows := [row for _, row in zip(range(batch_size), rows)]:
        batch = stack_rows(batch_rows, device)
        labels, topk_ids, topk_logprobs, tail = flatten_targets(batch)
        with autocast or nullcontext():
            hidden = head.hidden_states(batch["input_ids"])
        hidden = hidden.reshape(-1, hidden.shape[-1])
        for start in range(0, hidden.shape[0], chunk_positions):
            part = slice(start, start + chunk_positions)
            with autocast or nullcontext():
                logits = head.logits(hidden[part])
            parts = distillation_parts(logits, labels[part], topk_ids[part], topk_logprobs[part], tail[part], 1.0)
            kl_sum += float(parts.kd_sum)
            ce_sum += float(parts.ce_sum)
            kl_count += parts.kd_count
            ce_count += parts.ce_count
            del logits, parts
    if was_training:
        head.model.train()
    ce = ce_sum / max(ce_count, 1)
    return {
        "kl": kl_sum / max(kl_count, 1),
        "ce": ce,
        "perplexity": math.exp(min(ce, 700.0)),
        "positions": kl_count,
    }
