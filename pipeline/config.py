"""Settings of each pass, as frozen dataclasses validated on construction.

Error messages name the command-line flag, since that is where users set them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from pipeline.capture_spec import STRATEGIES, CaptureSpec
from pipeline.codec_v2 import CodecSettings, default_mode
from pipeline.errors import ConfigError
from pipeline.features import parse_layer_map

DEFAULT_TOP_K = 64
DEFAULT_TOP_P = 0.99
DEFAULT_SAMPLES = 50
DEFAULT_HYBRID_HEAD = 16
DEFAULT_SEQ_LEN = 512
DEFAULT_SHARD_TOKENS = 1 << 18

# The student pass's distillation losses (``--loss``; see pipeline/losses.py and docs/losses.md).
LossName = Literal["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd"]
LOSSES: tuple[LossName, ...] = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd")
# How --ensemble combines teachers (see pipeline/ensemble.py).
EnsembleMode = Literal["mean_prob", "mean_logprob"]
ENSEMBLE_MODES: tuple[EnsembleMode, ...] = ("mean_prob", "mean_logprob")
# The orders --curriculum knows, and the pacing of its pool (see pipeline/curriculum.py).
CurriculumName = Literal["confidence"]
CURRICULA: tuple[CurriculumName, ...] = ("confidence",)
PacingName = Literal["linear", "root"]
CURRICULUM_PACINGS: tuple[PacingName, ...] = ("linear", "root")
CURRICULUM_DEFAULTS = {"curriculum_pacing": "root", "curriculum_start": 0.2, "curriculum_span": 0.5}
# Where --adapt-temperature keeps the temperature.
TEMPERATURE_BOUNDS = (1.0, 20.0)


@dataclass(frozen=True)
class TeacherCacheConfig:
    """``distill teacher-cache``."""

    teacher: str
    dataset: str
    out: str
    dataset_config: str | None = None
    split: str = "train"
    text_column: str = "text"
    txt_sample_by: Literal["document", "paragraph", "line"] = "document"
    txt_encoding_errors: Literal["strict", "replace", "skip-file"] = "strict"
    seq_len: int = DEFAULT_SEQ_LEN
    max_tokens: int | None = None
    capture: Literal["topk", "topp", "sample", "hybrid"] = "topk"
    top_k: int | None = None
    top_p: float = DEFAULT_TOP_P
    min_k: int = 1
    max_k: int = DEFAULT_TOP_K
    samples: int = DEFAULT_SAMPLES
    sample_temperature: float = 1.0
    sample_logprobs: bool = False
    seed: int = 0
    codec_mode: Literal["quantized", "lossless", "sqrt"] | None = None
    logprob_step: float | None = None
    sqrt_step: float | None = None
    dtype: Literal["fp32", "bf16", "fp16"] | None = None
    device: str = "auto"
    batch_size: int = 8
    shard_tokens: int = DEFAULT_SHARD_TOKENS
    row_stats: bool = True
    chat_template: bool = False
    messages_column: str = "messages"
    document_attention: bool = False
    hidden_layers: tuple[int, ...] = ()
    hidden_encoding: Literal["bf16", "int8"] = "bf16"
    hidden_dim: int | None = None
    hidden_seed: int = 0
    trust_remote_code: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.hidden_encoding not in ("bf16", "int8"):
            raise ConfigError(f"--hidden-encoding {self.hidden_encoding} is not one of bf16, int8")
        if self.hidden_dim is not None and self.hidden_dim < 1:
            raise ConfigError(f"--hidden-dim {self.hidden_dim} must be at least 1")
        if not 0 <= self.hidden_seed < 2**63:
            raise ConfigError("--hidden-seed must be in [0, 2**63)")
        if not self.hidden_layers and (self.hidden_dim is not None or self.hidden_encoding != "bf16"):
            raise ConfigError("--hidden-dim and --hidden-encoding apply to --hidden-layers; name the layers to store")
        if self.seq_len < 2:
            raise ConfigError(f"--seq-len {self.seq_len} is too small; use at least 2")
        if self.capture not in STRATEGIES:
            raise ConfigError(f"--capture {self.capture} is not one of {', '.join(STRATEGIES)}")
        if self.top_k is not None and self.capture not in ("topk", "hybrid"):
            raise ConfigError(f"--top-k applies to --capture topk and hybrid, not {self.capture}; use --max-k for topp")
        problem = self.capture_spec().problem()
        if problem:
            raise ConfigError(problem)
        mode = self.codec_settings().mode
        for flag, value, wanted in (
            ("--logprob-step", self.logprob_step, "quantized"),
            ("--sqrt-step", self.sqrt_step, "sqrt"),
        ):
            if value is not None and mode != wanted:
                raise ConfigError(f"{flag} applies to --codec-mode {wanted}, not {mode}; drop one of them")
        problem = self.codec_settings().problem()
        if problem:
            raise ConfigError(problem)
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size {self.batch_size} must be at least 1")
        if self.max_tokens is not None and self.max_tokens < self.seq_len:
            raise ConfigError(
                f"--max-tokens {self.max_tokens} is less than one sequence (--seq-len {self.seq_len}); raise it"
            )
        if self.shard_tokens < 1:
            raise ConfigError(f"--shard-tokens {self.shard_tokens} must be at least 1")
        if self.device not in ("auto", "cpu", "cuda", "mps") and not self.device.startswith("cuda:"):
            raise ConfigError(f"--device {self.device} is not one of auto, cpu, cuda, cuda:N, mps")
        if self.txt_encoding_errors not in ("strict", "replace", "skip-file"):
            raise ConfigError(
                f"--txt-encoding-errors {self.txt_encoding_errors} is not one of strict, replace, skip-file"
            )

    def codec_settings(self) -> CodecSettings:
        """How the cache encodes values: ``--codec-mode`` (else the capture's default) and its step flag."""
        mode = self.codec_mode or default_mode(self.capture_spec())
        return CodecSettings.for_mode(mode, self.sqrt_step if mode == "sqrt" else self.logprob_step)

    def capture_spec(self) -> CaptureSpec:
        """The capture these settings ask for (checked against the teacher's width once it is known)."""
        if self.capture == "topk":
            return CaptureSpec("topk", k=DEFAULT_TOP_K if self.top_k is None else self.top_k)
        if self.capture == "topp":
            return CaptureSpec("topp", k=None, top_p=self.top_p, min_k=self.min_k, max_k=self.max_k)
        sampled = {"samples": self.samples, "sample_temperature": self.sample_temperature, "seed": self.seed}
        if self.capture == "sample":
            return CaptureSpec("sample", k=None, sample_logprobs=self.sample_logprobs, **sampled)
        return CaptureSpec("hybrid", k=DEFAULT_HYBRID_HEAD if self.top_k is None else self.top_k, **sampled)

    @property
    def max_sequences(self) -> int | None:
        return None if self.max_tokens is None else self.max_tokens // self.seq_len

    @property
    def rows_per_shard(self) -> int:
        return max(1, self.shard_tokens // self.seq_len)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class StudentTrainConfig:
    """``distill student-train``."""

    # Settings ``--resume`` may change; every other one must equal the checkpoint's. A new
    # --max-steps/--epochs changes the learning-rate schedule from there on (a warning
    # says so); --cache may move (its manifest must be the same); --out is where the
    # checkpoint was found; --fsdp changes where the state lives, not its values; the rest
    # do not change what is learned.
    RESUME_MAY_CHANGE = (
        "fsdp",
        "data_workers",
        "prefetch",
        "max_steps",
        "epochs",
        "save_every",
        "log_every",
        "device",
        "eval_cache",
        "verify",
        "head_chunk",
        "cache",
        "ensemble_caches",
        "report_to",
        "out",
        "resume",
        "overwrite",
    )

    cache: str
    student: str
    out: str
    ensemble_caches: tuple[str, ...] = ()
    ensemble: EnsembleMode | None = None
    cache_weights: tuple[float, ...] | None = None
    student_config: tuple[str, ...] = field(default_factory=tuple)
    tokenizer: str | None = None
    alpha: float = 0.5
    temperature: float = 1.0
    loss: LossName = "forward_kl"
    beta: float = 0.5
    skew: float = 0.1
    renormalize: bool = False
    adapt_temperature: bool = False
    curriculum: CurriculumName | None = None
    curriculum_pacing: PacingName | None = None
    curriculum_start: float | None = None
    curriculum_span: float | None = None
    report_to: Literal["none", "tensorboard"] = "none"
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int | None = None
    max_grad_norm: float = 1.0
    epochs: float | None = None
    max_steps: int | None = None
    eval_cache: str | None = None
    seed: int = 0
    device: str = "auto"
    save_every: int = 0
    log_every: int = 10
    head_chunk: int = 0
    fsdp: bool = False
    feature_loss: Literal["mse", "cosine"] | None = None
    layer_map: str | None = None
    feature_weight: float = 1.0
    data_workers: int = 0
    prefetch: int = 2
    verify: bool = True
    trust_remote_code: bool = False
    overwrite: bool = False
    resume: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"--alpha {self.alpha} must lie in [0, 1]")
        if not self.temperature > 0:
            raise ConfigError(f"--temperature {self.temperature} must be positive")
        low, high = TEMPERATURE_BOUNDS
        if self.adapt_temperature and not low <= self.temperature <= high:
            raise ConfigError(
                f"--adapt-temperature keeps the temperature within [{low:g}, {high:g}], but --temperature is "
                f"{self.temperature:g}; start from a temperature in that range"
            )
        self._check_ensemble()
        self._check_curriculum()
        if self.report_to not in ("none", "tensorboard"):
            raise ConfigError(f"--report-to {self.report_to!r} is not one of none, tensorboard")
        if self.loss not in LOSSES:
            raise ConfigError(f"--loss {self.loss!r} is not one of {', '.join(LOSSES)}")
        if not 0.0 <= self.beta <= 1.0:
            raise ConfigError(f"--beta {self.beta} must lie in [0, 1] (0 is forward_kl, 1 is reverse_kl)")
        if not 0.0 <= self.skew < 1.0:
            raise ConfigError(f"--skew {self.skew} must lie in [0, 1) (at 1 the loss is identically 0)")
        if (self.feature_loss is None) != (self.layer_map is None):
            raise ConfigError("--feature-loss and --layer-map go together: name the loss and the layers it matches")
        if self.feature_loss is not None:
            if self.feature_loss not in ("mse", "cosine"):
                raise ConfigError(f"--feature-loss {self.feature_loss!r} is not one of mse, cosine")
            parse_layer_map(self.layer_map or "")
            if not self.feature_weight >= 0:
                raise ConfigError(f"--feature-weight {self.feature_weight} must be at least 0")
            if self.fsdp or self.ensemble_caches:
                raise ConfigError("--feature-loss works with one --cache and without --fsdp; drop one of them")
        if self.data_workers < 0 or self.prefetch < 1:
            raise ConfigError("--data-workers must be at least 0 and --prefetch at least 1")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ConfigError("--batch-size and --grad-accum must be at least 1")
        if not self.lr > 0:
            raise ConfigError(f"--lr {self.lr} must be positive")
        if self.epochs is not None and self.max_steps is not None:
            raise ConfigError("give either --epochs or --max-steps, not both")
        if self.epochs is not None and not self.epochs > 0:
            raise ConfigError(f"--epochs {self.epochs} must be positive")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"--max-steps {self.max_steps} must be at least 1")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ConfigError("--warmup-steps must be at least 0")
        if self.max_grad_norm < 0:
            raise ConfigError("--max-grad-norm must be at least 0 (0 disables clipping)")
        if self.save_every < 0 or self.log_every < 1:
            raise ConfigError("--save-every must be >= 0 and --log-every >= 1")
        if self.head_chunk < 0:
            raise ConfigError(f"--head-chunk {self.head_chunk} must be at least 0 (0 picks it from the vocabulary)")
        if self.seed < 0:
            raise ConfigError(f"--seed {self.seed} must be at least 0")
        if self.device not in ("auto", "cpu", "cuda", "mps") and not self.device.startswith("cuda:"):
            raise ConfigError(f"--device {self.device} is not one of auto, cpu, cuda, cuda:N, mps")
        if self.overwrite and self.resume:
            raise ConfigError("--overwrite and --resume contradict each other; pick one")

    def _check_ensemble(self) -> None:
        caches = len(self.caches)
        if self.ensemble_caches and self.ensemble is None:
            raise ConfigError(
                f"--cache given {caches} times without --ensemble; to distil from several teachers' caches of the "
                "same data add --ensemble mean_prob (or mean_logprob); to train on more data, make one cache of it all"
            )
        if self.ensemble is not None and self.ensemble not in ENSEMBLE_MODES:
            raise ConfigError(f"--ensemble {self.ensemble!r} is not one of {', '.join(ENSEMBLE_MODES)}")
        if self.ensemble is not None and not self.ensemble_caches:
            raise ConfigError(f"--ensemble {self.ensemble} needs a --cache for each teacher, at least two; got one")
        if self.cache_weights is None:
            return
        if self.ensemble is None:
            raise ConfigError("--cache-weights weighs the teachers of an --ensemble; add --ensemble or drop it")
        if len(self.cache_weights) != caches:
            raise ConfigError(
                f"--cache-weights has {len(self.cache_weights)} weights for {caches} --cache; give one each"
            )
        if not all(math.isfinite(w) and w >= 0 for w in self.cache_weights) or not sum(self.cache_weights) > 0:
            raise ConfigError(
                f"--cache-weights {','.join(f'{w:g}' for w in self.cache_weights)} must be non-negative numbers "
                "with a positive sum"
            )

    def _check_curriculum(self) -> None:
        given = [name for name in CURRICULUM_DEFAULTS if getattr(self, name) is not None]
        if self.curriculum is None:
            if given:
                raise ConfigError(f"{self.flag(given[0])} shapes a curriculum; add --curriculum confidence or drop it")
            return
        if self.curriculum not in CURRICULA:
            raise ConfigError(f"--curriculum {self.curriculum!r} is not one of {', '.join(CURRICULA)}")
        if self.curriculum_pacing is not None and self.curriculum_pacing not in CURRICULUM_PACINGS:
            raise ConfigError(
                f"--curriculum-pacing {self.curriculum_pacing!r} is not one of {', '.join(CURRICULUM_PACINGS)}"
            )
        for name in ("curriculum_start", "curriculum_span"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value <= 1.0:
                raise ConfigError(f"{self.flag(name)} {value} must lie in (0, 1]")

    def curriculum_setting(self, name: str) -> Any:
        """``curriculum_pacing``, ``curriculum_start`` or ``curriculum_span``: as given, else its default."""
        value = getattr(self, name)
        return CURRICULUM_DEFAULTS[name] if value is None else value

    @property
    def caches(self) -> tuple[str, ...]:
        """Every training cache: ``--cache``, and the ensemble's other teachers' caches."""
        return (self.cache, *self.ensemble_caches)

    @property
    def weights(self) -> tuple[float, ...]:
        """The ensemble's weight per cache, normalised to sum to 1 (equal without ``--cache-weights``)."""
        raw = self.cache_weights or (1.0,) * len(self.caches)
        return tuple(weight / sum(raw) for weight in raw)

    @staticmethod
    def flag(name: str) -> str:
        """The command-line flag that sets field ``name`` (``seed`` -> ``--seed``, ``verify`` -> ``--no-verify``)."""
        if name == "ensemble_caches":
            return "--cache"
        return "--no-verify" if name == "verify" else "--" + name.replace("_", "-")

    def to_json(self) -> dict[str, Any]:
        values = asdict(self)
        values["student_config"] = list(self.student_config)
        values["ensemble_caches"] = list(self.ensemble_caches)
        if self.cache_weights is not None:
            values["cache_weights"] = list(self.cache_weights)
        return values


@dataclass(frozen=True)
class RecodeConfig:
    """``distill recode``: rewrite a cache in another codec mode, a coarser step, or fewer ids per position.

    ``None`` keeps the source's setting: its codec mode (``lossless`` for a version 1
    cache), its step, its ``k``. A step flag without ``--codec-mode`` asks for its mode
    (``--logprob-step``: quantized, ``--sqrt-step``: sqrt). What depends on the source
    (finer than it, more ids than it) is checked once its manifest is read (see
    :mod:`pipeline.recode`).
    """

    cache: str
    out: str
    codec_mode: Literal["quantized", "lossless", "sqrt"] | None = None
    logprob_step: float | None = None
    sqrt_step: float | None = None
    top_k: int | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        if not self.cache.strip():
            raise ConfigError("--cache is empty; give the folder of the cache to recode")
        if not self.out.strip():
            raise ConfigError("--out is empty; give the folder to write the recoded cache to")
        if self.codec_mode is not None:
            problem = CodecSettings.for_mode(self.codec_mode).problem()
            if problem:
                raise ConfigError(problem)
        if self.logprob_step is not None and self.sqrt_step is not None:
            raise ConfigError("--logprob-step and --sqrt-step belong to different codec modes; give one of them")
        for flag, step, mode in (
            ("--logprob-step", self.logprob_step, "quantized"),
            ("--sqrt-step", self.sqrt_step, "sqrt"),
        ):
            if step is None:
                continue
            if self.codec_mode not in (None, mode):
                raise ConfigError(f"{flag} applies to --codec-mode {mode}, not {self.codec_mode}; drop one of them")
            problem = CodecSettings.for_mode(mode, step).problem()
            if problem:
                raise ConfigError(problem)
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"--top-k {self.top_k} must be at least 1")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
