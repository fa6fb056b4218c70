"""The student pass's output folder: what may be written there, and what ``--overwrite`` may delete.

``--out`` is checked before anything loads: never a URL, a link, or a path overlapping
an input. A run records the model and tokenizer file names it writes in
``outputs.json`` before moving them in, so ``--overwrite`` deletes exactly what a
previous run wrote and refuses a folder holding anything else.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.cache_tokenizer import is_plain_file_name
from pipeline.checkpoint import CHECKPOINTS, latest_checkpoint
from pipeline.config import StudentTrainConfig
from pipeline.errors import ConfigError, OutputExistsError
from pipeline.paths import reject_overlap, reject_url
from pipeline.store.atomic import fsync_dir, write_bytes_atomic
from pipeline.tracking import TENSORBOARD_DIR

# What student-train writes in --out besides the model and tokenizer files, whose names
# (whatever save_pretrained chose) OUTPUTS_NAME records before they are moved in.
METRICS_NAME = "metrics.jsonl"
TRAINING_NAME = "training.json"
EVAL_NAME = "eval.json"
OUTPUTS_NAME = "outputs.json"
FINAL_STAGING = ".final.tmp"
RUN_FOLDERS = (CHECKPOINTS, FINAL_STAGING, TENSORBOARD_DIR)
RUN_FILES = (METRICS_NAME, TRAINING_NAME, EVAL_NAME, OUTPUTS_NAME)
# write_bytes_atomic's temporary names, left behind by a crash mid-write.
RUN_TEMPORARIES = tuple(f".{name}.tmp" for name in (TRAINING_NAME, EVAL_NAME, OUTPUTS_NAME))
MAX_OUTPUTS_BYTES = 1 << 20


@dataclass(frozen=True)
class OutputPlan:
    """What ``--out`` holds and what this run does with it, decided before anything loads.

    Attributes:
        out: the folder.
        resume_from: the checkpoint to continue from (``--resume``), else ``None``.
        replace: entries of a previous run that ``--overwrite`` deletes just before training.
        recorded: model and tokenizer file names a previous run recorded in ``outputs.json``.
    """

    out: Path
    resume_from: Path | None
    replace: tuple[str, ...]
    recorded: frozenset[str]


def check_output(cfg: StudentTrainConfig) -> OutputPlan:
    """Check ``--out`` and plan what happens to it; nothing is deleted or written here.

    Refused: a URL, a symbolic link, a file, a path that is, contains or lies inside
    ``--cache``, ``--eval-cache``, ``--student`` or ``--tokenizer``; ``--resume`` without a
    checkpoint; a non-empty folder without ``--overwrite``; and with ``--overwrite`` a
    folder holding anything student-train did not write: ``checkpoints/``,
    ``metrics.jsonl``, ``training.json``, ``eval.json``, ``outputs.json`` (the model and
    tokenizer files of that run, by name), and the temporary names of a crashed write.
    """
    reject_url(cfg.out, "--out")
    out = Path(cfg.out)
    if out.is_symlink():
        raise ConfigError(f"--out '{out}' is a symbolic link; give the folder it points to, or a new path")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"--out '{out}' is a file; give a folder path")
    inputs = [(cfg.cache, "--cache"), (cfg.eval_cache, "--eval-cache")]
    inputs += [(path, flag) for path, flag in ((cfg.student, "--student"), (cfg.tokenizer, "--tokenizer")) if path]
    for path, flag in inputs:
        if path is not None and (flag in ("--cache", "--eval-cache") or Path(path).expanduser().exists()):
            reject_overlap(out, "--out", path, flag)
    recorded = _recorded_outputs(out)
    if cfg.resume:
        checkpoint = latest_checkpoint(out) if out.is_dir() else None
        if checkpoint is None:
            raise ConfigError(f"--resume: '{out}' holds no checkpoint; drop --resume to start afresh")
        return OutputPlan(out, checkpoint, (), recorded)
    entries = sorted(out.iterdir()) if out.is_dir() else []
    if entries and not cfg.overwrite:
        raise OutputExistsError(
            f"--out '{out}' is not empty; pass --resume to continue its run or --overwrite to replace it"
        )
    foreign = [entry.name for entry in entries if not _written_by_a_run(entry, recorded)]
    if foreign:
        listed = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise OutputExistsError(
            f"--out '{out}' holds what student-train did not write ({listed}), so --overwrite deleted nothing; "
            "move those away or choose another --out"
        )
    # outputs.json goes last, so a crash while deleting leaves the rest still recorded.
    replace = sorted((entry.name for entry in entries), key=lambda name: name == OUTPUTS_NAME)
    return OutputPlan(out, None, tuple(replace), recorded)


def _written_by_a_run(entry: Path, recorded: frozenset[str]) -> bool:
    if entry.is_symlink():
        return False
    if entry.name in RUN_FOLDERS:
        return entry.is_dir()
    return entry.is_file() and (entry.name in RUN_FILES or entry.name in RUN_TEMPORARIES or entry.name in recorded)


def _recorded_outputs(out: Path) -> frozenset[str]:
    """The model and tokenizer file names ``outputs.json`` records (empty where there is none)."""
    path = out / OUTPUTS_NAME
    if path.is_symlink() or not path.is_file():
        return frozenset()
    with open(path, "rb") as handle:
        data = handle.read(MAX_OUTPUTS_BYTES + 1)
    try:
        names = json.loads(data)["files"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise OutputExistsError(
            f"'{path}' is damaged, so which files the run wrote is unknown; remove it and the model files "
            "beside it, or choose another --out"
        ) from exc
    if not isinstance(names, list) or not all(
        isinstance(name, str) and is_plain_file_name(name) and name not in RUN_FILES + RUN_FOLDERS for name in names
    ):
        raise OutputExistsError(
            f"'{path}' lists names that are not plain file names; remove it and the model files beside it, "
            "or choose another --out"
        )
    return frozenset(names)


def clear_previous_run(plan: OutputPlan) -> None:
    """Delete what :func:`check_output` found of a previous run (``--overwrite``), then make sure ``out`` exists."""
    for name in plan.replace:
        path = plan.out / name
        if name in RUN_FOLDERS:
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    plan.out.mkdir(parents=True, exist_ok=True)


def save_student(
    plan: OutputPlan,
    model: torch.nn.Module,
    tokenizer: Any,
    state_dict: dict[str, torch.Tensor] | None = None,
    extra_files: dict[str, bytes] | None = None,
) -> list[str]:
    """Save the final model and tokenizer into ``out``; return the names of the files written.

    ``state_dict``: the model's weights where the model itself holds only shards of them (``--fsdp``).
    ``extra_files``: files written beside them (name -> bytes), e.g. the feature projectors.

    They are written to a staging folder first; their names are recorded in
    ``outputs.json`` before any is moved into ``out``, so a later ``--overwrite`` deletes
    exactly them, even after a crash half-way. Files an earlier save of this run recorded
    and this one did not write are deleted.
    """
    out = plan.out
    staging = out / FINAL_STAGING
    if staging.is_symlink():
        staging.unlink()
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    model.save_pretrained(str(staging), **({} if state_dict is None else {"state_dict": state_dict}))
    tokenizer.save_pretrained(str(staging))
    for name, payload in (extra_files or {}).items():
        (staging / name).write_bytes(payload)
    written = sorted(path.name for path in staging.iterdir())
    odd = [name for name in written if not (staging / name).is_file() or name in RUN_FILES + RUN_FOLDERS]
    if odd or not all(is_plain_file_name(name) for name in written):
        raise ConfigError(f"saving the student wrote unexpected entries {odd[:3]}; nothing was moved into --out")
    _write_outputs(out, sorted(plan.recorded | set(written)))
    for name in written:
        os.replace(staging / name, out / name)
    staging.rmdir()
    fsync_dir(out)
    for name in plan.recorded - set(written):
        (out / name).unlink(missing_ok=True)
    _write_outputs(out, written)
    return written


def _write_outputs(out: Path, names: list[str]) -> None:
    write_bytes_atomic(out / OUTPUTS_NAME, (json.dumps({"files": names}, indent=2) + "\n").encode())
