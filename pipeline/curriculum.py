"""Curriculum by teacher confidence: which rows each micro-batch reads (pure; ``--curriculum confidence``).

Rows are ranked from the most confident teacher (highest mean top-1 probability; ties by
lower mean entropy, then by a seeded draw) to the least. Training starts on the most
confident fraction ``--curriculum-start`` of the rows, and the pool of rows it draws from
grows with a pacing function until, after ``--curriculum-span`` of the run's steps, it
holds every row (the competence schedules of Platanios et al., 2019, "Competence-based
Curriculum Learning for Neural Machine Translation", arXiv:1903.09848):

- ``linear``: ``c(t) = min(1, c0 + (1 - c0) t / T)``;
- ``root``: ``c(t) = min(1, sqrt(c0^2 + (1 - c0^2) t / T))`` (the pool grows fast early).

Each micro-batch draws its rows uniformly, without repeats, from the current pool, with a
generator keyed by ``(seed, micro-batch number)``: the order is a function of the seed and
the position in the run alone, so ``--resume`` continues it exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from pipeline.config import PacingName

# Keeps the curriculum's draws apart from the other uses of the seed.
STREAM = 0x43555252


@dataclass(frozen=True)
class Pacing:
    """The fraction of the ranked rows available at each optimizer step.

    Attributes:
        kind: ``"linear"`` or ``"root"``.
        start: the fraction available at step 0, in ``(0, 1]``.
        steps: the step from which every row is available (at least 1).
    """

    kind: PacingName
    start: float
    steps: int

    def competence(self, step: int) -> float:
        """The fraction of rows in the pool at optimizer ``step`` (counted from 0), in ``[start, 1]``."""
        progress = min(1.0, step / self.steps)
        if self.kind == "linear":
            return min(1.0, self.start + (1.0 - self.start) * progress)
        return min(1.0, math.sqrt(self.start**2 + (1.0 - self.start**2) * progress))


def confidence_ranking(stats: np.ndarray, seed: int) -> np.ndarray:
    """Row indices from the most to the least confident teacher.

    Args:
        stats: ``(rows, 2)`` float: mean top-1 probability, mean entropy (:mod:`pipeline.row_stats`).
        seed: breaks the remaining ties.

    Returns:
        ``(rows,)`` int64: a permutation of the rows.
    """
    tie_break = np.random.default_rng([seed, STREAM, 0]).permutation(len(stats))
    # np.lexsort sorts by the last key first: top-1 probability (descending), entropy, then the draw.
    return np.lexsort((tie_break, stats[:, 1], -stats[:, 0])).astype(np.int64)


@dataclass(frozen=True)
class CurriculumOrder:
    """Which rows each micro-batch reads.

    Attributes:
        ranking: ``(rows,)`` int64 row indices, most confident first (:func:`confidence_ranking`).
        pacing: how the pool grows over optimizer steps.
        seed: keys each micro-batch's draw.
        batch_size: rows per micro-batch.
        micro_batches_per_step: ``--grad-accum``.
    """

    ranking: np.ndarray
    pacing: Pacing
    seed: int
    batch_size: int
    micro_batches_per_step: int

    def pool_size(self, step: int) -> int:
        """Rows in the pool at optimizer ``step``: at least one batch's worth (or every row)."""
        rows = len(self.ranking)
        return min(rows, max(self.batch_size, math.ceil(self.pacing.competence(step) * rows)))

    def micro_batch(self, number: int) -> np.ndarray:
        """``(batch_size,)`` int64 row indices of micro-batch ``number`` (counted from 0 over the whole run)."""
        pool = self.pool_size(number // self.micro_batches_per_step)
        generator = np.random.default_rng([self.seed, STREAM, 1, number])
        picks = generator.choice(pool, size=self.batch_size, replace=pool < self.batch_size)
        return self.ranking[picks]

    def rows(self, start: int) -> Iterator[int]:
        """Row indices forever, from the ``start``-th row the run reads (a multiple of ``batch_size``)."""
        number = start // self.batch_size
        while True:
            yield from (int(row) for row in self.micro_batch(number))
            number += 1
