"""Checkpoints: a damaged, edited or foreign checkpoint, or a resume with other settings, is refused in one line
before training continues; the settings --resume may change are accepted."""

import json
import logging
import shutil

import pytest
import torch
from conftest import run_cli

from pipeline.checkpoint import _same_structure, latest_checkpoint
from pipeline.errors import CacheError

SETTINGS = ["--batch-size", "2", "--seed", "0", "--alpha", "0.5", "--max-steps", "4", "--save-every", "2"]
CHECKPOINT = "step-0000002"


def run(cache, student, out, *options: str):
    return run_cli("student-train", "--cache", str(cache), "--student", str(student), "--out", str(out), *options)


def bad(result) -> str:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


@pytest.fixture(scope="module")
def checkpointed(train_cache, student_config_dir, tmp_path_factory):
    """A 4-step run that saved a checkpoint at step 2; its final model is removed, as after a crash."""
    root = tmp_path_factory.mktemp("checkpointed")
    student = shutil.copytree(student_config_dir, root / "student")
    out = root / "run"
    result = run(train_cache, student, out, *SETTINGS)
    assert result.exit_code == 0, result.output
    (out / "model.safetensors").unlink()
    (out / "training.json").unlink()
    return root


@pytest.fixture()
def crashed(checkpointed, tmp_path):
    """The run's student and a private copy of the crashed run's --out: ``(student, out)``."""
    return checkpointed / "student", shutil.copytree(checkpointed / "run", tmp_path / "run")


def resume(train_cache, crashed, *options: str, settings=SETTINGS):
    student, out = crashed
    return run(train_cache, student, out, *settings, "--resume", *options)


def edit_state(out, change) -> None:
    path = out / "checkpoints" / CHECKPOINT / "state.json"
    state = json.loads(path.read_text())
    change(state)
    path.write_text(json.dumps(state))


def test_resume_with_the_same_settings_finishes_the_run(train_cache, crashed):
    result = resume(train_cache, crashed)
    assert result.exit_code == 0, result.output
    assert json.loads((crashed[1] / "training.json").read_text())["steps"] == 4


def test_resume_with_a_longer_run_warns_that_the_schedule_changes(train_cache, crashed, caplog):
    settings = [*SETTINGS[:-4], "--max-steps", "5", "--save-every", "3", "--log-every", "1"]
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        result = resume(train_cache, crashed, settings=settings)
    assert result.exit_code == 0, result.output
    assert any("learning-rate schedule changes" in record.getMessage() for record in caplog.records)
    assert json.loads((crashed[1] / "training.json").read_text())["steps"] == 5


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("--seed", "1", "--seed was 0, now 1"),
        ("--alpha", "0.7", "--alpha was 0.5, now 0.7"),
        ("--batch-size", "4", "--batch-size was 2, now 4"),
        ("--lr", "0.1", "--lr was 0.001, now 0.1"),
        ("--student-config", "num_hidden_layers=1", '--student-config was [], now ["num_hidden_layers=1"]'),
    ],
)
def test_resume_with_other_settings_is_refused(option, value, expected, train_cache, crashed):
    settings = [item for item in SETTINGS]
    if option in settings:
        settings[settings.index(option) + 1] = value
    else:
        settings += [option, value]
    message = bad(resume(train_cache, crashed, settings=settings))
    assert expected in message and "resume with the run's settings or start a new --out" in message
    assert not (crashed[1] / "training.json").exists()


def test_resume_with_fewer_steps_than_the_checkpoint_is_refused(train_cache, crashed):
    settings = [*SETTINGS[:-4], "--max-steps", "1", "--save-every", "2"]
    assert "at step 2, past this run's 1 steps" in bad(resume(train_cache, crashed, settings=settings))


def test_checkpoint_of_another_architecture_is_refused(train_cache, crashed):
    from safetensors.torch import load_file, save_file

    path = crashed[1] / "checkpoints" / CHECKPOINT / "model.safetensors"
    weights = load_file(str(path))
    weights = {name: torch.zeros(*tensor.shape[:-1], 64) for name, tensor in weights.items()}  # hidden size 64
    save_file(weights, str(path))
    assert "of another architecture than the student" in bad(resume(train_cache, crashed))


