"""The student pass: cache -> batches -> student forward -> distillation loss + CE -> optimizer step.

The teacher is never loaded: everything it contributes comes from the cache. The
student's LM head runs a chunk of positions at a time (forward and backward), so its
full-vocabulary logits never exist for the whole batch.

:func:`run_student_train` reads as the recipe:
:func:`~pipeline.student_setup.prepare_run` (every check and load, before ``--out`` is
touched), :func:`resume_position`, :func:`train` (the loop) and :func:`finish_run` (save,
evaluate, record).

Launched by ``torchrun``, every process runs this recipe on its share of each step's rows;
gradients and metrics are averaged across processes, and only rank 0 writes
(:mod:`pipeline.student_distributed` explains how).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import save as safetensors_save

from pipeline import loader, models
from pipeline.capture_spec import CaptureSpec
from pipeline.checkpoint import restore_checkpoint, save_checkpoint
from pipeline.config import StudentTrainConfig
from pipeline.distributed import current_world, leave
from pipeline.evaluate import evaluate, iter_chunk_logits
from pipeline.features import feature_loss
from pipeline.losses import FORWARD_KL, Divergence, loss_parts, next_token_labels
from pipeline.monitor import (
    MONITOR_FIELDS,
    MonitorSums,
    MonitorWarnings,
    TemperatureSchedule,
    add_chunk_stats,
    monitor_targets,
)
from pipeline.progress import progress as progress_bar
from pipeline.run_folder import EVAL_NAME, METRICS_NAME, TRAINING_NAME, clear_previous_run, save_student
from pipeline.store.atomic import write_bytes_atomic
from pipeline.student_distributed import average_gradients, broadcast_parameters, mean_across_ranks, rank_order
from pipeline.student_fsdp import ShardedStudent, full_state, shard_student
from pipeline.student_setup import PROJECTORS_ATTRIBUTE, FeatureMatching, StudentRun, build_optimizer, prepare_run
from pipeline.teachers import CaptureTeacher, TeacherSource
from pipeline.tracking import open_sink

log = logging.getLogger(__name__)

# The capture of callers that name none: top-k, as every format version 1 cache holds.
TOPK_CAPTURE = CaptureSpec("topk")


@dataclass(frozen=True)
class TrainSummary:
    """What a student pass did."""

    out: str
    steps: int
    tokens: int
    seconds: float
    final_loss: float
    student_origin: str
    eval: dict[str, Any] | None
    rank: int = 0


@dataclass
class TrainState:
    """Where the loop stands: ``step`` and ``rows_seen`` over the whole run (resumes included), the
    distillation ``temperature`` (which ``--adapt-temperature`` lowers), ``tokens`` trained in this
    invocation, the last step's losses, the current throughput window."""

    step: int
    rows_seen: int
    temperature: float
    tokens: int = 0
    last: dict[str, float] = field(default_factory=lambda: {"loss": float("nan")})
    window_start: float = field(default_factory=time.time)
    window_tokens: int = 0


def run_student_train(cfg: StudentTrainConfig, progress: bool = True) -> TrainSummary:
    """Train a student from a cache as ``cfg`` says; return a summary.

    Every check (paths, caches, tokenizer, student, loss against the capture, checkpoint)
    runs before ``--out`` is touched; then ``--overwrite`` clears the previous run and
    training starts. Under torchrun (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` set) every rank
    runs it and joins the process group first.
    """
    started = time.time()
    models.quiet_transformers()
    world = current_world(models.pick_device(cfg.device).type)
    if not world.is_main:
        logging.getLogger("pipeline").setLevel(logging.WARNING)  # rank 0 tells the story once
    try:
        run = prepare_run(cfg, world)
        broadcast_parameters(run.model, world)
        if cfg.fsdp:
            run = dataclasses.replace(run, head=shard_student(run.model))
        optimizer = build_optimizer(run.model, cfg)
        state = resume_position(run, optimizer)
        world.barrier()  # every rank has checked --out and read its checkpoint before rank 0 changes it
        if world.is_main:
            clear_previous_run(run.plan)
        log_effective_batch(run)
        state = train(run, optimizer, state, progress and world.is_main)
        summary = finish_run(run, state, started)
        world.barrier()
        return summary
    finally:
        leave()


