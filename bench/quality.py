"""Does a student distilled from a cache match one distilled online? Measured on held-out text.

    python bench/quality.py            # default: 3 seeds, about 14 minutes (1 thread of a 2-core CPU)
    python bench/quality.py --alpha 1 --arms standard,full-cache   # pure distillation, with a check
    python bench/quality.py --fast     # 1 seed, tiny models, seconds (the smoke test)

Results and their reading: ``docs/quality.md``.

What it does, all on CPU:

1. Tokenizer: a byte-level BPE of 512 ids (:class:`Budget`), trained on the demo corpus
   (``data/generated/pydoc``, made with ``pipeline.demo`` if absent), so that the teacher's
   distribution is small enough for CPU budgets to mean something.
2. Teacher: a small Llama trained briefly on cross-entropy, saved with the tokenizer.
   (There is no mode with the embedded Gemma 3 teacher: with 262,144 logits a CPU budget
   of minutes buys too few student steps to separate the arms.)
3. Caches: the real teacher pass (:func:`pipeline.teacher.run_teacher_cache`) once per capture
   strategy, over the same packed training text. The teacher runs once per cache (the pass
   takes one strategy); it is deterministic, so every cache holds the same teacher's
   distributions over the same token stream (checked: their token-stream hashes agree).
   The caches use the pass's default codec settings (the JSON output records them); top-p
   is uncapped (``--max-k`` = the vocabulary).
   Sampled captures (``sample``, ``hybrid``) draw with the student's seed, so the confidence
   intervals include the variance of the draws.
4. Students: the same architecture, initialisation, data order, token budget and
   optimizer for every arm of one seed, trained by the real student loop
   (:func:`pipeline.student.train`, through the cache reader and :mod:`pipeline.losses`):
   cross-entropy only (``alpha = 0``), each cache (``alpha`` on distillation, ``1 - alpha``
   on cross-entropy), and online distillation, where the same loop takes the dense
   full-vocabulary ``KL(teacher || student)`` at T = 1 from the live teacher instead of a cache.
5. Metrics (:mod:`pipeline.metrics`) on held-out text against the live teacher: full-vocabulary
   KL, perplexity, top-1 agreement with the teacher, ECE (15 bins). Each cache arm is compared
   with online distillation of the same seed (a paired difference), and as the fraction of the
   cross-entropy -> online gain in KL it recovers, ``(KL_ce - KL_arm) / (KL_ce - KL_online)``.
   Intervals are 95% Student-t intervals over seeds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline import models  # noqa: E402
from pipeline.cache import open_cache  # noqa: E402
from pipeline.config import StudentTrainConfig, TeacherCacheConfig  # noqa: E402
from pipeline.data import pack_records, tokenize_records  # noqa: E402
from pipeline.evaluate import iter_chunk_logits  # noqa: E402
from pipeline.losses import dense_kl, loss_parts, next_token_labels  # noqa: E402
from pipeline.metrics import HeldOutMetrics  # noqa: E402
from pipeline.run_folder import clear_previous_run  # noqa: E402
from pipeline.student import TrainState, lr_factor, optimizer_step, set_learning_rate, train  # noqa: E402
from pipeline.student_setup import StudentRun, build_optimizer, prepare_run  # noqa: E402
from pipeline.teacher import run_teacher_cache  # noqa: E402

CORPUS = REPO / "data" / "generated" / "pydoc"
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
# Two-sided 95% Student-t quantiles by degrees of freedom (1 .. 10); 1.96 beyond.
T_QUANTILE = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
# The targets of docs/quality.md (DESIGN.md's table): fraction of the CE -> online gain recovered.
TARGET_TOPK = 0.95
TARGET_SAMPLED = 0.99


@dataclass(frozen=True)
class Budget:
    """Sizes and steps of one benchmark run."""

    vocab: int = 512
    seq_len: int = 128
    train_chars: int | None = None  # the first documents up to this many characters; None: all
    heldout_chars: int | None = None
    teacher_hidden: int = 128
    teacher_layers: int = 4
    teacher_steps: int = 600
    teacher_lr: float = 2e-3
    student_hidden: int = 64
    student_layers: int = 2
    student_steps: int = 300
    batch_size: int = 16
    lr: float = 3e-3
    alpha: float = 0.5
    seeds: int = 3


FAST = Budget(
    vocab=300,
    seq_len=32,
    train_chars=20_000,
    heldout_chars=5_000,
    teacher_hidden=32,
    teacher_layers=1,
    teacher_steps=30,
    student_hidden=32,
    student_layers=1,
    student_steps=8,
    batch_size=4,
    seeds=1,
)


@dataclass(frozen=True)
class Arm:
    """One way of training the student: a cache's capture (``capture`` set), ``online`` or ``ce``."""

    name: str
    capture: dict[str, Any] | None = None  # TeacherCacheConfig fields; None for ce and online
    sampled: bool = False  # draws depend on the seed: one cache per seed


