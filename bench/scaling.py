"""How both passes scale: processes (torchrun), data size, and peak memory.

    python bench/scaling.py                 # about 10 minutes on a 2-core CPU
    python bench/scaling.py --fast          # seconds: the smoke test
    python bench/scaling.py --json out.json

Every run is a real command (``torchrun -m pipeline teacher-cache`` / ``student-train``)
in a child process, one thread per process (``OMP_NUM_THREADS=1``), on the same data:

- **processes**: the teacher pass and the student pass at 1 and at 2 processes. The
  teacher pass writes the same cache (checked byte for byte); the student pass trains the
  same steps on the same global batch (1 process x batch 2B against 2 x B). Reported as
  the 2-process throughput over the 1-process one (2.0 is perfect on 2 free cores).
- **data size**: the teacher pass on 1x, 2x, 5x and 10x the tokens, one process: seconds per
  token relative to 1x (1.0 everywhere is linear) and each run's peak resident memory
  relative to 1x (flat is 1.0).

The teacher is a random Llama from its config (width 256, 4 layers, a byte-level BPE of
8,192 ids trained on the demo corpus), the student one of half its width. Wall times
include each command's start (imports, model load), which is what a user waits for; the
figures are ratios of runs made one after the other in this one invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # the demo corpus and its tokenizer


@dataclass(frozen=True)
class Budget:
    base_tokens: int  # the 1x of the data-size series
    sizes: tuple[int, ...]  # multiples of base_tokens
    process_tokens: int  # tokens of the 1-vs-2-process teacher runs
    seq_len: int
    vocab: int
    width: int
    layers: int
    student_steps: int
    student_batch: int  # per process at 2 processes; the 1-process run takes twice this


FULL = Budget(16_384, (1, 2, 5, 10), 65_536, 128, 8192, 256, 4, 60, 4)
FAST = Budget(1_024, (1, 2), 2_048, 32, 512, 32, 1, 4, 2)


def set_up(work: Path, budget: Budget) -> tuple[Path, Path, Path]:
    """The teacher folder (random weights, tokenizer), the training text, the student's config folder."""
    from transformers import AutoModelForCausalLM

    train = _corpus(work)
    tokenizer = quality.train_tokenizer(work / "tokenizer", quality.documents(train), budget.vocab)
    teacher_dir = work / "teacher"
    config = quality.llama_config(budget.vocab, budget.width, budget.layers, budget.seq_len, tokenizer)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(str(teacher_dir))
    tokenizer.save_pretrained(str(teacher_dir))
    student_dir = work / "student"
    half = (budget.width // 2, max(1, budget.layers // 2))
    student = quality.llama_config(budget.vocab, *half, budget.seq_len, tokenizer)
    student.save_pretrained(str(student_dir))
    return teacher_dir, train, student_dir


def _corpus(work: Path) -> Path:
    """The demo corpus (written once under data/generated), repeated until it holds enough text."""
    source = quality.CORPUS / "train.jsonl"
    if not source.exists():
        from pipeline.demo import write_corpus

        write_corpus(quality.CORPUS)
    texts = quality.documents(source)
    repeated = work / "train.jsonl"
    with open(repeated, "w", encoding="utf-8") as handle:
        for copy in range(8):  # enough for the 10x run
            for text in texts:
                handle.write(json.dumps({"text": f"{copy} {text}"}) + "\n")
    return repeated


def timed(nproc: int, args: list[str]) -> dict[str, float]:
    """Run ``torchrun -m pipeline ARGS`` on ``nproc`` processes (1 thread each): wall seconds and the
    largest resident memory of any one process (MiB)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    command += ["-m", "pipeline", "-q", *args]
    # A wrapper process reports its children's peak RSS (ru_maxrss of RUSAGE_CHILDREN: the largest one).
    wrapper = (
        "import resource, subprocess, sys, json, time; start = time.perf_counter(); "
        "code = subprocess.run(sys.argv[1:]).returncode; seconds = time.perf_counter() - start; "
        "print(json.dumps({'code': code, 'seconds': seconds, "
        "'peak_mib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))"
    )
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, "-c", wrapper, *command], capture_output=True, text=True, env=environment)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    if report["code"] != 0:
        raise RuntimeError(f"{' '.join(args[:1])} failed:\n{result.stderr[-3000:]}")
    return {"seconds": report["seconds"], "peak_mib": report["peak_mib"]}


def teacher_args(teacher: Path, dataset: Path, out: Path, tokens: int, budget: Budget) -> list[str]:
    return [
        "teacher-cache", "--teacher", str(teacher), "--dataset", str(dataset), "--out", str(out),
        "--seq-len", str(budget.seq_len), "--max-tokens", str(tokens), "--batch-size", "8", "--top-k", "64",
        "--shard-tokens", str(budget.seq_len * 64),
    ]  # fmt: skip


def stream_seconds(teacher: Path, dataset: Path, tokens: int, seq_len: int) -> float:
    """Seconds to tokenize and pack ``tokens`` tokens of the dataset, as every rank does for the whole stream."""
    from transformers import AutoTokenizer

    from pipeline.data import pack_records, tokenize_records

    tokenizer = AutoTokenizer.from_pretrained(str(teacher))
    texts = quality.documents(dataset)
    start = time.perf_counter()
    for _ in pack_records(tokenize_records(texts, tokenizer), seq_len, tokens // seq_len):
        pass
    return time.perf_counter() - start


def cache_bytes(cache: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in [*sorted(cache.glob("shard-*.arrow")), cache / "manifest.json"]}


def processes(work: Path, teacher: Path, dataset: Path, student: Path, budget: Budget) -> dict[str, Any]:
    """Teacher and student pass at 1 and 2 processes, one after the other on the same inputs."""
    results: dict[str, Any] = {}
    runs = {}
    for nproc in (1, 2):
        out = work / f"cache-{nproc}p"
        runs[nproc] = timed(nproc, teacher_args(teacher, dataset, out, budget.process_tokens, budget))
        quality.log(f"teacher pass, {nproc} process(es): {runs[nproc]['seconds']:.1f} s")
    same = cache_bytes(work / "cache-1p") == cache_bytes(work / "cache-2p")
    tokenizing = stream_seconds(teacher, dataset, budget.process_tokens, budget.seq_len)
    results["teacher"] = {
        "tokens": budget.process_tokens,
        "tokenize_seconds": tokenizing,
        "tokenize_share_of_1p": tokenizing / runs[1]["seconds"],
        "seconds": {str(n): runs[n]["seconds"] for n in runs},
        "throughput_2p_over_1p": runs[1]["seconds"] / runs[2]["seconds"],
        "same_bytes": same,
    }
    student_runs = {}
    for nproc, batch in ((1, 2 * budget.student_batch), (2, budget.student_batch)):
        out = work / f"student-{nproc}p"
        args = [
            "student-train", "--cache", str(work / "cache-1p"), "--student", str(student), "--out", str(out),
            "--batch-size", str(batch), "--max-steps", str(budget.student_steps), "--log-every", "1",
        ]  # fmt: skip
        student_runs[nproc] = timed(nproc, args)
        training = json.loads((out / "training.json").read_text())
        student_runs[nproc]["train_seconds"] = training["seconds"]
        student_runs[nproc]["final_loss"] = training["final"]["loss"]
        quality.log(f"student pass, {nproc} process(es): {student_runs[nproc]['seconds']:.1f} s")
    results["student"] = {
        "steps": budget.student_steps,
        "global_batch": 2 * budget.student_batch,
        "seconds": {str(n): student_runs[n]["seconds"] for n in student_runs},
        "train_seconds": {str(n): student_runs[n]["train_seconds"] for n in student_runs},
        "final_loss": {str(n): student_runs[n]["final_loss"] for n in student_runs},
        "throughput_2p_over_1p": student_runs[1]["seconds"] / student_runs[2]["seconds"],
        "train_throughput_2p_over_1p": student_runs[1]["train_seconds"] / student_runs[2]["train_seconds"],
    }
    return results


def data_size(work: Path, teacher: Path, dataset: Path, budget: Budget) -> dict[str, Any]:
    """The teacher pass (one process) on growing data: time per token and peak memory relative to 1x."""
    runs = {}
    for size in budget.sizes:
        tokens = size * budget.base_tokens
        runs[size] = timed(1, teacher_args(teacher, dataset, work / f"cache-{size}x", tokens, budget))
        quality.log(f"teacher pass, {size}x ({tokens:,} tokens): {runs[size]['seconds']:.1f} s")
    base = runs[budget.sizes[0]]
    # Least squares: seconds = start + per_token * tokens; linear when every point sits on the line.
    tokens = [size * budget.base_tokens for size in runs]
    seconds = [run["seconds"] for run in runs.values()]
    mean_t, mean_s = sum(tokens) / len(tokens), sum(seconds) / len(seconds)
    slope = sum((t - mean_t) * (s - mean_s) for t, s in zip(tokens, seconds)) / sum((t - mean_t) ** 2 for t in tokens)
    intercept = mean_s - slope * mean_t
    return {
        "base_tokens": budget.base_tokens,
        "fit": {"start_seconds": intercept, "seconds_per_1k_tokens": slope * 1000},
        "rows": [
            {
                "size": size,
                "seconds": run["seconds"],
                "seconds_per_token_vs_1x": (run["seconds"] / size) / base["seconds"],
                "peak_mib": run["peak_mib"],
                "peak_vs_1x": run["peak_mib"] / base["peak_mib"],
                "off_the_line": run["seconds"] / (intercept + slope * size * budget.base_tokens) - 1,
            }
            for size, run in runs.items()
        ],
    }


def report(results: dict[str, Any]) -> str:
    teacher, student = results["processes"]["teacher"], results["processes"]["student"]
    lines = [
        "| what | 2 processes over 1 (1 thread each) |",
        "|---|---:|",
        f"| teacher pass throughput ({teacher['tokens']:,} tokens; same bytes: {teacher['same_bytes']}) "
        f"| {teacher['throughput_2p_over_1p']:.2f}x |",
        f"| tokenizing the whole stream (what every rank does) vs the 1-process pass "
        f"| {teacher['tokenize_share_of_1p']:.1%} of its time |",
        f"| student pass throughput, whole command ({student['steps']} steps, global batch {student['global_batch']}) "
        f"| {student['throughput_2p_over_1p']:.2f}x |",
        f"| student pass throughput, training loop only | {student['train_throughput_2p_over_1p']:.2f}x |",
        "",
        "| data | seconds per token vs 1x | off the fitted line | peak memory vs 1x |",
        "|---|---:|---:|---:|",
    ]
    for row in results["data_size"]["rows"]:
        lines.append(
            f"| {row['size']}x | {row['seconds_per_token_vs_1x']:.2f} | {row['off_the_line']:+.1%} "
            f"| {row['peak_vs_1x']:.2f} |"
        )
    fit = results["data_size"]["fit"]
    lines.append(
        f"\nfitted: {fit['start_seconds']:.1f} s of start (imports, load) + {fit['seconds_per_1k_tokens']:.2f} s "
        "per 1,000 tokens"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="tiny sizes: a smoke test of the script")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--work", type=Path, default=None, help="keep the work folder here")
    args = parser.parse_args(argv)
    budget = FAST if args.fast else FULL
    started = time.time()
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        teacher, dataset, student = set_up(work, budget)
        results = {
            "budget": budget.__dict__,
            "processes": processes(work, teacher, dataset, student, budget),
            "data_size": data_size(work, teacher, dataset, budget),
        }
    results["seconds"] = round(time.time() - started, 1)
    print(report(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
