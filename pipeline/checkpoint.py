"""Resumable training checkpoints: safetensors for tensors, JSON for the rest. Nothing is pickled.

A checkpoint is a folder ``checkpoints/step-NNNNNNN/`` holding ``model.safetensors``,
``optimizer.safetensors`` (every optimizer state tensor and the RNG states) and
``state.json`` (step, data position, the number of processes that wrote it, optimizer
hyper-parameters, the run's config). A sharded (``--fsdp``) student is gathered to full
tensors first, so every checkpoint has the single-process layout and resumes at any
number of processes that keeps the data order (:func:`check_world_size`).
``checkpoints/latest.json`` names the newest complete one; it is written after the
folder is renamed into place, so a crash never leaves it pointing at a torn checkpoint.

Reading one treats every file as possibly damaged or edited: each problem ends in a
:class:`~pipeline.errors.CacheError` (a damaged file) or :class:`~pipeline.errors.ConfigError`
(a checkpoint of another student, or a resume with other settings: see
:func:`restore_checkpoint`) before any training continues.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file, save_model

from pipeline.config import TEMPERATURE_BOUNDS, StudentTrainConfig
from pipeline.errors import CacheError, ConfigError, first_line
from pipeline.store.atomic import fsync_dir, write_bytes_atomic
from pipeline.student_fsdp import full_state, full_tensor, is_sharded, local_view, shard_like

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LATEST = "latest.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
STEP_FOLDER = re.compile(r"step-\d{7,}")
MAX_LATEST_BYTES = 1 << 12
MAX_STATE_BYTES = 1 << 24
# What ``state.json`` must hold besides ``param_groups``, and the JSON type of each.
STATE_FIELDS: dict[str, type] = {"step": int, "rows_seen": int, "config": dict, "cache_manifest_sha256": str}
# Per-parameter AdamW state: ``step`` is a scalar, the moments have the parameter's shape.
OPTIMIZER_STATE_NAMES = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
RESTART_HINT = "point checkpoints/latest.json at an earlier checkpoint, or start afresh with --overwrite"


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for param_id, values in state["state"].items():
        for name, value in values.items():
            tensor = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"state.{param_id}.{name}"] = full_tensor(tensor.detach()).cpu().contiguous()
    return tensors, state["param_groups"]


def save_checkpoint(
    out: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    write: bool = True,
) -> Path:
    """Write a checkpoint for ``step`` and point ``latest.json`` at it; return its folder.

    A sharded (``--fsdp``) model and its optimizer state are gathered to full tensors first, so
    the checkpoint is the one a single process writes; every rank calls this then (gathering is
    a collective), and only the one told to ``write`` writes.
    """
    weights: Any = _Gathered(full_state(model)) if is_sharded(model) else model
    tensors, param_groups = _optimizer_tensors(optimizer)
    root = out / CHECKPOINTS
    final = root / f"step-{step:07d}"
    if not write:
        return final
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".step-{step:07d}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    save_model(weights, str(staging / MODEL_FILE))
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for index, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{index}"] = cuda_state
    save_file(tensors, str(staging / OPTIMIZER_FILE))
    state = {"step": step, "param_groups": param_groups, **trainer_state}
    write_bytes_atomic(staging / STATE_FILE, (json.dumps(state, indent=2, sort_keys=True) + "\n").encode())
    fsync_dir(staging)
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)
    fsync_dir(root)
    write_bytes_atomic(root / LATEST, (json.dumps({"step": step, "path": final.name}) + "\n").encode())
    return final


class _Gathered:
    """A model's gathered state, shaped as ``save_model`` reads a model (tied names share one tensor, so it
    keeps one of them, as for the model itself)."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        self._state = state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self._state)


