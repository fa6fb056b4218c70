"""The student pass: cache -> batches -> student forward -> sparse KD + CE -> optimizer step.

The teacher is never loaded: everything it contributes comes from the cache. The
student's LM head runs a chunk of positions at a time (forward and backward), so its
full-vocabulary logits never exist for the whole batch.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import shutil
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from pipeline import models
from pipeline.cache import Cache, open_cache, stack_rows
from pipeline.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from pipeline.codec import SparseRow
from pipeline.config import StudentTrainConfig
from pipeline.errors import CacheError, ConfigError, OutputExistsError, TokenizerMismatchError
from pipeline.evaluate import evaluate, head_chunk_positions
from pipeline.fingerprint import sha256_file, tokenizer_fingerprint
from pipeline.losses import distillation_parts, flatten_targets
from pipeline.store.layout import TOKENIZER_DIR
from pipeline.store.reader import tokenizer_file_problems

log = logging.getLogger(__name__)

TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass(frozen=True)
class TrainSummary:
    """What a student pass did."""

    out: str
    steps: int
    tokens: int
    seconds: float
    final_loss: float
    student_origin: str
    eval: dict[str, float] | None


def resolve_student_tokenizer(cfg: StudentTrainConfig, cache: Cache) -> tuple[Any, str]:
    """The tokenizer to save with the student, checked against the cache's fingerprint.

    Taken from ``--tokenizer``, else from the student source if it has one, else from the
    copy the teacher pass stored in the cache.
    """
    expected = cache.manifest.tokenizer_fingerprint
    student_path = Path(cfg.student)
    if cfg.tokenizer:
        spec, origin = cfg.tokenizer, "--tokenizer"
    elif student_path.is_dir() and any((student_path / marker).exists() for marker in TOKENIZER_MARKERS):
        spec, origin = str(student_path), "the student folder"
    elif not student_path.exists():
        spec, origin = cfg.student, "the student's Hub repo"
    else:
        spec, origin = str(_cache_tokenizer_dir(cache)), "the cache"
    tokenizer = models.load_tokenizer(spec, "student", cfg.trust_remote_code)
    actual = tokenizer_fingerprint(tokenizer)
    if actual != expected:
        raise TokenizerMismatchError(
            f"the student's tokenizer (from {origin}, fingerprint {actual[:12]}) differs from the teacher's "
            f"in the cache (fingerprint {expected[:12]}); use a student that shares the teacher's tokenizer"
        )
    return tokenizer, origin


def _cache_tokenizer_dir(cache: Cache) -> Path:
    folder = cache.path / TOKENIZER_DIR
    listed = cache.manifest.raw.get("tokenizer", {}).get("files", [])
    if not folder.is_dir() or not listed:
        raise CacheError(f"the cache has no tokenizer copy and the student '{folder}' brings none; pass --tokenizer")
    problems = tokenizer_file_problems(cache.path, cache.manifest) if cache.verify else []
    if problems:
        raise CacheError(f"{problems[0]} in the cache; the cache is damaged")
    return folder


def prepare_student_output(out: Path, cfg: StudentTrainConfig) -> Path | None:
    """Check ``out``; return the checkpoint to resume from, if ``--resume`` and there is one."""
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"--out '{out}' is a file; give a folder path")
    if cfg.resume:
        checkpoint = latest_checkpoint(out) if out.is_dir() else None
        if checkpoint is None:
            raise ConfigError(f"--resume: '{out}' holds no checkpoint; drop --resume to start afresh")
        return checkpoint
    if out.is_dir() and any(out.iterdir()):
        if not cfg.overwrite:
            raise OutputExistsError(
                f"--out '{out}' is not empty; pass --resume to continue its run or --overwrite to replace it"
            )
        if (
            not (out / "training.json").exists()
            and not (out / "checkpoints").exists()
            and not (out / "metrics.jsonl").exists()
        ):
            raise OutputExistsError(f"--out '{out}' does not hold a student run; --overwrite only replaces one")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return None


def row_stream(cache: Cache, seed: int) -> Iterator[tuple[int, SparseRow]]:
    """``(epoch, row)`` forever, reshuffled each epoch with ``(seed, epoch)``."""
    for epoch in itertools.count():
        for row in cache.shuffled_rows(seed, epoch):
            yield epoch, row


def lr_factor(step: int, warmup: int, total: int, floor: float = 0.1) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``floor`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def train_step_loss(
    head: models.LMHead,
    batch: dict[str, torch.Tensor],
    alpha: float,
    temperature: float,
    chunk_positions: int,
    scale: float,
    autocast: torch.autocast | None,
) -> dict[str, float]:
    """Forward and backward of one micro-batch; gradients accumulate, scaled by ``scale``.

    The backbone runs once; the head runs chunk by chunk on a detached copy of its output,
    each chunk's loss backpropagates at once (freeing its logits), and the summed gradient
    then flows through the backbone in one backward.
    """
    input_ids = batch["input_ids"]
    n_batch, seq_len = input_ids.shape
    labels, topk_ids, topk_logprobs, tail_logmass = flatten_targets(batch)
    with autocast or nullcontext():
        hidden = head.hidden_states(input_ids)
    flat = hidden.detach().reshape(n_batch * seq_len, -1).requires_grad_(True)
    kd_total = n_batch * seq_len
    ce_total = max(1, int((labels != -100).sum()))
    need_kd, need_ce = alpha > 0, True
    kd_sum = ce_sum = 0.0
    for start in range(0, flat.shape[0], chunk_positions):
        part = slice(start, start + chunk_positions)
        with autocast or nullcontext():
            logits = head.logits(flat[part])
        parts = distillation_parts(
            logits, labels[part], topk_ids[part], topk_logprobs[part], tail_logmass[part], temperature, need_kd, need_ce
        )
        loss = alpha * parts.kd_sum / kd_total + (1 - alpha) * parts.ce_sum / ce_total
        (loss * scale).backward()
        kd_sum += float(parts.kd_sum.detach())
        ce_sum += float(parts.ce_sum.detach())
        del logits, parts, loss  # free this chunk's (N, V) logits before the next chunk
    hidden.backward(flat.grad.reshape(hidden.shape))
    kd = kd_sum / kd_total if need_kd else float("nan")
    ce = ce_sum / ce_total
    loss_value = (alpha * kd if need_kd else 0.0) + (1 - alpha) * ce
    return {"loss": loss_value, "kd": kd, "ce": ce}


def run_student_train(cfg: StudentTrainConfig, progress: bool = True) -> TrainSummary:
    """Train a student from a cache as ``cfg`` says; return a summary."""
    started = time.time()
    models.quiet_transformers()
    torch.manual_seed(cfg.seed)
    cache = open_cache(cfg.cache, verify=cfg.verify)
    eval_cache = open_cache(cfg.eval_cache, verify=cfg.verify) if cfg.eval_cache else None
    if eval_cache is not None and eval_cache.manifest.tokenizer_fingerprint != cache.manifest.tokenizer_fingerprint:
        raise TokenizerMismatchError(
            "--eval-cache was made with another tokenizer than --cache; use caches of the same teacher"
        )
    tokenizer, tokenizer_origin = resolve_student_tokenizer(cfg, cache)
    out = Path(cfg.out)
    resume_from = prepare_student_output(out, cfg)

    device = models.pick_device(cfg.device)
    overrides = models.parse_overrides(cfg.student_config)
    model, origin = models.load_student(cfg.student, overrides, device, cfg.trust_remote_code)
    width = models.logit_width(model.config)
    if width < cache.manifest.logit_width:
        raise ConfigError(
            f"the student has {width} logits but the teacher's ids go up to {cache.manifest.logit_width}; "
            f"give the student vocab_size={cache.manifest.logit_width} (e.g. --student-config vocab_size=...)"
        )
    how = "a fresh model built from its config" if origin == "config" else "its pretrained weights"
    parameters = sum(p.numel() for p in model.parameters())
    log.info(
        "student %s: %s, %s parameters, on %s; tokenizer from %s",
        cfg.student,
        how,
        f"{parameters:,}",
        device,
        tokenizer_origin,
    )
    head = models.LMHead(model)
    chunk_positions = cfg.head_chunk or head_chunk_positions(width)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None

    rows_per_step = cfg.batch_size * cfg.grad_accum
    if cfg.max_steps is not None:
        total_steps = cfg.max_steps
    else:
        total_steps = max(1, math.ceil(len(cache) * (cfg.epochs or 1.0) / rows_per_step))
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, total_steps // 20)
    decay, no_decay = [], []
    for param in model.parameters():
        (decay if param.dim() >= 2 else no_decay).append(param)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )

    step, rows_seen = 0, 0
    if resume_from is not None:
        state = load_checkpoint(resume_from, model, optimizer)
        if state.get("cache_manifest_sha256") != _manifest_sha(cache):
            raise ConfigError("--resume: the checkpoint was trained on another cache; use the same --cache")
        step, rows_seen = int(state["step"]), int(state["rows_seen"])
    rows = row_stream(cache, cfg.seed)
    for _ in range(rows_seen):  # replay the data order up to where the checkpoint stopped
        next(rows)

    metrics_path = out / "metrics.jsonl"
    model.train()
    bar = tqdm(
        total=total_steps,
        initial=step,
        unit="step",
        desc="student pass",
        disable=None if progress else True,
        mininterval=1.0,
    )
    tokens_done, last = 0, {"loss": float("nan")}
    window_start, window_tokens = time.time(), 0
    seq_len = cache.manifest.seq_len
    with open(metrics_path, "a") as metrics_file:
        while step < total_steps:
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * lr_factor(step, warmup, total_steps)
            sums = {"loss": 0.0, "kd": 0.0, "ce": 0.0}
            for _ in range(cfg.grad_accum):
                batch_rows = [next(rows)[1] for _ in range(cfg.batch_size)]
                rows_seen += cfg.batch_size
                batch = stack_rows(batch_rows, device)
                parts = train_step_loss(
                    head, batch, cfg.alpha, cfg.temperature, chunk_positions, 1 / cfg.grad_accum, autocast
                )
                for key in sums:
                    sums[key] += parts[key] / cfg.grad_accum
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            step_tokens = rows_per_step * seq_len
            tokens_done += step_tokens
            window_tokens += step_tokens
            last = sums
            bar.update(1)
            bar.set_postfix(loss=f"{sums['loss']:.3f}")
            if step % cfg.log_every == 0 or step == total_steps:
                now = time.time()
                record = {
                    "step": step,
                    "epoch": rows_seen / len(cache),
                    "loss": sums["loss"],
                    "kd": None if math.isnan(sums["kd"]) else sums["kd"],
                    "ce": sums["ce"],
                    "lr": optimizer.param_groups[0]["lr"],
                    "tokens_per_s": window_tokens / max(now - window_start, 1e-9),
                }
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
                window_start, window_tokens = now, 0
            if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
                save_checkpoint(
                    out,
                    step,
                    model,
                    optimizer,
                    {"rows_seen": rows_seen, "config": cfg.to_json(), "cache_manifest_sha256": _manifest_sha(cache)},
                )
    bar.close()
    model.eval()
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    results = evaluate(head, eval_cache, chunk_positions, device, autocast) if eval_cache is not None else None
    seconds = time.time() - started
    training = {
        "config": cfg.to_json(),
        "student_origin": origin,
        "tokenizer_origin": tokenizer_origin,
        "cache_manifest_sha256": _manifest_sha(cache),
        "steps": step,
        "tokens": tokens_done,
        "seconds": round(seconds, 3),
        "final": last,
        "eval": results,
    }
    (out / "training.json").write_text(json.dumps(training, indent=2, sort_keys=True) + "\n")
    if results is not None:
        (out / "eval.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return TrainSummary(
        out=str(out),
        steps=step,
        tokens=tokens_done,
        seconds=seconds,
        final_loss=last["loss"],
        student_origin=origin,
        eval=results,
    )


def _manifest_sha(cache: Cache) -> str:
    return sha256_file(cache.path / "manifest.json")
