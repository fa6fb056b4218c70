"""Where the student pass's distillation target comes from: one cache, or an ensemble of teachers' caches.

The loop asks a :class:`TeacherSource` for two things: batches of rows (the student's
``input_ids`` plus what the target is built from) and the :class:`~pipeline.losses.Target`
of a batch at a temperature. :class:`OneTeacher` serves a single cache;
:class:`TeacherEnsemble` reads several caches of the same token stream in step and
combines their targets (:func:`pipeline.ensemble.combine_targets`). The checks that the
caches belong together run in :func:`check_ensemble`, before anything is written.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from pipeline.cache import Cache, aligned_rows_at, aligned_shuffled_rows, same_layout, stack_rows
from pipeline.capture_spec import CaptureSpec
from pipeline.config import EnsembleMode
from pipeline.divergences import FORWARD_KL, Divergence
from pipeline.ensemble import combine_targets
from pipeline.errors import ConfigError
from pipeline.fingerprint import sha256_file
from pipeline.losses import Target, target_problem, targets_from_batch
from pipeline.rows import SparseRow

Batch = dict[str, Any]


class RowOrder(Protocol):
    """Sequence indices a run reads, forever, from its ``start``-th row on: a
    :class:`~pipeline.curriculum.CurriculumOrder`, or one rank's share of the global order
    (:class:`~pipeline.student_distributed.RankOrder`)."""

    def rows(self, start: int) -> Iterator[int]: ...


class TeacherSource(Protocol):
    """What the student pass distils from."""

    @property
    def caches(self) -> tuple[Cache, ...]:
        """The training caches, the first one's rows giving the student's ``input_ids``."""
        ...

    def problem(self, temperature: float, divergence: Divergence = FORWARD_KL) -> str | None:
        """Why the loss at ``temperature`` does not fit, or ``None``."""
        ...

    def target(self, batch: Batch, temperature: float) -> Target:
        """The target of a batch from :meth:`batches`, flattened to ``B * T`` positions."""
        ...

    def batches(
        self, seed: int, start: int, batch_size: int, device: torch.device, order: RowOrder | None = None
    ) -> Iterator[Batch]:
        """Batches of ``batch_size`` rows from the ``start``-th row the run reads on, forever: in the
        seeded shuffle of each epoch, or in ``order`` (a curriculum's, or a rank's share of the run's)."""
        ...

    def batch_at(self, seq_indices: list[int], device: torch.device) -> Batch:
        """The batch of the rows ``seq_indices``, read by random access (:mod:`pipeline.loader`'s workers)."""
        ...

    def identity(self) -> str:
        """The sha256 naming the caches, recorded in checkpoints so that ``--resume`` reads the same ones."""
        ...


def manifest_sha256(cache: Cache) -> str:
    """The sha256 of ``cache``'s manifest file: its identity in checkpoints and ``training.json``."""
    return sha256_file(cache.path / "manifest.json")


@dataclass(frozen=True)
class CaptureTeacher:
    """The targets of batches of one capture, without a cache to read (for checks, tests and benchmarks).

    ``vocab_size`` (the teacher's logit width) tempers the tail as spread evenly over the
    uncaptured ids; ``None`` tempers it as one logit (:func:`pipeline.losses.teacher_buckets`).
    """

    capture: CaptureSpec
    vocab_size: int | None = None

    def problem(self, temperature: float, divergence: Divergence = FORWARD_KL) -> str | None:
        return target_problem(self.capture, temperature, divergence)

    def target(self, batch: Batch, temperature: float) -> Target:
        return targets_from_batch(batch, self.capture, temperature, self.vocab_size)


@dataclass(frozen=True)
class OneTeacher:
    """A single cache: batches are :func:`~pipeline.cache.stack_rows` of its rows."""

    cache: Cache

    @property
    def caches(self) -> tuple[Cache, ...]:
        return (self.cache,)

    @property
    def capture(self) -> CaptureSpec:
        return self.cache.manifest.capture

    def problem(self, temperature: float, divergence: Divergence = FORWARD_KL) -> str | None:
        return CaptureTeacher(self.capture).problem(temperature, divergence)

    def target(self, batch: Batch, temperature: float) -> Target:
        return CaptureTeacher(self.capture, self.cache.manifest.logit_width).target(batch, temperature)

    def batches(
        self, seed: int, start: int, batch_size: int, device: torch.device, order: RowOrder | None = None
    ) -> Iterator[Batch]:
        if order is not None:
            rows: Iterator[SparseRow] = self.cache.rows_at(order.rows(start))
        else:
            rows = epoch_rows(
                lambda epoch, skip: self.cache.shuffled_rows(seed, epoch, start=skip), len(self.cache), start
            )
        while True:
            yield stack_rows(list(itertools.islice(rows, batch_size)), device)

    def batch_at(self, seq_indices: list[int], device: torch.device) -> Batch:
        return stack_rows(list(self.cache.rows_at(seq_indices)), device)

    def identity(self) -> str:
        return manifest_sha256(self.cache)


@dataclass(frozen=True)
class TeacherEnsemble:
    """Several teachers' caches of one token stream; the target combines theirs by ``mode`` and ``weights``.

    A batch holds the first cache's ``input_ids`` and, under ``"members"``, each cache's
    batch of the same rows.
    """

    members: tuple[OneTeacher, ...]
    weights: tuple[float, ...]
    mode: EnsembleMode

    @property
    def caches(self) -> tuple[Cache, ...]:
        return tuple(member.cache for member in self.members)

    def problem(self, temperature: float, divergence: Divergence = FORWARD_KL) -> str | None:
        for number, member in enumerate(self.members, start=1):
            problem = member.problem(temperature, divergence)
            if problem:
                return f"--cache number {number} ('{member.cache.path}'): {problem}"
            if self.mode == "mean_logprob" and member.capture.strategy in ("sample", "hybrid"):
                return (
                    f"--ensemble mean_logprob needs each teacher's probability at every id, but --cache number "
                    f"{number} is a {member.capture.strategy} cache, whose estimate is 0 outside its draws; "
                    "use --ensemble mean_prob"
                )
        return None

    def target(self, batch: Batch, temperature: float) -> Target:
        members = batch["members"]
        targets = [member.target(rows, temperature) for member, rows in zip(self.members, members)]
        tail_ids = [
            uncaptured_ids(rows, member.cache.manifest.logit_width) for member, rows in zip(self.members, members)
        ]
        vocab = min(member.cache.manifest.logit_width for member in self.members)
        return combine_targets(targets, tail_ids, self.weights, self.mode, vocab)

    def batches(
        self, seed: int, start: int, batch_size: int, device: torch.device, order: RowOrder | None = None
    ) -> Iterator[Batch]:
        caches = list(self.caches)
        if order is not None:
            rows: Iterator[tuple[SparseRow, ...]] = aligned_rows_at(caches, order.rows(start))
        else:
            rows = epoch_rows(
                lambda epoch, skip: aligned_shuffled_rows(caches, seed, epoch, start=skip), len(caches[0]), start
            )
        while True:
            yield self._stacked(list(itertools.islice(rows, batch_size)), device)

    def batch_at(self, seq_indices: list[int], device: torch.device) -> Batch:
        return self._stacked(list(aligned_rows_at(list(self.caches), seq_indices)), device)

    def _stacked(self, taken: list[tuple[SparseRow, ...]], device: torch.device) -> Batch:
        members = [stack_rows([row[index] for row in taken], device) for index in range(len(self.members))]
        return {"input_ids": members[0]["input_ids"], "members": members}

    def identity(self) -> str:
        joined = ",".join(f"{manifest_sha256(cache)}*{weight!r}" for cache, weight in zip(self.caches, self.weights))
        return hashlib.sha256(f"{self.mode}:{joined}".encode()).hexdigest()


def uncaptured_ids(batch: Batch, vocab_size: int) -> torch.Tensor:
    """``(B * T,)`` int64: ids outside each position's valid slots, of ``vocab_size``."""
    valid = batch["valid"] if "valid" in batch else torch.ones_like(batch["ids"], dtype=torch.bool)
    return (vocab_size - valid.reshape(-1, valid.shape[-1]).sum(dim=-1)).clamp_min(0)


def epoch_rows(rows_of_epoch: Any, rows_per_epoch: int, start: int) -> Iterator[Any]:
    """Rows forever, epoch after epoch, from the ``start``-th on.

    ``rows_of_epoch(epoch, skip)`` yields one epoch's rows, reshuffled per epoch, skipping
    the first ``skip``; whole epochs before ``start`` are never read.
    """
    first_epoch, skip = divmod(start, rows_per_epoch)
    for epoch in itertools.count(first_epoch):
        yield from rows_of_epoch(epoch, skip if epoch == first_epoch else 0)


def check_ensemble(caches: list[Cache], flags: list[str]) -> None:
    """Refuse caches that cannot be combined position by position, in one line naming the two caches.

    They must share the tokenizer fingerprint, the token stream (the manifest's sha256 of
    it), ``seq_len`` and the cut into shards.
    """
    first = caches[0].manifest
    for cache, flag in zip(caches[1:], flags[1:]):
        other = cache.manifest
        where = f"{flags[0]} '{caches[0].path}' and {flag} '{cache.path}'"
        if other.tokenizer_fingerprint != first.tokenizer_fingerprint:
            raise ConfigError(
                f"{where} were made with different tokenizers (fingerprints {first.tokenizer_fingerprint[:12]} and "
                f"{other.tokenizer_fingerprint[:12]}); an ensemble needs teachers that share one tokenizer"
            )
        if other.seq_len != first.seq_len:
            raise ConfigError(
                f"{where} have seq_len {first.seq_len} and {other.seq_len}; make both with the same --seq-len"
            )
        if other.token_stream_sha256 != first.token_stream_sha256:
            raise ConfigError(
                f"{where} hold different token streams; make each teacher's cache from the same --dataset with "
                "the same --seq-len and --max-tokens"
            )
        if not same_layout(first, other):
            raise ConfigError(
                f"{where} cut the sequences into shards differently; make both with the same --shard-tokens"
            )