def _read_json(path: Path, limit: int, what: str) -> Any:
    """Parse a small JSON file that must be a regular file (not a link) of at most ``limit`` bytes."""
    if path.is_symlink() or not path.is_file():
        raise CacheError(f"{what} '{path}' is missing or not a regular file; {RESTART_HINT}")
    with open(path, "rb") as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise CacheError(f"{what} '{path}' is larger than {limit:,} bytes; it is damaged: {RESTART_HINT}")
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CacheError(f"{what} '{path}' is not valid JSON ({first_line(exc, 80)}); {RESTART_HINT}") from exc


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint folder under ``out``, or ``None`` where there is none.

    ``latest.json`` must name a ``step-NNNNNNN`` folder directly inside ``checkpoints/``;
    neither that folder nor ``checkpoints/`` may be a symbolic link.
    """
    root = out / CHECKPOINTS
    if root.is_symlink():
        raise CacheError(f"'{root}' is a symbolic link; student-train writes a plain folder there: {RESTART_HINT}")
    pointer = root / LATEST
    if not pointer.exists() and not pointer.is_symlink():
        return None
    content = _read_json(pointer, MAX_LATEST_BYTES, "checkpoint pointer")
    name = content.get("path") if isinstance(content, dict) else None
    if not isinstance(name, str) or not STEP_FOLDER.fullmatch(name):
        raise CacheError(f"{pointer} does not name a step-NNNNNNN folder inside {CHECKPOINTS}/; {RESTART_HINT}")
    folder = root / name
    if folder.is_symlink() or not folder.is_dir():
        raise CacheError(f"{pointer} names {name}, which is missing or not a plain folder; {RESTART_HINT}")
    return folder


def read_state(folder: Path) -> dict[str, Any]:
    """``state.json`` of a checkpoint, with each field's JSON type checked (values are the caller's to judge)."""
    state = _read_json(folder / STATE_FILE, MAX_STATE_BYTES, f"checkpoint {folder.name}:")
    if not isinstance(state, dict):
        raise CacheError(f"checkpoint {folder.name}: {STATE_FILE} is not a JSON object; {RESTART_HINT}")
    for key, kind in STATE_FIELDS.items():
        value = state.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise CacheError(
                f"checkpoint {folder.name}: {STATE_FILE} field '{key}' is missing or not a {kind.__name__}; "
                f"{RESTART_HINT}"
            )
    groups = state.get("param_groups")
    if not isinstance(groups, list) or not all(isinstance(group, dict) for group in groups):
        raise CacheError(f"checkpoint {folder.name}: {STATE_FILE} field 'param_groups' is damaged; {RESTART_HINT}")
    return state


def load_checkpoint(
    folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Restore model, optimizer and RNG state from ``folder``; ``state`` is its :func:`read_state`.

    Every tensor's name and shape is checked against the model and optimizer first, so a
    checkpoint of another architecture or a damaged file is refused with one line. A sharded
    (``--fsdp``) model and its optimizer take each full tensor sharded as its parameter is.
    """
    weights = _read_tensors(folder, MODEL_FILE)
    _check_weights(folder, model, weights)
    current = model.state_dict()
    weights = {name: shard_like(tensor, current[name]) for name, tensor in weights.items()}
    tensors = _read_tensors(folder, OPTIMIZER_FILE)
    optimizer_state = _optimizer_state(folder, optimizer, tensors)
    _check_param_groups(folder, optimizer, state["param_groups"])
    rng = tensors.get("rng.torch")
    if rng is None or rng.dtype != torch.uint8 or rng.shape != torch.get_rng_state().shape:
        raise CacheError(f"checkpoint {folder.name}: {OPTIMIZER_FILE} lacks a valid rng.torch state; {RESTART_HINT}")
    try:
        model.load_state_dict(weights, strict=False)
        optimizer.load_state_dict({"state": optimizer_state, "param_groups": state["param_groups"]})
        torch.set_rng_state(rng)
        cuda_states = [tensors[key] for key in sorted(k for k in tensors if k.startswith("rng.cuda."))]
        if cuda_states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda_states)
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise CacheError(
            f"checkpoint {folder.name} cannot be restored ({first_line(exc, 120)}); {RESTART_HINT}"
        ) from exc


def resume_conflicts(cfg: StudentTrainConfig, saved: dict[str, Any], also_allowed: tuple[str, ...] = ()) -> list[str]:
    """``--flag was X, now Y`` for each setting outside ``RESUME_MAY_CHANGE`` and ``also_allowed`` that
    differs from ``saved``.

    ``saved`` is the checkpoint's ``config``; a setting it lacks (an older release) is
    compared with its default.
    """
    current = cfg.to_json()
    defaults = _default_settings()
    conflicts = []
    for name, now in current.items():
        was = saved.get(name, defaults[name])
        allowed = name in StudentTrainConfig.RESUME_MAY_CHANGE or name in also_allowed
        if not allowed and was != now:
            conflicts.append(f"{StudentTrainConfig.flag(name)} was {json.dumps(was)}, now {json.dumps(now)}")
    return conflicts


def _default_settings() -> dict[str, Any]:
    return StudentTrainConfig(cache="", student="", out="").to_json()


