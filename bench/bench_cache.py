"""Side-by-side benchmarks: each figure is a ratio of two things measured in the same run.

    python bench/bench_cache.py [--teacher models/gemma3-270m] [--student data/student-gemma3-tiny]

1. Teacher pass vs a bare teacher forward on the same batches: throughput ratio, and the
   extra memory each needs over the loaded model (peak RSS sampled every 5 ms).
2. Bytes per token of the encoded cache rows at the chosen k.
3. Student step from the cache (KD + CE, alpha 0.5) vs plain cross-entropy training of the
   same student on the same batch (the usual ``model(ids, labels=ids).loss``): step time
   and extra memory.
4. The fused folded log-softmax vs the same quantities composed from torch ops.

Without the converted default teacher it falls back to a random model from a config with
the same vocabulary size. Runs are interleaved (A, B, A, B, ...) and the median is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from pipeline import codec_v2, models
from pipeline.cache import stack_rows
from pipeline.capture import capture_topk
from pipeline.capture_spec import CaptureSpec
from pipeline.losses import distillation_parts
from pipeline.row_writer import RowEncoder
from pipeline.student import train_step_loss
from pipeline.teacher import HEAD_CHUNK_ELEMENTS, capture_batch

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * PAGE


class PeakRSS:
    """Peak resident memory above the level at entry, sampled by a thread."""

    def __enter__(self) -> PeakRSS:
        self.base = rss_bytes()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.005)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def extra(self) -> int:
        return self.peak - self.base


def interleave(first, second, repeats: int) -> tuple[list[float], list[float], int, int]:
    """Time ``first`` and ``second`` alternately; return both time lists and peak extra memory."""
    times_a, times_b, mem_a, mem_b = [], [], 0, 0
    for _ in range(repeats):
        for fn, times, which in ((first, times_a, "a"), (second, times_b, "b")):
            with PeakRSS() as peak:
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            if which == "a":
                mem_a = max(mem_a, peak.extra)
            else:
                mem_b = max(mem_b, peak.extra)
    return times_a, times_b, mem_a, mem_b


def load_teacher(spec: str | None, vocab: int) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    if spec and Path(spec).exists():
        return AutoModelForCausalLM.from_pretrained(spec, dtype=torch.float32).eval()
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
    )
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def bench_teacher(model: torch.nn.Module, batch: torch.Tensor, k: int, repeats: int) -> dict:
    head = models.LMHead(model)
    width = models.logit_width(model.config)
    chunk = max(1, HEAD_CHUNK_ELEMENTS // width)
    encoded_bytes = []
    spec = CaptureSpec(strategy="topk", k=k)
    settings = codec_v2.CodecSettings.for_mode(codec_v2.default_mode(spec))
    sequences = [
        SimpleNamespace(source_record=0, record_offset=0, target_mask=None, document_starts=None)
        for _ in range(batch.shape[0])
    ]

    def teacher_pass() -> None:
        """Forward, capture and encode (on the pass's encoder threads), as the teacher pass does."""
        rows, stats = capture_batch(head, batch, spec, 0, chunk)
        with RowEncoder(spec, settings) as encoder:
            encoded = [row.cells() for row in encoder.encode(0, sequences, rows, stats)]
        encoded_bytes.clear()
        encoded_bytes.extend(sum(len(c) for c in cells.values() if isinstance(c, bytes)) for cells in encoded)

    @torch.inference_mode()
    def bare_forward() -> None:
        model(input_ids=batch, use_cache=False).logits.sum()

    with torch.inference_mode():
        bare_forward()  # warm-up
    times_pass, times_bare, mem_pass, mem_bare = interleave(teacher_pass, bare_forward, repeats)
    tokens = batch.numel()
    return {
        "tokens_per_batch": tokens,
        "bare_forward_s": statistics.median(times_bare),
        "teacher_pass_s": statistics.median(times_pass),
        "throughput_ratio": statistics.median(times_bare) / statistics.median(times_pass),
        "bare_forward_extra_mib": mem_bare / 2**20,
        "teacher_pass_extra_mib": mem_pass / 2**20,
        "memory_ratio": mem_pass / max(mem_bare, 1),
        "bytes_per_token": sum(encoded_bytes) / tokens,
    }


def bench_student(student_spec: str, teacher: torch.nn.Module, batch: torch.Tensor, k: int, repeats: int) -> dict:
    student, _ = models.load_student(student_spec, {}, torch.device("cpu"))
    head = models.LMHead(student)
    width = models.logit_width(student.config)
    teacher_head = models.LMHead(teacher)
    rows, _ = capture_batch(
        teacher_head, batch, CaptureSpec(strategy="topk", k=k), 0, max(1, HEAD_CHUNK_ELEMENTS // width)
    )
    cached = stack_rows(rows)
    from pipeline.evaluate import head_chunk_positions

    chunk = head_chunk_positions(width)

    def kd_step() -> None:
        train_step_loss(head, cached, 0.5, 1.0, chunk, 1.0, None)
        student.zero_grad(set_to_none=True)

    def ce_step() -> None:
        student(input_ids=batch, labels=batch).loss.backward()
        student.zero_grad(set_to_none=True)

    ce_step()
    kd_step()
    times_kd, times_ce, mem_kd, mem_ce = interleave(kd_step, ce_step, repeats)
    return {
        "plain_ce_step_s": statistics.median(times_ce),
        "kd_step_s": statistics.median(times_kd),
        "step_time_ratio": statistics.median(times_kd) / statistics.median(times_ce),
        "plain_ce_extra_mib": mem_ce / 2**20,
        "kd_extra_mib": mem_kd / 2**20,
        "memory_ratio": mem_kd / max(mem_ce, 1),
    }


def bench_loss_kernel(vocab: int, positions: int, k: int, repeats: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    teacher = torch.randn(positions, vocab, generator=generator) * 3
    ids, logprobs, tail = capture_topk(teacher, k)
    logits = torch.randn(positions, vocab, generator=generator).requires_grad_(True)
    labels = torch.randint(0, vocab, (positions,), generator=generator)

    def fused() -> None:
        parts = distillation_parts(logits, labels, ids, logprobs, tail)
        (parts.kd_sum + parts.ce_sum).backward()
        logits.grad = None

    def composed() -> None:
        log_normalizer = torch.logsumexp(logits, -1, keepdim=True)
        captured = logits.gather(-1, ids) - log_normalizer
        rest = torch.logsumexp(logits.scatter(-1, ids, float("-inf")), -1, keepdim=True) - log_normalizer
        student = torch.cat([captured, rest], -1)
        teacher_b = torch.log_softmax(torch.cat([logprobs, tail.unsqueeze(-1)], -1), -1)
        kl = (teacher_b.exp() * (teacher_b - student)).sum()
        ce = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
        (kl + ce).backward()
        logits.grad = None

    del teacher
    fused()
    composed()
    times_fused, times_composed, mem_fused, mem_composed = interleave(fused, composed, repeats)
    return {
        "positions": positions,
        "composed_s": statistics.median(times_composed),
        "fused_s": statistics.median(times_fused),
        "speedup": statistics.median(times_composed) / statistics.median(times_fused),
        "composed_extra_mib": mem_composed / 2**20,
        "fused_extra_mib": mem_fused / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="models/gemma3-270m")
    parser.add_argument("--student", default="data/student-gemma3-tiny")
    parser.add_argument("--vocab", type=int, default=262144, help="vocabulary of the fallback random teacher")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    models.quiet_transformers()
    teacher = load_teacher(args.teacher, args.vocab)
    width = models.logit_width(teacher.config)
    batch = torch.randint(3, min(width, 32000), (args.batch, args.seq_len))
    results = {
        "setup": {
            "teacher": args.teacher if Path(args.teacher).exists() else f"random Llama, vocab {args.vocab}",
            "student": args.student,
            "batch": args.batch,
            "seq_len": args.seq_len,
            "k": args.top_k,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "teacher_pass": bench_teacher(teacher, batch, args.top_k, args.repeats),
        "student_step": bench_student(args.student, teacher, batch, args.top_k, args.repeats),
        "loss_kernel": bench_loss_kernel(width, 512, args.top_k, args.repeats),
    }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
