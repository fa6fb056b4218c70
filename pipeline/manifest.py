"""The manifest: building its checksum and validating one field by field (pure: bytes in, values out).

A cache may come from another team, so every field a reader relies on is checked for
type, range and consistency before anything is opened; an error names the field.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from pipeline import codec
from pipeline.errors import CacheError

FORMAT_NAME = "distill-cache"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
CHECKSUM_FIELD = "manifest_sha256"
SHARD_PATTERN = re.compile(r"shard-\d{5,9}\.arrow")
HEX64 = re.compile(r"[0-9a-f]{64}")
# Limits on what a reader accepts from an untrusted manifest.
MAX_MANIFEST_BYTES = 64 << 20
MAX_SHARDS = 1_000_000
MAX_ROWS_PER_SHARD = 1 << 20
MAX_SEQ_LEN = 1 << 20
MAX_K = 1 << 16
MAX_LOGIT_WIDTH = 1 << 24
MAX_SHARD_BYTES = 1 << 40
# Tokenizer fingerprint versions this reader can recompute (see pipeline.fingerprint).
TOKENIZER_FINGERPRINT_VERSIONS = 2


@dataclass(frozen=True)
class ShardEntry:
    """One shard as the manifest lists it."""

    name: str
    rows: int
    tokens: int
    bytes: int
    sha256: str
    first_seq: int

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "rows": self.rows,
            "tokens": self.tokens,
            "bytes": self.bytes,
            "sha256": self.sha256,
            "first_seq": self.first_seq,
        }


@dataclass(frozen=True)
class Manifest:
    """A validated manifest. ``raw`` is the parsed JSON; the fields are what readers need."""

    raw: dict[str, Any]
    seq_len: int
    k: int
    logit_width: int
    tokenizer_fingerprint: str
    tokenizer_fingerprint_version: int
    shards: tuple[ShardEntry, ...]

    @property
    def sequences(self) -> int:
        return sum(shard.rows for shard in self.shards)

    @property
    def tokens(self) -> int:
        return sum(shard.tokens for shard in self.shards)

    @property
    def bytes(self) -> int:
        return sum(shard.bytes for shard in self.shards)


def content_checksum(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON without its own checksum field.

    Canonical: ``json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)``.
    It catches a change anywhere in the manifest, including fields no reader checks.
    """
    body = {key: value for key, value in manifest.items() if key != CHECKSUM_FIELD}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def render_manifest(manifest: dict[str, Any]) -> bytes:
    """The manifest's file bytes: its checksum added, keys sorted, indented, ASCII."""
    sealed = {**manifest, CHECKSUM_FIELD: content_checksum(manifest)}
    return (json.dumps(sealed, indent=2, sort_keys=True, ensure_ascii=True) + "\n").encode("ascii")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(keys) != len(set(keys)):
        duplicate = next(key for key in keys if keys.count(key) > 1)
        raise CacheError(f"manifest: key '{duplicate}' appears twice in one object; the manifest is damaged")
    return dict(pairs)


