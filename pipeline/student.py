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
from pipeline.cache_tokenizer import load_cache_tokenizer
from pipeline.checkpoint import restore_checkpoint, save_checkpoint
from pipeline.config import StudentTrainConfig
from pipeline.errors import ConfigError, TokenizerMismatchError, first_line
from pipeline.evaluate import evaluate, head_chunk_positions
from pipeline.fingerprint import sha256_file, tokenizer_fingerprint
from pipeline.losses import distillation_parts, flatten_targets
from pipeline.rows import SparseRow
from pipeline.run_folder import EVAL_NAME, METRICS_NAME, TRAINING_NAME, check_output, clear_previous_run, save_student
from pipeline.store.atomic import write_bytes_atomic

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


def planned_steps(cfg: StudentTrainConfig, sequences: int) -> int:
    """Optimizer steps of the whole run: ``--max-steps``, else ``--epochs`` (default 1) over ``sequences`` rows."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    return max(1, math.ceil(sequences * (cfg.epochs or 1.0) / (cfg.batch_size * cfg.grad_accum)))


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


def row_stream(cache: Cache, seed: int, start: int = 0) -> Iterator[tuple[int, SparseRow]]:
    """``(epoch, row)`` forever, reshuffled each epoch with ``(seed, epoch)``, from the ``start``-th row on.

    Whole epochs before ``start`` are skipped without reading; the rows before it in its
    epoch are read and dropped (the order within an epoch is only known by reading it).
    """
    first_epoch, skip = divmod(start, len(cache))
    for epoch in itertools.count(first_epoch):
        rows = cache.shuffled_rows(seed, epoch)
        if epoch == first_epoch:
            rows = itertools.islice(rows, skip, None)
        for row in rows:
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
    """Train a student from a cache as ``cfg`` says; return a summary.

    Every check (paths, caches, tokenizer, student, checkpoint) runs before ``--out`` is
    touched; then ``--overwrite`` clears the previous run and training starts.
    """
    started = time.time()
    models.quiet_transformers()
    plan = check_output(cfg)
    torch.manual_seed(cfg.seed)
    cache = open_cache(cfg.cache, verify=cfg.verify)
    eval_cache = open_cache(cfg.eval_cache, verify=cfg.verify) if cfg.eval_cache else None
    tokenizer, tokenizer_origin = resolve_student_tokenizer(cfg, cache)
    if eval_cache is not None:
        check_tokenizer_matches(tokenizer, tokenizer_origin, eval_cache, "--eval-cache")

    device = models.pick_device(cfg.device)
    overrides = models.parse_overrides(cfg.student_config)
    model, origin = models.load_student(cfg.student, overrides, device, cfg.trust_remote_code)
    check_student_fits(model, origin, cache, "--cache")
    if eval_cache is not None:
        check_student_fits(model, origin, eval_cache, "--eval-cache")
    width = models.logit_width(model.config)
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
    total_steps = planned_steps(cfg, len(cache))
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, total_steps // 20)
    optimizer = build_optimizer(model, cfg)
    step, rows_seen = 0, 0
    if plan.resume_from is not None:
        step, rows_seen = restore_checkpoint(plan.resume_from, cfg, _manifest_sha(cache), model, optimizer, total_steps)
    clear_previous_run(plan)
    out = plan.out
    rows = row_stream(cache, cfg.seed, start=rows_seen)  # the data order continues where the checkpoint stopped

    metrics_path = out / METRICS_NAME
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
    written = save_student(plan, model, tokenizer)
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
        "outputs": written,
    }
    write_bytes_atomic(out / TRAINING_NAME, (json.dumps(training, indent=2, sort_keys=True) + "\n").encode())
    if results is not None:
        write_bytes_atomic(out / EVAL_NAME, (json.dumps(results, indent=2, sort_keys=True) + "\n").encode())
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