def log_effective_batch(run: StudentRun) -> None:
    """Say, once, how many sequences each optimizer step reads and how they are split."""
    cfg = run.cfg
    log.info(
        "effective batch: %d sequences (%d tokens) per optimizer step = --batch-size %d x --grad-accum %d x %d "
        "process(es); %d steps",
        run.rows_per_step,
        run.rows_per_step * run.cache.manifest.seq_len,
        cfg.batch_size,
        cfg.grad_accum,
        run.world.size,
        run.total_steps,
    )


def resume_position(run: StudentRun, optimizer: torch.optim.Optimizer) -> TrainState:
    """Step 0, or the checkpoint's step and rows read, restored into the model and optimizer (``--resume``)."""
    if run.plan.resume_from is None:
        return TrainState(step=0, rows_seen=0, temperature=run.cfg.temperature)
    step, rows_seen, temperature = restore_checkpoint(
        run.plan.resume_from, run.cfg, run.manifest_sha256, run.model, optimizer, run.total_steps, run.world.size
    )
    if temperature != run.cfg.temperature:
        log.info("--adapt-temperature: continuing at T=%.4g, where the checkpoint left it", temperature)
    return TrainState(step=step, rows_seen=rows_seen, temperature=temperature)


def train(run: StudentRun, optimizer: torch.optim.Optimizer, state: TrainState, progress: bool) -> TrainState:
    """The loop: batch, forward, loss, backward (``--grad-accum`` times), step; log and checkpoint.

    The data order continues where ``state`` stopped, so a resumed run reads what the
    uninterrupted one would have. Logging steps also measure the monitors
    (:mod:`pipeline.monitor`), and :class:`~pipeline.monitor.MonitorWarnings` logs a warning
    when the KL vanishes or the loss stops falling; with ``--adapt-temperature``,
    :class:`~pipeline.monitor.TemperatureSchedule` lowers the temperature while the KL is vanishing.

    On several processes each reads its share of every step's rows; after the micro-batches the
    gradients and the step's losses are averaged across them, and rank 0 alone writes metrics and
    checkpoints.
    """
    cfg = run.cfg
    order = rank_order(run.order, run.cache.manifest, cfg.seed, cfg.batch_size, run.world)
    batches = loader.batches(
        run.teacher, cfg.seed, state.rows_seen, cfg.batch_size, run.device, order, cfg.data_workers, cfg.prefetch
    )
    run.model.train()
    main = run.world.is_main
    bar = progress_bar(run.total_steps, "student pass", "step", state.step, enabled=progress)
    warnings = MonitorWarnings(state.temperature, adapting=cfg.adapt_temperature)
    schedule = TemperatureSchedule(state.temperature) if cfg.adapt_temperature else None
    sink = open_sink(cfg.report_to if main else "none", run.plan.out)
    with open(run.plan.out / METRICS_NAME, "a") if main else nullcontext() as metrics_file, bar:
        while state.step < run.total_steps:
            set_learning_rate(optimizer, cfg.lr * lr_factor(state.step, run.warmup, run.total_steps))
            logging_step = is_logging_step(state.step + 1, cfg.log_every, run.total_steps)
            losses = accumulate_gradients(run, batches, state.temperature, monitor=logging_step)
            if not cfg.fsdp:  # FSDP reduce-scatters the gradients itself, backward by backward
                average_gradients(run.model, run.world)
            losses = mean_across_ranks(losses, run.world)
            optimizer_step(run.model, optimizer, cfg.max_grad_norm)
            advance(state, run, losses)
            bar.update(1)
            bar.set_postfix(loss=f"{losses['loss']:.3f}")
            if logging_step:
                record = metrics_record(state, run, optimizer)
                for message in warnings.update(record):
                    if main:
                        log.warning(message)
                if schedule is not None:  # every rank decides alike: the record's values are reduced ones
                    adapt_temperature(schedule, record, state)
                if metrics_file is not None:
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
                sink.write(record)
            due = cfg.save_every and state.step % cfg.save_every == 0 and state.step < run.total_steps
            if due and (main or cfg.fsdp):  # under FSDP every rank gathers the shards; rank 0 writes
                save_checkpoint(run.plan.out, state.step, run.model, optimizer, trainer_state(run, state), main)
    sink.close()
    run.model.eval()
    return state