def check_world_size(folder: Path, state: dict[str, Any], cfg: StudentTrainConfig, world_size: int) -> bool:
    """Whether a checkpoint written by a launch on another number of processes may continue on ``world_size``.

    It may when the global micro-batch (``--batch-size x`` processes) is the same, so the data order
    and every optimizer step's rows are too: True, and ``--batch-size`` may then differ. Otherwise
    refused in one line naming both sizes. A checkpoint without ``world_size`` (an older release) ran
    on one process.
    """
    saved_world = state.get("world_size", 1)
    if isinstance(saved_world, bool) or not isinstance(saved_world, int) or saved_world < 1:
        raise CacheError(
            f"checkpoint {folder.name}: {STATE_FILE} field 'world_size' is not a positive integer; {RESTART_HINT}"
        )
    if saved_world == world_size:
        return False
    saved_batch = state["config"].get("batch_size", _default_settings()["batch_size"])
    if isinstance(saved_batch, bool) or not isinstance(saved_batch, int) or saved_batch < 1:
        raise CacheError(f"checkpoint {folder.name}: its config's batch_size is damaged; {RESTART_HINT}")
    micro_batch = saved_batch * saved_world
    if micro_batch == cfg.batch_size * world_size:
        return True
    fits = f" or --batch-size {micro_batch // world_size} on {world_size}" if micro_batch % world_size == 0 else ""
    raise ConfigError(
        f"--resume: the checkpoint was trained on {saved_world} process(es) x --batch-size {saved_batch} "
        f"({micro_batch} rows per micro-batch), this launch has {world_size} x --batch-size {cfg.batch_size}; "
        f"resume on {saved_world} process(es) with --batch-size {saved_batch}{fits}, so the data order is the same"
    )


def restore_checkpoint(
    folder: Path,
    cfg: StudentTrainConfig,
    cache_manifest_sha256: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    world_size: int = 1,
) -> tuple[int, int, float]:
    """Check a checkpoint against this run and restore it into ``model`` and ``optimizer``; return
    ``(step, rows_seen, temperature)``: the temperature ``--adapt-temperature`` had reached
    (``--temperature`` without it, or in a checkpoint that predates it).

    Refused, before anything is restored: settings outside ``RESUME_MAY_CHANGE`` that
    differ, another cache (by its manifest's sha256), a step past ``total_steps``, a launch on
    another number of processes than ``world_size`` that changes the data order
    (:func:`check_world_size`), and a ``rows_seen`` other than ``step x batch size x grad accum
    x processes`` (an edited one could make the data replay run for ever).
    """
    state = read_state(folder)
    world_changed = check_world_size(folder, state, cfg, world_size)
    conflicts = resume_conflicts(cfg, state["config"], ("batch_size",) if world_changed else ())
    if conflicts:
        raise ConfigError(f"--resume: {', '.join(conflicts)}; resume with the run's settings or start a new --out")
    if state["cache_manifest_sha256"] != cache_manifest_sha256:
        raise ConfigError("--resume: the checkpoint was trained on another cache; use the same --cache")
    step, rows_seen = state["step"], state["rows_seen"]
    if step < 0:
        raise CacheError(f"checkpoint {folder.name}: step {step} is negative; {STATE_FILE} is damaged: {RESTART_HINT}")
    if step > total_steps:
        raise ConfigError(
            f"--resume: checkpoint {folder.name} is at step {step}, past this run's {total_steps} steps; "
            f"give --max-steps of at least {step}"
        )
    rows_per_step = cfg.batch_size * cfg.grad_accum * world_size
    if rows_seen != step * rows_per_step:
        raise CacheError(
            f"checkpoint {folder.name}: rows_seen {rows_seen} is not step x --batch-size x --grad-accum x processes "
            f"= {step * rows_per_step}; its state.json is damaged: {RESTART_HINT}"
        )
    saved = state["config"]
    if (saved.get("max_steps"), saved.get("epochs")) != (cfg.max_steps, cfg.epochs):
        log.warning(
            "--resume: the run now lasts %d steps (--max-steps/--epochs changed): the learning-rate schedule "
            "changes from step %d on",
            total_steps,
            step,
        )
    temperature = saved_temperature(folder, state, cfg)
    load_checkpoint(folder, model, optimizer, state)
    return step, rows_seen, temperature


def saved_temperature(folder: Path, state: dict[str, Any], cfg: StudentTrainConfig) -> float:
    """The temperature to continue with: ``state.json``'s under ``--adapt-temperature`` (checked to lie
    within its bounds), else ``--temperature``."""
    temperature = state.get("temperature", cfg.temperature)
    if not cfg.adapt_temperature:
        return cfg.temperature
    low, high = TEMPERATURE_BOUNDS
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not low <= temperature <= high:
        raise CacheError(
            f"checkpoint {folder.name}: {STATE_FILE} field 'temperature' is not a number in [{low:g}, {high:g}]; "
            f"{RESTART_HINT}"
        )
    return float(temperature)