ARMS = (
    Arm("ce"),
    Arm("online"),
    Arm("topk-8", {"capture": "topk", "top_k": 8}),
    Arm("topk-64", {"capture": "topk", "top_k": 64}),
    Arm("topp-0.99", {"capture": "topp", "top_p": 0.99}),  # uncapped: max-k is the vocabulary
    Arm("sample-8", {"capture": "sample", "samples": 8}, sampled=True),
    Arm("sample-32", {"capture": "sample", "samples": 32}, sampled=True),
    Arm("hybrid-8+24", {"capture": "hybrid", "top_k": 8, "samples": 24}, sampled=True),
)
# Diagnostics, chosen with --arms. full-cache: the whole distribution through the cache (top-k with
# k = the vocabulary, the codec's float16 "lossless" mode); it should match online distillation,
# which shows that the arms differ in their target alone. topk-64-lossless: top-64 in that mode
# rather than the default rounding.
# sample-128: more draws, to see how the sampled arms' shortfall shrinks with N.
FULL_CACHE = Arm("full-cache", {"capture": "topk", "top_k": "vocab", "codec_mode": "lossless"})
DIAGNOSTIC_ARMS = (
    FULL_CACHE,
    Arm("topk-64-lossless", {"capture": "topk", "top_k": 64, "codec_mode": "lossless"}),
    Arm("sample-128", {"capture": "sample", "samples": 128}, sampled=True),
)
KNOWN_ARMS = {arm.name: arm for arm in (*ARMS, *DIAGNOSTIC_ARMS)}
# Always run: the two ends of the gain, and the cache whose rows (input ids and order) they read
# (their targets are ignored), which is also the byte budget the sampled arms must beat.
ROW_SOURCE = "topk-64"
REQUIRED_ARMS = ("ce", "online", ROW_SOURCE)


def select_arms(names: str) -> list[Arm]:
    """The arms of ``--arms``: comma-separated names, ``standard`` for the eight standard arms; the required
    arms are added. Raises ``ValueError`` naming an unknown arm."""
    wanted = list(REQUIRED_ARMS)
    for name in (part.strip() for part in names.split(",") if part.strip()):
        expanded = [arm.name for arm in ARMS] if name == "standard" else [name]
        for item in expanded:
            if item not in KNOWN_ARMS:
                raise ValueError(f"unknown arm {item!r}; known: standard, {', '.join(KNOWN_ARMS)}")
            if item not in wanted:
                wanted.append(item)
    order = list(KNOWN_ARMS)
    return [KNOWN_ARMS[name] for name in sorted(wanted, key=order.index)]


def log(message: str) -> None:
    print(message, flush=True)


# ----------------------------------------------------------------------------- setup


def corpus_files(work: Path, budget: Budget) -> tuple[Path, Path]:
    """The training and held-out jsonl files: the demo corpus, cut to the budget's characters."""
    if not (CORPUS / "train.jsonl").exists():
        from pipeline.demo import write_corpus

        write_corpus(CORPUS)
    files = []
    for split, limit in (("train", budget.train_chars), ("heldout", budget.heldout_chars)):
        source = CORPUS / f"{split}.jsonl"
        if limit is None:
            files.append(source)
            continue
        kept, room = [], limit
        for text in documents(source):
            if room <= 0:
                break
            kept.append(json.dumps({"text": text[:room]}) + "\n")
            room -= len(text)
        cut = work / f"{split}.jsonl"
        cut.write_text("".join(kept), encoding="utf-8")
        files.append(cut)
    return files[0], files[1]