def adapt_temperature(schedule: TemperatureSchedule, record: dict[str, Any], state: TrainState) -> None:
    """Apply ``--adapt-temperature`` to a logging step's record: a lowered temperature is logged, added
    to the record as ``temperature_next`` and used from the next step on."""
    lowered = schedule.update(record)
    if lowered is None:
        return
    log.info(
        "--adapt-temperature: KL at T=%.4g is %.3g (below %g): temperature lowered to %.4g",
        state.temperature,
        record["kl_t"],
        schedule.low_kl,
        lowered,
    )
    record["temperature_next"] = lowered
    state.temperature = lowered


def is_logging_step(step: int, log_every: int, total_steps: int) -> bool:
    """Whether optimizer step ``step`` (counted from 1) writes a line to ``metrics.jsonl``."""
    return step % log_every == 0 or step == total_steps


def accumulate_gradients(
    run: StudentRun, batches: Iterator[dict[str, torch.Tensor]], temperature: float, monitor: bool = False
) -> dict[str, float]:
    """Forward and backward ``--grad-accum`` micro-batches at ``temperature``; their mean ``loss``, ``kd`` and ``ce``.

    With ``monitor``, also the monitors of :meth:`pipeline.monitor.MonitorSums.means`
    (``kl_t1``, ``kl_t``, entropies, ``top1_agreement``), averaged over every position of the step.
    """
    cfg = run.cfg
    sums = {"loss": 0.0, "kd": 0.0, "ce": 0.0, **({"feature": 0.0} if run.features else {})}
    stats = MonitorSums() if monitor else None
    for _ in range(cfg.grad_accum):
        parts = train_step_loss(
            run.head,
            next(batches),
            cfg.alpha,
            temperature,
            run.chunk_positions,
            1 / cfg.grad_accum,
            run.autocast,
            run.teacher,
            Divergence(cfg.loss, cfg.beta, cfg.skew, cfg.renormalize),
            stats,
            run.features,
        )
        for key in sums:
            sums[key] += parts[key] / cfg.grad_accum
    return sums if stats is None else {**sums, **stats.means()}


