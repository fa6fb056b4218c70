"""``distill eval``: the figures are the metric functions' on the same logits, the start is the student
before its first step, and several sources stand side by side."""

import json

import pytest
import torch
from conftest import run_cli

from pipeline.config import StudentTrainConfig
from pipeline.student_eval import EvalConfig, rebuild_start, run_eval
from pipeline.student_setup import prepare_run


@pytest.fixture(scope="module")
def trained(train_cache, student_config_dir, tmp_path_factory):
    """A student trained 6 steps from a config-built start."""
    out = tmp_path_factory.mktemp("eval") / "student"
    args = ["--cache", str(train_cache), "--student", str(student_config_dir), "--out", str(out)]
    result = run_cli("student-train", *args, "--max-steps", "6", "--batch-size", "4", "--seed", "5", "--lr", "5e-3")
    assert result.exit_code == 0, result.output
    return out


def test_the_rebuilt_start_is_the_student_before_its_first_step(trained, train_cache, student_config_dir, tmp_path):
    start, described = rebuild_start(str(trained), torch.device("cpu"))
    assert "seed 5" in described
    run = prepare_run(
        StudentTrainConfig(cache=str(train_cache), student=str(student_config_dir), out=str(tmp_path / "x"), seed=5)
    )
    for (name, a), (_, b) in zip(start.state_dict().items(), run.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_eval_reports_every_model_on_every_source_and_the_teacher_retained(
    trained, teacher_dir, heldout_cache, corpus, tmp_path
):
    out = tmp_path / "eval.json"
    sources = ["--source", str(heldout_cache), "--source", str(corpus["heldout"])]
    args = ["eval", "--student", str(trained), "--teacher", str(teacher_dir), "--start", "auto", *sources]
    result = run_cli(*args, "--seq-len", "32", "--max-tokens", "512", "--json", str(out))
    assert result.exit_code == 0, result.output
    assert "teacher retained (cross-entropy)" in result.output
    report = json.loads(out.read_text())
    assert report["models"] == ["student", "start", "teacher"]
    cache_figures, text_figures = (report["sources"][source] for source in (str(heldout_cache), str(corpus["heldout"])))
    assert cache_figures["kind"] == "cache" and text_figures["kind"] == "text"
    for figures in (cache_figures, text_figures):
        student, start, teacher = figures["student"], figures["start"], figures["teacher"]
        assert student["ce"] < start["ce"]  # six steps taught it something
        assert 0 < student["kl"] < start["kl"] and "kl" not in teacher
        assert 0 <= student["ece"] <= 1 and 0 <= student["top1_agreement"] <= 1
        expected = (start["ce"] - student["ce"]) / (start["ce"] - teacher["ce"])
        assert figures["teacher_retained"] == pytest.approx(expected)
    # Only a cache gives the bucket KL, and it is a different measure from the full-vocabulary KL.
    assert "kl_cache" in cache_figures["student"] and "kl_cache" not in text_figures["student"]
    assert cache_figures["student"]["kl_cache"] != pytest.approx(cache_figures["student"]["kl"])


def test_eval_figures_are_the_metric_functions_on_the_same_logits(trained, teacher_dir, corpus):
    from transformers import AutoModelForCausalLM

    from pipeline.losses import next_token_labels
    from pipeline.metrics import HeldOutMetrics
    from pipeline.student_eval import source_batches

    cfg = EvalConfig(student=str(trained), sources=(str(corpus["heldout"]),), teacher=str(teacher_dir), seq_len=32)
    cfg = EvalConfig(**{**cfg.__dict__, "max_tokens": 256})
    figures = run_eval(cfg)["sources"][str(corpus["heldout"])]["student"]
    student = AutoModelForCausalLM.from_pretrained(str(trained)).eval()
    teacher = AutoModelForCausalLM.from_pretrained(str(teacher_dir)).eval()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(trained))
    metrics = HeldOutMetrics()
    with torch.no_grad():
        for batch in source_batches(str(corpus["heldout"]), cfg, tokenizer, torch.device("cpu")):
            ids = batch["input_ids"]
            metrics.update(teacher(ids).logits, student(ids).logits, next_token_labels(ids))
    expected = metrics.result()
    for key in ("kl", "ce", "ece", "top1_agreement"):
        assert figures[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), key


