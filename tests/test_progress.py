"""Logs that read well everywhere: a periodic status line where stderr is not a terminal, and -v / -q
after a command's name as before it."""

import logging

import pytest
from conftest import run_cli

from pipeline.progress import StatusLines, progress


def test_without_a_terminal_progress_is_a_periodic_status_line_with_rate_and_eta(caplog):
    caplog.set_level(logging.INFO, logger="pipeline.progress")
    status = progress(1000, "teacher pass", "tok")  # pytest captures stderr: not a terminal
    assert isinstance(status, StatusLines)
    status.every = 0.0  # a line at every update
    status.update(250)
    status.set_postfix(loss="1.234")
    status.update(250)
    status.close()
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 3
    assert lines[0].startswith("teacher pass: 250/1,000 tok (25%), ") and " tok/s" in lines[0] and "ETA " in lines[0]
    assert lines[1].startswith("teacher pass: 500/1,000 tok (50%)") and lines[1].endswith("loss=1.234")


def test_status_lines_wait_for_their_period_and_say_when_done(caplog):
    caplog.set_level(logging.INFO, logger="pipeline.progress")
    with StatusLines(10, "student pass", "step", initial=4, every=3600.0) as status:
        for _ in range(6):
            status.update(1)
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("student pass: 10/10 step (100%)") and lines[0].endswith("(done)")


def test_a_disabled_progress_writes_nothing(caplog):
    caplog.set_level(logging.INFO, logger="pipeline.progress")
    bar = progress(5, "x", "tok", enabled=False)
    bar.update(5)
    bar.close()
    assert caplog.records == []


@pytest.mark.parametrize(
    ("args", "level"),
    [
        (["verify", "CACHE", "-q"], logging.WARNING),
        (["-q", "verify", "CACHE"], logging.WARNING),
        (["verify", "CACHE", "--verbose"], logging.DEBUG),
        (["verify", "CACHE"], logging.INFO),
    ],
)
def test_verbosity_flags_work_before_or_after_the_command(args, level, train_cache):
    logger = logging.getLogger("pipeline")
    result = run_cli(*[str(train_cache) if arg == "CACHE" else arg for arg in args])
    assert result.exit_code == 0, result.output
    assert logger.level == level
    logger.setLevel(logging.NOTSET)


def test_every_command_takes_the_verbosity_flags():
    from pipeline.cli import main

    for name, command in main.commands.items():
        flags = {flag for param in command.params for flag in param.opts}
        assert {"-v", "-q", "--verbose", "--quiet"} <= flags, name


def test_report_to_tensorboard_writes_the_logged_metrics_and_the_held_out_results(
    train_cache, heldout_cache, student_config_dir, tmp_path
):
    pytest.importorskip("tensorboard")
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    args = ["--cache", str(train_cache), "--student", str(student_config_dir), "--out", str(out)]
    args += ["--max-steps", "3", "--log-every", "1", "--batch-size", "2", "--eval-cache", str(heldout_cache)]
    result = run_cli("student-train", *args, "--report-to", "tensorboard")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    for key in ("loss", "kd", "ce", "kl_t1", "lr"):
        scalars = events.Scalars(f"train/{key}")
        assert [event.step for event in scalars] == [record["step"] for record in records]
        assert [event.value for event in scalars] == pytest.approx([record[key] for record in records], rel=1e-6)
    evaluation = json.loads((out / "eval.json").read_text())
    assert events.Scalars("eval/kl")[-1].value == pytest.approx(evaluation["kl"], rel=1e-6)
    again = run_cli("student-train", *args, "--report-to", "tensorboard", "--overwrite")
    assert again.exit_code == 0, again.output  # the run's own tensorboard folder is replaced, not refused
