"""Checks on the paths a command is given: no URLs where only local folders work, no output that overlaps an input,
an output that is a folder (or can be made one)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from pipeline.errors import ConfigError, OutputExistsError

URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def reject_url(value: str, flag: str) -> None:
    """Refuse ``s3://...``, ``hf://...`` and other URLs for ``flag``, an output that must be local."""
    if URL.match(value):
        raise ConfigError(
            f"{flag} '{value}' is a URL; give a local path (caches are read from URLs as --cache, and "
            "teacher-cache writes them to a URL --out)"
        )


def _resolved(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def overlaps(first: str | Path, second: str | Path) -> bool:
    """Whether ``first`` and ``second`` are the same path or one lies inside the other (symlinks resolved)."""
    a, b = _resolved(first), _resolved(second)
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def reject_overlap(out: str | Path, out_flag: str, other: str | Path | None, other_flag: str) -> None:
    """Refuse an output path that is, contains or lies inside an input path."""
    if other is None or URL.match(str(other)):
        return
    if overlaps(out, other):
        raise ConfigError(
            f"{out_flag} '{out}' overlaps {other_flag} '{other}' (one is, contains or lies inside the other); "
            f"choose an {out_flag} folder outside it"
        )


def check_out_folder(out: Path) -> None:
    """Refuse an ``--out`` that is a dangling (or looping) symlink, or a file."""
    if out.is_symlink() and not out.exists():
        raise ConfigError(
            f"--out '{out}' is a symlink to '{os.readlink(out)}', which does not exist (or loops); "
            "create its target folder or give another path"
        )
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"--out '{out}' is a file; give a folder path")


def make_output_folder(out: Path) -> list[Path]:
    """Create ``out`` and any missing parents; return the folders created, outermost first."""
    missing = [folder for folder in (out, *out.parents) if not folder.exists()][::-1]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"cannot create --out '{out}' ({exc.strerror or exc}); give a folder path you can write to"
        ) from exc
    return missing
