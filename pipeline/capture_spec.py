"""What a teacher pass captures at each position, as chosen by ``--capture`` and recorded in the manifest.

Strategies:

- ``topk``: the ``k`` most probable ids, their log-probabilities, and the tail.
- ``topp``: the smallest set of most probable ids whose probability reaches ``top_p``,
  at least ``min_k`` and at most ``max_k`` ids; log-probabilities and the tail.
- ``sample``: ``samples`` draws with replacement from the teacher's distribution at
  ``sample_temperature``; the distinct ids and their counts. The log-probabilities at
  temperature 1 (and so the tail) only with ``sample_logprobs``.
- ``hybrid``: the top-``k`` head (log-probabilities), plus ``samples`` draws from the
  rest of the distribution (renormalised outside the head) at ``sample_temperature``,
  with their counts and log-probabilities; the tail outside head and samples.

Draws are keyed by ``(seed, global position)`` so that they do not depend on batch
size, resumption or world size.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

Strategy = Literal["topk", "topp", "sample", "hybrid"]
STRATEGIES: tuple[str, ...] = ("topk", "topp", "sample", "hybrid")
MAX_SAMPLES = 65535
# The counter-based generator that keys draws by (seed, global position, draw); see pipeline.capture.
GENERATOR_NAME = "splitmix64-counter/1"


@dataclass(frozen=True)
class CaptureSpec:
    """A capture strategy and its parameters (``None`` where a strategy has no such parameter)."""

    strategy: Strategy = "topk"
    k: int | None = 64
    top_p: float | None = None
    min_k: int | None = None
    max_k: int | None = None
    samples: int | None = None
    sample_temperature: float | None = None
    sample_logprobs: bool | None = None
    seed: int | None = None

    @property
    def slots(self) -> int:
        """``K``: the most ids one position can capture."""
        if self.strategy == "topk":
            return int(self.k or 0)
        if self.strategy == "topp":
            return int(self.max_k or 0)
        if self.strategy == "sample":
            return int(self.samples or 0)
        return int(self.k or 0) + int(self.samples or 0)

    @property
    def has_logprobs(self) -> bool:
        """Whether rows carry teacher log-probabilities at temperature 1 (and so a tail)."""
        return self.strategy != "sample" or bool(self.sample_logprobs)

    @property
    def has_counts(self) -> bool:
        """Whether rows carry draw counts."""
        return self.strategy in ("sample", "hybrid")

    @property
    def variable_length(self) -> bool:
        """Whether positions capture different numbers of ids (``lengths`` is stored)."""
        return self.strategy != "topk"

    def problem(self, logit_width: int | None = None) -> str | None:
        """What is wrong with these settings, or ``None``; with ``logit_width``, also against the teacher's width."""
        if self.strategy not in STRATEGIES:
            return f"capture strategy {self.strategy!r} is not one of {', '.join(STRATEGIES)}"
        width = logit_width if logit_width is not None else 2**32
        teacher = f"the teacher's {logit_width} logits" if logit_width is not None else "2^32"
        if self.strategy in ("topk", "hybrid") and not (self.k is not None and 1 <= self.k <= width):
            return f"--top-k {self.k} must be between 1 and {teacher}"
        if self.strategy == "hybrid" and logit_width is not None and self.k >= logit_width:
            return f"--top-k {self.k} leaves nothing of the teacher's {logit_width} logits to sample; lower it"
        if self.strategy == "topp":
            if self.top_p is None or not (0.0 < self.top_p <= 1.0):
                return f"--top-p {self.top_p} must be in (0, 1]"
            if not (self.min_k is not None and self.max_k is not None and 1 <= self.min_k <= self.max_k <= width):
                return f"--min-k {self.min_k} and --max-k {self.max_k} must satisfy 1 <= min-k <= max-k <= {teacher}"
        if self.strategy in ("sample", "hybrid"):
            if not (self.samples is not None and 1 <= self.samples <= MAX_SAMPLES):
                return f"--samples {self.samples} must be between 1 and {MAX_SAMPLES}"
            temperature = self.sample_temperature
            if temperature is None or not (math.isfinite(temperature) and temperature > 0):
                return f"--sample-temperature {temperature} must be a positive number"
            if self.seed is None or not (0 <= self.seed < 2**63):
                return f"--seed {self.seed} must be between 0 and 2^63 - 1"
        return None

    def to_json(self) -> dict[str, Any]:
        """The manifest's ``capture`` object: the strategy and the parameters it uses."""
        return {key: value for key, value in asdict(self).items() if value is not None}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CaptureSpec:
        """From a manifest's ``capture`` object (already type-checked); unknown keys are ignored."""
        known = {key: data[key] for key in cls.__dataclass_fields__ if key in data}
        return cls(**{"k": None, **known})
