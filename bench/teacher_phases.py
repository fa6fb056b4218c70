"""Where the teacher pass's time goes on CPU: backbone forward, LM head, capture, encode, write.

    python bench/teacher_phases.py [--teacher models/gemma3-270m] [--batch 4] [--seq-len 256] [--repeats 3]

Each phase runs as the pass runs it, on the same batches: the backbone once per batch,
then per chunk of positions the LM head's logits and the top-64 capture (which measures
the per-row statistics on the way, :mod:`pipeline.row_stats`); then each row's
encoding (one thread, as one encoder worker does) and the shard write (Arrow IPC, fsync,
sha256). The figures are each phase's share of the sum, medians over ``--repeats``
interleaved runs, so they hold on a noisy shared machine; the absolute seconds are
printed beside them for orientation only. The same batches also run with the row
statistics off (``--no-row-stats``), interleaved, and their cost is reported as the ratio
of the two passes' times. Without the converted default teacher it uses
a random model of the same shape from its config.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pipeline import codec_v2, models
from pipeline.capture import capture
from pipeline.capture_spec import CaptureSpec
from pipeline.manifest import Column
from pipeline.rows import SparseRow
from pipeline.store import layout, writer
from pipeline.teacher import HEAD_CHUNK_ELEMENTS

PHASES = ("backbone forward", "LM head", "capture", "encode", "write")


def load_teacher(spec: str) -> torch.nn.Module:
    path = Path(spec)
    if (path / "config.json").is_file() and models.has_weights(path):
        model, _ = models.load_student(spec, {}, torch.device("cpu"))
        return model.eval()
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(spec) if (path / "config.json").is_file() else None
    if config is None:
        raise SystemExit(f"{spec}: no model here; run ACCEPT_GEMMA_TERMS=1 make teacher-cache first")
    return AutoModelForCausalLM.from_config(config).eval()


@torch.inference_mode()
def one_run(
    head: models.LMHead, input_ids: torch.Tensor, spec: CaptureSpec, folder: Path, measure: bool = True
) -> dict[str, float]:
    """Seconds of each phase for one batch, run as the teacher pass runs them."""
    seconds = dict.fromkeys(PHASES, 0.0)
    batch, seq_len = input_ids.shape
    started = time.perf_counter()
    hidden = head.hidden_states(input_ids).reshape(batch * seq_len, -1)
    seconds["backbone forward"] = time.perf_counter() - started
    chunk = max(1, HEAD_CHUNK_ELEMENTS // models.logit_width(head.model.config))
    positions = torch.arange(batch * seq_len, dtype=torch.int64)
    parts = []
    for start in range(0, hidden.shape[0], chunk):
        clock = time.perf_counter()
        logits = head.logits(hidden[start : start + chunk])
        seconds["LM head"] += time.perf_counter() - clock
        clock = time.perf_counter()
        parts.append(capture(logits, spec, positions[start : start + chunk], overwrite=True, measure=measure))
        seconds["capture"] += time.perf_counter() - clock
        del logits
    ids = torch.cat([part.ids for part in parts]).numpy()
    logprobs = torch.cat([part.logprobs for part in parts]).numpy()
    tail = torch.cat([part.tail_logmass for part in parts]).numpy()
    settings = codec_v2.CodecSettings.for_mode(codec_v2.default_mode(spec))
    clock = time.perf_counter()
    encoded = []
    for row in range(batch):
        window = slice(row * seq_len, (row + 1) * seq_len)
        sparse = SparseRow(
            input_ids=input_ids[row].numpy(), ids=ids[window], logprobs=logprobs[window], tail_logmass=tail[window]
        )
        encoded.append(codec_v2.encode_row(sparse, spec, settings))
    seconds["encode"] = time.perf_counter() - clock
    columns = codec_v2.columns(spec, settings, provenance=False)
    schema = layout.schema_v2([Column(**column) for column in columns], settings.label)
    folder.mkdir(parents=True)
    clock = time.perf_counter()
    with writer.ShardWriter(folder, batch, schema=schema) as shards:
        for row, cells in enumerate(encoded):
            shards.add(row, cells, seq_len)
    seconds["write"] = time.perf_counter() - clock
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default="models/gemma3-270m")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args(argv)
    models.quiet_transformers()
    model = load_teacher(args.teacher)
    head = models.LMHead(model)
    width = models.logit_width(model.config)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, width, (args.batch, args.seq_len), generator=generator)
    spec = CaptureSpec("topk", k=64)
    runs, plain = [], []
    with tempfile.TemporaryDirectory() as work:
        one_run(head, input_ids, spec, Path(work) / "warm-up")
        for repeat in range(args.repeats):
            runs.append(one_run(head, input_ids, spec, Path(work) / f"run-{repeat}"))
            plain.append(one_run(head, input_ids, spec, Path(work) / f"plain-{repeat}", measure=False))
    ratio = statistics.median(sum(b.values()) / sum(a.values()) for a, b in zip(runs, plain))
    shares = {phase: statistics.median(run[phase] / sum(run.values()) for run in runs) for phase in PHASES}
    medians = {phase: statistics.median(run[phase] for run in runs) for phase in PHASES}
    tokens = args.batch * args.seq_len
    print(
        f"teacher {args.teacher} ({width} logits), {tokens} tokens per batch, top-64, {torch.get_num_threads()} threads"
    )
    print("| phase | share of the pass | median seconds per batch |")
    print("|---|---:|---:|")
    for phase in PHASES:
        print(f"| {phase} | {100 * shares[phase]:.1f}% | {medians[phase]:.3f} |")
    print(f"pass with row statistics vs without (--no-row-stats), same batches: {ratio:.2f}x throughput")
    if args.json:
        figures = {"shares": shares, "seconds": medians, "tokens": tokens, "row_stats_throughput_ratio": ratio}
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
