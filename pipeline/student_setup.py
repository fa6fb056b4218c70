"""Setting up a student pass: every check and every load, before ``--out`` is touched.

:func:`prepare_run` opens the caches, checks the distillation loss against the training
cache's capture, resolves and checks the tokenizer, loads and checks the student, and
bundles what it decided in one :class:`StudentRun` for the loop in :mod:`pipeline.student`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import models
from pipeline.cache import Cache, open_cache
from pipeline.cache_tokenizer import load_cache_tokenizer
from pipeline.config import TEMPERATURE_BOUNDS, StudentTrainConfig
from pipeline.curriculum import CurriculumOrder, Pacing, confidence_ranking
from pipeline.distributed import World
from pipeline.errors import ConfigError, TokenizerMismatchError, first_line
from pipeline.evaluate import head_chunk_positions
from pipeline.features import FeatureLossName, LayerPair, Projectors, parse_layer_map, resolve_pairs
from pipeline.fingerprint import tokenizer_fingerprint
from pipeline.losses import Divergence
from pipeline.run_folder import OutputPlan, check_output
from pipeline.student_fsdp import ShardedStudent
from pipeline.teachers import OneTeacher, TeacherEnsemble, TeacherSource, check_ensemble
from pipeline.tracking import check_available

log = logging.getLogger(__name__)

TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
SINGLE_PROCESS = World()


@dataclass(frozen=True)
class StudentRun:
    """What the setup of a student pass decided, all of it checked before ``--out`` is touched.

    Attributes:
        cfg: the settings.
        plan: what ``--out`` holds and what the run does with it.
        cache, eval_cache: the training cache (the first ``--cache`` of an ensemble) and the optional
            held-out one.
        teacher: where the distillation target comes from: the cache, or the ensemble of caches.
        tokenizer, tokenizer_origin: the tokenizer saved with the student, and where it came from.
        model, origin: the student, and whether it came from a config or pretrained weights.
        head: the student split into backbone and LM head, for the chunked head (under ``--fsdp``, the
            sharded root :class:`~pipeline.student_fsdp.ShardedStudent`, with the same two methods).
        device: where it trains.
        chunk_positions: positions per LM-head chunk.
        autocast: bf16 autocast on CUDA, else ``None``.
        total_steps, warmup: the learning-rate schedule's length and warm-up.
        order: the rows each global micro-batch reads under ``--curriculum``, else ``None`` (shuffled epochs).
        world: this process's place in a torchrun launch (``World()`` for a single process).
        features: ``--feature-loss``'s layer pairs, projectors (attached to the model as
            ``distill_projectors``, so they train, checkpoint and average with it) and loss.
        manifest_sha256: the training caches' identity (:meth:`~pipeline.teachers.TeacherSource.identity`),
            recorded in checkpoints.
    """

    cfg: StudentTrainConfig
    plan: OutputPlan
    cache: Cache
    eval_cache: Cache | None
    teacher: TeacherSource
    tokenizer: Any
    tokenizer_origin: str
    model: torch.nn.Module
    origin: str
    head: models.LMHead | ShardedStudent
    device: torch.device
    chunk_positions: int
    autocast: torch.autocast | None
    total_steps: int
    warmup: int
    manifest_sha256: str
    order: CurriculumOrder | None = None
    world: World = SINGLE_PROCESS
    features: FeatureMatching | None = None

    @property
    def rows_per_step(self) -> int:
        """Rows read per optimizer step by every process together, the effective batch:
        ``--batch-size x --grad-accum x`` the number of processes."""
        return self.cfg.batch_size * self.cfg.grad_accum * self.world.size


def prepare_run(cfg: StudentTrainConfig, world: World = SINGLE_PROCESS) -> StudentRun:
    """Open and check everything the run needs; nothing is written. Under torchrun every rank runs it."""
    check_world(cfg, world)
    plan = check_output(cfg)
    check_available(cfg.report_to)
    torch.manual_seed(cfg.seed)
    teacher, eval_cache = open_caches(cfg)
    cache = teacher.caches[0]
    tokenizer, tokenizer_origin = resolve_student_tokenizer(cfg, cache)
    if eval_cache is not None:
        check_tokenizer_matches(tokenizer, tokenizer_origin, eval_cache, "--eval-cache")
    device = world.device(models.pick_device(cfg.device))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    model, origin = load_checked_student(cfg, teacher.caches, eval_cache, device)
    log.info(
        "student %s: %s, %s parameters, on %s; tokenizer from %s",
        cfg.student,
        "a fresh model built from its config" if origin == "config" else "its pretrained weights",
        f"{sum(p.numel() for p in model.parameters()):,}",
        device,
        tokenizer_origin,
    )
    check_document_attention(cache, model)
    features = feature_matching(cfg, cache, model, device) if cfg.feature_loss else None
    total_steps = planned_steps(cfg, len(cache), world.size)
    order = curriculum_order(cfg, teacher, total_steps, world.size) if cfg.curriculum else None
    return StudentRun(
        cfg=cfg,
        plan=plan,
        cache=cache,
        eval_cache=eval_cache,
        teacher=teacher,
        tokenizer=tokenizer,
        tokenizer_origin=tokenizer_origin,
        model=model,
        origin=origin,
        head=models.LMHead(model),
        device=device,
        chunk_positions=cfg.head_chunk or head_chunk_positions(models.logit_width(model.config)),
        autocast=torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None,
        total_steps=total_steps,
        warmup=cfg.warmup_steps if cfg.warmup_steps is not None else max(1, total_steps // 20),
        manifest_sha256=teacher.identity(),
        order=order,
        world=world,
        features=features,
    )


def check_document_attention(cache: Cache, model: torch.nn.Module) -> None:
    """Refuse a student whose sliding-window layers a cache's per-document attention mask would override."""
    documents = any(column.name == "document_starts" for column in cache.manifest.columns)
    window = models.sliding_window(model.config)
    if documents and window is not None and cache.manifest.seq_len > window:
        raise ConfigError(
            f"'{cache.path}' keeps attention within documents, which replaces the student's attention mask, and "
            f"this student restricts some layers to a window of {window} positions, shorter than the cache's "
            f"seq_len {cache.manifest.seq_len}; use a student without a sliding window, or a cache of shorter rows"
        )


