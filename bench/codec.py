"""Codec v2 side by side: every capture strategy from the same teacher logits, every codec mode, one run.

    python bench/codec.py [--fast] [--teacher PATH] [--dataset PATH] [--tokens N] [--json OUT]

The teacher runs once per batch (backbone, then the LM head a chunk of positions at a
time, as ``distill teacher-cache`` does); every capture spec reads the same logits. Each
(capture, codec settings) pair is then encoded with :func:`pipeline.codec_v2.encode_row`,
written to real shards with the project's :class:`~pipeline.store.writer.ShardWriter`, and
decoded with :func:`pipeline.codec_v2.decode_row`. Reported per pair:

- bytes per token: ``ids`` (the ``ids`` column), ``values`` (log-probabilities and counts),
  ``rest`` (input_ids, lengths, tail_logmass, and the two int64 provenance cells), Arrow
  (what the shard file holds beyond those: offsets, record-batch headers, schema, footer)
  and ``total`` = shard file bytes / tokens;
- ids per position (distinct ids, for sampled captures) and bytes per entry
  (``(ids + values) / entries``, the cost of one more captured id);
- reconstruction KL, mean over positions: ``KL lp`` is KL(captured || decoded) on the
  K + 1 buckets (log-probabilities and tail, each side renormalised as the loss does);
  ``KL t`` is the same on the empirical ``counts / N`` (0 when the counts come back exact);
- encode and decode tokens/s on one core: tokens over CPU seconds with
  ``torch.set_num_threads(1)``, median of ``--repeats`` passes over all rows (decode
  includes every check and the reordering :func:`~pipeline.codec_v2.decode_row` does);
  CPU time because a shared machine stretches wall time (the JSON has both);
- ``enc/teacher``: encode tokens/s on one core over the teacher's forward tokens/s in this
  run, the forward taken at a full share of its threads (tokens x threads / CPU seconds;
  the wall figure and the share it got are printed). Above 1, one core of encoding keeps
  up with the teacher.

Default: the embedded teacher (``models/gemma3-270m``, float32 on the CPU) on the demo
corpus, 8,192 tokens in sequences of 256. ``--fast``: a random 2-layer model with 320
logits on random documents, a few seconds, for CI.

Codec settings are enumerated from ``codec_v2.MODES`` for top-64: every mode at its default
step and at twice it, and ``quantized`` at log-probability steps 1/8 and 1/4; the other
captures use their default (``codec_v2.default_mode``, as ``distill teacher-cache`` does).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from pipeline import codec_v2, models  # noqa: E402
from pipeline.capture import capture  # noqa: E402
from pipeline.capture_spec import CaptureSpec  # noqa: E402
from pipeline.codec_v2 import CodecSettings  # noqa: E402
from pipeline.config import DEFAULT_SHARD_TOKENS  # noqa: E402
from pipeline.data import PackedSequence, open_text_stream, pack_records, tokenize_records  # noqa: E402
from pipeline.manifest import Column  # noqa: E402
from pipeline.rows import SparseRow  # noqa: E402
from pipeline.store import layout, writer  # noqa: E402
from pipeline.teacher import HEAD_CHUNK_ELEMENTS  # noqa: E402

DEFAULT_TEACHER = "models/gemma3-270m"
DEFAULT_DATASET = "data/generated/pydoc/train.jsonl"
QUANTIZED_STEPS = (1 / 8, 1 / 4)
SEED = 0
# Targets from the codec issue.
TARGET_TOPK64_BYTES = 80.0
TARGET_TOPK64_KL = 1e-3
TARGET_SAMPLE32_BYTES = 24.0
TARGET_DECODE_TOKENS_PER_S = 200_000.0
# The random --fast teacher: sharp distributions (large init), as the tests' teacher.
FAST_LOGITS = 320
FAST_HIDDEN = 64


@dataclass(frozen=True)
class Case:
    """One capture spec with a short name for the table."""

    name: str
    params: str
    spec: CaptureSpec


def sampled(samples: int, logprobs: bool = False) -> CaptureSpec:
    return CaptureSpec("sample", k=None, samples=samples, sample_temperature=1.0, sample_logprobs=logprobs, seed=SEED)


CASES = (
    Case("topk", "k=64", CaptureSpec("topk", k=64)),
    Case("topk", "k=8", CaptureSpec("topk", k=8)),
    Case("topk", "k=16", CaptureSpec("topk", k=16)),
    Case("topk", "k=32", CaptureSpec("topk", k=32)),
    Case("topp", "p=0.99 max_k=64 min_k=1", CaptureSpec("topp", k=None, top_p=0.99, min_k=1, max_k=64)),
    Case("sample", "N=32", sampled(32)),
    Case("sample", "N=32 +logprobs", sampled(32, logprobs=True)),
    Case("sample", "N=50", sampled(50)),
    Case("hybrid", "k=8 N=24", CaptureSpec("hybrid", k=8, samples=24, sample_temperature=1.0, seed=SEED)),
)
TOPK64 = CASES[0]


def codec_variants() -> list[CodecSettings]:
    """Every mode in ``codec_v2.MODES`` at its default step and at twice it, and ``quantized`` at ``QUANTIZED_STEPS``.

    Read from the module at run time, so a mode added there is measured without editing this script.
    """
    variants: dict[str, CodecSettings] = {}
    for mode in codec_v2.MODES:
        default = CodecSettings.for_mode(mode)
        steps = [None] if default.step is None else [default.step, 2 * default.step]
        steps += list(QUANTIZED_STEPS) if mode == "quantized" else []
        for step in steps:
            settings = CodecSettings.for_mode(mode, step)
            if settings.problem() is None:
                variants.setdefault(json.dumps(settings.to_json(), sort_keys=True), settings)
    return sorted(variants.values(), key=lambda settings: (codec_v2.MODES.index(settings.mode), settings.step or 0))


def default_settings(spec: CaptureSpec) -> CodecSettings:
    """What ``distill teacher-cache`` uses for ``spec`` without codec flags: its default mode at that mode's step."""
    return CodecSettings.for_mode(codec_v2.default_mode(spec))