def documents(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def train_tokenizer(folder: Path, texts: list[str], vocab: int) -> Any:
    """A byte-level BPE (every byte is an id, so nothing is unknown) that adds ``<bos>``; saved to ``folder``."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors, trainers
    from tokenizers import models as tokenizer_models
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(tokenizer_models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", core.token_to_id("<bos>"))]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>"
    )
    tokenizer.save_pretrained(str(folder))
    return tokenizer


def packed(texts: list[str], tokenizer: Any, seq_len: int) -> torch.Tensor:
    """``(S, seq_len)`` int64: the texts packed as the teacher pass packs them."""
    rows = [sequence.input_ids for sequence in pack_records(tokenize_records(texts, tokenizer), seq_len)]
    return torch.from_numpy(np.stack(rows))


def llama_config(vocab: int, hidden: int, layers: int, seq_len: int, tokenizer: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 3,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=seq_len,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def train_teacher(
    folder: Path, tokenizer: Any, sequences: torch.Tensor, budget: Budget, seed: int = 1234
) -> torch.nn.Module:
    """A Llama trained on next-token cross-entropy for ``teacher_steps`` steps, saved with the tokenizer."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = llama_config(budget.vocab, budget.teacher_hidden, budget.teacher_layers, budget.seq_len, tokenizer)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=budget.teacher_lr, betas=(0.9, 0.95), weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(sequences), generator=generator)
    warmup = max(1, budget.teacher_steps // 20)
    model.train()
    cursor = 0
    for step in range(budget.teacher_steps):
        if cursor + budget.batch_size > len(order):
            order, cursor = torch.randperm(len(sequences), generator=generator), 0
        batch = sequences[order[cursor : cursor + budget.batch_size]]
        cursor += budget.batch_size
        set_learning_rate(optimizer, budget.teacher_lr * lr_factor(step, warmup, budget.teacher_steps))
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer_step(model, optimizer, 1.0)
        if (step + 1) % max(1, budget.teacher_steps // 4) == 0:
            log(f"  teacher step {step + 1}/{budget.teacher_steps}: train CE {loss.item():.3f}")
    model.eval()
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return model


def make_cache(arm: Arm, seed: int, teacher_dir: Path, dataset: Path, out: Path, budget: Budget) -> dict[str, Any]:
    """Run the teacher pass for ``arm``'s capture; return its bytes per token, ids per position and stream hash."""
    fields = {key: budget.vocab if value == "vocab" else value for key, value in (arm.capture or {}).items()}
    if fields["capture"] == "topp":
        fields.setdefault("max_k", budget.vocab)
    cfg = TeacherCacheConfig(
        teacher=str(teacher_dir),
        dataset=str(dataset),
        out=str(out),
        seq_len=budget.seq_len,
        seed=seed,
        device="cpu",
        dtype="fp32",
        batch_size=16,
        **fields,
    )
    summary = run_teacher_cache(cfg, progress=False)
    cache = open_cache(out)
    ids = sum(int(row.valid().sum()) for row in cache)
    return {
        "bytes_per_token": summary.bytes_per_token,
        "ids_per_position": ids / summary.tokens,
        "tokens": summary.tokens,
        "codec": cfg.codec_settings().to_json(),
        "token_stream_sha256": cache.manifest.token_stream_sha256,
    }


# ----------------------------------------------------------------------------- students


def student_config(
    cache: Path, student_dir: Path, out: Path, seed: int, alpha: float, budget: Budget
) -> StudentTrainConfig:
    return StudentTrainConfig(
        cache=str(cache),
        student=str(student_dir),
        out=str(out),
        alpha=alpha,
        temperature=1.0,
        batch_size=budget.batch_size,
        lr=budget.lr,
        max_steps=budget.student_steps,
        seed=seed,
        device="cpu",
        log_every=max(1, budget.student_steps),
        overwrite=True,
    )


def train_from_cache(cfg: StudentTrainConfig) -> torch.nn.Module:
    """The student pass's own setup and loop (no final save or evaluation): the cache arms and ce."""
    run = prepare_run(cfg)
    optimizer = build_optimizer(run.model, cfg)
    clear_previous_run(run.plan)
    train(run, optimizer, TrainState(step=0, rows_seen=0, temperature=cfg.temperature), progress=False)
    return run.model


def train_online(cfg: StudentTrainConfig, teacher: models.LMHead) -> torch.nn.Module:
    """Online distillation: the student pass's setup and loop, with the live teacher's dense KL as the target.

    Everything but the target is the cache arms': :func:`prepare_run` (seeded initialisation),
    :meth:`~pipeline.teachers.OneTeacher.batches` (the same rows in the same order), :func:`build_optimizer`, the
    learning-rate schedule, clipping, and the step's loss ``alpha * KL + (1 - alpha) * CE``.
    """
    run = prepare_run(cfg)
    optimizer = build_optimizer(run.model, cfg)
    clear_previous_run(run.plan)
    batches = run.teacher.batches(cfg.seed, 0, cfg.batch_size, run.device)
    run.model.train()
    for step in range(run.total_steps):
        set_learning_rate(optimizer, cfg.lr * lr_factor(step, run.warmup, run.total_steps))
        online_step_loss(run, teacher, next(batches)["input_ids"], cfg.alpha)
        optimizer_step(run.model, optimizer, cfg.max_grad_norm)
    run.model.eval()
    return run.model


def online_step_loss(run: StudentRun, teacher: models.LMHead, input_ids: torch.Tensor, alpha: float) -> None:
    """:func:`pipeline.student.train_step_loss` with ``dense_kl`` to the live teacher in place of the cache target."""
    labels = next_token_labels(input_ids).reshape(-1)
    with torch.no_grad():
        teacher_logits = teacher.logits(teacher.hidden_states(input_ids)).reshape(labels.shape[0], -1)
    hidden = run.head.hidden_states(input_ids)
    flat = hidden.detach().reshape(-1, hidden.shape[-1]).requires_grad_(True)
    kd_total = flat.shape[0]
    ce_total = max(1, int((labels != -100).sum()))
    for positions, logits in iter_chunk_logits(run.head, flat, run.chunk_positions, run.autocast):
        ce_sum = loss_parts(logits, labels[positions], None).ce_sum
        kd_sum = dense_kl(teacher_logits[positions], logits).sum()  # T = 1, so no T^2 factor
        (alpha * kd_sum / kd_total + (1 - alpha) * ce_sum / ce_total).backward()
    hidden.backward(flat.grad.reshape(hidden.shape))


@torch.no_grad()
def heldout_metrics(
    student: torch.nn.Module, heldout: torch.Tensor, teacher_logits: list[torch.Tensor], batch_size: int
) -> dict[str, Any]:
    """:class:`HeldOutMetrics` of ``student`` on ``(S, T)`` held-out ids against the teacher's logits per batch."""
    student.eval()
    metrics = HeldOutMetrics()
    for index, start in enumerate(range(0, len(heldout), batch_size)):
        input_ids = heldout[start : start + batch_size]
        metrics.update(teacher_logits[index], student(input_ids=input_ids).logits, next_token_labels(input_ids))
    return metrics.result()


# ----------------------------------------------------------------------------- statistics


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% Student-t interval (``nan`` with one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan")
    quantile = T_QUANTILE.get(len(values) - 1, 1.96)
    return mean, quantile * statistics.stdev(values) / math.sqrt(len(values))


def summarise(runs: dict[str, list[dict[str, Any]]], caches: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per arm: each metric's mean and CI over seeds, the paired KL difference to online, the gain recovered."""
    summary: dict[str, Any] = {}
    ce_kl = [run["kl"] for run in runs["ce"]]
    online_kl = [run["kl"] for run in runs["online"]]
    for name, per_seed in runs.items():
        row: dict[str, Any] = {}
        for key in ("kl", "perplexity", "top1_agreement", "ece"):
            row[key] = mean_ci([run[key] for run in per_seed])
        kl = [run["kl"] for run in per_seed]
        row["kl_minus_online"] = mean_ci([a - b for a, b in zip(kl, online_kl)])
        row["recovered"] = mean_ci([(c - a) / (c - o) for a, c, o in zip(kl, ce_kl, online_kl)])
        if name in caches:
            row["bytes_per_token"] = statistics.fmean(cache["bytes_per_token"] for cache in caches[name])
            row["ids_per_position"] = statistics.fmean(cache["ids_per_position"] for cache in caches[name])
        summary[name] = row
    return summary


def table(summary: dict[str, Any], teacher: dict[str, Any]) -> str:
    """The results as a markdown table (intervals as +-)."""

    def fmt(pair: tuple[float, float], digits: int, scale: float = 1.0) -> str:
        mean, half = pair
        if math.isnan(half):
            return f"{mean * scale:.{digits}f}"
        return f"{mean * scale:.{digits}f} ± {half * scale:.{digits}f}"

    lines = [
        "| method | bytes/token | ids/position | KL(teacher‖student) | perplexity | top-1 agreement % | ECE % "
        "| KL − online KL (paired) | gain recovered % |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in summary.items():
        nbytes = f"{row['bytes_per_token']:.1f}" if "bytes_per_token" in row else "–"
        ids = f"{row['ids_per_position']:.1f}" if "ids_per_position" in row else "–"
        lines.append(
            f"| {name} | {nbytes} | {ids} | {fmt(row['kl'], 4)} | {fmt(row['perplexity'], 2)} "
            f"| {fmt(row['top1_agreement'], 1, 100)} | {fmt(row['ece'], 2, 100)} "
            f"| {fmt(row['kl_minus_online'], 4)} | {fmt(row['recovered'], 1, 100)} |"
        )
    lines.append(
        f"| teacher (reference) | – | – | 0 | {teacher['perplexity']:.2f} | 100 | {teacher['ece'] * 100:.2f} | – | – |"
    )
    return "\n".join(lines)


def verdicts(summary: dict[str, Any]) -> list[str]:
    """Each cache arm against its target: met or missed by the mean, with the interval's lower end beside it.

    Top-k and top-p: >= 95% of the gain; sample and hybrid: >= 99% at fewer bytes per token
    than top-64. The full cache has no target: it should recover 100%.
    """
    lines = []
    top64_bytes = summary["topk-64"]["bytes_per_token"]
    for name, row in summary.items():
        if "bytes_per_token" not in row:
            continue
        mean, half = row["recovered"]
        figures = f"recovers {mean:.1%} of the gain"
        if not math.isnan(half):
            figures = f"recovers {mean:.1%} ± {half:.1%} of the gain (lower end {mean - half:.1%})"
        if name == FULL_CACHE.name:
            lines.append(f"{name}: {figures}; a check, expected 100%")
            continue
        sampled = name.startswith(("sample", "hybrid"))
        target = TARGET_SAMPLED if sampled else TARGET_TOPK
        met = mean >= target
        if sampled:
            fewer = row["bytes_per_token"] < top64_bytes
            figures += f", {row['bytes_per_token']:.1f} B/token vs top-64's {top64_bytes:.1f}"
            met = met and fewer
            target_text = f">= {target:.0%} at fewer bytes than top-64"
        else:
            target_text = f">= {target:.0%}"
        lines.append(f"{name}: {figures}; target {target_text}: {'met' if met else 'missed'}")
    return lines


# ----------------------------------------------------------------------------- the run


@contextlib.contextmanager
def phase(name: str, clock: dict[str, dict[str, float]]) -> Iterator[None]:
    """Log a phase and record its wall-clock and CPU seconds (the CPU time is what another load does not inflate)."""
    wall, cpu = time.time(), time.process_time()
    log(f"[{name}]")
    yield
    clock[name] = {"wall": time.time() - wall, "cpu": time.process_time() - cpu}
    log(f"[{name}] {clock[name]['wall']:.0f} s wall, {clock[name]['cpu']:.0f} s CPU")


@dataclass(frozen=True)
class Setup:
    """The tokenizer, the trained teacher and the held-out text with the teacher's logits over it."""

    train_file: Path
    teacher_dir: Path
    tokenizer: Any
    teacher: models.LMHead
    heldout: torch.Tensor  # (S, seq_len) int64
    teacher_logits: list[torch.Tensor]  # per held-out batch: (B, seq_len, V) float32
    teacher_scores: dict[str, Any]  # the teacher's own held-out metrics (KL 0 by construction)


def set_up(budget: Budget, work: Path) -> Setup:
    """Train the tokenizer and the teacher; run the live teacher once over the held-out text."""
    train_file, heldout_file = corpus_files(work, budget)
    teacher_dir = work / "teacher"
    tokenizer = train_tokenizer(teacher_dir, documents(train_file), budget.vocab)
    train_ids = packed(documents(train_file), tokenizer, budget.seq_len)
    heldout = packed(documents(heldout_file), tokenizer, budget.seq_len)
    log(
        f"  vocabulary {len(tokenizer)}; {train_ids.numel():,} training tokens, "
        f"{heldout.numel():,} held-out tokens (seq_len {budget.seq_len})"
    )
    model = train_teacher(teacher_dir, tokenizer, train_ids, budget)
    teacher_logits, reference = [], HeldOutMetrics()
    with torch.no_grad():
        for start in range(0, len(heldout), budget.batch_size):
            input_ids = heldout[start : start + budget.batch_size]
            teacher_logits.append(model(input_ids=input_ids).logits)
            reference.update(teacher_logits[-1], teacher_logits[-1], next_token_labels(input_ids))
    scores = reference.result()
    parameters = sum(p.numel() for p in model.parameters())
    log(f"  teacher: {parameters:,} parameters, held-out perplexity {scores['perplexity']:.2f}")
    return Setup(train_file, teacher_dir, tokenizer, models.LMHead(model), heldout, teacher_logits, scores)


def make_caches(
    arms: list[Arm], seeds: list[int], setup: Setup, work: Path, budget: Budget
) -> tuple[dict[str, list[dict[str, Any]]], dict[tuple[str, int], Path]]:
    """One cache per capture arm (per seed for sampled ones); their figures, and the cache of each ``(arm, seed)``."""
    caches: dict[str, list[dict[str, Any]]] = {}
    paths: dict[tuple[str, int], Path] = {}
    for arm in arms:
        if arm.capture is None:
            continue
        for seed in seeds if arm.sampled else [0]:
            out = work / "caches" / f"{arm.name}-seed{seed}"
            info = make_cache(arm, seed, setup.teacher_dir, setup.train_file, out, budget)
            caches.setdefault(arm.name, []).append(info)
            for student_seed in [seed] if arm.sampled else seeds:
                paths[arm.name, student_seed] = out
            log(f"  {arm.name} seed {seed}: {info['bytes_per_token']:.1f} B/token, {info['ids_per_position']:.1f} ids")
    hashes = {info["token_stream_sha256"] for infos in caches.values() for info in infos}
    assert len(hashes) == 1, "every cache must hold the same token stream"
    return caches, paths


def train_students(
    arms: list[Arm], seeds: list[int], setup: Setup, paths: dict[tuple[str, int], Path], work: Path, budget: Budget
) -> dict[str, list[dict[str, Any]]]:
    """Every arm at every seed; each student's held-out metrics against the live teacher."""
    config = llama_config(budget.vocab, budget.student_hidden, budget.student_layers, budget.seq_len, setup.tokenizer)
    student_dir = work / "student"
    config.save_pretrained(str(student_dir))
    runs: dict[str, list[dict[str, Any]]] = {arm.name: [] for arm in arms}
    for seed in seeds:
        for arm in arms:
            wall, cpu = time.time(), time.process_time()
            source = paths[(arm.name if arm.capture else ROW_SOURCE), seed]
            alpha = 0.0 if arm.name == "ce" else budget.alpha
            cfg = student_config(source, student_dir, work / "students" / f"{arm.name}-seed{seed}", seed, alpha, budget)
            model = train_online(cfg, setup.teacher) if arm.name == "online" else train_from_cache(cfg)
            scores = heldout_metrics(model, setup.heldout, setup.teacher_logits, budget.batch_size)
            seconds = {"wall": time.time() - wall, "cpu": time.process_time() - cpu}
            runs[arm.name].append({"seed": seed, **scores, "seconds": seconds})
            log(
                f"  seed {seed} {arm.name:<16} KL {scores['kl']:.4f}  ppl {scores['perplexity']:.2f}  "
                f"agree {scores['top1_agreement']:.3f}  ECE {scores['ece']:.4f}  "
                f"({seconds['wall']:.0f} s wall, {seconds['cpu']:.0f} s CPU)"
            )
    return runs


def run_benchmark(budget: Budget, work: Path, arms: list[Arm]) -> dict[str, Any]:
    """Every phase of the module docstring; returns the per-seed results, the summary and the timings."""
    models.quiet_transformers()
    clock: dict[str, dict[str, float]] = {}
    wall, cpu = time.time(), time.process_time()
    seeds = list(range(budget.seeds))
    with phase("tokenizer and teacher", clock):
        setup = set_up(budget, work)
    with phase("teacher passes: one per capture, per seed where it samples", clock):
        caches, paths = make_caches(arms, seeds, setup, work, budget)
    with phase(f"students: {len(arms)} arms x {len(seeds)} seed(s)", clock):
        runs = train_students(arms, seeds, setup, paths, work, budget)
    clock["total"] = {"wall": time.time() - wall, "cpu": time.process_time() - cpu}
    return {
        "budget": asdict(budget),
        "threads": torch.get_num_threads(),
        "teacher": setup.teacher_scores,
        "caches": caches,
        "runs": runs,
        "summary": summarise(runs, caches),
        "seconds": clock,
    }


def describe_budget(budget: Budget, arms: list[Arm]) -> str:
    tokens = budget.student_steps * budget.batch_size * budget.seq_len
    return (
        f"budget: vocab {budget.vocab}, seq_len {budget.seq_len}; teacher Llama {budget.teacher_layers}x"
        f"{budget.teacher_hidden}, {budget.teacher_steps} CE steps of {budget.batch_size} sequences; "
        f"student Llama {budget.student_layers}x{budget.student_hidden}, {budget.student_steps} steps of "
        f"{budget.batch_size} sequences = {tokens:,} tokens per run, alpha {budget.alpha}; "
        f"{len(arms)} arms x {budget.seeds} seed(s) = {len(arms) * budget.seeds} student runs; "
        f"{torch.get_num_threads()} thread(s)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast", action="store_true", help="1 seed, tiny models: a smoke test of seconds")
    parser.add_argument("--seeds", type=int, help="student seeds (default 3; 1 with --fast)")
    parser.add_argument("--alpha", type=float, help="weight of distillation in the cache and online arms (0.5)")
    parser.add_argument("--student-steps", type=int, help="optimizer steps per student")
    parser.add_argument(
        "--arms",
        default="standard",
        help="comma-separated arms: standard (the eight), full-cache, topk-64-lossless, sample-128 "
        "(ce, online and topk-64 always run)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadiest on a shared 2-core CPU)")
    parser.add_argument("--work", help="folder for the tokenizer, teacher, caches and students (default: temporary)")
    parser.add_argument("--json", help="write every figure to this file")
    args = parser.parse_args(argv)

    budget = FAST if args.fast else Budget()
    changes = {"seeds": args.seeds, "alpha": args.alpha, "student_steps": args.student_steps}
    budget = replace(budget, **{key: value for key, value in changes.items() if value is not None})
    if budget.seeds < 1 or not 0.0 < budget.alpha <= 1.0:
        parser.error("--seeds must be at least 1 and --alpha in (0, 1]")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING)
    try:
        arms = select_arms(args.arms)
    except ValueError as exc:
        parser.error(f"--arms: {exc}")
    log(describe_budget(budget, arms))
    with contextlib.ExitStack() as stack:
        if args.work:
            work = Path(args.work)
            work.mkdir(parents=True, exist_ok=True)
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="distill-quality-")))
        result = run_benchmark(budget, work, arms)
    log("")
    log(table(result["summary"], result["teacher"]))
    log("")
    for line in verdicts(result["summary"]):
        log(line)
    total = result["seconds"]["total"]
    log(f"total: {total['wall']:.0f} s wall, {total['cpu']:.0f} s CPU")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
