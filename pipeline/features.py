"""Feature distillation: the student's hidden states matched to the teacher's cached ones (pure tensors, no I/O).

``--layer-map S:T[,S:T...]`` pairs student layer ``S`` with teacher layer ``T``, both in
transformers' ``output_hidden_states`` indexing (``0`` the embeddings, ``-1`` the final
states after the last norm; the teacher's must be stored in the cache,
:mod:`pipeline.hidden`). Where the widths differ, each pair gets a learned linear
projector from the student's width to the stored teacher width, initialised from the
run's seed and the pair's place in the map (so two runs with one seed start equal),
trained with the student, saved beside it (``projectors.safetensors``) and never part of
the exported student model.

Losses, per position and averaged over the positions that count (the loss mask):
``mse`` is the mean squared difference over the ``D`` features; ``cosine`` is
``1 - cos(projected student, teacher)``. The run's loss adds ``--feature-weight`` times
their mean over the mapped pairs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from pipeline.errors import ConfigError

FeatureLossName = Literal["mse", "cosine"]
FEATURE_LOSSES = ("mse", "cosine")


@dataclass(frozen=True)
class LayerPair:
    """Student layer ``student`` (resolved) matched to teacher layer ``teacher`` (as stored)."""

    student: int
    teacher: int


def parse_layer_map(value: str) -> tuple[tuple[int, int], ...]:
    """``"4:8,-1:-1"`` -> ``((4, 8), (-1, -1))``; a malformed map is refused in one line."""
    pairs = []
    for piece in value.split(","):
        left, colon, right = piece.partition(":")
        try:
            if not colon:
                raise ValueError
            pairs.append((int(left), int(right)))
        except ValueError:
            raise ConfigError(
                f"--layer-map {value!r}: each pair is STUDENT:TEACHER layer numbers, e.g. 4:8,-1:-1"
            ) from None
    return tuple(pairs)


def resolve_pairs(
    pairs: tuple[tuple[int, int], ...], student_blocks: int, teacher_blocks: int, stored: tuple[int, ...]
) -> tuple[LayerPair, ...]:
    """The map's layers resolved (negatives from the end), each student layer once, each teacher layer stored."""
    resolved = []
    for student, teacher in pairs:
        if not -(student_blocks + 1) <= student <= student_blocks:
            raise ConfigError(
                f"--layer-map: student layer {student} is outside 0 .. {student_blocks} "
                f"(or -1 .. -{student_blocks + 1})"
            )
        if not -(teacher_blocks + 1) <= teacher <= teacher_blocks:
            raise ConfigError(
                f"--layer-map: teacher layer {teacher} is outside 0 .. {teacher_blocks} "
                f"(or -1 .. -{teacher_blocks + 1})"
            )
        pair = LayerPair(student % (student_blocks + 1), teacher % (teacher_blocks + 1))
        if pair.teacher not in stored:
            raise ConfigError(
                f"--layer-map: the cache stores teacher layers {', '.join(map(str, stored)) or 'none'}, not "
                f"{pair.teacher}; write the cache with --hidden-layers including it"
            )
        resolved.append(pair)
    if len({pair.student for pair in resolved}) != len(resolved):
        raise ConfigError("--layer-map names a student layer twice")
    return tuple(resolved)


class Projectors(nn.Module):
    """One linear map per layer pair from the student's width to the teacher's stored width (identity when equal)."""

    def __init__(self, pairs: tuple[LayerPair, ...], student_width: int, teacher_dim: int, seed: int) -> None:
        super().__init__()
        self.pairs = pairs
        self.maps = nn.ModuleList()
        for number, _ in enumerate(pairs):
            if student_width == teacher_dim:
                self.maps.append(nn.Identity())
                continue
            layer = nn.Linear(student_width, teacher_dim, bias=False)
            generator = torch.Generator().manual_seed(seed * 1_000_003 + number)
            bound = math.sqrt(6.0 / (student_width + teacher_dim))  # Glorot uniform, from the run's seed
            with torch.no_grad():
                layer.weight.copy_(torch.rand(layer.weight.shape, generator=generator) * 2 * bound - bound)
            self.maps.append(layer)

    def forward(self, number: int, states: torch.Tensor) -> torch.Tensor:
        return self.maps[number](states)


def feature_loss(
    student_states: torch.Tensor,
    teacher_states: torch.Tensor,
    name: FeatureLossName,
    loss_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean per-position feature loss.

    Args:
        student_states: ``(B, T, D)`` float, the student's states after the pair's projector.
        teacher_states: ``(B, T, D)`` float32, the cached teacher states of the same positions.
        name: ``mse`` (mean squared difference over the ``D`` features) or ``cosine`` (``1 - cos``).
        loss_mask: ``(B, T)`` bool, the positions that count, or ``None`` for all.

    Returns:
        A scalar: the mean over counted positions (0 when none count).
    """
    student = student_states.float()
    teacher = teacher_states.to(student.device, torch.float32)
    if name == "mse":
        per_position = (student - teacher).pow(2).mean(dim=-1)
    else:
        per_position = 1.0 - torch.nn.functional.cosine_similarity(student, teacher, dim=-1, eps=1e-8)
    if loss_mask is None:
        return per_position.mean()
    counted = loss_mask.to(per_position.device)
    return torch.where(counted, per_position, per_position.new_zeros(())).sum() / counted.sum().clamp_min(1)
