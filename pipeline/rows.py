"""One cached row in memory: a packed sequence and what the teacher pass captured at each position.

Every capture strategy (top-k, top-p, sampled, hybrid) and every codec version decodes
to the same :class:`SparseRow`, so losses, readers and tools see one shape. Position
``t`` holds the teacher's distribution over token ``t + 1``.

A position captures a variable number of ids: ``lengths[t]`` of the ``K`` slots are
valid, the rest are padding (id 0, log-probability ``-inf``, count 0). Top-k rows have
every slot valid (``lengths`` is ``None``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SparseRow:
    """One packed sequence and the teacher's captured next-token distributions.

    Attributes:
        input_ids: ``(T,)`` int64 token ids.
        ids: ``(T, K)`` int64 captured ids, distinct among a position's valid slots.
            Order: most probable first for top-k and top-p; for hybrid, the top-k head most
            probable first, then the sampled ids ascending; for sampled rows, ascending.
        logprobs: ``(T, K)`` float32 teacher log-probabilities at temperature 1 (``-inf``
            in padding), or ``None`` when the capture did not store them (sampled
            without ``--sample-logprobs``).
        tail_logmass: ``(T,)`` float32 log of the teacher's probability outside the valid
            ids (``-inf`` where nothing is left out), or ``None`` when not stored.
        counts: ``(T, K)`` int32 draws per id (sampled: every valid slot counts at least
            one; hybrid: 0 on the head's slots), or ``None`` for top-k and top-p.
        lengths: ``(T,)`` int32 valid slots per position, or ``None`` when all ``K`` are.
        hidden: layer -> ``(T, D)`` float32 hidden states of the teacher at each position
            (:mod:`pipeline.hidden`), or ``None`` when none are stored.
        loss_mask: ``(T,)`` bool, whether position ``t``'s target (token ``t + 1``) counts in
            the losses (chat data: the assistant's tokens), or ``None`` when every one does.
        document_starts: ``(T,)`` bool, where documents begin, when attention is kept within
            them (``teacher-cache --document-attention``), else ``None``.
    """

    input_ids: np.ndarray
    ids: np.ndarray
    logprobs: np.ndarray | None
    tail_logmass: np.ndarray | None
    counts: np.ndarray | None = None
    lengths: np.ndarray | None = None
    hidden: dict[int, np.ndarray] | None = None
    loss_mask: np.ndarray | None = None
    document_starts: np.ndarray | None = None

    @property
    def topk_ids(self) -> np.ndarray:
        """``ids``, under the name the first cache version used."""
        return self.ids

    @property
    def topk_logprobs(self) -> np.ndarray | None:
        """``logprobs``, under the name the first cache version used."""
        return self.logprobs

    @property
    def width(self) -> int:
        """``K``: the slots per position."""
        return int(self.ids.shape[1])

    def valid(self) -> np.ndarray:
        """``(T, K)`` bool: which slots hold a captured id."""
        if self.lengths is None:
            return np.ones(self.ids.shape, dtype=bool)
        return np.arange(self.ids.shape[1])[None, :] < self.lengths[:, None]


# Batch keys, in the order rows stack: those a row may lack are left out of a batch.
ROW_FIELDS = ("input_ids", "ids", "logprobs", "tail_logmass", "counts")
PAD_VALUES = {"ids": 0, "logprobs": -np.inf, "counts": 0}


def stack_numpy(rows: list[SparseRow]) -> dict[str, np.ndarray]:
    """Stack rows into numpy arrays: ``input_ids (B, T)``, ``ids (B, T, K)``, ``valid (B, T, K)``, and
    ``logprobs (B, T, K)``, ``tail_logmass (B, T)``, ``counts (B, T, K)``, ``loss_mask (B, T)`` bool
    where every row has them.

    Rows with fewer slots are padded to the widest row's ``K``.
    """
    width = max(row.width for row in rows)
    batch: dict[str, np.ndarray] = {"input_ids": np.stack([row.input_ids for row in rows])}
    for name in ROW_FIELDS[1:]:
        values = [getattr(row, name) for row in rows]
        if any(value is None for value in values):
            continue
        if name in PAD_VALUES:
            values = [_pad(value, width, PAD_VALUES[name]) for value in values]
        batch[name] = np.stack(values)
    batch["valid"] = np.stack([_pad(row.valid(), width, False) for row in rows])
    if all(row.loss_mask is not None for row in rows):
        batch["loss_mask"] = np.stack([row.loss_mask for row in rows])
    if all(row.document_starts is not None for row in rows):
        batch["document_starts"] = np.stack([row.document_starts for row in rows])
    if all(row.hidden for row in rows):
        for layer in rows[0].hidden:  # type: ignore[union-attr]
            batch[f"hidden_{layer}"] = np.stack([row.hidden[layer] for row in rows])  # type: ignore[index]
    return batch


def _pad(values: np.ndarray, width: int, fill: float | bool) -> np.ndarray:
    if values.shape[1] == width:
        return values
    padded = np.full((values.shape[0], width), fill, dtype=values.dtype)
    padded[:, : values.shape[1]] = values
    return padded
