"""``distill eval``: how much of the teacher a student kept, and what it forgot, on several held-out sources.

For each source (a cache, or text run through the models) and each model given (the
student; its start, rebuilt from ``training.json`` with ``--start auto``; the live
teacher), it measures with :class:`pipeline.metrics.HeldOutMetrics` (the quality
benchmark's metric functions):

- ``ce``, ``perplexity``, ``accuracy`` and ``ece`` (15 equal-width bins) on the text's
  next tokens, for every model;
- with a live teacher: full-vocabulary ``kl`` (``KL(teacher || model)``) and
  ``top1_agreement``, for the student and the start;
- on a cache: ``kl_cache`` and ``top1_agreement_cache``, against the cache's target over its
  ``k + 1`` buckets (a different measure from the full-vocabulary KL: both are labelled);
- ``teacher_retained``: ``(CE_start - CE_student) / (CE_start - CE_teacher)``, where the
  start and the teacher are given.

Several sources side by side make forgetting visible: domain text next to general text.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import models
from pipeline.cache import Cache, open_cache, stack_rows
from pipeline.data import open_text_stream, pack_records, tokenize_records
from pipeline.errors import ConfigError
from pipeline.evaluate import head_chunk_positions
from pipeline.losses import next_token_labels
from pipeline.manifest import MANIFEST_NAME
from pipeline.metrics import HeldOutMetrics
from pipeline.monitor import MonitorSums, add_chunk_stats
from pipeline.run_folder import TRAINING_NAME
from pipeline.student_setup import check_tokenizer_matches
from pipeline.teachers import OneTeacher

log = logging.getLogger(__name__)
MODEL_ROLES = ("student", "start", "teacher")
# Numbers lm-eval's results carry that are not metrics.
NOT_METRICS = ("alias", "sample_len", "samples")
# The local lm-evaluation-harness tasks shipped with the repository (their data paths are relative to its root).
DEFAULT_TASK_PATH = str(Path(__file__).resolve().parents[1] / "data" / "lm_eval_tasks")


@dataclass(frozen=True)
class EvalConfig:
    """``distill eval``.

    Attributes:
        student: the student's folder (a finished ``student-train`` output, or any model with weights).
        sources: caches, or datasets (local files or Hub ids) to run through the models.
        teacher: the live teacher, or ``None``.
        start: ``"auto"`` (rebuilt from the student's ``training.json``), a model, or ``None``.
        seq_len: tokens per row for dataset sources (caches keep theirs).
        max_tokens: at most this many tokens of each source.
    """

    student: str
    sources: tuple[str, ...]
    teacher: str | None = None
    start: str | None = None
    seq_len: int = 256
    max_tokens: int = 65536
    batch_size: int = 4
    device: str = "auto"
    trust_remote_code: bool = False
    tasks: tuple[str, ...] = ()
    task_path: str = DEFAULT_TASK_PATH
    task_limit: int | None = None

    def __post_init__(self) -> None:
        if not self.sources and not self.tasks:
            raise ConfigError(
                "give at least one --source (a cache folder, or a dataset to run through the models) or --tasks"
            )
        if self.seq_len < 2 or self.max_tokens < self.seq_len or self.batch_size < 1:
            raise ConfigError("--seq-len must be at least 2, --max-tokens at least --seq-len, --batch-size at least 1")


def rebuild_start(student: str, device: torch.device) -> tuple[torch.nn.Module, str]:
    """The student before its first step, as its ``training.json`` records it; and a description."""
    path = Path(student) / TRAINING_NAME
    if not path.is_file():
        raise ConfigError(f"--start auto reads '{path}', which is missing; give --start a model instead")
    training = json.loads(path.read_text())
    recipe = training.get("start") or start_from_settings(training)
    if not isinstance(recipe, dict) or recipe.get("kind") not in ("config", "weights"):
        raise ConfigError(f"'{path}' does not record the student's start; give --start a model")
    if recipe["kind"] == "weights":
        model, _ = models.load_student(str(recipe["student"]), {}, device)
        return model, f"pretrained weights {recipe['student']}"
    torch.manual_seed(int(recipe["seed"]))  # as the student pass seeds before building the student
    overrides = models.parse_overrides(list(recipe.get("student_config", [])))
    model, _ = models.load_student(str(recipe["student"]), overrides, device)
    return model, f"{recipe['student']} built with seed {recipe['seed']}"


def start_from_settings(training: dict[str, Any]) -> dict[str, Any] | None:
    """The start recipe of a ``training.json`` written before it recorded one, from its settings."""
    cfg, origin = training.get("config"), training.get("student_origin")
    if not isinstance(cfg, dict) or "student" not in cfg or origin is None:
        return None
    if origin != "config":
        return {"kind": "weights", "student": cfg["student"]}
    return {
        "kind": "config",
        "student": cfg["student"],
        "student_config": cfg.get("student_config", []),
        "seed": cfg.get("seed", 0),
    }


def load_models(cfg: EvalConfig, device: torch.device) -> tuple[dict[str, torch.nn.Module], Any]:
    """The models to evaluate, by role, each in eval mode; and the student's tokenizer."""
    student, origin = models.load_student(cfg.student, {}, device, cfg.trust_remote_code)
    if origin == "config":
        raise ConfigError(f"--student '{cfg.student}' holds a config but no weights; give a trained student's folder")
    tokenizer = models.load_tokenizer(cfg.student, "student", cfg.trust_remote_code)
    loaded = {"student": student}
    if cfg.start == "auto":
        loaded["start"], described = rebuild_start(cfg.student, device)
        log.info("start: %s", described)
    elif cfg.start:
        loaded["start"], _ = models.load_student(cfg.start, {}, device, cfg.trust_remote_code)
    if cfg.teacher:
        source = models.resolve_source(cfg.teacher, "teacher")
        loaded["teacher"] = models.load_teacher(source, torch.float32, device, cfg.trust_remote_code)
    width = models.logit_width(student.config)
    for role, model in loaded.items():
        if models.logit_width(model.config) > width:
            raise ConfigError(
                f"the {role} has {models.logit_width(model.config)} logits, more than the student's {width}; "
                "evaluate models that share the student's vocabulary"
            )
        model.eval()
    return loaded, tokenizer


def source_batches(
    source: str, cfg: EvalConfig, tokenizer: Any, device: torch.device, cache: Cache | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of a source: the rows of ``cache`` (the source opened as one, as
    :func:`~pipeline.cache.stack_rows` builds them), or a dataset packed with the student's
    tokenizer into rows of ``seq_len`` (``input_ids`` alone)."""
    if cache is not None:
        check_tokenizer_matches(tokenizer, "the student", cache, "--source")
        rows = max(1, cfg.max_tokens // cache.manifest.seq_len)
        batch: list[Any] = []
        for _, row in zip(range(rows), cache):
            batch.append(row)
            if len(batch) == cfg.batch_size:
                yield stack_rows(batch, device)
                batch = []
        if batch:
            yield stack_rows(batch, device)
        return
    stream = open_text_stream(source)
    packed = pack_records(tokenize_records(stream.documents, tokenizer), cfg.seq_len, cfg.max_tokens // cfg.seq_len)
    sequences = [sequence.input_ids for sequence in packed]
    if not sequences:
        raise ConfigError(f"--source '{source}' gave fewer than {cfg.seq_len} tokens; add text or lower --seq-len")
    for start in range(0, len(sequences), cfg.batch_size):
        yield {"input_ids": torch.from_numpy(np.stack(sequences[start : start + cfg.batch_size])).to(device)}


def is_cache_source(source: str) -> bool:
    """Whether a ``--source`` is a cache folder (it holds a manifest) rather than a dataset."""
    return (Path(source) / MANIFEST_NAME).is_file()


@torch.no_grad()
def evaluate_source(
    source: str, loaded: dict[str, torch.nn.Module], tokenizer: Any, cfg: EvalConfig, device: torch.device
) -> dict[str, Any]:
    """Every model's figures on one source, and the teacher retained."""
    heads = {role: models.LMHead(model) for role, model in loaded.items()}
    width = models.logit_width(loaded["student"].config)
    chunk = head_chunk_positions(width)
    metrics = {role: HeldOutMetrics() for role in loaded}
    on_cache = {role: MonitorSums() for role in loaded if role != "teacher"}
    cache = open_cache(source) if is_cache_source(source) else None
    teacher_target = OneTeacher(cache) if cache is not None else None
    tokens = 0
    for batch in source_batches(source, cfg, tokenizer, device, cache):
        input_ids = batch["input_ids"]
        tokens += input_ids.numel()
        labels = next_token_labels(input_ids).reshape(-1)
        target = teacher_target.target(batch, 1.0) if teacher_target is not None else None
        starts = batch.get("document_starts")  # a cache of per-document attention: evaluate under it too
        hidden = {
            role: head.hidden_states(input_ids, starts).reshape(input_ids.numel(), -1) for role, head in heads.items()
        }
        for start in range(0, labels.shape[0], chunk):
            positions = slice(start, start + chunk)
            logits = {role: _padded(heads[role].logits(hidden[role][positions]), width) for role in heads}
            reference = logits.get("teacher")
            for role, values in logits.items():
                metrics[role].update(values if reference is None else reference, values, labels[positions])
                if target is not None and role in on_cache:
                    chunk_target = target.chunk(positions)
                    add_chunk_stats(on_cache[role], values, chunk_target, chunk_target, 1.0)
            del logits
    figures: dict[str, Any] = {"tokens": tokens, "kind": "cache" if cache is not None else "text"}
    for role in loaded:
        result = metrics[role].result()
        row = {key: result[key] for key in ("ce", "perplexity", "accuracy", "ece")}
        if "teacher" in loaded and role != "teacher":
            row.update(kl=result["kl"], top1_agreement=result["top1_agreement"])
        if role in on_cache and on_cache[role].positions:
            means = on_cache[role].means()
            row.update(kl_cache=means["kl_t1"], top1_agreement_cache=means["top1_agreement"])
        figures[role] = row
    if "start" in loaded and "teacher" in loaded:
        gap = figures["start"]["ce"] - figures["teacher"]["ce"]
        figures["teacher_retained"] = (figures["start"]["ce"] - figures["student"]["ce"]) / gap if gap else math.nan
    return figures


def _padded(logits: torch.Tensor, width: int) -> torch.Tensor:
    """``(N, V)`` logits widened to ``width`` with ``-inf`` (ids a narrower model never gives)."""
    if logits.shape[-1] == width:
        return logits.float()
    pad = logits.new_full((logits.shape[0], width - logits.shape[-1]), float("-inf"))
    return torch.cat([logits.float(), pad], dim=-1)


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    """Load the models once and evaluate every source; the figures by source."""
    models.quiet_transformers()
    device = models.pick_device(cfg.device)
    loaded, tokenizer = load_models(cfg, device)
    report: dict[str, Any] = {
        "student": cfg.student,
        "models": sorted(loaded, key=MODEL_ROLES.index),
        "sources": {source: evaluate_source(source, loaded, tokenizer, cfg, device) for source in cfg.sources},
    }
    if cfg.tasks:
        report["tasks"] = task_report(cfg, loaded, tokenizer, device)
    return report


def task_report(
    cfg: EvalConfig, loaded: dict[str, torch.nn.Module], tokenizer: Any, device: torch.device
) -> dict[str, Any]:
    """lm-evaluation-harness on ``cfg.tasks`` for every model; per task, each model's metrics and, where
    the task has an accuracy, the student's over the teacher's."""
    with tempfile.TemporaryDirectory(prefix="distill-eval-") as folder:
        paths = {"student": str(Path(cfg.student).resolve())}
        for role, model in loaded.items():
            if role != "student":  # the start may exist only in memory, the teacher may be a GGUF file
                paths[role] = str(Path(folder) / role)
                model.save_pretrained(paths[role])
                tokenizer.save_pretrained(paths[role])
        scores = {role: harness_scores(path, cfg, device) for role, path in paths.items()}
    tasks: dict[str, Any] = {}
    for task in scores["student"]:
        row: dict[str, Any] = {role: scores[role].get(task, {}) for role in sorted(scores, key=MODEL_ROLES.index)}
        teacher_acc = row.get("teacher", {}).get("acc")
        if teacher_acc:
            row["accuracy_over_teacher"] = row["student"]["acc"] / teacher_acc
        tasks[task] = row
    return tasks


def harness_scores(model_path: str, cfg: EvalConfig, device: torch.device) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` of one saved model, from lm-evaluation-harness's ``simple_evaluate``.

    Runs from the repository root, where the shipped tasks' data paths point.
    """
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ConfigError("--tasks needs lm-evaluation-harness; pip install 'distill-cache[eval]'") from None
    task_path = Path(cfg.task_path).resolve()
    if not task_path.is_dir():
        raise ConfigError(f"--task-path '{cfg.task_path}' is not a folder of task YAML files")
    manager = TaskManager(include_path=str(task_path))
    unknown = [task for task in cfg.tasks if task not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"--tasks: {unknown[0]!r} is not a task lm-eval knows (nor one in '{cfg.task_path}')")
    previous = Path.cwd()
    os.chdir(task_path.parents[1] if task_path.parent.name == "data" else task_path)
    try:
        results = lm_eval.simple_evaluate(
            model="hf",
            model_args={"pretrained": model_path, "dtype": "float32"},
            tasks=list(cfg.tasks),
            task_manager=manager,
            device=str(device),
            batch_size=cfg.batch_size,
            limit=cfg.task_limit,
            log_samples=False,
        )
    finally:
        os.chdir(previous)
    return {
        task: {
            metric.split(",")[0]: float(value)
            for metric, value in values.items()
            if isinstance(value, (int, float)) and "stderr" not in metric and metric.split(",")[0] not in NOT_METRICS
        }
        for task, values in (results or {}).get("results", {}).items()
    }


def table(report: dict[str, Any]) -> str:
    """The figures as a text table: one line per source and model."""
    columns = ("ce", "perplexity", "accuracy", "ece", "kl", "top1_agreement", "kl_cache", "top1_agreement_cache")
    header = f"{'source':<28} {'model':<8} " + " ".join(f"{name:>20}" for name in columns)
    lines = [header]
    for source, figures in report["sources"].items():
        for role in report["models"]:
            row = figures[role]
            cells = " ".join(f"{row[name]:>20.4f}" if name in row else f"{'-':>20}" for name in columns)
            lines.append(f"{Path(source).name[:28]:<28} {role:<8} {cells}")
        if "teacher_retained" in figures:
            lines.append(f"{'':<28} teacher retained (cross-entropy): {100 * figures['teacher_retained']:.1f}%")
    for task, row in report.get("tasks", {}).items():
        for role in report["models"]:
            shown = ", ".join(f"{metric} {value:.4f}" for metric, value in sorted(row.get(role, {}).items()))
            lines.append(f"{'task ' + task:<28} {role:<8} {shown}")
        if "accuracy_over_teacher" in row:
            lines.append(f"{'':<28} student accuracy / teacher accuracy: {100 * row['accuracy_over_teacher']:.1f}%")
    return "\n".join(lines)
