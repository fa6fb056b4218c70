"""Do the distillation methods beat plain forward KL on the same budget? Measured on held-out text.

    python bench/methods.py            # default: 3 seeds, about 25 minutes (1 thread of a 2-core CPU)
    python bench/methods.py --fast     # 1 seed, tiny models, seconds (the smoke test)

Results and their reading: ``docs/quality.md`` ("Methods").

The setting is ``bench/quality.py``'s (same tokenizer, teacher, corpus, student and budget;
its module docstring has the details): a teacher A trained briefly on the demo corpus, its
top-64 cache made by the real teacher pass, and students of one architecture,
initialisation, data order and step count per seed, trained by the real student loop.
Every arm changes one thing against ``forward_kl`` (alpha 0.5, T = 1):

- the loss family (``--loss``): ``reverse_kl``, ``jsd`` (beta 0.5), ``skew_kl`` and
  ``skew_reverse_kl`` (skew 0.1), ``tvd``;
- ``ensemble-mean_prob`` and ``ensemble-mean_logprob`` (``--ensemble``, equal weights): A's
  cache and the top-64 cache of a teacher B of the same architecture, trained from another
  seed for half the steps (a weaker second teacher, as in practice);
- ``curriculum`` (``--curriculum confidence``, root pacing from 20% of the rows, every row
  from half-way);
- ``adapt-t4``: ``--temperature 4 --adapt-temperature`` against ``t4``, the fixed T = 4;
- ``ce``: cross-entropy alone, the floor.

Metrics (:mod:`pipeline.metrics`) are against teacher A on held-out text: full-vocabulary KL,
perplexity, top-1 agreement. Each arm's difference to ``forward_kl`` is paired by seed;
intervals are 95% Student-t intervals over seeds.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # the shared setting: bench/quality.py

TOPK = quality.Arm("topk-64", {"capture": "topk", "top_k": 64})
# name -> StudentTrainConfig fields changed against forward_kl; "ensemble" arms also read teacher B's cache.
ARMS: dict[str, dict[str, Any]] = {
    "ce": {"alpha": 0.0},
    "forward_kl": {},
    "reverse_kl": {"loss": "reverse_kl"},
    "jsd": {"loss": "jsd", "beta": 0.5},
    "skew_kl": {"loss": "skew_kl", "skew": 0.1},
    "skew_reverse_kl": {"loss": "skew_reverse_kl", "skew": 0.1},
    "tvd": {"loss": "tvd"},
    "ensemble-mean_prob": {"ensemble": "mean_prob"},
    "ensemble-mean_logprob": {"ensemble": "mean_logprob"},
    "curriculum": {"curriculum": "confidence"},
    "features": {"feature_loss": "mse", "feature_weight": 1.0},  # layer_map: set from the budget
    "t4": {"temperature": 4.0},
    "adapt-t4": {"temperature": 4.0, "adapt_temperature": True},
}
REFERENCE = "forward_kl"


def second_teacher(setup: quality.Setup, work: Path, budget: quality.Budget) -> Path:
    """Teacher B: teacher A's architecture, another seed, half the steps; saved with the tokenizer."""
    folder = work / "teacher-b"
    sequences = quality.packed(quality.documents(setup.train_file), setup.tokenizer, budget.seq_len)
    weaker = dataclasses.replace(budget, teacher_steps=max(1, budget.teacher_steps // 2))
    quality.train_teacher(folder, setup.tokenizer, sequences, weaker, seed=4321)
    return folder


def train_arm(name: str, seed: int, caches: dict[str, Path], student_dir: Path, work: Path, budget: quality.Budget):
    """One student of arm ``name`` at ``seed``, trained by the real student loop; returns the model."""
    changes = dict(ARMS[name])
    cache = caches["a-features"] if "feature_loss" in changes else caches["a"]
    if "feature_loss" in changes:  # the students' middle and last layers to the teacher's
        changes["layer_map"] = f"{budget.student_layers // 2}:{budget.teacher_layers // 2},-1:-1"
    cfg = quality.student_config(cache, student_dir, work / "students" / f"{name}-seed{seed}", seed, 0.5, budget)
    if "ensemble" in changes:
        changes["ensemble_caches"] = (str(caches["b"]),)
    # Log (and so measure the KL, which --adapt-temperature acts on) about 30 times a run.
    changes["log_every"] = max(1, budget.student_steps // 30)
    return quality.train_from_cache(dataclasses.replace(cfg, **changes))


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per arm: mean and interval of each metric over seeds, and its paired difference to forward KL."""
    summary: dict[str, Any] = {}
    reference = runs[REFERENCE]
    for name, per_seed in runs.items():
        row: dict[str, Any] = {}
        for key in ("kl", "perplexity", "top1_agreement"):
            row[key] = quality.mean_ci([run[key] for run in per_seed])
            row[f"{key}_minus_forward_kl"] = quality.mean_ci(
                [run[key] - ref[key] for run, ref in zip(per_seed, reference, strict=True)]
            )
        summary[name] = row
    return summary


def table(summary: dict[str, Any]) -> str:
    """The results as a markdown table (intervals as ±)."""

    def fmt(pair: tuple[float, float], digits: int, scale: float = 1.0, sign: str = "") -> str:
        mean, half = pair
        shown = f"{mean * scale:{sign}.{digits}f}"
        return shown if half != half else f"{shown} ± {half * scale:.{digits}f}"  # nan: one seed

    lines = [
        "| method | KL(teacher‖student) | − forward KL (paired) | perplexity | − forward KL (paired) "
        "| top-1 agreement % |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, row in summary.items():
        lines.append(
            f"| {name} | {fmt(row['kl'], 4)} | {fmt(row['kl_minus_forward_kl'], 4, sign='+')} "
            f"| {fmt(row['perplexity'], 2)} | {fmt(row['perplexity_minus_forward_kl'], 2, sign='+')} "
            f"| {fmt(row['top1_agreement'], 1, 100)} |"
        )
    return "\n".join(lines)


def run_benchmark(budget: quality.Budget, work: Path, arms: list[str]) -> dict[str, Any]:
    """Teachers A and B, their top-64 caches, every arm at every seed; per-seed results and the summary."""
    quality.models.quiet_transformers()
    started = time.time()
    setup = quality.set_up(budget, work)
    teacher_b = second_teacher(setup, work, budget)
    caches = {"a": work / "caches" / "a", "b": work / "caches" / "b"}
    for key, teacher in (("a", setup.teacher_dir), ("b", teacher_b)):
        info = quality.make_cache(TOPK, 0, teacher, setup.train_file, caches[key], budget)
        quality.log(f"  teacher {key.upper()} top-64 cache: {info['bytes_per_token']:.1f} B/token")
    if "features" in arms:  # the same cache plus teacher A's middle and last hidden states (bf16)
        caches["a-features"] = work / "caches" / "a-features"
        layers = (budget.teacher_layers // 2, -1)
        features = quality.Arm("topk-64+hidden", {"capture": "topk", "top_k": 64, "hidden_layers": layers})
        info = quality.make_cache(features, 0, setup.teacher_dir, setup.train_file, caches["a-features"], budget)
        quality.log(f"  teacher A top-64 + hidden layers {layers} cache: {info['bytes_per_token']:.1f} B/token")
    config = quality.llama_config(
        budget.vocab, budget.student_hidden, budget.student_layers, budget.seq_len, setup.tokenizer
    )
    student_dir = work / "student"
    config.save_pretrained(str(student_dir))
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in arms}
    for seed in range(budget.seeds):
        for name in arms:
            wall = time.time()
            model = train_arm(name, seed, caches, student_dir, work, budget)
            scores = quality.heldout_metrics(model, setup.heldout, setup.teacher_logits, budget.batch_size)
            runs[name].append({"seed": seed, **scores, "seconds": time.time() - wall})
            quality.log(
                f"  seed {seed} {name:<22} KL {scores['kl']:.4f}  ppl {scores['perplexity']:.2f}  "
                f"agree {scores['top1_agreement']:.3f}  ({time.time() - wall:.0f} s)"
            )
    return {
        "budget": dataclasses.asdict(budget),
        "threads": torch.get_num_threads(),
        "teacher": setup.teacher_scores,
        "runs": runs,
        "summary": summarise(runs),
        "seconds": time.time() - started,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast", action="store_true", help="1 seed, tiny models: a smoke test of seconds")
    parser.add_argument("--seeds", type=int, help="student seeds (default 3; 1 with --fast)")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of: {', '.join(ARMS)}")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadiest on a shared 2-core CPU)")
    parser.add_argument("--work", help="folder for the teachers, caches and students (default: temporary)")
    parser.add_argument("--json", help="write every figure to this file")
    args = parser.parse_args(argv)

    budget = quality.FAST if args.fast else quality.Budget()
    if args.seeds is not None:
        budget = dataclasses.replace(budget, seeds=args.seeds)
    arms = [name.strip() for name in args.arms.split(",") if name.strip()]
    unknown = [name for name in arms if name not in ARMS]
    if unknown or budget.seeds < 1:
        parser.error(f"unknown arm(s) {', '.join(unknown)}" if unknown else "--seeds must be at least 1")
    if REFERENCE not in arms:
        arms.insert(0, REFERENCE)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING)
    quality.log(quality.describe_budget(budget, [quality.Arm(name) for name in arms]))
    with contextlib.ExitStack() as stack:
        if args.work:
            work = Path(args.work)
            work.mkdir(parents=True, exist_ok=True)
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="distill-methods-")))
        result = run_benchmark(budget, work, arms)
    quality.log("")
    quality.log(table(result["summary"]))
    quality.log(f"total: {result['seconds']:.0f} s wall")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
