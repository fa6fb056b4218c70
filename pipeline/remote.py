"""Caches on object storage through fsspec URLs (``s3://``, ``gs://``, ``hf://datasets/...``, ``file://``, ...).

**Reading** (:func:`local_copy`): the manifest is read and validated first; every file it
lists (shards, tokenizer files) is streamed into a content-addressed store, checked
against the manifest's sha256 on the way in, and hard-linked into a mirror folder keyed
by the manifest's own sha256, which the ordinary reader then opens. A second run finds
the mirror and downloads nothing but the manifest. The store lives in
``$DISTILL_REMOTE_CACHE`` (default ``~/.cache/distill/remote``): ``blobs/SHA256`` and
``mirrors/MANIFEST_SHA256/``; it is kept under ``$DISTILL_REMOTE_CACHE_BYTES`` (default
100 GiB) by removing the least recently used mirrors and the blobs no mirror links.

**Writing** (:func:`upload_cache`): the teacher pass writes to a local staging folder
(its journal and lock live there, so a killed pass resumes from it), then uploads the
tokenizer files and shards, and the manifest last: a reader never sees a partial cache.
Two writers to one remote prefix are not prevented.

Credentials come from the standard places of each filesystem (environment variables,
fsspec configuration such as ``FSSPEC_S3_ENDPOINT_URL``), never from flags.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

from pipeline import paths
from pipeline.errors import CacheError, ConfigError, first_line
from pipeline.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, SHARD_PATTERN, Manifest, parse_manifest

DEFAULT_LIMIT_BYTES = 100 << 30
TOKENIZER_DIR = "tokenizer"
CHUNK = 1 << 20


def is_remote(path: str | Path) -> bool:
    """Whether ``path`` is a URL (a remote cache) rather than a local path."""
    return bool(paths.URL.match(str(path)))


def store_root() -> Path:
    return Path(os.environ.get("DISTILL_REMOTE_CACHE") or Path.home() / ".cache" / "distill" / "remote")


def store_limit() -> int:
    value = os.environ.get("DISTILL_REMOTE_CACHE_BYTES")
    return int(value) if value and value.isdigit() else DEFAULT_LIMIT_BYTES


def filesystem(url: str) -> tuple[Any, str]:
    """``(fsspec filesystem, path within it)`` of ``url``; a missing implementation is one line naming it."""
    try:
        import fsspec

        fs, path = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:
        raise ConfigError(f"'{url}': {first_line(exc, 160)}; install the filesystem's package (e.g. s3fs)") from None
    return fs, path.rstrip("/")


def read_remote_manifest(url: str) -> tuple[bytes, Manifest]:
    """The manifest's bytes and its validated form."""
    fs, root = filesystem(url)
    path = f"{root}/{MANIFEST_NAME}"
    try:
        size = fs.size(path)
        if size is None or size > MAX_MANIFEST_BYTES:
            raise CacheError(f"'{url}': {MANIFEST_NAME} is larger than {MAX_MANIFEST_BYTES} bytes")
        data = fs.cat_file(path)
    except FileNotFoundError:
        raise CacheError(f"'{url}' is not a cache (no {MANIFEST_NAME}); check the URL") from None
    except CacheError:
        raise
    except Exception as exc:  # each filesystem raises its own: credentials, network, permissions
        raise CacheError(f"'{url}': cannot read {MANIFEST_NAME} ({first_line(exc, 160)})") from None
    return data, parse_manifest(data)


