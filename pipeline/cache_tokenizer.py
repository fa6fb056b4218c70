"""Loading the tokenizer copy a cache carries, treating it as untrusted input.

A cache may come from someone else (see the threat model in ``DESIGN.md``), so its
``tokenizer/`` folder is never handed to ``from_pretrained`` as it is. Instead:

1. Only the files the manifest lists are copied, into a private temporary folder. Each is
   opened by its plain name relative to ``tokenizer/`` (itself not a symbolic link) with
   ``O_NOFOLLOW``, must be a regular file, is read up to its listed size, and the sha256
   of the bytes actually copied must match the manifest: always, even with
   ``--no-verify`` (the copy is small, and hashing the copy closes the gap between
   checking a file and loading it).
2. A tokenizer that asks for custom code is refused: a listed ``.py`` file, or an
   ``auto_map`` anywhere in its ``tokenizer_config.json`` or ``config.json``; so is a
   ``*_file`` setting naming a file that is not in the copy.
3. The tokenizer loads from the private folder with remote code disabled, so what a
   student later saves is what ``save_pretrained`` writes from it, nothing else.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

from pipeline import models
from pipeline.cache import Cache
from pipeline.errors import CacheError, SourceNotFoundError, first_line
from pipeline.manifest import TokenizerFile
from pipeline.store.layout import TOKENIZER_DIR

# No tokenizer file comes near this (Gemma 3's tokenizer.json is 33 MiB).
MAX_TOKENIZER_FILE_BYTES = 64 << 20
# Files transformers reads ``auto_map`` (custom code) and ``*_file`` settings from.
CONFIG_FILES = ("tokenizer_config.json", "config.json")
CUSTOM_CODE_KEY = "auto_map"
FIX = "pass --tokenizer with a tokenizer you trust, or use a student folder that has its own"


def load_cache_tokenizer(cache: Cache) -> Any:
    """The tokenizer from ``cache``'s ``tokenizer/`` copy, loaded as the module docstring says.

    Raises :class:`CacheError` naming the file for a missing, linked, oversized or
    altered file, a tokenizer that asks for custom code, or one that does not load.
    """
    listed = cache.manifest.tokenizer_files
    if not listed:
        raise CacheError(f"the cache has no tokenizer copy and the student brings none; {FIX}")
    with tempfile.TemporaryDirectory(prefix="distill-cache-tokenizer-") as private:
        folder = Path(private)
        copy_listed_files(cache.path / TOKENIZER_DIR, listed, folder)
        refuse_custom_code(folder, listed)
        try:
            return models.load_tokenizer(str(folder), "cache", trust_remote_code=False)
        except SourceNotFoundError as exc:
            cause = exc.__cause__ or exc
            raise CacheError(
                f"the cache's tokenizer copy does not load ({first_line(cause, 120)}); the cache is damaged: {FIX}"
            ) from exc


def is_plain_file_name(name: str) -> bool:
    """A name that can only mean a file directly inside a folder: no separators, ``..``, NUL or leading dot."""
    return (
        0 < len(name) <= 255
        and not name.startswith(".")
        and ".." not in name
        and not any(char in name for char in "/\\\0")
    )


def copy_listed_files(source: Path, listed: tuple[TokenizerFile, ...], dest: Path) -> None:
    """Copy each listed file from ``source`` into the empty folder ``dest``, checking it as the module says."""
    try:
        dir_fd = os.open(source, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as exc:
        raise CacheError(
            f"the cache's '{TOKENIZER_DIR}' folder is missing or is a symbolic link; the cache is damaged: {FIX}"
        ) from exc
    try:
        for item in listed:
            (dest / _checked_name(item)).write_bytes(_read_listed(dir_fd, item))
    finally:
        os.close(dir_fd)


def _checked_name(item: TokenizerFile) -> str:
    if not is_plain_file_name(item.name):
        raise CacheError(f"the manifest lists tokenizer file {item.name[:80]!r}, which is not a plain file name")
    return item.name


def _read_listed(dir_fd: int, item: TokenizerFile) -> bytes:
    """The bytes of one listed file, opened without following links, size- and hash-checked."""
    name = _checked_name(item)
    if item.bytes > MAX_TOKENIZER_FILE_BYTES:
        raise CacheError(
            f"tokenizer file '{name}' is listed at {item.bytes:,} bytes, more than the "
            f"{MAX_TOKENIZER_FILE_BYTES:,} a tokenizer file may have; the cache is damaged"
        )
    try:
        # O_NONBLOCK: opening a FIFO planted under a listed name must not wait for a writer.
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
    except OSError as exc:
        raise CacheError(
            f"tokenizer file '{name}' is missing or is a symbolic link in the cache; the cache is damaged"
        ) from exc
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise CacheError(f"tokenizer file '{name}' is not a regular file in the cache; the cache is damaged")
        data = handle.read(item.bytes + 1)
    if len(data) != item.bytes or hashlib.sha256(data).hexdigest() != item.sha256:
        raise CacheError(f"tokenizer file '{name}' fails its checksum in the cache; the cache is damaged")
    return data


def refuse_custom_code(folder: Path, listed: tuple[TokenizerFile, ...]) -> None:
    """Refuse a tokenizer copy that asks to run code or to read a file outside the copy."""
    names = {item.name for item in listed}
    for name in sorted(names):
        if name.endswith(".py"):
            raise CacheError(f"the cache's tokenizer ships Python code ('{name}'); a cache may not run code: {FIX}")
    for name in CONFIG_FILES:
        if name not in names:
            continue
        try:
            settings = json.loads((folder / name).read_bytes())
            custom_code = _has_key(settings, CUSTOM_CODE_KEY)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise CacheError(
                f"the cache's tokenizer file '{name}' is not valid JSON ({first_line(exc, 80)}); the cache is damaged"
            ) from exc
        if custom_code:
            raise CacheError(
                f"the cache's tokenizer asks for custom code ('{CUSTOM_CODE_KEY}' in {name}); "
                f"a cache may not run code: {FIX}"
            )
        if isinstance(settings, dict):
            for key, value in settings.items():
                if key.endswith("_file") and value is not None and value not in names:
                    raise CacheError(
                        f"the cache's tokenizer setting {key}={str(value)[:80]!r} in {name} names a file "
                        f"outside its copy; the cache is damaged: {FIX}"
                    )


def _has_key(value: Any, key: str) -> bool:
    """Whether ``key`` is an object member anywhere in the JSON ``value``."""
    if isinstance(value, dict):
        return key in value or any(_has_key(item, key) for item in value.values())
    if isinstance(value, list):
        return any(_has_key(item, key) for item in value)
    return False