def settings_label(settings: CodecSettings) -> str:
    """``mode``, with its step (as ``1/n`` where it is one) when the mode has a step."""
    step = settings.step
    if step is None:
        return settings.mode
    inverse = 1 / step
    return f"{settings.mode} 1/{inverse:.0f}" if inverse == round(inverse) else f"{settings.mode} {step:g}"


def ratio(value: float) -> str:
    return f"{value:,.0f}x" if value >= 10 else f"{value:.2f}x"


# ---------------------------------------------------------------------------- teacher and tokens


def fast_teacher() -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(SEED)
    config = LlamaConfig(
        vocab_size=FAST_LOGITS,
        hidden_size=FAST_HIDDEN,
        intermediate_size=2 * FAST_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def fast_sequences(seq_len: int, count: int) -> list[PackedSequence]:
    """Random documents (ids 3..319, then EOS) packed as the teacher pass packs them."""
    rng = random.Random(SEED)

    def documents() -> Iterator[tuple[int, list[int]]]:
        record = 0
        while True:
            yield record, [1] + [rng.randrange(3, FAST_LOGITS) for _ in range(rng.randint(20, 120))] + [2]
            record += 1

    return list(pack_records(documents(), seq_len, count))


def corpus_sequences(source: models.Source, dataset: str, seq_len: int, count: int) -> list[PackedSequence]:
    tokenizer = models.load_tokenizer(source, "teacher")
    stream = open_text_stream(dataset)
    sequences = list(pack_records(tokenize_records(stream.documents, tokenizer), seq_len, count))
    if len(sequences) < count:
        raise SystemExit(
            f"--dataset {dataset} holds {len(sequences)} sequences of {seq_len}, not {count}; lower --tokens"
        )
    return sequences


# ---------------------------------------------------------------------------- one forward, every capture


@dataclass
class Clock:
    """Wall seconds and this process's CPU seconds (all threads), summed over the timed blocks.

    On a shared machine the wall time grows with the load; the CPU time much less, so the
    per-core figures come from the CPU time.
    """

    wall: float = 0.0
    cpu: float = 0.0

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        wall, cpu = time.perf_counter(), time.process_time()
        yield
        self.wall += time.perf_counter() - wall
        self.cpu += time.process_time() - cpu


@dataclass
class Captured:
    """Every case's rows, and how long the forward and each capture took."""

    rows: dict[str, list[SparseRow]]
    forward: Clock
    capture_s: dict[str, Clock]


def case_key(case: Case) -> str:
    return f"{case.name} {case.params}"


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@torch.inference_mode()
def run_teacher(
    head: models.LMHead, sequences: list[PackedSequence], batch_size: int, chunk_positions: int
) -> Captured:
    """Forward each batch once (backbone, then the LM head by chunks) and capture every case from the same logits."""
    seq_len = sequences[0].input_ids.shape[0]
    result = Captured({case_key(case): [] for case in CASES}, Clock(), {case_key(case): Clock() for case in CASES})
    for first in range(0, len(sequences), batch_size):
        batch = sequences[first : first + batch_size]
        input_ids = torch.from_numpy(np.stack([packed.input_ids for packed in batch]))
        progress(f"teacher: sequences {first + 1}-{first + len(batch)} of {len(sequences)}")
        with result.forward.running():
            hidden = head.hidden_states(input_ids).reshape(input_ids.numel(), -1)
        positions = first * seq_len + torch.arange(input_ids.numel(), dtype=torch.int64)
        parts: dict[str, list[dict[str, np.ndarray]]] = {case_key(case): [] for case in CASES}
        for start in range(0, hidden.shape[0], chunk_positions):
            with result.forward.running():
                logits = head.logits(hidden[start : start + chunk_positions])
            scratch = torch.empty_like(logits)
            for case in CASES:
                # Each capture overwrites its own copy of the logits, as the teacher pass lets it; the copy is untimed.
                scratch.copy_(logits)
                with result.capture_s[case_key(case)].running():
                    captured = capture(scratch, case.spec, positions[start : start + chunk_positions], overwrite=True)
                fields = {name: getattr(captured, name) for name in ("ids", "lengths", "logprobs", "tail_logmass")}
                fields["counts"] = captured.counts
                parts[case_key(case)].append({k: v.numpy().copy() for k, v in fields.items() if v is not None})
            del logits, scratch
        for key, chunks in parts.items():
            joined = {name: np.concatenate([chunk[name] for chunk in chunks]) for name in chunks[0]}
            for row, packed in enumerate(batch):
                window = slice(row * seq_len, (row + 1) * seq_len)
                result.rows[key].append(
                    SparseRow(
                        input_ids=packed.input_ids,
                        ids=joined["ids"][window],
                        logprobs=joined["logprobs"][window] if "logprobs" in joined else None,
                        tail_logmass=joined["tail_logmass"][window] if "tail_logmass" in joined else None,
                        counts=joined["counts"][window] if "counts" in joined else None,
                        lengths=joined["lengths"][window] if "lengths" in joined else None,
                    )
                )
    return result


# ---------------------------------------------------------------------------- reconstruction error (pure)


def _by_id(row: SparseRow, width: int) -> tuple[np.ndarray, np.ndarray]:
    """``(T, width)`` slot order putting valid slots ascending by id first, and the valid mask after it."""
    valid = row.valid()
    order = np.argsort(np.where(valid, row.ids, np.iinfo(np.int64).max), axis=1, kind="stable")[:, :width]
    return order, np.take_along_axis(valid, order, axis=1)


def _bucket_kl(p_log: np.ndarray, q_log: np.ndarray) -> np.ndarray:
    """``(T,)`` KL(p || q) of ``(T, B)`` log-weights, each row renormalised; ``-inf`` weights are empty buckets."""
    p_log = p_log - np.logaddexp.reduce(p_log, axis=1, keepdims=True)
    q_log = q_log - np.logaddexp.reduce(q_log, axis=1, keepdims=True)
    p = np.exp(p_log)
    with np.errstate(invalid="ignore"):
        terms = np.where(p > 0, p * (p_log - q_log), 0.0)
    return terms.sum(axis=1)


def reconstruction_kl(captured: SparseRow, decoded: SparseRow, samples: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Per-position KL on log-probability buckets and on ``counts / samples`` (empty arrays where not stored).

    Entries are matched by id, so the decoder's reordering does not matter; the id sets
    and the lengths must come back exactly, or this raises.
    """
    width = decoded.width
    order_c, valid_c = _by_id(captured, width)
    order_d, valid_d = _by_id(decoded, width)
    ids_c = np.take_along_axis(captured.ids, order_c, axis=1)
    ids_d = np.take_along_axis(decoded.ids, order_d, axis=1)
    if not (np.array_equal(valid_c, valid_d) and np.array_equal(ids_c[valid_c], ids_d[valid_d])):
        raise AssertionError("decoded ids differ from the captured ids")
    if captured.valid().sum() != valid_c.sum():
        raise AssertionError("the decoded row is narrower than the captured one")
    kl_logprobs = kl_counts = np.zeros(0)
    if captured.logprobs is not None:
        tails = [captured.tail_logmass.astype(np.float64)[:, None], decoded.tail_logmass.astype(np.float64)[:, None]]
        p = np.where(valid_c, np.take_along_axis(captured.logprobs.astype(np.float64), order_c, axis=1), -np.inf)
        q = np.where(valid_d, np.take_along_axis(decoded.logprobs.astype(np.float64), order_d, axis=1), -np.inf)
        kl_logprobs = _bucket_kl(np.concatenate([p, tails[0]], axis=1), np.concatenate([q, tails[1]], axis=1))
    if captured.counts is not None:
        sampled_c = valid_c & (np.take_along_axis(captured.counts, order_c, axis=1) > 0)
        with np.errstate(divide="ignore"):
            p = np.log(np.take_along_axis(captured.counts, order_c, axis=1) / samples)
            q = np.log(np.take_along_axis(decoded.counts, order_d, axis=1) / samples)
        kl_counts = _bucket_kl(np.where(sampled_c, p, -np.inf), np.where(sampled_c, q, -np.inf))
    return kl_logprobs, kl_counts


# ---------------------------------------------------------------------------- encode, write, decode


def timed_passes(fn: Callable[[], object], repeats: int) -> Clock:
    """Median wall and CPU seconds of ``repeats`` calls of ``fn``."""
    clocks = []
    for _ in range(repeats):
        clocks.append(Clock())
        with clocks[-1].running():
            fn()
    return Clock(statistics.median(c.wall for c in clocks), statistics.median(c.cpu for c in clocks))


def write_shards(folder: Path, case: Case, settings: CodecSettings, sequences, frames, rows_per_shard: int) -> int:
    """Write the encoded rows as ``distill teacher-cache`` does; return the shard files' total bytes."""
    registry = [Column(**column) for column in codec_v2.columns(case.spec, settings)]
    schema = layout.schema_v2(registry, settings.label)
    seq_len = sequences[0].input_ids.shape[0]
    with writer.ShardWriter(folder, rows_per_shard, schema=schema) as shard_writer:
        for seq_index, (packed, row_frames) in enumerate(zip(sequences, frames)):
            cells: dict[str, bytes | int] = {**row_frames}
            cells["source_record"] = packed.source_record
            cells["record_offset"] = packed.record_offset
            shard_writer.add(seq_index, cells, seq_len)
    return sum(entry.bytes for entry in shard_writer.shards)


def measure(
    case: Case,
    settings: CodecSettings,
    rows: list[SparseRow],
    sequences: list[PackedSequence],
    width: int,
    folder: Path,
    rows_per_shard: int,
    repeats: int,
) -> dict[str, Any]:
    """Encode, time, write, decode and compare one capture's rows under one codec setting."""
    spec = case.spec
    seq_len = rows[0].input_ids.shape[0]
    tokens = seq_len * len(rows)
    frames = [codec_v2.encode_row(row, spec, settings) for row in rows]
    encode_s = timed_passes(lambda: [codec_v2.encode_row(row, spec, settings) for row in rows], repeats)
    decoded = [codec_v2.decode_row(f, seq_len, spec, settings, width) for f in frames]
    decode_s = timed_passes(lambda: [codec_v2.decode_row(f, seq_len, spec, settings, width) for f in frames], repeats)
    shard_bytes = write_shards(folder, case, settings, sequences, frames, rows_per_shard)

    def column_bytes(*names: str) -> int:
        return sum(len(row_frames[name]) for row_frames in frames for name in names if name in row_frames)

    ids_bytes = column_bytes("ids")
    value_bytes = column_bytes("logprobs", "counts")
    rest_bytes = column_bytes("input_ids", "lengths", "tail_logmass") + 16 * len(rows)  # two int64 provenance cells
    entries = int(sum(row.valid().sum() for row in rows))
    kl = [reconstruction_kl(c, d, spec.samples) for c, d in zip(rows, decoded)]
    kl_logprobs = np.concatenate([part[0] for part in kl])
    kl_counts = np.concatenate([part[1] for part in kl])
    return {
        "strategy": case.name,
        "params": case.params,
        "capture": spec.to_json(),
        "codec": settings.to_json(),
        "codec_label": settings_label(settings),
        "default_codec": settings == default_settings(spec),
        "tokens": tokens,
        "ids_per_position": entries / tokens,
        "bytes_per_token": {
            "ids": ids_bytes / tokens,
            "values": value_bytes / tokens,
            "rest": rest_bytes / tokens,
            "arrow": (shard_bytes - ids_bytes - value_bytes - rest_bytes) / tokens,
            "total": shard_bytes / tokens,
        },
        "column_bytes_per_token": {name: column_bytes(name) / tokens for name in frames[0]},
        "bytes_per_entry": (ids_bytes + value_bytes) / entries,
        "kl_logprobs": float(kl_logprobs.mean()) if kl_logprobs.size else None,
        "kl_logprobs_max": float(kl_logprobs.max()) if kl_logprobs.size else None,
        "kl_counts": float(kl_counts.mean()) if kl_counts.size else None,
        "encode_tokens_per_s": tokens / encode_s.cpu,
        "decode_tokens_per_s": tokens / decode_s.cpu,
        "encode_tokens_per_s_wall": tokens / encode_s.wall,
        "decode_tokens_per_s_wall": tokens / decode_s.wall,
    }


# ---------------------------------------------------------------------------- report


def _kl(value: float | None) -> str:
    if value is None:
        return "-"
    return "0" if value == 0 else f"{value:.1e}"


def table(results: list[dict[str, Any]], teacher_tokens_per_s: float) -> str:
    """The results as a Markdown table; ``enc/teacher`` is encode tokens/s over ``teacher_tokens_per_s``."""
    header = (
        "| strategy | parameters | codec | ids/pos | ids B/tok | values B/tok | rest B/tok | Arrow B/tok "
        "| **total B/tok** | B/entry | KL lp | KL t | encode tok/s | decode tok/s | enc/teacher |"
    )
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    for result in results:
        size = result["bytes_per_token"]
        default = " (default)" if result["default_codec"] else ""
        lines.append(
            f"| {result['strategy']} | {result['params']} | {result['codec_label']}{default} "
            f"| {result['ids_per_position']:.1f} | {size['ids']:.1f} | {size['values']:.1f} | {size['rest']:.1f} "
            f"| {size['arrow']:.1f} | **{size['total']:.1f}** | {result['bytes_per_entry']:.2f} "
            f"| {_kl(result['kl_logprobs'])} | {_kl(result['kl_counts'])} "
            f"| {result['encode_tokens_per_s']:,.0f} | {result['decode_tokens_per_s']:,.0f} "
            f"| {ratio(result['encode_tokens_per_s'] / teacher_tokens_per_s)} |"
        )
    return "\n".join(lines)


def targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each target of the codec issue, judged on this run's default-settings rows (top-64: every mode listed)."""
    found = []
    for result in results:
        if (result["strategy"], result["params"]) == (TOPK64.name, TOPK64.params):
            total, kl = result["bytes_per_token"]["total"], result["kl_logprobs"]
            found.append(
                {
                    "target": f"top-64 ({result['codec_label']}): <= {TARGET_TOPK64_BYTES:g} B/token "
                    f"with recon KL <= {TARGET_TOPK64_KL:g}",
                    "measured": f"{total:.1f} B/token, KL {kl:.1e}",
                    "met": total <= TARGET_TOPK64_BYTES and kl <= TARGET_TOPK64_KL,
                }
            )
    for result in results:
        if not result["default_codec"]:
            continue
        if (result["strategy"], result["params"]) == ("sample", "N=32"):
            total = result["bytes_per_token"]["total"]
            found.append(
                {
                    "target": f"sampled N=32 without log-probs: <= {TARGET_SAMPLE32_BYTES:g} B/token",
                    "measured": f"{total:.1f} B/token",
                    "met": total <= TARGET_SAMPLE32_BYTES,
                }
            )
        if (result["strategy"], result["params"]) == (TOPK64.name, TOPK64.params):
            speed = result["decode_tokens_per_s"]
            found.append(
                {
                    "target": f"decode top-64 ({result['codec_label']}): "
                    f">= {TARGET_DECODE_TOKENS_PER_S:,.0f} tokens/s on one core",
                    "measured": f"{speed:,.0f} tokens/s",
                    "met": speed >= TARGET_DECODE_TOKENS_PER_S,
                }
            )
    return found


def codec_state() -> dict[str, Any]:
    """What codec was measured: its modes and defaults, and the sha256 of ``codec_v2.py`` (first 12 hex digits)."""
    source = Path(codec_v2.__file__).read_bytes()
    return {
        "codec": CodecSettings.for_mode(codec_v2.MODES[0]).label,
        "modes": list(codec_v2.MODES),
        "default_mode": {case.spec.strategy: codec_v2.default_mode(case.spec) for case in CASES},
        "codec_v2_py_sha256": hashlib.sha256(source).hexdigest()[:12],
    }


# ---------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="random tiny teacher and random tokens (seconds)")
    parser.add_argument("--teacher", default=None, help=f"teacher folder (default {DEFAULT_TEACHER})")
    parser.add_argument("--dataset", default=None, help=f"text dataset (default {DEFAULT_DATASET})")
    parser.add_argument("--tokens", type=int, default=None, help="tokens to capture (default 8192; --fast 512)")
    parser.add_argument("--seq-len", type=int, default=None, help="default 256; --fast 64")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes over all rows; the median is reported")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.fast and (args.teacher or args.dataset):
        parser.error("--fast uses a random teacher on random tokens; drop --teacher and --dataset")
    args.seq_len = args.seq_len or (64 if args.fast else 256)
    args.tokens = args.tokens or (512 if args.fast else 8192)
    if args.tokens < args.seq_len:
        parser.error(f"--tokens {args.tokens} is less than one sequence of --seq-len {args.seq_len}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    models.quiet_transformers()
    count = args.tokens // args.seq_len
    if args.fast:
        model, teacher_name = fast_teacher(), "random 2-layer Llama"
        sequences = fast_sequences(args.seq_len, count)
    else:
        teacher_path = args.teacher or DEFAULT_TEACHER
        source = models.resolve_source(teacher_path, "teacher")
        model = models.load_teacher(source, torch.float32, torch.device("cpu"))
        teacher_name = teacher_path
        sequences = corpus_sequences(source, args.dataset or DEFAULT_DATASET, args.seq_len, count)
    width = models.logit_width(model.config)
    head = models.LMHead(model)
    head.check_parity(torch.from_numpy(sequences[0].input_ids[None, : min(args.seq_len, 32)]))
    threads = torch.get_num_threads()
    captured = run_teacher(head, sequences, args.batch_size, max(1, HEAD_CHUNK_ELEMENTS // width))
    tokens = len(sequences) * args.seq_len
    forward = captured.forward
    teacher = {
        "wall": tokens / forward.wall,
        "cpu_share": forward.cpu / (forward.wall * threads),
        "at_full_share": tokens * threads / forward.cpu,
    }

    rows_per_shard = max(1, DEFAULT_SHARD_TOKENS // args.seq_len)
    results = []
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-codec-") as scratch:
            for case in CASES:
                rows = captured.rows[case_key(case)]
                for settings in codec_variants() if case is TOPK64 else [default_settings(case.spec)]:
                    progress(f"codec: {case_key(case)}, {settings_label(settings)}")
                    folder = Path(scratch) / f"{len(results):02d}"
                    folder.mkdir()
                    results.append(
                        measure(case, settings, rows, sequences, width, folder, rows_per_shard, args.repeats)
                    )
    finally:
        torch.set_num_threads(threads)  # leave the caller's setting as it was (the smoke test runs in-process)

    report = {
        "setup": {
            "teacher": teacher_name,
            "logit_width": width,
            "dataset": "random documents" if args.fast else (args.dataset or DEFAULT_DATASET),
            "tokens": tokens,
            "seq_len": args.seq_len,
            "batch_size": args.batch_size,
            "rows_per_shard": rows_per_shard,
            "teacher_threads": threads,
            "codec_threads": 1,
            "repeats": args.repeats,
            "torch": torch.__version__,
            **codec_state(),
        },
        "teacher_forward_tokens_per_s": teacher,
        "capture_tokens_per_s": {key: tokens / clock.wall for key, clock in captured.capture_s.items()},
        "results": results,
    }
    report["targets"] = targets(results)
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


def print_report(report: dict[str, Any]) -> None:
    setup = report["setup"]
    print(
        f"teacher {setup['teacher']} ({setup['logit_width']:,} logits), {setup['dataset']}, "
        f"{setup['tokens']:,} tokens in sequences of {setup['seq_len']}, torch {setup['torch']}"
    )
    print(
        f"codec {setup['codec']}, modes {', '.join(setup['modes'])}, default mode by capture {setup['default_mode']}; "
        f"codec_v2.py sha256 {setup['codec_v2_py_sha256']}"
    )
    teacher = report["teacher_forward_tokens_per_s"]
    print(
        f"teacher forward on {setup['teacher_threads']} thread(s): {teacher['wall']:,.1f} tokens/s wall, "
        f"{teacher['cpu_share']:.0%} of its threads' time on a CPU, so {teacher['at_full_share']:,.1f} tokens/s "
        f"at a full share (enc/teacher divides by this); encode/decode: 1 thread, CPU time, median of "
        f"{setup['repeats']}\n"
    )
    print(table(report["results"], teacher["at_full_share"]))
    print("\ncapture (each spec on its own copy of the same logits, in place), tokens/s wall:")
    for key, speed in report["capture_tokens_per_s"].items():
        print(f"  {key:<28} {speed:,.0f}")
    print("\ntargets:")
    for target in report["targets"]:
        print(f"  {'met   ' if target['met'] else 'MISSED'} {target['target']}: {target['measured']}")


if __name__ == "__main__":
    main()
