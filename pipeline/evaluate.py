"""Held-out evaluation of a student against a cache: KL to the teacher's target, cross-entropy, perplexity.

Also the chunked LM head the student pass shares: :func:`head_chunk_positions` sizes a
chunk, :func:`iter_chunk_logits` runs the head a chunk of positions at a time.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import torch

from pipeline.cache import stack_rows
from pipeline.losses import evaluation_temperature, loss_parts, next_token_labels, targets_from_batch

if TYPE_CHECKING:
    from pipeline.cache import Cache
    from pipeline.models import LMHead

# Upper bound on student logits held at once in a chunk (elements).
HEAD_CHUNK_ELEMENTS = 1 << 25

# What the reported "kl" measures, by the target's estimator.
KL_MEASURES = {
    "buckets": "KL(teacher || student) over the captured ids and one rest bucket",
    "sampled": "KL(t_hat || student), t_hat the cache's sampled estimate of the teacher (not the teacher itself)",
}


def head_chunk_positions(width: int) -> int:
    """Positions per LM-head chunk so a chunk's logits stay near 128 MiB in fp32."""
    return max(1, HEAD_CHUNK_ELEMENTS // width)


def iter_chunk_logits(
    head: LMHead, hidden: torch.Tensor, chunk_positions: int, autocast: torch.autocast | None = None
) -> Iterator[tuple[slice, torch.Tensor]]:
    """``(positions, logits)`` for consecutive chunks of ``hidden``.

    Args:
        hidden: ``(N, H)`` hidden states.

    Yields:
        a slice of the ``N`` positions and its ``(chunk, V)`` logits. Only one chunk's logits
        are referenced from here at a time; drop yours before asking for the next.
    """
    for start in range(0, hidden.shape[0], chunk_positions):
        positions = slice(start, start + chunk_positions)
        with autocast or nullcontext():
            logits = head.logits(hidden[positions])
        yield positions, logits
        del logits


@torch.no_grad()
def evaluate(
    head: LMHead,
    cache: Cache,
    chunk_positions: int,
    device: torch.device,
    autocast: torch.autocast | None = None,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Mean KL from the cache's target to the student (all positions), mean next-token
    cross-entropy (positions whose label is in the row) and its perplexity.

    The KL is over the ``k + 1`` buckets for top-k and top-p caches, and to the sampled
    estimate ``t_hat`` for sample and hybrid caches (``kl_measure`` says which). It is taken
    at temperature 1, except for sampled caches without log-probabilities, whose draws fix
    the temperature (``kl_temperature``).
    """
    capture = cache.manifest.capture
    temperature = evaluation_temperature(capture)
    was_training = head.model.training
    head.model.eval()
    kd_sum = ce_sum = 0.0
    kd_count = ce_count = 0
    estimator = "buckets"
    rows = iter(cache)
    while batch_rows := [row for _, row in zip(range(batch_size), rows)]:
        batch = stack_rows(batch_rows, device)
        labels = next_token_labels(batch["input_ids"]).reshape(-1)
        target = targets_from_batch(batch, capture, temperature)
        estimator = target.estimator
        with autocast or nullcontext():
            hidden = head.hidden_states(batch["input_ids"], batch.get("document_starts"))
        hidden = hidden.reshape(-1, hidden.shape[-1])
        for positions, logits in iter_chunk_logits(head, hidden, chunk_positions, autocast):
            mask = batch["loss_mask"].reshape(-1)[positions] if "loss_mask" in batch else None
            parts = loss_parts(logits, labels[positions], target.chunk(positions), loss_mask=mask)
            kd_sum += float(parts.kd_sum)
            ce_sum += float(parts.ce_sum)
            kd_count += parts.kd_count
            ce_count += parts.ce_count
            del logits, parts
    if was_training:
        head.model.train()
    ce = ce_sum / max(ce_count, 1)
    return {
        "kl": kd_sum / temperature**2 / max(kd_count, 1),  # loss_parts scales by T^2; the KL itself is reported
        "kl_measure": KL_MEASURES[estimator],
        "kl_temperature": temperature,
        "ce": ce,
        "perplexity": math.exp(min(ce, 700.0)),
        "positions": kd_count,
    }
