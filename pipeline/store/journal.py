"""State of a pass in progress: the journal of committed shards, the folder lock, and the run log."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import platform
import re
import stat
from pathlib import Path
from typing import Any

from pipeline.errors import CacheLockedError, OutputExistsError
from pipeline.manifest import ShardEntry
from pipeline.store.atomic import write_bytes_atomic
from pipeline.store.layout import JOURNAL_NAME, LOCK_NAME, RANK_JOURNAL_PATTERN, RUN_LOG_NAME, journal_name


def write_journal(cache_dir: Path, header: dict[str, Any], shards: list[ShardEntry], rank: int = 0) -> None:
    """Record a pass in progress: the settings that define it and the shards ``rank`` committed so far.

    Each process of a data-parallel pass keeps its own journal (:func:`~pipeline.store.layout.journal_name`);
    rank 0's also lists the shards earlier runs committed.
    """
    journal = {"header": header, "shards": [entry.to_json() for entry in shards]}
    payload = (json.dumps(journal, indent=1, sort_keys=True, ensure_ascii=True) + "\n").encode("ascii")
    write_bytes_atomic(cache_dir / journal_name(rank), payload, crash_name="journal")


def _read_one(path: Path) -> tuple[dict[str, Any], list[ShardEntry]] | None:
    if not path.is_file() or path.is_symlink():
        return None
    try:
        journal = json.loads(path.read_bytes())
        shards = [ShardEntry(**item) for item in journal["shards"]]
        return journal["header"], shards
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        return None


def read_journal(cache_dir: Path) -> tuple[dict[str, Any], list[ShardEntry]] | None:
    """Rank 0's journal of an unfinished pass, or ``None`` if there is none or it is unreadable."""
    return _read_one(cache_dir / JOURNAL_NAME)


def rank_journals(cache_dir: Path) -> list[Path]:
    """The journals of ranks other than 0 in ``cache_dir``, by rank."""
    return sorted(path for path in cache_dir.iterdir() if RANK_JOURNAL_PATTERN.fullmatch(path.name))


def read_journals(cache_dir: Path) -> list[tuple[str, tuple[dict[str, Any], list[ShardEntry]] | None]]:
    """Every journal in ``cache_dir`` (rank 0's first, if there), each by name with its content or ``None``."""
    names = ([JOURNAL_NAME] if (cache_dir / JOURNAL_NAME).exists() else []) + [p.name for p in rank_journals(cache_dir)]
    return [(name, _read_one(cache_dir / name)) for name in names]


def remove_journals(cache_dir: Path) -> None:
    """Delete every journal: the pass is finished (or left no shard worth resuming)."""
    for path in rank_journals(cache_dir):
        path.unlink(missing_ok=True)
    (cache_dir / JOURNAL_NAME).unlink(missing_ok=True)


# What a lock file of ours holds: ``pid 123 on host``.
LOCK_CONTENT = re.compile(r"pid \d+ on \S*\n?")
MAX_LOCK_BYTES = 4096
# Times to retry when the previous holder removes the lock file just as this pass locks it.
LOCK_ATTEMPTS = 5


class CacheLock:
    """An exclusive ``flock`` on ``CACHE/.lock`` for the length of a teacher pass.

    The kernel drops the lock when its process dies, kill -9 included, so a crashed pass
    never blocks the next one; the file's content (``pid N on HOST``) names the holder in
    the error message and marks the file as ours. A ``.lock`` left by a killed pass is
    taken over; one that is not ours (other content, a symlink, a folder) is refused and
    left exactly as it was. On exit the file is removed, and only if it is still the one
    this pass locked. On a filesystem without ``flock`` support the lock is refused.
    """

    def __init__(self, cache_dir: Path) -> None:
        self.path = cache_dir / LOCK_NAME
        self._fd: int | None = None

    def __enter__(self) -> CacheLock:
        for _ in range(LOCK_ATTEMPTS):
            fd, created = self._open()
            if fd is None:
                continue  # removed between our two opens: try again
            try:
                self._acquire(fd, created)
            except BaseException:
                if created:
                    self._unlink_if_same(fd)
                os.close(fd)
                raise
            if self._is_at_path(fd):
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"pid {os.getpid()} on {platform.node()}\n".encode(), 0)
                self._fd = fd
                return self
            os.close(fd)  # the previous holder removed the file as we locked it: lock the next one
        raise CacheLockedError(f"cannot take the lock '{self.path}': other passes keep replacing it; retry")

    def _open(self) -> tuple[int | None, bool]:
        """Create the lock file, or open the one there; refuse anything that is not a regular file."""
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            return os.open(self.path, flags | os.O_CREAT | os.O_EXCL, 0o644), True
        except FileExistsError:
            pass
        except OSError as exc:
            raise CacheLockedError(
                f"cannot create the lock file '{self.path}' ({exc.strerror}); give an --out folder you can write to"
            ) from exc
        try:
            if not stat.S_ISREG(os.lstat(self.path).st_mode):
                raise OSError(errno.EINVAL, "not a regular file")
            return os.open(self.path, flags), False
        except FileNotFoundError:
            return None, False
        except OSError as exc:
            raise OutputExistsError(
                f"--out '{self.path.parent}' holds a '{LOCK_NAME}' that this tool cannot use as its lock "
                f"({exc.strerror}); move it away, or choose another folder"
            ) from exc

    def _acquire(self, fd: int, created: bool) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, MAX_LOCK_BYTES, 0).decode("utf-8", "replace").strip() or "unknown"
            raise CacheLockedError(
                f"another pass ({holder[:80]}) is writing to '{self.path.parent}'; wait for it to finish, "
                f"or, if that process is gone, delete '{self.path}' and retry"
            ) from None
        except OSError as exc:
            raise CacheLockedError(
                f"cannot lock '{self.path}' ({exc.strerror}): the filesystem does not support flock; "
                "write the cache to a local disk"
            ) from exc
        if created:
            return
        content = os.pread(fd, MAX_LOCK_BYTES + 1, 0)
        if LOCK_CONTENT.fullmatch(content.decode("ascii", "replace")) is None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            shown = content[:40].decode("utf-8", "replace")
            raise OutputExistsError(
                f"--out '{self.path.parent}' holds a '{LOCK_NAME}' that this tool did not write ({shown!r}); "
                "move it away, or choose another folder"
            )

    def _is_at_path(self, fd: int) -> bool:
        try:
            return os.path.samestat(os.fstat(fd), os.lstat(self.path))
        except FileNotFoundError:
            return False

    def _unlink_if_same(self, fd: int) -> None:
        if self._is_at_path(fd):
            self.path.unlink(missing_ok=True)

    def __exit__(self, *exc: object) -> None:
        assert self._fd is not None, "CacheLock exited without being entered"
        # Unlink while still holding the lock, so no other pass can have locked this file meanwhile.
        self._unlink_if_same(self._fd)
        os.close(self._fd)
        self._fd = None


def write_run_log(cache_dir: Path, run: dict[str, Any]) -> None:
    """Timings, host and paths of this run: outside the manifest, so the cache stays deterministic."""
    write_bytes_atomic(
        cache_dir / RUN_LOG_NAME, (json.dumps(run, indent=2, sort_keys=True) + "\n").encode(), crash_name="run-log"
    )