def local_copy(url: str) -> Path:
    """The local mirror of the remote cache at ``url``, downloading what the store lacks; see the module."""
    data, manifest = read_remote_manifest(url)
    mirror = store_root() / "mirrors" / hashlib.sha256(data).hexdigest()
    if (mirror / MANIFEST_NAME).is_file():
        os.utime(mirror)
        return mirror
    fs, root = filesystem(url)
    staging = mirror.with_name(f".{mirror.name}.{os.getpid()}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / TOKENIZER_DIR).mkdir(parents=True)
    try:
        for item in manifest.tokenizer_files:
            _link(
                _fetch(fs, f"{root}/{TOKENIZER_DIR}/{item.name}", item.sha256, item.bytes, url),
                staging / TOKENIZER_DIR / item.name,
            )
        for entry in manifest.shards:
            if not SHARD_PATTERN.fullmatch(entry.name):
                raise CacheError(f"'{url}': shard name {entry.name[:80]!r} is not of the form shard-NNNNN.arrow")
            _link(_fetch(fs, f"{root}/{entry.name}", entry.sha256, entry.bytes, url), staging / entry.name)
        (staging / MANIFEST_NAME).write_bytes(data)
        try:
            staging.rename(mirror)
        except OSError:  # another process made the same mirror meanwhile
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    evict(keep=mirror)
    return mirror


def _fetch(fs: Any, path: str, sha256: str, size: int, url: str) -> Path:
    """The blob of ``sha256``, downloaded from ``path`` unless the store has it; checked before it is kept."""
    blobs = store_root() / "blobs"
    blob = blobs / sha256
    if blob.is_file() and blob.stat().st_size == size:
        os.utime(blob)
        return blob
    blobs.mkdir(parents=True, exist_ok=True)
    tmp = blobs / f".{sha256}.{os.getpid()}.tmp"
    digest, written = hashlib.sha256(), 0
    name = path.rsplit("/", 1)[-1]
    try:
        with fs.open(path, "rb") as source, open(tmp, "wb") as sink:
            while block := source.read(CHUNK):
                written += len(block)
                if written > size:
                    raise CacheError(f"'{url}': '{name}' is larger than the manifest's {size} bytes; it is damaged")
                digest.update(block)
                sink.write(block)
        if written != size or digest.hexdigest() != sha256:
            raise CacheError(
                f"'{url}': downloaded '{name}' has {written} bytes and sha256 {digest.hexdigest()[:12]}, the manifest "
                f"says {size} and {sha256[:12]}; the remote cache is damaged"
            )
        tmp.replace(blob)
    except FileNotFoundError:
        raise CacheError(f"'{url}': '{name}' is missing from the remote cache") from None
    finally:
        tmp.unlink(missing_ok=True)
    return blob


def _link(blob: Path, target: Path) -> None:
    """Hard-link a blob into a mirror (a copy where links are not possible); the reader refuses symlinks."""
    try:
        os.link(blob, target)
    except OSError:
        shutil.copyfile(blob, target)


def evict(keep: Path | None = None) -> None:
    """Keep the store under its limit: drop the least recently used mirrors, then unlinked blobs."""
    root = store_root()
    blobs = sorted((root / "blobs").glob("[0-9a-f]*"), key=lambda path: path.stat().st_mtime)
    total = sum(blob.stat().st_size for blob in blobs)
    limit = store_limit()
    if total <= limit:
        return
    mirrors = sorted((root / "mirrors").glob("[0-9a-f]*"), key=lambda path: path.stat().st_mtime)
    for mirror in mirrors:
        if total <= limit:
            break
        if keep is not None and mirror == keep:
            continue
        shutil.rmtree(mirror, ignore_errors=True)
        for blob in list(blobs):
            if blob.stat().st_nlink == 1:  # no mirror links it any more
                total -= blob.stat().st_size
                blob.unlink(missing_ok=True)
                blobs.remove(blob)


def staging_folder(url: str) -> Path:
    """The local folder a teacher pass writes ``url``'s cache into before uploading it."""
    return store_root() / "staging" / hashlib.sha256(url.encode()).hexdigest()[:24]


def check_remote_out(url: str, overwrite: bool) -> None:
    """Refuse, before anything runs, an ``--out`` URL that already holds a cache, unless ``--overwrite``."""
    fs, root = filesystem(url)
    try:
        exists = fs.exists(f"{root}/{MANIFEST_NAME}")
    except Exception as exc:  # each filesystem raises its own: credentials, network, permissions
        raise ConfigError(f"--out '{url}': cannot reach the storage ({first_line(exc, 160)})") from None
    if exists and not overwrite:
        raise ConfigError(f"--out '{url}' already holds a cache; pass --overwrite to replace it, or choose another URL")


def upload_cache(local: Path, url: str) -> None:
    """Upload a finished local cache: tokenizer files and shards, then the manifest, then drop stale shards."""
    fs, root = filesystem(url)
    fs.makedirs(root, exist_ok=True)
    if fs.exists(f"{root}/{MANIFEST_NAME}"):
        fs.rm_file(f"{root}/{MANIFEST_NAME}")  # the cache being replaced stops being one first
    files = sorted((local / TOKENIZER_DIR).iterdir()) if (local / TOKENIZER_DIR).is_dir() else []
    if files:
        fs.makedirs(f"{root}/{TOKENIZER_DIR}", exist_ok=True)
    for path in files:
        _put(fs, path, f"{root}/{TOKENIZER_DIR}/{path.name}")
    shards = sorted(local.glob("shard-*.arrow"))
    for path in shards:
        _put(fs, path, f"{root}/{path.name}")
    _put(fs, local / MANIFEST_NAME, f"{root}/{MANIFEST_NAME}")
    kept = {path.name for path in shards}
    for remote in fs.glob(f"{root}/shard-*.arrow"):
        if remote.rsplit("/", 1)[-1] not in kept:
            fs.rm_file(remote)


def _put(fs: Any, local: Path, remote: str) -> None:
    fs.put_file(str(local), remote)
    if fs.size(remote) != local.stat().st_size:
        raise CacheError(
            f"uploading '{local.name}' to '{remote}' left {fs.size(remote)} bytes, not {local.stat().st_size}"
        )