@dataclass(frozen=True)
class FeatureMatching:
    """What ``--feature-loss`` matches: layer pairs, their projectors, the loss and its weight."""

    pairs: tuple[LayerPair, ...]
    projectors: Projectors
    loss: FeatureLossName
    weight: float


PROJECTORS_ATTRIBUTE = "distill_projectors"


def feature_matching(
    cfg: StudentTrainConfig, cache: Cache, model: torch.nn.Module, device: torch.device
) -> FeatureMatching:
    """Check ``--layer-map`` against the cache's stored layers and the student; build the projectors.

    The cache then also reads its hidden states (:attr:`~pipeline.cache.Cache.with_hidden`).
    """
    stored = cache.manifest.hidden
    if stored is None:
        raise ConfigError(
            f"--feature-loss needs hidden states in the cache, and '{cache.path}' stores none; "
            "write it with teacher-cache --hidden-layers"
        )
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    pairs = resolve_pairs(parse_layer_map(cfg.layer_map or ""), text.num_hidden_layers, stored.blocks, stored.layers)
    projectors = Projectors(pairs, text.hidden_size, stored.dim, cfg.seed).to(device)
    model.add_module(PROJECTORS_ATTRIBUTE, projectors)
    cache.with_hidden = True
    log.info(
        "feature distillation (%s, weight %g): student layer(s) %s to teacher layer(s) %s, %s",
        cfg.feature_loss,
        cfg.feature_weight,
        ", ".join(str(pair.student) for pair in pairs),
        ", ".join(str(pair.teacher) for pair in pairs),
        f"projected {text.hidden_size} -> {stored.dim}" if text.hidden_size != stored.dim else "same width",
    )
    return FeatureMatching(pairs, projectors, cfg.feature_loss or "mse", cfg.feature_weight)


def check_world(cfg: StudentTrainConfig, world: World) -> None:
    """Refuse, in one line, settings a launch on ``world.size`` processes cannot run."""
    if cfg.fsdp and not world.is_distributed:
        raise ConfigError(
            "--fsdp shards the student across torchrun's processes, but this is a single process; launch with "
            "torchrun --nproc-per-node N (N >= 2) -m pipeline student-train ..., or drop --fsdp"
        )
    if world.is_distributed and cfg.device.startswith("cuda:"):
        raise ConfigError(
            f"--device {cfg.device} would put all {world.size} processes on one GPU; under torchrun give --device "
            "cuda (or auto): each process takes the GPU of its local rank"
        )
    if world.is_distributed and cfg.device == "mps":
        raise ConfigError(
            f"--device mps runs in one process, but torchrun started {world.size}; launch without torchrun"
        )


