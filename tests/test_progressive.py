"""Progressive distillation: a finished student folder is a teacher for the next student.

teacher -> cache -> student 1 -> cache of student 1 -> student 2, all through the CLI, and
the Makefile's ``progressive`` target runs the same chain.
"""

import json
import shutil
from pathlib import Path

import pytest
from conftest import make_cache, run_cli
from helpers import make_dry_run
from transformers import AutoModelForCausalLM

from pipeline.fingerprint import files_fingerprint
from pipeline.store.layout import MANIFEST_NAME

ROOT = Path(__file__).resolve().parents[1]
CAPTURE = ("--seq-len", "32", "--top-k", "16", "--batch-size", "4")
TRAIN = ("--batch-size", "8", "--lr", "3e-3", "--seed", "0", "--max-steps", "4")


def manifest(cache: Path) -> dict:
    return json.loads((cache / MANIFEST_NAME).read_text())


def train(cache: Path, student: Path, out: Path, *extra: str) -> dict:
    result = run_cli(
        "student-train", "--cache", str(cache), "--student", str(student), "--out", str(out), *TRAIN, *extra
    )
    assert result.exit_code == 0, result.output
    return json.loads((out / "training.json").read_text())


@pytest.fixture(scope="module")
def chain(train_cache, student_config_dir, corpus, tmp_path_factory):
    """Student 1 from the teacher's cache, caches of student 1, and a smaller student 2 from them."""
    root = tmp_path_factory.mktemp("progressive")
    student1 = root / "student-1"
    train(train_cache, student_config_dir, student1)
    cache1 = make_cache(student1, corpus["train"], root / "cache-1", *CAPTURE)
    heldout1 = make_cache(student1, corpus["heldout"], root / "cache-1-heldout", *CAPTURE)
    student2 = root / "student-2"
    summary2 = train(
        cache1, student_config_dir, student2, "--student-config", "num_hidden_layers=1", "--eval-cache", str(heldout1)
    )
    return {"student1": student1, "cache1": cache1, "student2": student2, "summary2": summary2}


def test_a_student_folder_is_recorded_as_the_teacher_of_its_cache(chain, train_cache):
    teacher = manifest(chain["cache1"])["teacher"]
    assert teacher["source"] == chain["student1"].name
    assert teacher["model_type"] == "llama"
    assert teacher["weights_sha256"] == files_fingerprint([chain["student1"] / "model.safetensors"])
    assert teacher["config_sha256"] != manifest(train_cache)["teacher"]["config_sha256"]


def test_the_student_cache_keeps_the_original_tokenizer(chain, train_cache):
    assert manifest(chain["cache1"])["tokenizer"]["fingerprint"] == manifest(train_cache)["tokenizer"]["fingerprint"]


def test_second_student_is_smaller_loads_and_is_evaluated(chain):
    student2 = chain["student2"]
    model = AutoModelForCausalLM.from_pretrained(str(student2))
    assert model.config.num_hidden_layers == 1
    assert chain["summary2"]["steps"] > 0
    report = json.loads((student2 / "eval.json").read_text())
    assert report["kl"] >= 0 and report["ce"] > 0


def test_a_student_folder_still_being_written_is_refused_as_teacher(train_cache, student_config_dir, corpus, tmp_path):
    # A run that has saved checkpoints but not yet moved its final model and tokenizer in.
    finished = tmp_path / "finished"
    train(train_cache, student_config_dir, finished, "--save-every", "2")
    running = tmp_path / "running"
    running.mkdir()
    shutil.copytree(finished / "checkpoints", running / "checkpoints")
    shutil.copy(finished / "metrics.jsonl", running / "metrics.jsonl")
    result = run_cli(
        "teacher-cache", "--teacher", str(running), "--dataset", str(corpus["train"]), "--out", str(tmp_path / "c")
    )
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "teacher" in lines[0] and "running" in lines[0] and "has not finished" in lines[0]
    assert not (tmp_path / "c").exists()


# -- the Makefile ---------------------------------------------------------------------------

needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")

# Left out of make's environment, so that a caller's settings (or a make running pytest) change nothing.
MAKE_ENV_LEFT_OUT = {
    "TEACHER",
    "DATASET",
    "EVAL_DATASET",
    "CACHE",
    "EVAL_CACHE",
    "STUDENT",
    "OUT",
    "STUDENT1",
    "STUDENT2",
    "OUT1",
    "OUT2",
    "CACHE1",
    "MAKEFLAGS",
    "MFLAGS",
    "MAKELEVEL",
}


@needs_make
def test_make_progressive_runs_the_chain_in_order():
    settings = {"TEACHER": "models/t", "DATASET": "d.jsonl", "EVAL_DATASET": "e.jsonl"}
    printed, output = make_dry_run("progressive", settings, MAKE_ENV_LEFT_OUT)
    commands = [(words[0], words[words.index("--out") + 1], words[1:]) for words in printed]
    passes = [(command, out) for command, out, _ in commands]
    assert passes == [
        ("teacher-cache", "caches/demo"),
        ("teacher-cache", "caches/demo-heldout"),
        ("student-train", "students/progressive-1"),
        ("teacher-cache", "caches/progressive-1"),
        ("teacher-cache", "caches/progressive-1-heldout"),
        ("student-train", "students/progressive-2"),
    ], output

    def option(args: list[str], flag: str) -> str:
        return args[args.index(flag) + 1]

    teachers = [option(args, "--teacher") for command, _, args in commands if command == "teacher-cache"]
    assert teachers == ["models/t", "models/t", "students/progressive-1", "students/progressive-1"]
    datasets = [option(args, "--dataset") for command, _, args in commands if command == "teacher-cache"]
    assert datasets == ["d.jsonl", "e.jsonl", "d.jsonl", "e.jsonl"]
    student1, student2 = (args for command, _, args in commands if command == "student-train")
    assert option(student1, "--cache") == "caches/demo"
    assert option(student2, "--cache") == "caches/progressive-1"
    assert option(student1, "--student") == option(student2, "--student") == "data/student-gemma3-tiny"