def _read_tensors(folder: Path, name: str) -> dict[str, torch.Tensor]:
    path = folder / name
    if path.is_symlink() or not path.is_file():
        raise CacheError(f"checkpoint {folder.name}: {name} is missing or not a regular file; {RESTART_HINT}")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors reports every malformed file as a plain SafetensorError
        raise CacheError(
            f"checkpoint {folder.name}: {name} is not a readable safetensors file ({first_line(exc, 100)}); "
            f"{RESTART_HINT}"
        ) from exc


def _check_weights(folder: Path, model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    expected = model.state_dict()
    unexpected = [name for name in weights if name not in expected]
    resized = [name for name in weights if name in expected and weights[name].shape != expected[name].shape]
    missing = _untied(model, [name for name in expected if name not in weights])
    if unexpected or resized or missing:
        detail = (
            f"size of {resized[0]} is {tuple(weights[resized[0]].shape)}, "
            f"the student's is {tuple(expected[resized[0]].shape)}"
            if resized
            else f"missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
        raise ConfigError(
            f"--resume: checkpoint {folder.name} is of another architecture than the student ({detail}); "
            "resume with the run's --student and --student-config, or start a new --out"
        )


def _optimizer_state(
    folder: Path, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]
) -> dict[int, dict[str, torch.Tensor]]:
    """``{param_id: {name: tensor}}`` from the ``state.<id>.<name>`` tensors, each checked against its parameter."""
    params = [param for group in optimizer.param_groups for param in group["params"]]
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if key.startswith("rng."):
            continue
        prefix, _, rest = key.partition(".")
        param_id, _, name = rest.partition(".")
        if prefix != "state" or not param_id.isdigit() or int(param_id) >= len(params):
            raise CacheError(f"checkpoint {folder.name}: {OPTIMIZER_FILE} holds an unknown tensor '{key[:80]}'")
        if name not in OPTIMIZER_STATE_NAMES:
            raise CacheError(f"checkpoint {folder.name}: {OPTIMIZER_FILE} holds an unknown tensor '{key[:80]}'")
        shape = torch.Size([]) if name == "step" else params[int(param_id)].shape
        if tensor.shape != shape or not (name == "step" or tensor.is_floating_point()):
            raise ConfigError(
                f"--resume: checkpoint {folder.name}'s optimizer state '{key}' does not fit the student's "
                f"parameter {int(param_id)} (shape {tuple(tensor.shape)}, not {tuple(shape)}); "
                "resume with the run's --student, or start a new --out"
            )
        state.setdefault(int(param_id), {})[name] = (
            tensor if name == "step" else shard_like(tensor, params[int(param_id)].detach())
        )
    return state


def _check_param_groups(folder: Path, optimizer: torch.optim.Optimizer, saved: list[dict[str, Any]]) -> None:
    """The saved parameter groups must fit the optimizer: as many groups, as many parameters in each, and
    settings of the same JSON types (settings only one side knows are left to torch, for other torch releases)."""
    current = json.loads(json.dumps(optimizer.state_dict()["param_groups"]))
    fits = len(saved) == len(current) and all(
        isinstance(old.get("params"), list)
        and _same_structure(old["params"], new["params"])
        and all(_same_structure(old[key], new[key]) for key in old.keys() & new.keys())
        for old, new in zip(saved, current, strict=False)
    )
    if not fits:
        raise CacheError(
            f"checkpoint {folder.name}: {STATE_FILE} 'param_groups' do not fit the optimizer (edited or damaged); "
            f"{RESTART_HINT}"
        )


def _same_structure(saved: Any, current: Any) -> bool:
    """Whether two JSON values have the same shape: dict keys, list lengths, and types (any number for a number)."""
    if isinstance(current, dict):
        return (
            isinstance(saved, dict)
            and saved.keys() == current.keys()
            and all(_same_structure(saved[key], current[key]) for key in current)
        )
    if isinstance(current, list):
        return (
            isinstance(saved, list)
            and len(saved) == len(current)
            and all(_same_structure(a, b) for a, b in zip(saved, current, strict=True))
        )
    if isinstance(current, bool) or current is None or isinstance(current, str):
        return type(saved) is type(current)
    return isinstance(saved, (int, float)) and not isinstance(saved, bool)


def _untied(model: torch.nn.Module, missing: list[str]) -> list[str]:
    """Names in ``missing`` that share storage with no loaded tensor.

    safetensors' ``save_model`` keeps one name of each group of tied tensors, so the others
    come back as missing although loading the kept one filled them.
    """
    state = {name: local_view(tensor) for name, tensor in model.state_dict().items()}
    loaded = {state[name].data_ptr() for name in state if name not in missing}
    return [name for name in missing if state[name].data_ptr() not in loaded]