def curriculum_order(
    cfg: StudentTrainConfig, teacher: TeacherSource, total_steps: int, world_size: int = 1
) -> CurriculumOrder:
    """``--curriculum confidence``: the rows ranked by the teacher's confidence (an ensemble's: the weighted
    mean of its teachers'), paced over the run; refused, in one line, for caches without the statistics.

    Its micro-batches are global (``--batch-size x world_size`` rows, split between the processes), so the
    draws do not depend on how many processes share them."""
    stats = []
    for cache in teacher.caches:
        if not cache.manifest.has_row_stats:
            raise ConfigError(
                f"--curriculum confidence needs the teacher's per-row statistics, which '{cache.path}' lacks (it "
                "was made before they existed); make the cache again with teacher-cache, or drop --curriculum"
            )
        stats.append(cache.row_stats())
    weights = cfg.weights if len(stats) > 1 else (1.0,)
    mean = sum(weight * values.astype(np.float64) for weight, values in zip(weights, stats, strict=True))
    pacing = Pacing(
        cfg.curriculum_setting("curriculum_pacing"),
        cfg.curriculum_setting("curriculum_start"),
        max(1, round(cfg.curriculum_setting("curriculum_span") * total_steps)),
    )
    order = CurriculumOrder(
        confidence_ranking(mean, cfg.seed), pacing, cfg.seed, cfg.batch_size * world_size, cfg.grad_accum
    )
    ranked = mean[order.ranking, 0]
    log.info(
        "curriculum: %d rows from the most confident teacher (mean top-1 probability %.3f) to the least (%.3f); "
        "the pool starts at %.0f%% of them and holds every row from step %d of %d (%s pacing)",
        len(ranked),
        ranked[0],
        ranked[-1],
        100 * pacing.start,
        pacing.steps,
        total_steps,
        pacing.kind,
    )
    return order


def open_caches(cfg: StudentTrainConfig) -> tuple[TeacherSource, Cache | None]:
    """The teacher (``--cache``, or the ``--ensemble`` of every ``--cache``) and ``--eval-cache``, with the
    distillation loss checked against the training captures.

    Held-out evaluation fits every capture (:func:`pipeline.losses.evaluation_temperature`).
    """
    caches = [open_cache(path, verify=cfg.verify) for path in cfg.caches]
    if cfg.ensemble is None:
        teacher: TeacherSource = OneTeacher(caches[0])
    else:
        check_ensemble(caches, ["--cache"] * len(caches))
        teacher = TeacherEnsemble(tuple(OneTeacher(cache) for cache in caches), cfg.weights, cfg.ensemble)
    check_capture_fits(cfg, teacher)
    eval_cache = open_cache(cfg.eval_cache, verify=cfg.verify) if cfg.eval_cache else None
    return teacher, eval_cache


def check_capture_fits(cfg: StudentTrainConfig, teacher: TeacherSource) -> None:
    """Refuse settings whose distillation loss the teacher's caches cannot give, in one line naming the flags.

    With ``--alpha 0`` the run is cross-entropy alone and fits every cache. With
    ``--adapt-temperature`` the loss must also fit every temperature below ``--temperature``.
    """
    if cfg.alpha == 0:
        return
    divergence = Divergence(cfg.loss, cfg.beta, cfg.skew, cfg.renormalize)
    problem = teacher.problem(cfg.temperature, divergence)
    if problem is None and cfg.adapt_temperature:
        lowered = teacher.problem(TEMPERATURE_BOUNDS[0] + 0.5 * (cfg.temperature - TEMPERATURE_BOUNDS[0]), divergence)
        problem = lowered and f"--adapt-temperature would change the temperature, but {lowered}"
    if problem:
        raise ConfigError(problem)


def load_checked_student(
    cfg: StudentTrainConfig, caches: tuple[Cache, ...], eval_cache: Cache | None, device: torch.device
) -> tuple[torch.nn.Module, str]:
    """The student on ``device``, checked against every cache; returns it and its origin (``"config"`` or weights)."""
    overrides = models.parse_overrides(cfg.student_config)
    model, origin = models.load_student(cfg.student, overrides, device, cfg.trust_remote_code)
    for cache in caches:
        check_student_fits(model, origin, cache, "--cache")
    if eval_cache is not None:
        check_student_fits(model, origin, eval_cache, "--eval-cache")
    return model, origin


def resolve_student_tokenizer(cfg: StudentTrainConfig, cache: Cache) -> tuple[Any, str]:
    """The tokenizer to save with the student, checked against the cache's fingerprint.

    Taken from ``--tokenizer``, else from the student source if it has one, else from the
    copy the teacher pass stored in the cache (loaded as untrusted input:
    :func:`pipeline.cache_tokenizer.load_cache_tokenizer`, never with remote code).
    """
    student_path = Path(cfg.student)
    if cfg.tokenizer:
        _refuse_tokenizer_inside_a_cache(cfg)
        spec, origin = cfg.tokenizer, "--tokenizer"
    elif student_path.is_dir() and any((student_path / marker).exists() for marker in TOKENIZER_MARKERS):
        spec, origin = str(student_path), "the student folder"
    elif not student_path.exists():
        spec, origin = cfg.student, "the student's Hub repo"
    else:
        spec, origin = None, "the cache"
    if spec is None:
        tokenizer = load_cache_tokenizer(cache)
    else:
        tokenizer = models.load_tokenizer(spec, "student", cfg.trust_remote_code)
    check_tokenizer_matches(tokenizer, origin, cache, "--cache")
    return tokenizer, origin


