"""Checks on the paths a command is given: no URLs where only local folders work, no output that overlaps an input."""

from __future__ import annotations

import re
from pathlib import Path

from pipeline.errors import ConfigError

URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def reject_url(value: str, flag: str) -> None:
    """Refuse ``s3://...``, ``hf://...`` and other URLs for ``flag``: only local paths are supported yet."""
    if URL.match(value):
        raise ConfigError(f"{flag} '{value}' is a URL; remote storage is not supported yet: give a local path")


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