def test_checkpoint_with_weights_the_student_lacks_is_refused(train_cache, crashed):
    from safetensors.torch import load_file, save_file

    path = crashed[1] / "checkpoints" / CHECKPOINT / "model.safetensors"
    weights = load_file(str(path))
    weights["model.layers.7.extra.weight"] = torch.zeros(2)
    save_file(weights, str(path))
    assert "unexpected ['model.layers.7.extra.weight']" in bad(resume(train_cache, crashed))


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda state: state.update(step="2"), "field 'step' is missing or not a int"),
        (lambda state: state.update(step=True), "field 'step' is missing or not a int"),
        (lambda state: state.pop("rows_seen"), "field 'rows_seen' is missing"),
        (lambda state: state.update(config=[]), "field 'config' is missing or not a dict"),
        (lambda state: state.update(param_groups={}), "'param_groups' is damaged"),
        (lambda state: state["param_groups"][0].update(lr="fast"), "'param_groups' do not fit the optimizer"),
        (lambda state: state["param_groups"][0]["params"].pop(), "'param_groups' do not fit the optimizer"),
        (lambda state: state.update(rows_seen=10**15), "rows_seen 1000000000000000 is not step x --batch-size"),
        (lambda state: state.update(rows_seen=3), "rows_seen 3 is not step x --batch-size"),
        (lambda state: state.update(step=10**9, rows_seen=2 * 10**9), "at step 1000000000, past this run's 4 steps"),
        (lambda state: state.update(step=-1, rows_seen=-2), "step -1 is negative"),
    ],
    ids=[
        "step-a-string",
        "step-a-bool",
        "rows-seen-missing",
        "config-a-list",
        "param-groups-an-object",
        "lr-a-string",
        "a-parameter-dropped",
        "rows-seen-huge",
        "rows-seen-off",
        "step-huge",
        "step-negative",
    ],
)
def test_damaged_or_edited_state_is_refused(change, expected, train_cache, crashed):
    edit_state(crashed[1], change)
    assert expected in bad(resume(train_cache, crashed))


def test_state_that_is_not_json_is_refused(train_cache, crashed):
    (crashed[1] / "checkpoints" / CHECKPOINT / "state.json").write_text('{"step": 2,')
    assert "is not valid JSON" in bad(resume(train_cache, crashed))


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors"])
@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_damaged_tensor_files_are_refused(name, damage, train_cache, crashed):
    path = crashed[1] / "checkpoints" / CHECKPOINT / name
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\xff" * 64, "empty": b""}[damage])
    assert f"{name} is not a readable safetensors file" in bad(resume(train_cache, crashed))


def test_optimizer_state_of_the_wrong_shape_is_refused(train_cache, crashed):
    from safetensors.torch import load_file, save_file

    path = crashed[1] / "checkpoints" / CHECKPOINT / "optimizer.safetensors"
    tensors = load_file(str(path))
    tensors["state.0.exp_avg"] = torch.zeros(3)
    save_file(tensors, str(path))
    assert "optimizer state 'state.0.exp_avg' does not fit" in bad(resume(train_cache, crashed))


def test_optimizer_file_without_the_rng_state_is_refused(train_cache, crashed):
    from safetensors.torch import load_file, save_file

    path = crashed[1] / "checkpoints" / CHECKPOINT / "optimizer.safetensors"
    tensors = load_file(str(path))
    tensors["rng.torch"] = torch.zeros(5, dtype=torch.uint8)
    save_file(tensors, str(path))
    assert "lacks a valid rng.torch state" in bad(resume(train_cache, crashed))


@pytest.mark.parametrize(
    "pointer",
    [
        {"step": 2, "path": "../../elsewhere"},
        {"step": 2, "path": "/tmp"},
        {"step": 2, "path": "latest.json"},
        {"step": 2},
        [],
    ],
)
def test_latest_pointer_outside_the_checkpoints_folder_is_refused(pointer, train_cache, crashed):
    (crashed[1] / "checkpoints" / "latest.json").write_text(json.dumps(pointer))
    assert "does not name a step-NNNNNNN folder" in bad(resume(train_cache, crashed))


def test_latest_pointer_to_a_linked_folder_is_refused(train_cache, crashed, tmp_path):
    checkpoints = crashed[1] / "checkpoints"
    shutil.move(checkpoints / CHECKPOINT, tmp_path / "elsewhere")
    (checkpoints / CHECKPOINT).symlink_to(tmp_path / "elsewhere")
    assert "missing or not a plain folder" in bad(resume(train_cache, crashed))


def test_latest_pointer_that_is_not_json_is_refused(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest.json").write_text("{")
    with pytest.raises(CacheError, match="is not valid JSON"):
        latest_checkpoint(tmp_path)
    assert latest_checkpoint(tmp_path / "nothing") is None


def test_param_groups_compare_by_structure_and_json_type():
    assert _same_structure([{"lr": 1, "betas": [0.9, 0.95]}], [{"lr": 0.5, "betas": [0.8, 0.9]}])
    assert not _same_structure([{"lr": "1"}], [{"lr": 0.5}])
    assert not _same_structure([{"lr": True}], [{"lr": 0.5}])
    assert not _same_structure([{"betas": [0.9]}], [{"betas": [0.9, 0.95]}])
    assert not _same_structure({"a": None}, {"a": False})