def test_eval_without_a_teacher_reports_perplexity_and_calibration_alone(trained, corpus):
    report = run_eval(EvalConfig(student=str(trained), sources=(str(corpus["heldout"]),), seq_len=32, max_tokens=256))
    figures = report["sources"][str(corpus["heldout"])]
    assert report["models"] == ["student"] and "teacher_retained" not in figures
    assert set(figures["student"]) == {"ce", "perplexity", "accuracy", "ece"}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--start", "auto", "--source", "SOURCE", "--student", "TEACHER"], "--start auto reads"),
        (["--source", "SOURCE", "--student", "CONFIG"], "holds a config but no weights"),
        (["--source", "SOURCE", "--student", "TRAINED", "--seq-len", "1"], "--seq-len must be at least 2"),
    ],
)
def test_eval_refuses_in_one_line(extra, message, trained, student_config_dir, teacher_dir, corpus):
    names = {"SOURCE": str(corpus["heldout"]), "CONFIG": str(student_config_dir), "TRAINED": str(trained)}
    names["TEACHER"] = str(teacher_dir)
    result = run_cli("eval", *[names.get(arg, arg) for arg in extra])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.output


def test_eval_runs_the_shipped_harness_task_for_the_student_and_the_teacher(trained, teacher_dir, tmp_path):
    pytest.importorskip("lm_eval")
    out = tmp_path / "tasks.json"
    args = ["eval", "--student", str(trained), "--teacher", str(teacher_dir), "--tasks", "pydoc_cloze"]
    result = run_cli(*args, "--task-limit", "8", "--json", str(out))
    assert result.exit_code == 0, result.output
    row = json.loads(out.read_text())["tasks"]["pydoc_cloze"]
    assert 0 <= row["student"]["acc"] <= 1 and 0 <= row["teacher"]["acc"] <= 1
    if row["teacher"]["acc"]:
        assert row["accuracy_over_teacher"] == pytest.approx(row["student"]["acc"] / row["teacher"]["acc"])
    assert "student accuracy / teacher accuracy" in result.output or not row["teacher"]["acc"]


def test_an_unknown_task_is_refused_in_one_line(trained):
    pytest.importorskip("lm_eval")
    result = run_cli("eval", "--student", str(trained), "--tasks", "no_such_task_here")
    assert result.exit_code == 1 and "'no_such_task_here' is not a task lm-eval knows" in result.output


def test_the_shipped_tasks_read_their_local_data():
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "data" / "lm_eval_tasks"
    for name, keys in (("pydoc_cloze", {"context", "choices", "answer"}), ("pydoc_perplexity", {"text"})):
        rows = [json.loads(line) for line in (folder / f"{name}.jsonl").read_text().splitlines()]
        assert len(rows) >= 20 and all(set(row) == keys for row in rows)
        assert f"test: data/lm_eval_tasks/{name}.jsonl" in (folder / f"{name}.yaml").read_text()
    for row in (json.loads(line) for line in (folder / "pydoc_cloze.jsonl").read_text().splitlines()):
        assert len(row["choices"]) == 4 and 0 <= row["answer"] < 4


@pytest.mark.skipif(__import__("shutil").which("make") is None, reason="needs make")
def test_make_eval_evaluates_the_demo_student_against_its_start_and_teacher():
    from helpers import make_dry_run

    settings = {"OUT": "students/x", "TEACHER": "models/t", "CACHE": "caches/c", "DATASET": "d.jsonl"}
    left_out = {*settings, "MAKEFLAGS", "MFLAGS", "MAKELEVEL", "EVAL_CACHE", "EVAL_DATASET", "TASKS"}
    (command,), output = make_dry_run("eval", {**settings, "EVAL_DATASET": "e.jsonl"}, left_out)
    assert command[0] == "eval", output
    assert command[command.index("--student") + 1] == "students/x-kd"
    assert command[command.index("--start") + 1] == "auto" and command[command.index("--teacher") + 1] == "models/t"
    assert [command[i + 1] for i, word in enumerate(command) if word == "--source"] == ["caches/c-heldout", "e.jsonl"]
    assert command[command.index("--tasks") + 1] == "pydoc_cloze,pydoc_perplexity"


def test_a_run_recorded_before_the_start_was_rebuilds_it_from_its_settings(trained, tmp_path):
    import shutil

    older = shutil.copytree(trained, tmp_path / "older")
    training = json.loads((older / "training.json").read_text())
    del training["start"]
    (older / "training.json").write_text(json.dumps(training))
    rebuilt, _ = rebuild_start(str(older), torch.device("cpu"))
    expected, _ = rebuild_start(str(trained), torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), expected.state_dict().values()))