def _refuse_tokenizer_inside_a_cache(cfg: StudentTrainConfig) -> None:
    """``--tokenizer`` loads with ``--trust-remote-code``, which must never reach a cache's files."""
    tokenizer = Path(cfg.tokenizer or "").expanduser()
    if not cfg.tokenizer or not tokenizer.exists():
        return
    for cache, flag in ((cfg.cache, "--cache"), (cfg.eval_cache, "--eval-cache")):
        if cache and tokenizer.resolve().is_relative_to(Path(cache).expanduser().resolve()):
            raise ConfigError(
                f"--tokenizer '{cfg.tokenizer}' lies inside {flag}; a cache's files are only loaded through its "
                "checked copy: drop --tokenizer to use it"
            )


def check_tokenizer_matches(tokenizer: Any, origin: str, cache: Cache, flag: str) -> None:
    """Refuse ``tokenizer`` unless its fingerprint, at the version ``cache`` used, is the cache's."""
    expected = cache.manifest.tokenizer_fingerprint
    try:
        actual = tokenizer_fingerprint(tokenizer, version=cache.manifest.tokenizer_fingerprint_version)
    except ValueError as exc:
        raise TokenizerMismatchError(
            f"cannot fingerprint the student's tokenizer (from {origin}): {first_line(exc)}"
        ) from exc
    if actual == expected:
        return
    if flag == "--cache":
        raise TokenizerMismatchError(
            f"the student's tokenizer (from {origin}, fingerprint {actual[:12]}) differs from the teacher's "
            f"in the cache (fingerprint {expected[:12]}); use a student that shares the teacher's tokenizer"
        )
    raise TokenizerMismatchError(
        f"{flag} was made with another tokenizer (fingerprint {expected[:12]}) than the student's "
        f"(from {origin}, fingerprint {actual[:12]}); use a cache of the same teacher as --cache"
    )


def check_student_fits(model: torch.nn.Module, origin: str, cache: Cache, flag: str) -> None:
    """Refuse a student with fewer logits than ``cache``'s ids need, or learned positions fewer than its seq_len.

    A student whose positions are not learned (rotary) gets a warning instead: it runs
    past ``max_position_embeddings``, usually worse.
    """
    width = models.logit_width(model.config)
    needed = cache.manifest.logit_width
    if width < needed:
        if origin == "config":
            how = f"give it vocab_size={needed} (--student-config vocab_size={needed})"
        else:
            how = (
                f"load it with transformers, call model.resize_token_embeddings({needed}), save_pretrained it "
                "to a folder and pass that folder as --student"
            )
        raise ConfigError(
            f"the student has {width} logits but {flag}'s ids go up to {needed - 1}, so it needs at least "
            f"{needed}; {how}"
        )
    limit = models.max_positions(model.config)
    seq_len = cache.manifest.seq_len
    if limit is None or seq_len <= limit:
        return
    if models.has_learned_positions(model):
        raise ConfigError(
            f"{flag} holds sequences of {seq_len} tokens but the student has learned positions for only {limit}; "
            f"use a student with max_position_embeddings >= {seq_len}, or a cache made with a shorter --seq-len"
        )
    log.warning(
        "%s holds sequences of %d tokens, more than the student's max_position_embeddings %d; its positions "
        "are not learned (rotary), so it trains, but it may do worse past %d",
        flag,
        seq_len,
        limit,
        limit,
    )


def planned_steps(cfg: StudentTrainConfig, sequences: int, world_size: int = 1) -> int:
    """Optimizer steps of the whole run: ``--max-steps``, else ``--epochs`` (default 1) over ``sequences`` rows
    read ``--batch-size x --grad-accum x world_size`` a step."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    return max(1, math.ceil(sequences * (cfg.epochs or 1.0) / (cfg.batch_size * cfg.grad_accum * world_size)))


def build_optimizer(model: torch.nn.Module, cfg: StudentTrainConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (not on norms and biases)."""
    decay, no_decay = [], []
    for param in model.parameters():
        (decay if param.dim() >= 2 else no_decay).append(param)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
