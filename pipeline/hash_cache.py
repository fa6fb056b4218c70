"""Remembered sha256 of large files (a teacher's weights), so repeated passes do not re-read hundreds of GB.

An entry is keyed by the file's resolved path and trusted only while the file's size,
modification time, inode and status-change time (``st_ctime_ns``, which the system sets
on any write, rename or metadata change and which no user call can set back) are all
what they were when it was hashed; any difference, or a damaged store, and the file is
read again. The store is one small JSON file, by default
``$XDG_CACHE_HOME/distill/file-hashes.json`` (``~/.cache/...``), or
``$DISTILL_HASH_CACHE``; ``DISTILL_HASH_CACHE=off`` turns it off. At most
:data:`MAX_ENTRIES` entries are kept, the least recently used dropped first.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from pipeline.fingerprint import sha256_file

MAX_ENTRIES = 4096
MAX_STORE_BYTES = 4 << 20


def store_path() -> Path | None:
    """Where the remembered hashes live, or ``None`` when turned off."""
    configured = os.environ.get("DISTILL_HASH_CACHE")
    if configured == "off":
        return None
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "distill" / "file-hashes.json"


def _stamp(path: Path) -> dict[str, int]:
    status = path.stat()
    return {
        "size": status.st_size,
        "mtime_ns": status.st_mtime_ns,
        "ino": status.st_ino,
        "ctime_ns": status.st_ctime_ns,
    }


def _load(store: Path) -> dict[str, Any]:
    try:
        if store.is_symlink() or store.stat().st_size > MAX_STORE_BYTES:
            return {}
        entries = json.loads(store.read_text())
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


def _save(store: Path, entries: dict[str, Any]) -> None:
    kept = sorted(entries.items(), key=lambda item: item[1].get("used", 0))[-MAX_ENTRIES:]
    try:
        store.parent.mkdir(parents=True, exist_ok=True)
        tmp = store.with_name(f".{store.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(dict(kept), sort_keys=True))
        tmp.replace(store)
    except OSError:
        pass  # a read-only home: the hash is still right, only not remembered


def cached_sha256(path: str | Path) -> str:
    """``sha256_file(path)``, read from the store when the file is unchanged since it was hashed."""
    path = Path(path).resolve()
    store = store_path()
    if store is None:
        return sha256_file(path)
    stamp = _stamp(path)
    entries = _load(store)
    entry = entries.get(str(path))
    if isinstance(entry, dict) and entry.get("stamp") == stamp and isinstance(entry.get("sha256"), str):
        digest = entry["sha256"]
    else:
        digest = sha256_file(path)
        if _stamp(path) != stamp:  # written while being read: remember nothing
            return digest
    entries[str(path)] = {"stamp": stamp, "sha256": digest, "used": time.time()}
    _save(store, entries)
    return digest