def train_step_loss(
    head: models.LMHead | ShardedStudent,
    batch: dict[str, torch.Tensor],
    alpha: float,
    temperature: float,
    chunk_positions: int,
    scale: float,
    autocast: torch.autocast | None,
    teacher: TeacherSource | CaptureSpec = TOPK_CAPTURE,
    divergence: Divergence = FORWARD_KL,
    stats: MonitorSums | None = None,
    features: FeatureMatching | None = None,
) -> dict[str, float]:
    """Forward and backward of one micro-batch; gradients accumulate, scaled by ``scale``.

    Args:
        batch: from ``teacher.batches`` (for a capture: as :func:`pipeline.cache.stack_rows`
            builds it from a cache of that capture).
        alpha: weight of the distillation term (``1 - alpha`` on cross-entropy); at 0 no
            target is built.
        teacher: what builds the target (:mod:`pipeline.teachers`), or a cache's capture
            (the tail then tempered as one logit: :func:`pipeline.losses.teacher_buckets`).
        divergence: the distillation loss (``--loss``).
        stats: where to add the monitors (:func:`pipeline.monitor.add_chunk_stats`), measured
            under ``torch.no_grad`` on the same chunk logits; ``None`` skips them.
        features: ``--feature-loss``: the student's states of each mapped layer, through its
            projector, against the batch's cached teacher states (``hidden_<layer>``, ``(B, T, D)``);
            ``weight`` times their mean loss joins the step's loss (and its backward).

    A batch with a ``loss_mask`` (chat data, generated samples) counts only the positions it
    keeps, in both terms and in their means.

    The backbone runs once; the head runs chunk by chunk on a detached copy of its output,
    each chunk's loss backpropagates at once (freeing its logits), and the summed gradient
    then flows through the backbone in one backward.
    """
    input_ids = batch["input_ids"]
    labels = next_token_labels(input_ids).reshape(-1)
    if isinstance(teacher, CaptureSpec):
        teacher = CaptureTeacher(teacher)
    target = teacher.target(batch, temperature) if alpha > 0 else None
    target_t1, target_t = monitor_targets(batch, teacher, temperature, target) if stats is not None else (None, None)
    with autocast or nullcontext():
        starts = batch.get("document_starts")  # attention kept within documents, as the teacher's was
        if features is None:
            hidden, states = head.hidden_states(input_ids, starts), {}
        else:
            hidden, states = head.hidden_states_of(input_ids, tuple(pair.student for pair in features.pairs), starts)
    flat = hidden.detach().reshape(-1, hidden.shape[-1]).requires_grad_(True)
    # Chat data: only the positions whose target the mask keeps count, in either term.
    mask = batch["loss_mask"].reshape(-1) if "loss_mask" in batch else None
    kd_total = max(1, flat.shape[0] if mask is None else int(mask.sum()))
    ce_total = max(1, int(((labels != -100) if mask is None else (labels != -100) & mask).sum()))
    kd_sum = ce_sum = 0.0
    for positions, logits in iter_chunk_logits(head, flat, chunk_positions, autocast):
        chunk_target = None if target is None else target.chunk(positions)
        chunk_mask = None if mask is None else mask[positions]
        parts = loss_parts(logits, labels[positions], chunk_target, divergence=divergence, loss_mask=chunk_mask)
        loss = alpha * parts.kd_sum / kd_total + (1 - alpha) * parts.ce_sum / ce_total
        if loss.requires_grad:  # under --alpha 0 a chunk of unlabelled positions (a row's last) has no loss
            (loss * scale).backward()
        kd_sum += float(parts.kd_sum.detach())
        ce_sum += float(parts.ce_sum.detach())
        if stats is not None:
            chunk_t1 = None if target_t1 is None else target_t1.chunk(positions)
            chunk_t = chunk_t1 if target_t is target_t1 else None if target_t is None else target_t.chunk(positions)
            add_chunk_stats(stats, logits, chunk_t1, chunk_t, temperature)
        del logits, parts, loss  # free this chunk's (N, V) logits before the next chunk
    feature = None
    if features is not None:
        mask = batch.get("loss_mask")
        feature = sum(
            feature_loss(features.projectors(number, states[pair.student]), batch[f"hidden_{pair.teacher}"],
                         features.loss, mask)
            for number, pair in enumerate(features.pairs)
        ) / len(features.pairs)  # fmt: skip
        # One backward through the backbone: the head's summed gradient and the feature loss's.
        torch.autograd.backward([hidden, feature * features.weight * scale], [flat.grad.reshape(hidden.shape), None])
    else:
        hidden.backward(flat.grad.reshape(hidden.shape))
    kd = kd_sum / kd_total if target is not None else float("nan")
    ce = ce_sum / ce_total
    loss = (alpha * kd if target is not None else 0.0) + (1 - alpha) * ce
    if feature is None:
        return {"loss": loss, "kd": kd, "ce": ce}
    value = float(feature.detach())
    return {"loss": loss + features.weight * value, "kd": kd, "ce": ce, "feature": value}


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, max_grad_norm: float) -> None:
    """Clip the gradient norm (``max_grad_norm > 0``), step, and clear the gradients."""
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def lr_factor(step: int, warmup: int, total: int, floor: float = 0.1) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``floor`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def advance(state: TrainState, run: StudentRun, losses: dict[str, float]) -> None:
    """Count one optimizer step's rows and tokens (every process's)."""
    step_tokens = run.rows_per_step * run.cache.manifest.seq_len
    state.step += 1
    state.rows_seen += run.rows_per_step
    state.tokens += step_tokens
    state.window_tokens += step_tokens
    state.last = losses


def metrics_record(state: TrainState, run: StudentRun, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The ``metrics.jsonl`` line of a logging step: the last step's losses, temperature and monitors
    (those it measured), learning rate, effective batch (sequences per step, every process's), throughput
    since the last line (every process's tokens)."""
    now = time.time()
    kd = state.last["kd"]
    record = {
        "step": state.step,
        "epoch": state.rows_seen / len(run.cache),
        "loss": state.last["loss"],
        "kd": None if math.isnan(kd) else kd,
        "ce": state.last["ce"],
        **({"feature": state.last["feature"]} if "feature" in state.last else {}),
        "temperature": state.temperature,
        **({} if run.order is None else {"curriculum_pool": run.order.pool_size(state.step - 1) / len(run.cache)}),
        **{name: value for name, value in state.last.items() if name in MONITOR_FIELDS},
        "lr": optimizer.param_groups[0]["lr"],
        "effective_batch": run.rows_per_step,
        "tokens_per_s": state.window_tokens / max(now - state.window_start, 1e-9),
    }
    state.window_start, state.window_tokens = now, 0
    return record


def trainer_state(run: StudentRun, state: TrainState) -> dict[str, Any]:
    """What a checkpoint records besides weights and optimizer: rows read, the settings, the cache's identity."""
    return {
        "rows_seen": state.rows_seen,
        "world_size": run.world.size,
        "temperature": state.temperature,
        "config": run.cfg.to_json(),
        "cache_manifest_sha256": run.manifest_sha256,
    }


def start_recipe(run: StudentRun) -> dict[str, Any]:
    """How to rebuild the student as it was before its first step (``distill eval --start auto``): the
    pretrained weights it was loaded from, or the config, overrides and seed that built it."""
    cfg = run.cfg
    if run.origin != "config":
        return {"kind": "weights", "student": cfg.student}
    return {"kind": "config", "student": cfg.student, "student_config": list(cfg.student_config), "seed": cfg.seed}


PROJECTORS_FILE = "projectors.safetensors"


def projector_metadata(features: FeatureMatching) -> dict[str, str]:
    """What the projectors file says about itself: the layer pairs (``maps.N`` is pair ``N``) and the loss."""
    pairs = ",".join(f"{pair.student}:{pair.teacher}" for pair in features.pairs)
    return {"layer_map": pairs, "feature_loss": features.loss, "maps": "maps.N.weight: (teacher dim, student width)"}


def finish_run(run: StudentRun, state: TrainState, started: float) -> TrainSummary:
    """Save the student, evaluate it on ``--eval-cache``, write ``training.json`` (and ``eval.json``).

    On several processes rank 0 does all of it (evaluation too, on the whole held-out cache) and
    the others return with no ``eval``; under ``--fsdp`` every rank first gathers the weights and
    runs the evaluation's forwards with it (each a collective).
    """
    main, sharded = run.world.is_main, run.cfg.fsdp
    weights = full_state(run.model) if sharded else None
    extra = None
    if run.features is not None:  # trained with the student, saved beside it, never part of it
        delattr(run.model, PROJECTORS_ATTRIBUTE)
        tensors = {
            name: value.detach().cpu().contiguous() for name, value in run.features.projectors.state_dict().items()
        }
        extra = {PROJECTORS_FILE: safetensors_save(tensors, metadata=projector_metadata(run.features))}
    try:
        written = save_student(run.plan, run.model, run.tokenizer, weights, extra) if main else []
    finally:
        if run.features is not None:
            run.model.add_module(PROJECTORS_ATTRIBUTE, run.features.projectors)
    del weights
    results = None
    if run.eval_cache is not None and (main or sharded):
        results = evaluate(run.head, run.eval_cache, run.chunk_positions, run.device, run.autocast)
    if not main:
        seconds = time.time() - started
        return TrainSummary(
            str(run.plan.out), state.step, state.tokens, seconds, state.last["loss"], run.origin, None, run.world.rank
        )
    seconds = time.time() - started
    training = {
        "world_size": run.world.size,
        "effective_batch": run.rows_per_step,
        "config": run.cfg.to_json(),
        "student_origin": run.origin,
        "start": start_recipe(run),
        "tokenizer_origin": run.tokenizer_origin,
        "cache_manifest_sha256": run.manifest_sha256,
        "steps": state.step,
        "tokens": state.tokens,
        "seconds": round(seconds, 3),
        "final": state.last,
        "eval": results,
        "outputs": written,
    }
    out = run.plan.out
    write_bytes_atomic(out / TRAINING_NAME, (json.dumps(training, indent=2, sort_keys=True) + "\n").encode())
    if results is not None and run.cfg.report_to != "none":
        sink = open_sink(run.cfg.report_to, out)
        sink.write_eval(results, state.step)
        sink.close()
    if results is not None:
        write_bytes_atomic(out / EVAL_NAME, (json.dumps(results, indent=2, sort_keys=True) + "\n").encode())
    return TrainSummary(
        out=str(out),
        steps=state.step,
        tokens=state.tokens,
        seconds=seconds,
        final_loss=state.last["loss"],
        student_origin=run.origin,
        eval=results,
    )
