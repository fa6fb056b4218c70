"""State of a pass in progress: the journal of committed shards, the folder lock, and the run log."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
from pathlib import Path
from typing import Any

from pipeline.errors import CacheLockedError
from pipeline.manifest import ShardEntry
from pipeline.store.atomic import write_bytes_atomic
from pipeline.store.layout import JOURNAL_NAME, LOCK_NAME, RUN_LOG_NAME


def write_journal(cache_dir: Path, header: dict[str, Any], shards: list[ShardEntry]) -> None:
    """Record a pass in progress: the settings that define it and the shards committed so far."""
    journal = {"header": header, "shards": [entry.to_json() for entry in shards]}
    payload = (json.dumps(journal, indent=1, sort_keys=True, ensure_ascii=True) + "\n").encode("ascii")
    write_bytes_atomic(cache_dir / JOURNAL_NAME, payload, crash_name="journal")


def read_journal(cache_dir: Path) -> tuple[dict[str, Any], list[ShardEntry]] | None:
    """The journal of an unfinished pass, or ``None`` if there is none or it is unreadable."""
    path = cache_dir / JOURNAL_NAME
    if not path.is_file():
        return None
    try:
        journal = json.loads(path.read_bytes())
        shards = [ShardEntry(**item) for item in journal["shards"]]
        return journal["header"], shards
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        return None


class CacheLock:
    """An exclusive ``flock`` on ``CACHE/.lock`` for the length of a teacher pass.

    The kernel drops the lock when its process dies, kill -9 included, so a crashed pass
    never blocks the next one; the file's content (pid, host) only names the holder in
    the error message. On a filesystem without ``flock`` support the lock is refused.
    """

    def __init__(self, cache_dir: Path) -> None:
        self.path = cache_dir / LOCK_NAME
        self._handle: Any = None

    def __enter__(self) -> CacheLock:
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise CacheLockedError(
                f"another teacher pass ({holder}) is writing to '{self.path.parent}'; wait for it to finish, "
                f"or, if that process is gone, delete '{self.path}' and retry"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {platform.node()}\n")
        handle.flush()
        self._handle = handle
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._handle.close()


def write_run_log(cache_dir: Path, run: dict[str, Any]) -> None:
    """Timings, host and paths of this run: outside the manifest, so the cache stays deterministic."""
    write_bytes_atomic(
        cache_dir / RUN_LOG_NAME, (json.dumps(run, indent=2, sort_keys=True) + "\n").encode(), crash_name="run-log"
    )
