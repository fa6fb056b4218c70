"""Run configs: ``--config FILE`` gives a pass's settings by field name; flags override it; bad files are
refused in one line."""

import json
from pathlib import Path

import pytest
from conftest import run_cli

import pipeline
from pipeline.cli import main
from pipeline.run_config import command_defaults

ROOT = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def training_config(out: Path) -> dict:
    return json.loads((out / "training.json").read_text())["config"]


def test_a_config_file_trains_as_the_same_flags_do(train_cache, student_config_dir, tmp_path):
    config = write(
        tmp_path / "student.yaml",
        f"""
        # a comment
        cache: {train_cache}
        student: {student_config_dir}
        alpha: 0.7
        temperature: 2.0
        batch_size: 2
        max_steps: 2
        seed: 3
        student_config: [num_hidden_layers=1]
        """.replace("\n        ", "\n"),
    )
    from_file = run_cli("student-train", "--config", str(config), "--out", str(tmp_path / "file"))
    assert from_file.exit_code == 0, from_file.output
    flags = ["--cache", str(train_cache), "--student", str(student_config_dir), "--alpha", "0.7"]
    flags += ["--temperature", "2", "--batch-size", "2", "--max-steps", "2", "--seed", "3"]
    flags += ["--student-config", "num_hidden_layers=1"]
    from_flags = run_cli("student-train", *flags, "--out", str(tmp_path / "flags"))
    assert from_flags.exit_code == 0, from_flags.output
    file_config, flag_config = training_config(tmp_path / "file"), training_config(tmp_path / "flags")
    assert {**file_config, "out": None} == {**flag_config, "out": None}
    metrics = [(tmp_path / name / "metrics.jsonl").read_text().splitlines()[-1] for name in ("file", "flags")]
    assert json.loads(metrics[0])["loss"] == json.loads(metrics[1])["loss"]


def test_flags_override_the_file_and_a_list_on_the_command_line_replaces_the_files(
    train_cache, student_config_dir, tmp_path
):
    config = write(
        tmp_path / "student.yaml",
        f"cache: {train_cache}\nstudent: {student_config_dir}\nalpha: 0.7\nmax_steps: 1\nbatch_size: 2\n"
        "student_config: [num_hidden_layers=1, intermediate_size=40]\n",
    )
    extra = ["--alpha", "0.2", "--student-config", "intermediate_size=48"]
    result = run_cli("student-train", "--config", str(config), *extra, "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    saved = training_config(tmp_path / "out")
    assert saved["alpha"] == 0.2 and saved["max_steps"] == 1
    assert saved["student_config"] == ["intermediate_size=48"]


def test_a_teacher_pass_takes_its_settings_from_a_file_and_records_them(teacher_dir, corpus, tmp_path):
    config = write(
        tmp_path / "teacher.yaml",
        f"teacher: {teacher_dir}\ndataset: {corpus['heldout']}\nseq_len: 16\nmax_tokens: 64\ntop_k: 5\n"
        "codec_mode: lossless\n",
    )
    result = run_cli("teacher-cache", "--config", str(config), "--out", str(tmp_path / "cache"), "--top-k", "7")
    assert result.exit_code == 0, result.output
    manifest = pipeline.open_cache(tmp_path / "cache").manifest
    assert manifest.k == 7 and manifest.seq_len == 16 and manifest.codec["mode"] == "lossless"
    recorded = json.loads((tmp_path / "cache" / "run.json").read_text())["config"]
    assert recorded["top_k"] == 7 and recorded["max_tokens"] == 64


def test_an_ensemble_in_a_file_lists_its_caches(train_cache, student_config_dir, tmp_path):
    config = write(
        tmp_path / "ensemble.yaml",
        f"cache: {train_cache}\nensemble_caches: [{train_cache}]\nensemble: mean_prob\n"
        f"cache_weights: [0.6, 0.4]\nstudent: {student_config_dir}\nmax_steps: 1\nbatch_size: 2\n",
    )
    result = run_cli("student-train", "--config", str(config), "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    saved = training_config(tmp_path / "out")
    assert saved["ensemble_caches"] == [str(train_cache)] and saved["cache_weights"] == [0.6, 0.4]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("cache: c\nbogus_key: 1\n", "unknown key 'bogus_key' for student-train"),
        ("cache: c\nalpha: [1, 2]\n", "alpha takes one value, not a list"),
        ("cache: c\nbatch_size: many\n", "batch_size: 'many' is not a valid integer"),
        ("cache: c\nloss: kl\n", "loss: 'kl' is not one of"),
        ("- cache\n- student\n", "holds a list; it must map field names to values"),
        ("cache: [unclosed\n", "does not parse"),
    ],
)
def test_a_bad_config_file_is_refused_in_one_line_naming_the_problem(text, message, tmp_path):
    config = write(tmp_path / "bad.yaml", text)
    result = run_cli("student-train", "--config", str(config), "--student", "s", "--out", str(tmp_path / "out"))
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.output
    assert not (tmp_path / "out").exists()


def test_a_missing_config_file_is_refused(tmp_path):
    result = run_cli("student-train", "--config", str(tmp_path / "none.yaml"), "--out", str(tmp_path / "out"))
    assert result.exit_code == 1 and "is not a file" in result.output


@pytest.mark.parametrize(("name", "command"), [("teacher.yaml", "teacher-cache"), ("student.yaml", "student-train")])
def test_the_shipped_examples_name_only_known_fields_even_commented_out(name, command, tmp_path):
    example = ROOT / "data" / "configs" / name
    assert command_defaults(str(example), main.commands[command])
    # Uncommenting every commented-out setting must give a file the command still accepts.
    lines = [
        line[2:] if line.startswith("# ") and ":" in line.split("#")[1] else line
        for line in example.read_text().splitlines()
    ]
    settings = [line for line in lines if line and not line.startswith("#") and line.split(":")[0].isidentifier()]
    uncommented = write(tmp_path / name, "\n".join(settings) + "\n")
    assert len(command_defaults(str(uncommented), main.commands[command])) > len(
        command_defaults(str(example), main.commands[command])
    )
