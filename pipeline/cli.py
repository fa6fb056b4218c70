"""The ``distill`` command line: options -> config dataclasses -> the passes. No logic lives here."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import click

from pipeline import codec_v2
from pipeline.config import (
    CURRICULA,
    CURRICULUM_PACINGS,
    DEFAULT_SAMPLES,
    DEFAULT_SEQ_LEN,
    DEFAULT_SHARD_TOKENS,
    DEFAULT_TOP_K,
    DEFAULT_TOP_P,
    ENSEMBLE_MODES,
    LOSSES,
    StudentTrainConfig,
    TeacherCacheConfig,
)
from pipeline.distributed import launched_as_main
from pipeline.errors import DistillError
from pipeline.run_config import config_option


def _one_line_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the project's errors into one line on stderr and exit status 1."""

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except DistillError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", is_flag=True, help="Log more detail.")
@click.option("-q", "--quiet", is_flag=True, help="Log only warnings.")
@click.version_option(package_name="distill-cache")
def main(verbose: bool, quiet: bool) -> None:
    """Offline knowledge distillation: cache a teacher's top-k next-token distributions once,
    then train any number of students from the cache."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("pipeline").setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)


@main.command("teacher-cache")
@click.option("--teacher", required=True, help="Hub id, local model folder, or .gguf file.")
@click.option(
    "--row-stats/--no-row-stats",
    default=True,
    show_default=True,
    help="Store each row's teacher top-1 probability and entropy (what --curriculum confidence reads); "
    "--no-row-stats saves their cost in the LM head's pass.",
)
@click.option(
    "--chat-template",
    is_flag=True,
    help="Read chat data: render --messages-column with the tokenizer's chat template and store a loss mask "
    "(the assistant's tokens count, prompts and system text do not).",
)
@click.option("--messages-column", default="messages", show_default=True, help="Column of chat messages.")
@click.option(
    "--document-attention",
    is_flag=True,
    help="Keep attention within each document of a packed row (positions restart per document); the cache "
    "records the boundaries and the student pass keeps to them too.",
)
@click.option(
    "--hidden-layers",
    default=None,
    callback=lambda _ctx, _param, value: _parse_layers(value),
    help="Also store these layers' hidden states, e.g. 8,16,-1 (0: embeddings, -1: after the final norm); "
    "see docs/FORMAT.md.",
)
@click.option(
    "--hidden-encoding",
    type=click.Choice(["bf16", "int8"]),
    default="bf16",
    show_default=True,
    help="bf16 (relative error <= 2^-8) or int8 with one scale per position (error <= max|x_t| / 254).",
)
@click.option("--hidden-dim", type=int, default=None, help="Project hidden states to this width (fixed ±1 matrix).")
@click.option("--hidden-seed", type=int, default=0, show_default=True, help="Seed of the --hidden-dim projection.")
@click.option(
    "--dataset", required=True, help="Hub dataset id, or a local file/folder (.txt .jsonl .json .parquet .arrow)."
)
@click.option("--dataset-config", default=None, help="Hub dataset configuration name.")
@click.option("--split", default="train", show_default=True)
@click.option("--text-column", default="text", show_default=True)
@click.option(
    "--txt-sample-by",
    type=click.Choice(["document", "paragraph", "line"]),
    default="document",
    show_default=True,
    help="How .txt files split into documents: whole file, blank-line paragraphs, or lines.",
)
@click.option(
    "--txt-encoding-errors",
    type=click.Choice(["strict", "replace", "skip-file"]),
    default="strict",
    show_default=True,
    help="A .txt file that is not UTF-8: refuse the run, replace bad bytes with U+FFFD, or leave the file out.",
)
@click.option("--seq-len", type=int, default=DEFAULT_SEQ_LEN, show_default=True, help="Tokens per packed sequence.")
@click.option("--max-tokens", type=int, default=None, help="Stop after this many packed tokens.")
@click.option(
    "--capture",
    type=click.Choice(["topk", "topp", "sample", "hybrid"]),
    default="topk",
    show_default=True,
    help="What to keep per position: the top-k ids, the top-p set, sampled ids with counts, or a top-k head "
    "plus samples from the rest.",
)
@click.option(
    "--top-k", type=int, default=None, help=f"topk: ids kept per position [{DEFAULT_TOP_K}]; hybrid: the head [16]."
)
@click.option("--top-p", type=float, default=DEFAULT_TOP_P, show_default=True, help="topp: cumulative probability.")
@click.option("--min-k", type=int, default=1, show_default=True, help="topp: fewest ids per position.")
@click.option("--max-k", type=int, default=DEFAULT_TOP_K, show_default=True, help="topp: most ids per position.")
@click.option(
    "--samples", type=int, default=DEFAULT_SAMPLES, show_default=True, help="sample, hybrid: draws per position."
)
@click.option(
    "--sample-temperature", type=float, default=1.0, show_default=True, help="sample, hybrid: temperature of the draws."
)
@click.option(
    "--sample-logprobs",
    is_flag=True,
    help="sample: also store the teacher's log-probabilities of the drawn ids (needed for --temperature other "
    "than the draws' in the student pass; costs bytes).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="sample, hybrid: seed of the draws.")
@click.option(
    "--codec-mode",
    type=click.Choice(list(codec_v2.MODES)),
    default=None,
    help="How log-probabilities are stored: lossless (float16); quantized (within --logprob-step / 2 nats); "
    "sqrt (square root of probability within --sqrt-step / 2: the fewest bytes for a KL bound) "
    "[sqrt for topk and topp, quantized for sample and hybrid].",
)
@click.option(
    "--logprob-step",
    type=float,
    default=None,
    help=f"quantized: log-probability step in nats, about step^2 / 24 nats of KL [{codec_v2.DEFAULT_LOGPROB_STEP}].",
)
@click.option(
    "--sqrt-step",
    type=float,
    default=None,
    help="sqrt: step on the square root of probability, about K step^2 / 6 nats of KL "
    f"[1/{1 / codec_v2.DEFAULT_SQRT_STEP:g}].",
)
@click.option(
    "--dtype",
    type=click.Choice(["fp32", "bf16", "fp16"]),
    default=None,
    help="Teacher dtype [bf16 on CUDA, else fp32].",
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Sequences per teacher forward.")
@click.option(
    "--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, show_default=True, help="Tokens per shard file."
)
@click.option(
    "--trust-remote-code", is_flag=True, help="Allow models that ship their own Python code (run only code you trust)."
)
@click.option("--out", required=True, help="Cache folder to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing cache in --out.")
@_one_line_errors
def teacher_cache(**options: Any) -> None:
    """Stream a dataset through the teacher once and write its sparse next-token distributions to a cache."""
    from pipeline.teacher import run_teacher_cache

    summary = run_teacher_cache(TeacherCacheConfig(**options))
    if not launched_as_main():  # under torchrun, rank 0 reports for the whole pass
        return
    if summary.status != "written":
        click.echo(
            f"cache {summary.path}: {summary.status} ({summary.tokens:,} tokens, {summary.shards} shard(s)); "
            "nothing to do"
        )
        return
    click.echo(
        f"cache {summary.path}: {summary.tokens:,} tokens in {summary.sequences:,} sequences, "
        f"{summary.shards} shard(s), {summary.bytes:,} bytes ({summary.bytes_per_token:.1f} bytes/token), "
        f"{summary.seconds:.1f} s ({summary.tokens_per_second:,.0f} tokens/s)"
        + (f"; resumed after {summary.resumed_tokens:,} cached tokens" if summary.resumed_tokens else "")
        + (
            f"; skipped {summary.skipped_documents:,} document(s) holding ids the teacher cannot embed"
            if summary.skipped_documents
            else ""
        )
        + (f"; left out {len(summary.skipped_files)} file(s) that are not UTF-8" if summary.skipped_files else "")
    )


def _parse_layers(value: str | None) -> tuple[int, ...]:
    """``--hidden-layers 8,16,-1`` as integers; a malformed list is refused naming the flag."""
    if not value:
        return ()
    try:
        return tuple(int(piece) for piece in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of layer numbers, e.g. 8,16,-1") from None


def _parse_weights(value: str | None) -> tuple[float, ...] | None:
    """``--cache-weights 0.7,0.3`` as floats; a malformed list is refused naming the flag."""
    if value is None:
        return None
    try:
        return tuple(float(piece) for piece in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of numbers, e.g. 0.7,0.3") from None


@main.command("student-train")
@click.option(
    "--cache",
    "caches",
    required=True,
    multiple=True,
    help="Cache folder written by teacher-cache; repeat it, with --ensemble, for several teachers of the same data.",
)
@click.option(
    "--ensemble",
    type=click.Choice(ENSEMBLE_MODES),
    default=None,
    help="Distil from the teachers of every --cache at once: the mean of their probabilities, or of their "
    "log-probabilities (renormalised).",
)
@click.option(
    "--cache-weights",
    default=None,
    metavar="W1,W2,...",
    callback=lambda _ctx, _param, value: _parse_weights(value),
    help="One weight per --cache of an --ensemble [equal].",
)
@click.option(
    "--student", required=True, help="Hub id, folder with weights, or folder/file with a config only (fresh model)."
)
@click.option(
    "--student-config",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a field of a config-built student (repeatable).",
)
@click.option(
    "--tokenizer", default=None, help="Tokenizer to save with the student [the student's own, else the cache's copy]."
)
@click.option("--out", required=True, help="Folder for checkpoints, metrics and the final model.")
@click.option(
    "--alpha", type=float, default=0.5, show_default=True, help="Weight of the KD term; 1 - alpha weighs cross-entropy."
)
@click.option(
    "--temperature", type=float, default=1.0, show_default=True, help="Distillation temperature T (loss scaled by T^2)."
)
@click.option(
    "--loss",
    type=click.Choice(LOSSES),
    default="forward_kl",
    show_default=True,
    help="Distillation loss over the cached buckets (docs/losses.md); tvd is not scaled by T^2.",
)
@click.option(
    "--beta", type=float, default=0.5, show_default=True, help="jsd: weight of the teacher in the mixture, in [0, 1]."
)
@click.option(
    "--skew", type=float, default=0.1, show_default=True, help="skew_kl, skew_reverse_kl: mixture weight, in [0, 1)."
)
@click.option(
    "--renormalize",
    is_flag=True,
    help="Compare both sides renormalised over the captured ids, without the rest bucket "
    "(the tail is dropped; see docs/losses.md).",
)
@click.option(
    "--adapt-temperature",
    is_flag=True,
    help="Lower the temperature (T *= 0.9, not below 1) at each logging step whose KL at T is below 0.01; "
    "--temperature must lie in [1, 20].",
)
@click.option(
    "--curriculum",
    type=click.Choice(CURRICULA),
    default=None,
    help="Train from the rows the teacher is most confident on towards the least (needs a cache with per-row "
    "teacher statistics; docs/losses.md).",
)
@click.option(
    "--curriculum-pacing",
    type=click.Choice(CURRICULUM_PACINGS),
    default=None,
    help="How the pool of rows grows: linear, or root (fast early) [root].",
)
@click.option(
    "--curriculum-start",
    type=float,
    default=None,
    help="Fraction of the rows, most confident, in the pool at first [0.2].",
)
@click.option(
    "--curriculum-span",
    type=float,
    default=None,
    help="Fraction of the run's steps after which the pool holds every row [0.5].",
)
@click.option(
    "--report-to",
    type=click.Choice(["none", "tensorboard"]),
    default="none",
    show_default=True,
    help="Also write the logged metrics for TensorBoard, in --out/tensorboard.",
)
@click.option("--batch-size", type=int, default=8, show_default=True, help="Sequences per micro-batch.")
@click.option("--grad-accum", type=int, default=1, show_default=True, help="Micro-batches per optimizer step.")
@click.option("--lr", type=float, default=1e-3, show_default=True, help="Peak learning rate (AdamW).")
@click.option("--weight-decay", type=float, default=0.01, show_default=True)
@click.option("--warmup-steps", type=int, default=None, help="Linear warm-up steps [5% of the run].")
@click.option("--max-grad-norm", type=float, default=1.0, show_default=True, help="Gradient clipping (0 disables).")
@click.option("--epochs", type=float, default=None, help="Passes over the cache [1].")
@click.option("--max-steps", type=int, default=None, help="Optimizer steps (instead of --epochs).")
@click.option(
    "--eval-cache", default=None, help="Held-out cache: report KL to the teacher, cross-entropy and perplexity."
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
@click.option(
    "--save-every", type=int, default=0, show_default=True, help="Checkpoint every N steps (0: only the final model)."
)
@click.option("--log-every", type=int, default=10, show_default=True, help="Write metrics every N steps.")
@click.option("--head-chunk", type=int, default=0, help="Positions per LM-head chunk [about 128 MiB of logits].")
@click.option(
    "--feature-loss",
    type=click.Choice(["mse", "cosine"]),
    default=None,
    help="Also match hidden states stored in the cache (teacher-cache --hidden-layers) through learned projectors.",
)
@click.option("--layer-map", default=None, help="STUDENT:TEACHER layer pairs for --feature-loss, e.g. 2:8,-1:-1.")
@click.option("--feature-weight", type=float, default=1.0, show_default=True, help="Weight of the feature loss.")
@click.option(
    "--data-workers",
    type=int,
    default=0,
    show_default=True,
    help="Processes that read, decode and batch the rows ahead of the loop (0: in the training process); "
    "the batches are the same whatever the number.",
)
@click.option("--prefetch", type=int, default=2, show_default=True, help="Batches each data worker keeps ready.")
@click.option(
    "--fsdp",
    is_flag=True,
    help="Under torchrun, shard the student's weights, gradients and optimizer state across the processes (FSDP2), "
    "for students too large for one device (docs/distributed.md).",
)
@click.option(
    "--no-verify",
    "verify",
    is_flag=True,
    flag_value=False,
    default=True,
    help="Skip shard checksums (faster, trusts the files).",
)
@click.option(
    "--trust-remote-code", is_flag=True, help="Allow models that ship their own Python code (run only code you trust)."
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace a previous run in --out: deletes only what student-train wrote there, and refuses a folder "
    "holding anything else.",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Continue from the latest checkpoint in --out with the run's settings; only "
    + ", ".join(dict.fromkeys(StudentTrainConfig.flag(name) for name in StudentTrainConfig.RESUME_MAY_CHANGE))
    + " may differ (a new --max-steps or --epochs changes the learning-rate schedule from there on).",
)
@_one_line_errors
def student_train(student_config: tuple[str, ...], caches: tuple[str, ...], **options: Any) -> None:
    """Train a student from a cache, without loading the teacher."""
    from pipeline.student import run_student_train

    cfg = StudentTrainConfig(
        cache=caches[0], ensemble_caches=tuple(caches[1:]), student_config=tuple(student_config), **options
    )
    summary = run_student_train(cfg)
    if summary.rank != 0:
        return  # under torchrun, rank 0 reports for every process
    click.echo(
        f"student {summary.out}: {summary.steps} steps, {summary.tokens:,} tokens in {summary.seconds:.1f} s, "
        f"final loss {summary.final_loss:.4f} (built from {summary.student_origin})"
    )
    if summary.eval:
        click.echo(
            f"held-out: KL(teacher||student) {summary.eval['kl']:.4f} nats/token, "
            f"cross-entropy {summary.eval['ce']:.4f}, perplexity {summary.eval['perplexity']:.2f}"
        )


@main.command("eval")
@click.option("--student", required=True, help="The student: a student-train output folder, or any model with weights.")
@click.option(
    "--source",
    "sources",
    multiple=True,
    help="Held-out cache folder, or a dataset (local file/folder or Hub id) to run through the models; repeatable.",
)
@click.option("--teacher", default=None, help="The live teacher, for full-vocabulary KL and the teacher retained.")
@click.option(
    "--start",
    default=None,
    help="The student before training: 'auto' rebuilds it from the student's training.json, or give a model.",
)
@click.option("--seq-len", type=int, default=256, show_default=True, help="Tokens per row of a dataset source.")
@click.option("--max-tokens", type=int, default=65536, show_default=True, help="At most this many tokens per source.")
@click.option("--batch-size", type=int, default=4, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
@click.option(
    "--tasks",
    default="",
    metavar="T1,T2",
    help="lm-evaluation-harness tasks to run each model on, e.g. pydoc_cloze,pydoc_perplexity (shipped) or hellaswag.",
)
@click.option("--task-path", default=None, help="Folder of extra task YAML files [the shipped data/lm_eval_tasks].")
@click.option("--task-limit", type=int, default=None, help="At most this many documents per task.")
@click.option("--json", "json_out", default=None, metavar="FILE", help="Also write the figures to FILE as JSON.")
@click.option("--trust-remote-code", is_flag=True, help="Allow models that ship their own Python code.")
@_one_line_errors
def eval_student(
    json_out: str | None, sources: tuple[str, ...], tasks: str, task_path: str | None, **options: Any
) -> None:
    """Evaluate a student, and optionally its start and the teacher, on held-out sources: perplexity, KL,
    top-1 agreement, calibration (ECE) and the teacher retained."""
    from pipeline.student_eval import EvalConfig, run_eval, table

    names = tuple(name.strip() for name in tasks.split(",") if name.strip())
    extra = {"task_path": task_path} if task_path else {}
    report = run_eval(EvalConfig(sources=tuple(sources), tasks=names, **extra, **options))
    click.echo(table(report))
    if json_out:
        from pipeline.store.atomic import write_bytes_atomic

        write_bytes_atomic(Path(json_out), (json.dumps(report, indent=2) + "\n").encode())
        click.echo(f"wrote {json_out}", err=True)


@main.command("report")
@click.argument("runs", nargs=-1, required=True, metavar="RUN_DIR...")
@click.option(
    "--out", required=True, metavar="FILE", help="Picture to write: .png, .svg, .pdf, or .html (a page holding it)."
)
@_one_line_errors
def report_runs(runs: tuple[str, ...], out: str) -> None:
    """Draw student runs' loss, KD and CE curves, KL and top-1 agreement, learning rate and held-out
    points, overlaid (from each RUN_DIR's metrics.jsonl and eval.json)."""
    from pipeline import plots

    series = [plots.run_series(folder) for folder in runs]
    written = plots.save(plots.draw_runs(series), out, caption="runs: " + ", ".join(runs))
    click.echo(f"wrote {written}")


def _set_verbosity(_ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        logging.getLogger("pipeline").setLevel(logging.DEBUG if param.name == "verbose" else logging.WARNING)


def verbosity_options(command: click.Command) -> None:
    """``-v`` and ``-q`` after the command's name too (``distill teacher-cache ... -q``), as before it."""
    click.option("-v", "--verbose", is_flag=True, expose_value=False, callback=_set_verbosity, help="Log more detail.")(
        command
    )
    click.option("-q", "--quiet", is_flag=True, expose_value=False, callback=_set_verbosity, help="Log only warnings.")(
        command
    )


# --config FILE on the two passes (pipeline/run_config.py).
config_option(teacher_cache)
config_option(student_train)


@main.command("inspect")
@click.argument("cache")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead of text.")
@click.option(
    "--plot",
    default=None,
    metavar="FILE",
    help="Also draw captured mass, teacher entropy and bytes per column to FILE (.png .svg .pdf .html).",
)
@click.option(
    "--sample",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="Read only N rows, drawn at random, for the per-row figures (fast on huge caches) [every row].",
)
@_one_line_errors
def inspect_cache(cache: str, as_json: bool, plot: str | None, sample: int | None) -> None:
    """Summarise a cache: size, settings, teacher, and the mean captured probability mass."""
    from pipeline.report import cache_report

    report = cache_report(cache, histograms=plot is not None, sample=sample)
    if plot is not None:
        from pipeline import plots

        written = plots.save(plots.draw_cache(report), plot, caption=f"cache {cache}")
        click.echo(f"wrote {written}", err=True)
        report = {key: value for key, value in report.items() if not key.endswith("_histogram")}
    if as_json:
        click.echo(json.dumps(report, indent=2, sort_keys=True))
        return
    for key in (
        "path",
        "teacher",
        "dataset",
        "format_version",
        "tokens",
        "sequences",
        "seq_len",
        "shards",
        "capture",
        "codec",
        "logit_width",
        "bytes",
        "bytes_per_token",
        "column_bytes_per_token",
        "mean_ids_per_position",
        "mean_captured_mass",
        "teacher_mean_top1_prob",
        "teacher_mean_entropy",
        "sampled_rows",
    ):
        click.echo(f"{key:>22}: {_shown(report[key])}")


def _shown(value: Any) -> str:
    """A report value as one line of text."""
    if isinstance(value, dict):
        return ", ".join(f"{name}={_shown(item)}" for name, item in value.items())
    if isinstance(value, float):
        return f"{value:,.4f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


@main.command("verify")
@click.argument("cache")
@click.option("--deep", is_flag=True, help="Also decode every row and check its ids and values.")
@_one_line_errors
def verify_cache(cache: str, deep: bool) -> None:
    """Re-hash every shard and check it against the manifest; exit 1 naming each problem."""
    from pipeline.report import verify_report

    problems, checked = verify_report(cache, deep=deep)
    for problem in problems:
        click.echo(f"BAD {problem}", err=True)
    if problems:
        click.echo(f"error: {len(problems)} problem(s) in {cache}", err=True)
        sys.exit(1)
    what = f"{checked} rows decoded and checked" if deep else f"{checked} shard(s) match the manifest"
    click.echo(f"ok: {what}")


@main.command("recode")
@click.option("--cache", required=True, help="Cache folder to read (format version 1 or 2).")
@click.option("--out", required=True, help="Folder for the recoded cache (a new one; never --cache itself).")
@click.option(
    "--codec-mode",
    type=click.Choice(["quantized", "lossless", "sqrt"]),
    default=None,
    help="How to store log-probabilities [the source's; the mode of a step flag given]. A source quantized on "
    "one grid cannot become lossless or move to the other.",
)
@click.option(
    "--logprob-step",
    type=float,
    default=None,
    help="quantized: step in nats [the source's, else 0.125]; from a quantized source, an odd multiple of its step.",
)
@click.option(
    "--sqrt-step",
    type=float,
    default=None,
    help="sqrt: step on the square root of probability [the source's, else 1/128]; from a sqrt source, an odd "
    "multiple of its step.",
)
@click.option(
    "--top-k",
    type=int,
    default=None,
    help="Keep at most this many ids per position (topk and topp captures; at most the source's), "
    "the rest folded into the tail.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing cache in --out.")
@_one_line_errors
def recode(**options: Any) -> None:
    """Rewrite a cache in another codec mode, a coarser step or with fewer ids, without the teacher."""
    from pipeline.config import RecodeConfig
    from pipeline.recode import run_recode

    summary = run_recode(RecodeConfig(**options))
    if summary.status != "written":
        click.echo(f"cache {summary.path}: {summary.status} as this recode of {summary.source}; nothing to do")
        return
    click.echo(
        f"cache {summary.path}: recoded from {summary.source}, {summary.tokens:,} tokens in {summary.sequences:,} "
        f"sequences, {summary.shards} shard(s), {summary.bytes:,} bytes ({summary.bytes_per_token:.1f} bytes/token, "
        f"source {summary.source_bytes_per_token:.1f}); {summary.codec}, at most {summary.ids_per_position} ids "
        f"per position, {summary.seconds:.1f} s"
        + (f"; resumed after {summary.resumed_shards} committed shard(s)" if summary.resumed_shards else "")
    )


@main.command("generate")
@click.option("--teacher", required=True, help="Hub id, local model folder, or .gguf file.")
@click.option("--dataset", required=True, help="Prompts: a Hub dataset id, or local files (as teacher-cache reads).")
@click.option("--dataset-config", default=None, help="Hub dataset configuration name.")
@click.option("--split", default="train", show_default=True)
@click.option("--text-column", default="text", show_default=True, help="Column of text prompts.")
@click.option(
    "--messages-column",
    default=None,
    help="Column of chat prompts ({role, content} lists), rendered with the teacher's chat template.",
)
@click.option("--num-return-sequences", type=int, default=1, show_default=True, help="Responses per prompt.")
@click.option("--max-new-tokens", type=int, default=128, show_default=True)
@click.option("--gen-temperature", type=float, default=1.0, show_default=True, help="Sampling temperature.")
@click.option("--gen-top-p", type=float, default=1.0, show_default=True, help="Nucleus of the sampling.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the draws (keyed by prompt and step).")
@click.option("--max-prompts", type=int, default=None, help="Stop after this many dataset records.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Rows generated at once.")
@click.option(
    "--prompts-per-part", type=int, default=64, show_default=True, help="Prompts per output file (the resume unit)."
)
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default=None, help="[bf16 on CUDA, else fp32]")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
@click.option(
    "--trust-remote-code", is_flag=True, help="Allow models that ship their own Python code (run only code you trust)."
)
@click.option(
    "--capture-out",
    default=None,
    help="Also write a cache of the teacher's top-k distributions over each sample, in the same pass "
    "(one row per sample, the loss mask over the response).",
)
@click.option("--capture-top-k", type=int, default=64, show_default=True, help="Ids per position in --capture-out.")
@click.option(
    "--capture-seq-len", type=int, default=None, help="Row length of --capture-out [the teacher's, at most 1024]."
)
@click.option(
    "--capture-shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, show_default=True, help="Tokens per shard."
)
@click.option("--out", required=True, help="Folder to write: generation.json and data/part-*.jsonl.")
@click.option("--overwrite", is_flag=True, help="Replace what generate wrote in --out before.")
@_one_line_errors
def generate(**options: Any) -> None:
    """Write synthetic data: the teacher's responses to a dataset's prompts (sequence-level distillation)."""
    from pipeline.generate import GenerateConfig, run_generate

    summary = run_generate(GenerateConfig(**options))
    if summary.status != "written":
        click.echo(f"{summary.out}: {summary.status} ({summary.rows:,} rows); nothing to do")
        return
    click.echo(
        f"{summary.out}: {summary.rows:,} responses to {summary.prompts:,} prompts, {summary.new_tokens:,} new tokens "
        f"in {summary.seconds:.1f} s; train on it with --dataset {Path(summary.out) / 'data'}"
        + (
            f"; skipped {summary.skipped_prompts:,} prompt(s) too long for the teacher"
            if summary.skipped_prompts
            else ""
        )
    )


for _command in main.commands.values():
    verbosity_options(_command)


if __name__ == "__main__":
    main()
