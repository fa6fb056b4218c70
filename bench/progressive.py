"""Progressive distillation on the demo budget: teacher -> student 1 -> student 2, against teacher -> student 2.

    ACCEPT_GEMMA_TERMS=1 make demo        # first: the teacher's caches and the direct student
    python bench/progressive.py           # then: about 15 minutes on a 2-core CPU

Every pass is the real command line with the demo's settings (``make demo``: top-64 caches
of 24,576 training tokens at ``seq_len`` 256, alpha 0.5, T = 1, 2 epochs, batch 4,
lr 3e-3). The chain:

1. student 1, an intermediate: the demo student's config made wider and deeper
   (``--student-config`` hidden 256, 4 layers), trained on the teacher's cache;
2. a cache of student 1 over the same training text (the teacher pass with student 1 as
   ``--teacher``);
3. student 2, the demo student, trained on student 1's cache.

The direct run is the demo's own distilled student (teacher -> student 2 on the same
budget), and the demo's cross-entropy student is the floor. Every student is then
evaluated on the *teacher's* held-out cache (``caches/demo-heldout``): KL to the teacher
over its top-64 buckets, cross-entropy and perplexity on the held-out text.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline import models  # noqa: E402
from pipeline.cache import open_cache  # noqa: E402
from pipeline.evaluate import evaluate, head_chunk_positions  # noqa: E402

DISTILL = REPO / ".venv" / "bin" / "distill"
DEMO = {
    "cache": "caches/demo",
    "heldout": "caches/demo-heldout",
    "direct": "students/demo-kd",
    "ce": "students/demo-ce",
}
TRAIN = ["--alpha", "0.5", "--temperature", "1.0", "--epochs", "2", "--batch-size", "4", "--lr", "3e-3", "--seed", "0"]
TEACHER_PASS = ["--capture", "topk", "--top-k", "64", "--seq-len", "256", "--batch-size", "4"]
STUDENT = "data/student-gemma3-tiny"
WIDER = ["hidden_size=256", "intermediate_size=1024", "num_hidden_layers=4", "num_attention_heads=4"]
WIDER += ['layer_types=["sliding_attention","full_attention","sliding_attention","full_attention"]']


def distill(*args: str) -> float:
    """Run one ``distill`` command (its output shown); return its wall seconds."""
    started = time.time()
    print("+ distill", " ".join(args), flush=True)
    subprocess.run([str(DISTILL), *args], cwd=REPO, check=True)
    return time.time() - started


def held_out(student: Path, heldout: Path) -> dict[str, float]:
    """KL to the teacher, cross-entropy and perplexity of a saved student on the teacher's held-out cache."""
    model, _ = models.load_student(str(student), {}, torch.device("cpu"))
    head = models.LMHead(model)
    scores = evaluate(
        head, open_cache(heldout), head_chunk_positions(models.logit_width(model.config)), torch.device("cpu")
    )
    parameters = sum(p.numel() for p in model.parameters())
    return {"kl": scores["kl"], "ce": scores["ce"], "perplexity": scores["perplexity"], "parameters": parameters}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="students/progressive-bench", help="folder for the chain's outputs")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args(argv)
    missing = [path for path in DEMO.values() if not (REPO / path).exists()]
    if missing:
        parser.error(f"{missing[0]} is missing: run ACCEPT_GEMMA_TERMS=1 make demo first")
    work = REPO / args.work
    work.mkdir(parents=True, exist_ok=True)
    student1, cache1, student2 = work / "student-1", work / "cache-1", work / "student-2"
    overrides = [arg for item in WIDER for arg in ("--student-config", item)]
    seconds = {
        "student 1": distill(
            "student-train",
            "--cache",
            DEMO["cache"],
            "--student",
            STUDENT,
            *overrides,
            "--out",
            str(student1),
            *TRAIN,
            "--overwrite",
        ),
        "cache of student 1": distill(
            "teacher-cache",
            "--teacher",
            str(student1),
            "--dataset",
            "data/generated/pydoc/train.jsonl",
            "--out",
            str(cache1),
            *TEACHER_PASS,
            "--max-tokens",
            "24576",
            "--overwrite",
        ),
        "student 2": distill(
            "student-train",
            "--cache",
            str(cache1),
            "--student",
            STUDENT,
            "--out",
            str(student2),
            *TRAIN,
            "--overwrite",
        ),
    }
    heldout = REPO / DEMO["heldout"]
    rows = {
        "teacher -> student 2 (direct, the demo's)": held_out(REPO / DEMO["direct"], heldout),
        "teacher -> student 1 (intermediate)": held_out(student1, heldout),
        "teacher -> student 1 -> student 2 (progressive)": held_out(student2, heldout),
        "cross-entropy only (the demo's)": held_out(REPO / DEMO["ce"], heldout),
    }
    print("\n| student | parameters | KL(teacher‖student), teacher's held-out | cross-entropy | perplexity |")
    print("|---|---:|---:|---:|---:|")
    for name, row in rows.items():
        print(f"| {name} | {row['parameters']:,} | {row['kl']:.4f} | {row['ce']:.4f} | {row['perplexity']:.1f} |")
    print("seconds: " + ", ".join(f"{name} {value:.0f}" for name, value in seconds.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"students": rows, "seconds": seconds}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