def _field(container: dict[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in container:
        raise CacheError(f"manifest: missing field '{where}{key}'; the cache is damaged or not a cache")
    value = container[key]
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
        raise CacheError(f"manifest: field '{where}{key}' should be {kind.__name__}, got {type(value).__name__}")
    return value


def _int_in(container: dict[str, Any], key: str, where: str, low: int, high: int) -> int:
    value = _field(container, key, int, where)
    if not low <= value <= high:
        raise CacheError(f"manifest: field '{where}{key}' = {value} is outside [{low}, {high}]")
    return value


def parse_manifest(data: bytes) -> Manifest:
    """Validate manifest bytes; raise :class:`CacheError` naming the first problem found."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise CacheError(f"{MANIFEST_NAME} is larger than {MAX_MANIFEST_BYTES} bytes; refusing to parse it")
    try:
        raw = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise CacheError(f"{MANIFEST_NAME} is not valid JSON ({str(exc)[:120]}); the cache is damaged") from None
    if not isinstance(raw, dict):
        raise CacheError(f"{MANIFEST_NAME} is not a JSON object; the cache is damaged")
    if raw.get("format") != FORMAT_NAME:
        raise CacheError(f"{MANIFEST_NAME} is not a {FORMAT_NAME} manifest (format field missing or different)")
    version = _field(raw, "format_version", int, "")
    if version != FORMAT_VERSION:
        raise CacheError(
            f"cache format version {version} is not supported (this reader knows {FORMAT_VERSION}); "
            "upgrade the package to read it"
        )
    stored = _field(raw, CHECKSUM_FIELD, str, "")
    if stored != content_checksum(raw):
        raise CacheError(f"{MANIFEST_NAME} fails its own checksum ({CHECKSUM_FIELD}); the manifest is damaged")
    codec_info = _field(raw, "codec", dict, "")
    if codec_info.get("name") != codec.CODEC_NAME or codec_info.get("version") != codec.CODEC_VERSION:
        raise CacheError(
            f"codec {codec_info.get('name')}/{codec_info.get('version')} is not supported "
            f"(this reader knows {codec.CODEC_NAME}/{codec.CODEC_VERSION}); upgrade the package"
        )
    capture = _field(raw, "capture", dict, "")
    if capture.get("strategy") != "topk":
        raise CacheError(f"capture strategy {capture.get('strategy')!r} is not supported; upgrade the package")
    width = _int_in(raw, "logit_width", "", 1, MAX_LOGIT_WIDTH)
    k = _int_in(capture, "k", "capture.", 1, min(MAX_K, width))
    seq_len = _int_in(raw, "seq_len", "", 2, MAX_SEQ_LEN)
    tokenizer = _field(raw, "tokenizer", dict, "")
    fingerprint = _field(tokenizer, "fingerprint", str, "tokenizer.")
    if not HEX64.fullmatch(fingerprint):
        raise CacheError("manifest: tokenizer.fingerprint is not 64 hex digits")
    # Caches written before the fingerprint was versioned carry version 1 implicitly.
    fingerprint_version = 1
    if "fingerprint_version" in tokenizer:
        fingerprint_version = _int_in(tokenizer, "fingerprint_version", "tokenizer.", 1, TOKENIZER_FINGERPRINT_VERSIONS)
    shard_items = _field(raw, "shards", list, "")
    if not shard_items:
        raise CacheError("manifest lists no shards; the cache is empty")
    if len(shard_items) > MAX_SHARDS:
        raise CacheError(f"manifest lists {len(shard_items)} shards, more than the {MAX_SHARDS} a reader accepts")
    shards: list[ShardEntry] = []
    seen: set[str] = set()
    next_seq = 0
    for number, item in enumerate(shard_items):
        where = f"shards[{number}]."
        if not isinstance(item, dict):
            raise CacheError(f"manifest: shards[{number}] is not an object")
        name = _field(item, "name", str, where)
        if not SHARD_PATTERN.fullmatch(name):
            raise CacheError(f"manifest: shard name {name[:80]!r} is not of the form shard-NNNNN.arrow")
        if name in seen:
            raise CacheError(f"manifest: shard '{name}' is listed twice")
        seen.add(name)
        rows = _int_in(item, "rows", where, 1, MAX_ROWS_PER_SHARD)
        tokens = _field(item, "tokens", int, where)
        if tokens != rows * seq_len:
            expected = rows * seq_len
            raise CacheError(f"manifest: shard '{name}' has {tokens} tokens, expected rows x seq_len = {expected}")
        first_seq = _field(item, "first_seq", int, where)
        if first_seq != next_seq:
            raise CacheError(f"manifest: shard '{name}' starts at sequence {first_seq}, expected {next_seq}")
        next_seq += rows
        digest = _field(item, "sha256", str, where)
        if not HEX64.fullmatch(digest):
            raise CacheError(f"manifest: shard '{name}' sha256 is not 64 hex digits")
        size = _int_in(item, "bytes", where, 1, MAX_SHARD_BYTES)
        shards.append(ShardEntry(name=name, rows=rows, tokens=tokens, bytes=size, sha256=digest, first_seq=first_seq))
    totals = _field(raw, "totals", dict, "")
    checks = (
        ("sequences", sum(s.rows for s in shards)),
        ("tokens", sum(s.tokens for s in shards)),
        ("shards", len(shards)),
        ("bytes", sum(s.bytes for s in shards)),
    )
    for key, expected in checks:
        if _field(totals, key, int, "totals.") != expected:
            raise CacheError(f"manifest: totals.{key} does not add up (the shards give {expected})")
    return Manifest(
        raw=raw,
        seq_len=seq_len,
        k=k,
        logit_width=width,
        tokenizer_fingerprint=fingerprint,
        tokenizer_fingerprint_version=fingerprint_version,
        shards=tuple(shards),
    )
