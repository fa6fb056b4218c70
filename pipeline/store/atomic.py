"""Durable file primitives: fsync, write-then-rename, and the fault-injection points the crash tests use."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

CRASH_ENV = "DISTILL_TEST_CRASH_AT"
_crash_counts: dict[str, int] = {}


def crash_point(name: str) -> None:
    """Fault injection for the crash tests: SIGKILL this process at the n-th pass through ``name``.

    Inert unless the environment variable ``DISTILL_TEST_CRASH_AT`` is ``name:n``.
    """
    target = os.environ.get(CRASH_ENV)
    if not target:
        return
    point, _, count = target.partition(":")
    if point != name:
        return
    _crash_counts[name] = _crash_counts.get(name, 0) + 1
    if _crash_counts[name] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def fsync_file(path: Path) -> None:
    """Make a file's bytes durable (before a manifest that lists it is written)."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_bytes_atomic(path: Path, payload: bytes, crash_name: str | None = None) -> None:
    """Write ``payload`` to ``path`` via a fsynced temporary file and a rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        half = len(payload) // 2
        handle.write(payload[:half])
        if crash_name:
            handle.flush()
            crash_point(f"{crash_name}-partial")
        handle.write(payload[half:])
        handle.flush()
        os.fsync(handle.fileno())
    if crash_name:
        crash_point(f"{crash_name}-before-rename")
    os.replace(tmp, path)
    fsync_dir(path.parent)
    if crash_name:
        crash_point(f"{crash_name}-after-rename")
