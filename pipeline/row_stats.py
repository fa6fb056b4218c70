"""Per-row teacher confidence: what the teacher pass measures for ``--curriculum confidence`` (pure functions).

For every row the teacher pass stores two numbers, measured on the device from the full
next-token distribution (before any capture keeps a part of it):

- ``mean_top1_prob``: the mean over the row's positions of the teacher's largest
  probability, in ``[0, 1]``;
- ``mean_entropy``: the mean over the row's positions of the teacher's entropy, in nats,
  in ``[0, log(logit_width)]``.

They travel in the optional ``row_stats`` column (one 8-byte cell per row: two
little-endian float32, in that order), and each shard's means of them in its manifest
entry (``row_stats``), so that an order can be planned from the manifest alone, or
from one small column per shard without decoding any payload. ``docs/FORMAT.md`` has
the layout.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import torch

from pipeline.errors import CacheError

COLUMN = "row_stats"
KIND = "row_stats"
ENCODING = "row-stats-f32le/1"
FIELDS = ("mean_top1_prob", "mean_entropy")
CELL = struct.Struct("<ff")
# Slack on the bounds a reader checks: float32 rounding of a mean of float32 values.
SLACK = 1e-3


def position_stats(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's top-1 probability and entropy at each position, from its full distribution.

    Args:
        logits: ``(N, V)`` float logits, any device (read, never written).

    Returns:
        ``top1_prob (N,)`` and ``entropy (N,)`` float32 (nats), on ``logits``' device.

    Four passes over the logits and one ``(N, V)`` buffer: with ``m = max z``,
    ``e = exp(z - m)`` and ``S = sum e``, the top-1 probability is ``1 / S`` and the entropy
    ``H = m + log S - (e . z) / S`` (the dot product batched, without a second buffer).
    """
    z = logits.float()
    shift = z.max(dim=-1, keepdim=True).values
    exp = (z - shift).exp_()
    total = exp.sum(dim=-1)
    weighted = torch.bmm(exp.unsqueeze(1), z.unsqueeze(2)).reshape(-1)
    entropy = shift.squeeze(-1) + torch.log(total) - weighted / total
    return 1.0 / total, entropy.clamp_min(0.0)


def row_means(values: np.ndarray, rows: int) -> np.ndarray:
    """``(rows * T,)`` per-position values -> ``(rows,)`` float32 means over each row's ``T`` positions."""
    return values.reshape(rows, -1).astype(np.float64).mean(axis=1).astype(np.float32)


def encode_cell(mean_top1_prob: float, mean_entropy: float) -> bytes:
    """One row's ``row_stats`` cell: 8 bytes."""
    return CELL.pack(mean_top1_prob, mean_entropy)


def decode_cells(cells: list[bytes], logit_width: int, where: str) -> np.ndarray:
    """``(rows, 2)`` float32 from ``row_stats`` cells, each checked; raise :class:`CacheError` naming ``where``."""
    if any(len(cell) != CELL.size for cell in cells):
        raise CacheError(f"{where}: a row_stats cell is not {CELL.size} bytes; the shard is damaged")
    values = np.frombuffer(b"".join(cells), dtype="<f4").reshape(-1, 2).astype(np.float32)
    check_values(values, logit_width, where)
    return values


def check_values(values: np.ndarray, logit_width: int, where: str) -> None:
    """Refuse statistics outside their ranges (``(rows, 2)``: top-1 probability, entropy)."""
    top1, entropy = values[:, 0], values[:, 1]
    if not np.isfinite(values).all():
        raise CacheError(f"{where}: row_stats holds a value that is not finite; the cache is damaged")
    if (top1 < -SLACK).any() or (top1 > 1 + SLACK).any():
        raise CacheError(f"{where}: row_stats holds a top-1 probability outside [0, 1]; the cache is damaged")
    if (entropy < -SLACK).any() or (entropy > math.log(logit_width) + SLACK).any():
        raise CacheError(f"{where}: row_stats holds an entropy outside [0, log {logit_width}]; the cache is damaged")


def shard_summary(values: np.ndarray) -> dict[str, float]:
    """A shard's manifest entry ``row_stats``: the mean of each field over its rows (``(rows, 2)`` in)."""
    means = values.astype(np.float64).mean(axis=0)
    return {name: round(float(mean), 6) for name, mean in zip(FIELDS, means, strict=True)}
