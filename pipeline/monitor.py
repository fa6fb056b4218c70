"""Training monitors for the student pass: KL, entropies and top-1 agreement over the target's buckets,
and the warnings they raise (pure functions and one small tracker; the loop does the logging).

On a logging step, :func:`monitor_targets` builds the target at temperature 1 (when the
capture allows it) beside the training one, and :func:`add_chunk_stats` adds each chunk of
the student's logits, under ``torch.no_grad``, into a :class:`MonitorSums`; its
:meth:`~MonitorSums.means` go to ``metrics.jsonl``. :class:`MonitorWarnings` reads those
records and says when the KL has vanished (the temperature is too high) or the loss has
stopped falling. ``docs/losses.md`` ("Monitoring") explains the fields.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from pipeline.config import TEMPERATURE_BOUNDS
from pipeline.divergences import bucket_kl
from pipeline.losses import Target, folded_log_softmax, padding_slots

if TYPE_CHECKING:
    from pipeline.teachers import TeacherSource

# Defaults of the warnings (documented in docs/losses.md, "Monitoring").
LOW_KL = 0.01
LOW_KL_PATIENCE = 3
PLATEAU_WINDOW = 10

# ``--adapt-temperature``: the classic rule on the KL at the training temperature.
ADAPT_FACTOR = 0.9

# What a logging step adds to ``metrics.jsonl`` (each where it can be measured).
MONITOR_FIELDS = ("kl_t1", "kl_t", "teacher_entropy", "student_entropy", "top1_agreement")


def bucket_entropy(logprobs: torch.Tensor) -> torch.Tensor:
    """Entropy per position over buckets: ``(N, B)`` float log-probabilities -> ``(N,)`` float32.

    Buckets with probability 0 (``-inf``) contribute 0.
    """
    logprobs = logprobs.float()
    probs = logprobs.exp()
    return -torch.where(probs > 0, probs * logprobs, torch.zeros_like(probs)).sum(dim=-1)


def student_target_buckets(student_logits: torch.Tensor, target: Target, temperature: float) -> torch.Tensor:
    """The student's log-probabilities at ``temperature`` over ``target``'s ``K + 1`` buckets.

    Args:
        student_logits: ``(N, V)`` float logits.
        target: the same ``N`` positions' :class:`~pipeline.losses.Target`.

    Returns:
        ``(N, K + 1)`` float32, rest last; ``-inf`` in padding slots (as :func:`~pipeline.losses.loss_parts`).
    """
    scaled = student_logits.float()
    if temperature != 1.0:
        scaled = scaled / temperature
    captured, rest, _ = folded_log_softmax(scaled, target.ids)
    captured = torch.where(padding_slots(target.ids), float("-inf"), captured)
    return torch.cat([captured, rest.unsqueeze(-1)], dim=-1)


def top1_matches(student_buckets: torch.Tensor, target: Target) -> torch.Tensor:
    """``(N,)`` bool: whether the student's most probable captured id is the target's.

    Args:
        student_buckets: ``(N, K + 1)`` from :func:`student_target_buckets` (padding ``-inf``).
        target: its ``logprobs`` are ``-inf`` in padding, so neither side picks a padding slot.

    Only the ``K`` captured slots compete (the rest bucket is not an id); ids are compared,
    not slots, so ties between slots of the same id cannot disagree.
    """
    student_slot = student_buckets[:, :-1].argmax(dim=-1, keepdim=True)
    target_slot = target.logprobs.argmax(dim=-1, keepdim=True)
    return target.ids.gather(-1, student_slot).squeeze(-1) == target.ids.gather(-1, target_slot).squeeze(-1)


@dataclass
class MonitorSums:
    """Sums over positions of one step's monitors (micro-batches and chunks added together).

    ``kl_t1`` and ``teacher_entropy`` need the target at temperature 1 (``has_t1``);
    ``kl_t`` the target at the training temperature (``has_t``).
    """

    positions: int = 0
    kl_t1: float = 0.0
    kl_t: float = 0.0
    teacher_entropy: float = 0.0
    student_entropy: float = 0.0
    top1_agreement: float = 0.0
    has_t1: bool = False
    has_t: bool = False

    def means(self) -> dict[str, float]:
        """The fields for ``metrics.jsonl``, averaged over positions; empty when nothing was added."""
        if self.positions == 0:
            return {}
        n = self.positions
        record: dict[str, float] = {}
        if self.has_t1:
            record["kl_t1"] = self.kl_t1 / n
        if self.has_t:
            record["kl_t"] = self.kl_t / n
        if self.has_t1:
            record["teacher_entropy"] = self.teacher_entropy / n
        record["student_entropy"] = self.student_entropy / n
        record["top1_agreement"] = self.top1_agreement / n
        return record


def monitor_targets(
    batch: dict[str, Any],
    teacher: TeacherSource,
    temperature: float,
    training_target: Target | None = None,
) -> tuple[Target | None, Target | None]:
    """The batch's targets at temperature 1 and at ``temperature``, each ``None`` where the teacher's
    caches refuse it.

    ``training_target`` (the loss's own, at ``temperature``) is reused rather than rebuilt;
    at ``temperature`` 1 both are the same target.
    """
    at_t = training_target
    if at_t is None and teacher.problem(temperature) is None:
        at_t = teacher.target(batch, temperature)
    if temperature == 1.0:
        return at_t, at_t
    at_t1 = teacher.target(batch, 1.0) if teacher.problem(1.0) is None else None
    return at_t1, at_t


@torch.no_grad()
def add_chunk_stats(
    sums: MonitorSums,
    student_logits: torch.Tensor,
    target_t1: Target | None,
    target_t: Target | None,
    temperature: float,
) -> None:
    """Add one chunk's monitors into ``sums``: KL at 1 and at ``temperature``, entropies, top-1 agreement.

    Args:
        student_logits: ``(N, V)`` float, the chunk's logits (as the loss saw them).
        target_t1, target_t: the same ``N`` positions of the targets at temperature 1 and at
            ``temperature`` (:func:`monitor_targets`), ``None`` where the capture has none.

    Entropies and agreement are at temperature 1, against ``target_t1`` (or ``target_t``
    when there is no target at 1, in which case ``teacher_entropy`` is left out).
    """
    reference = target_t1 if target_t1 is not None else target_t
    if reference is None:
        return
    student_t1 = student_target_buckets(student_logits, reference, 1.0)
    sums.positions += student_logits.shape[0]
    sums.student_entropy += float(bucket_entropy(student_t1).sum())
    sums.top1_agreement += float(top1_matches(student_t1, reference).sum())
    kl_t1 = None
    if target_t1 is not None:
        teacher_t1 = target_t1.buckets()
        kl_t1 = float(bucket_kl(teacher_t1, student_t1).sum())
        sums.has_t1 = True
        sums.kl_t1 += kl_t1
        sums.teacher_entropy += float(bucket_entropy(teacher_t1).sum())
    if target_t is not None:
        sums.has_t = True
        if temperature == 1.0 and kl_t1 is not None:
            sums.kl_t += kl_t1  # the same target: no second pass over the vocabulary
        else:
            student_t = student_target_buckets(student_logits, target_t, temperature)
            sums.kl_t += float(bucket_kl(target_t.buckets(), student_t).sum())


@dataclass
class MonitorWarnings:
    """Says, once each, when the logged KL has vanished or the logged loss has stopped falling.

    :meth:`update` takes each ``metrics.jsonl`` record in turn and returns the warnings it
    raises (the caller logs them); it does no I/O.

    Attributes:
        temperature: the training temperature (``--temperature``), named in the warning.
        adapting: ``--adapt-temperature`` is on: it answers a vanishing KL, so no warning.
        low_kl: KL at the training temperature below which a logging step counts as low.
        low_kl_patience: consecutive low logging steps before warning.
        plateau_window: logging steps without a new minimum of ``loss`` before warning.
    """

    temperature: float
    adapting: bool = False
    low_kl: float = LOW_KL
    low_kl_patience: int = LOW_KL_PATIENCE
    plateau_window: int = PLATEAU_WINDOW
    low_kl_streak: int = 0
    best_loss: float = math.inf
    best_step: int | None = None
    since_best: int = 0
    fired: set[str] = field(default_factory=set)

    def update(self, record: dict[str, object]) -> list[str]:
        """Take one logged record (``step``, ``loss``, and ``kl_t`` when monitored); the new warnings."""
        warnings = []
        kl = record.get("kl_t")
        self.low_kl_streak = self.low_kl_streak + 1 if isinstance(kl, float) and kl < self.low_kl else 0
        if self.low_kl_streak >= self.low_kl_patience and not self.adapting and "low_kl" not in self.fired:
            self.fired.add("low_kl")
            warnings.append(
                f"temperature too high? KL at T={self.temperature:g} is {kl:.3g} (below {self.low_kl:g} for "
                f"{self.low_kl_streak} logging steps), so the distillation term has little left to teach; "
                "lower --temperature"
            )
        loss = record.get("loss")
        if isinstance(loss, float) and math.isfinite(loss):
            if loss < self.best_loss:
                self.best_loss, self.best_step, self.since_best = loss, record.get("step"), 0
            else:
                self.since_best += 1
        if self.since_best >= self.plateau_window and "plateau" not in self.fired:
            self.fired.add("plateau")
            warnings.append(
                f"loss plateau: no new minimum for {self.since_best} logging steps (best {self.best_loss:.4g} at "
                f"step {self.best_step}); lower --lr, or stop sooner with --max-steps"
            )
        return warnings


@dataclass
class TemperatureSchedule:
    """``--adapt-temperature``: ``T *= 0.9`` at each logging step whose KL at ``T`` is below 0.01, never below 1.

    The rule is memoryless, so the current ``temperature`` is all a checkpoint needs to
    continue it. :meth:`update` takes each ``metrics.jsonl`` record and returns the new
    temperature, or ``None`` when it keeps the current one; it does no I/O.

    Attributes:
        temperature: the current temperature, within :data:`TEMPERATURE_BOUNDS`.
        low_kl: the KL below which the temperature is lowered.
        factor: what a lowering multiplies the temperature by.
    """

    temperature: float
    low_kl: float = LOW_KL
    factor: float = ADAPT_FACTOR

    def update(self, record: dict[str, object]) -> float | None:
        kl = record.get("kl_t")
        low, _ = TEMPERATURE_BOUNDS
        if not isinstance(kl, float) or kl >= self.low_kl or self.temperature <= low:
            return None
        self.temperature = max(low, self.temperature * self.factor)
        return self.temperature
