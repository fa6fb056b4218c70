"""Resumable training checkpoints: safetensors for tensors, JSON for the rest. Nothing is pickled.

A checkpoint is a folder ``checkpoints/step-NNNNNNN/`` holding ``model.safetensors``,
``optimizer.safetensors`` (every optimizer state tensor and the RNG states) and
``state.json`` (step, data position, optimizer hyper-parameters, the run's config).
``checkpoints/latest.json`` names the newest complete one; it is written after the
folder is renamed into place, so a crash never leaves it pointing at a torn checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from pipeline.errors import CacheError, ConfigError
from pipeline.store.atomic import fsync_dir, write_bytes_atomic

CHECKPOINTS = "checkpoints"
LATEST = "latest.json"


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for param_id, values in state["state"].items():
        for name, value in values.items():
            tensor = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"state.{param_id}.{name}"] = tensor.detach().cpu().contiguous()
    return tensors, state["param_groups"]


def save_checkpoint(
    out: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
) -> Path:
    """Write a checkpoint for ``step`` and point ``latest.json`` at it; return its folder."""
    root = out / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    staging = root / f".step-{step:07d}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    save_model(model, str(staging / "model.safetensors"))
    tensors, param_groups = _optimizer_tensors(optimizer)
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for index, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{index}"] = cuda_state
    save_file(tensors, str(staging / "optimizer.safetensors"))
    state = {"step": step, "param_groups": param_groups, **trainer_state}
    write_bytes_atomic(staging / "state.json", (json.dumps(state, indent=2, sort_keys=True) + "\n").encode())
    fsync_dir(staging)
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)
    fsync_dir(root)
    write_bytes_atomic(root / LATEST, (json.dumps({"step": step, "path": final.name}) + "\n").encode())
    return final


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint folder under ``out``, or ``None``."""
    pointer = out / CHECKPOINTS / LATEST
    if not pointer.is_file():
        return None
    try:
        name = json.loads(pointer.read_text())["path"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise CacheError(f"{pointer} is damaged; delete it to resume from scratch") from None
    folder = out / CHECKPOINTS / Path(name).name
    if not folder.is_dir():
        raise CacheError(f"{pointer} names {name}, which is missing; delete it to resume from scratch")
    return folder


def load_checkpoint(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore model, optimizer and RNG state from ``folder``; return its ``state.json``."""
    state = json.loads((folder / "state.json").read_text())
    missing, unexpected = load_model(model, str(folder / "model.safetensors"), strict=False)
    if unexpected or _untied(model, missing):
        raise ConfigError(
            f"checkpoint {folder.name} does not match the student (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    tensors = load_file(str(folder / "optimizer.safetensors"))
    optimizer_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if key.startswith("state."):
            _, param_id, name = key.split(".", 2)
            optimizer_state.setdefault(int(param_id), {})[name] = tensor
    optimizer.load_state_dict({"state": optimizer_state, "param_groups": state["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    cuda_states = [tensors[key] for key in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    return state


def _untied(model: torch.nn.Module, missing: list[str]) -> list[str]:
    """Names in ``missing`` that share storage with no loaded tensor.

    safetensors' ``save_model`` keeps one name of each group of tied tensors, so the others
    come back as missing although loading the kept one filled them.
    """
    state = model.state_dict()
    loaded = {state[name].data_ptr() for name in state if name not in missing}
    return [name for name in missing if state[name].data_ptr() not in loaded]
