"""The manifest: building its checksum and validating one field by field (pure: bytes in, values out).

A cache may come from another team, so every field a reader relies on is checked for
type, range and consistency before anything is opened; an error names the field.
"""

from __future__ import annotations

import hashlib
import json
import math
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
TOKENIZER_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
HEX64 = re.compile(r"[0-9a-f]{64}")
# Limits on what a reader accepts from an untrusted manifest.
MAX_MANIFEST_BYTES = 64 << 20
MAX_SHARDS = 1_000_000
MAX_ROWS_PER_SHARD = 1 << 20
MAX_SEQ_LEN = 1 << 20
MAX_K = 1 << 16
MAX_LOGIT_WIDTH = 1 << 24
MAX_SHARD_BYTES = 1 << 40
# A row decodes to about 14 bytes per entry of seq_len x k (int64 ids, float32 values, and
# their encoded forms while decoding): 2**23 entries keep one decoded row under 128 MiB.
MAX_ROW_ENTRIES = 1 << 23
MAX_TOKENIZER_FILE_BYTES = 1 << 30
PACKING_FIELDS: dict[str, type] = {
    "bos": str,
    "eos_after_document": bool,
    "cross_document_attention": bool,
    "trailing_partial_sequence": str,
    "txt_sample_by": str,
    "txt_encoding_errors": str,
    "unembeddable_ids": str,
    "embedding_rows": int,
}
# Tokenizer fingerprint versions this reader can recompute (see pipeline.fingerprint).
TOKENIZER_FINGERPRINT_VERSIONS = 2


def shard_name(index: int) -> str:
    """``shard-00042.arrow``: the shard's position in the manifest, zero-padded to at least five digits."""
    return f"shard-{index:05d}.arrow"


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
class TokenizerFile:
    """One file of the cache's ``tokenizer/`` copy as the manifest lists it."""

    name: str
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """A validated manifest. ``raw`` is the parsed JSON; the fields are what readers need."""

    raw: dict[str, Any]
    seq_len: int
    k: int
    logit_width: int
    tokenizer_fingerprint: str
    tokenizer_fingerprint_version: int
    token_stream_sha256: str
    tokenizer_files: tuple[TokenizerFile, ...]
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


def _no_constant(name: str) -> Any:
    raise CacheError(f"manifest: {name} is not valid JSON (numbers must be finite); the manifest is damaged")


def _check_numbers(value: Any, where: str = "") -> None:
    """Every number finite (``1e999`` parses to infinity) and every integer within 64 bits."""
    if isinstance(value, dict):
        for key, item in value.items():
            _check_numbers(item, f"{where}{key}.")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_numbers(item, f"{where}{index}.")
    elif isinstance(value, float) and not math.isfinite(value):
        raise CacheError(f"manifest: field '{where.rstrip('.')}' is not a finite number")
    elif isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
        raise CacheError(f"manifest: field '{where.rstrip('.')}' does not fit in 64 bits")


_KINDS: dict[Any, str] = {str: "a string", int: "an integer", bool: "true or false", dict: "an object", list: "a list"}


def _field(container: dict[str, Any], key: str, kind: type, where: str, nullable: bool = False) -> Any:
    if key not in container:
        raise CacheError(f"manifest: missing field '{where}{key}'; the cache is damaged or not a cache")
    value = container[key]
    if value is None and nullable:
        return None
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
        expected = _KINDS.get(kind, kind.__name__) + (" or null" if nullable else "")
        raise CacheError(f"manifest: field '{where}{key}' should be {expected}, got {_json_type(value)}")
    return value


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, float):
        return "a fraction"
    return _KINDS.get(type(value), type(value).__name__)


def _int_in(container: dict[str, Any], key: str, where: str, low: int, high: int, nullable: bool = False) -> Any:
    value = _field(container, key, int, where, nullable)
    if value is not None and not low <= value <= high:
        raise CacheError(f"manifest: field '{where}{key}' = {value} is outside [{low}, {high}]")
    return value


def _hex(container: dict[str, Any], key: str, where: str, nullable: bool = False) -> Any:
    value = _field(container, key, str, where, nullable)
    if value is not None and not HEX64.fullmatch(value):
        raise CacheError(f"manifest: field '{where}{key}' is not 64 lowercase hex digits")
    return value


def _equal(container: dict[str, Any], key: str, where: str, expected: Any, what: str) -> None:
    value = container.get(key)
    if value != expected or type(value) is not type(expected):
        shown = json.dumps(value)[:60] if key in container else "missing"
        raise CacheError(f"manifest: {where}{key} is {shown}, but {what} {json.dumps(expected)}")


def parse_manifest(data: bytes) -> Manifest:
    """Validate manifest bytes; raise :class:`CacheError` naming the first problem found.

    Every field a reader uses is checked for its JSON type, range and consistency; fields
    this reader does not know are allowed (the checksum still covers them) and ignored.
    """
    if len(data) > MAX_MANIFEST_BYTES:
        raise CacheError(f"{MANIFEST_NAME} is larger than {MAX_MANIFEST_BYTES} bytes; refusing to parse it")
    try:
        raw = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constant)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise CacheError(f"{MANIFEST_NAME} is not valid JSON ({str(exc)[:120]}); the cache is damaged") from exc
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
    _check_numbers(raw)
    stored = _field(raw, CHECKSUM_FIELD, str, "")
    if stored != content_checksum(raw):
        raise CacheError(f"{MANIFEST_NAME} fails its own checksum ({CHECKSUM_FIELD}); the manifest is damaged")
    codec_info = _field(raw, "codec", dict, "")
    if codec_info.get("name") != codec.CODEC_NAME or codec_info.get("version") != codec.CODEC_VERSION:
        raise CacheError(
            f"codec {str(codec_info.get('name'))[:40]}/{str(codec_info.get('version'))[:20]} is not supported "
            f"(this reader knows {codec.CODEC_NAME}/{codec.CODEC_VERSION}); upgrade the package"
        )
    _equal(codec_info, "columns", "codec.", codec.COLUMN_DTYPES, f"{codec.CODEC_NAME}/{codec.CODEC_VERSION} stores")
    capture = _field(raw, "capture", dict, "")
    if capture.get("strategy") != "topk":
        shown = str(capture.get("strategy"))[:40]
        raise CacheError(f"capture strategy {shown!r} is not supported; upgrade the package")
    _equal(capture, "logprob_temperature", "capture.", 1.0, "log-probabilities are stored at temperature")
    _equal(capture, "log_base", "capture.", "e", "log-probabilities are natural logs:")
    width = _int_in(raw, "logit_width", "", 1, MAX_LOGIT_WIDTH)
    k = _int_in(capture, "k", "capture.", 1, min(MAX_K, width))
    seq_len = _int_in(raw, "seq_len", "", 2, MAX_SEQ_LEN)
    if seq_len * k > MAX_ROW_ENTRIES:
        raise CacheError(
            f"manifest: seq_len x k = {seq_len} x {k} exceeds the {MAX_ROW_ENTRIES:,} entries a reader decodes per row"
        )
    rows_per_shard = _int_in(raw, "rows_per_shard", "", 1, MAX_ROWS_PER_SHARD)
    _field(raw, "position_convention", str, "")
    _check_teacher(_field(raw, "teacher", dict, ""))
    compute = _field(raw, "compute", dict, "")
    _field(compute, "device_type", str, "compute.")
    _int_in(compute, "batch_size", "compute.", 1, MAX_ROWS_PER_SHARD)
    _check_packing(_field(raw, "packing", dict, ""))
    tokenizer = _field(raw, "tokenizer", dict, "")
    fingerprint = _hex(tokenizer, "fingerprint", "tokenizer.")
    # Caches written before the fingerprint was versioned carry version 1 implicitly.
    fingerprint_version = 1
    if "fingerprint_version" in tokenizer:
        fingerprint_version = _int_in(tokenizer, "fingerprint_version", "tokenizer.", 1, TOKENIZER_FINGERPRINT_VERSIONS)
    _int_in(tokenizer, "length", "tokenizer.", 1, MAX_LOGIT_WIDTH)
    _int_in(tokenizer, "bos_token_id", "tokenizer.", 0, MAX_LOGIT_WIDTH, nullable=True)
    _int_in(tokenizer, "eos_token_id", "tokenizer.", 0, MAX_LOGIT_WIDTH, nullable=True)
    tokenizer_files = _tokenizer_files(_field(tokenizer, "files", list, "tokenizer."))
    dataset = _field(raw, "dataset", dict, "")
    _field(dataset, "source", str, "dataset.")
    _field(dataset, "config", str, "dataset.", nullable=True)
    _field(dataset, "split", str, "dataset.")
    _field(dataset, "text_column", str, "dataset.")
    _int_in(dataset, "max_tokens", "dataset.", 1, 2**63 - 1, nullable=True)
    token_stream = _hex(dataset, "token_stream_sha256", "dataset.")
    shards = _shards(_field(raw, "shards", list, ""), seq_len, rows_per_shard)
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
        token_stream_sha256=token_stream,
        tokenizer_files=tokenizer_files,
        shards=tuple(shards),
    )


def _check_teacher(teacher: dict[str, Any]) -> None:
    _field(teacher, "source", str, "teacher.")
    _field(teacher, "revision", str, "teacher.", nullable=True)
    _hex(teacher, "weights_sha256", "teacher.", nullable=True)
    _hex(teacher, "config_sha256", "teacher.")
    _field(teacher, "model_type", str, "teacher.", nullable=True)
    _field(teacher, "dtype", str, "teacher.")


def _check_packing(packing: dict[str, Any]) -> None:
    """Known packing settings must have their types; settings added later are passed through."""
    for key, kind in PACKING_FIELDS.items():
        if key in packing:
            _field(packing, key, kind, "packing.")


def _tokenizer_files(items: list[Any]) -> tuple[TokenizerFile, ...]:
    files: list[TokenizerFile] = []
    for number, item in enumerate(items):
        where = f"tokenizer.files[{number}]."
        if not isinstance(item, dict):
            raise CacheError(f"manifest: tokenizer.files[{number}] should be an object, got {_json_type(item)}")
        name = _field(item, "name", str, where)
        if not TOKENIZER_FILE_NAME.fullmatch(name) or ".." in name:
            raise CacheError(f"manifest: tokenizer file name {name[:80]!r} is not a plain file name")
        if any(known.name == name for known in files):
            raise CacheError(f"manifest: tokenizer file '{name}' is listed twice")
        size = _int_in(item, "bytes", where, 0, MAX_TOKENIZER_FILE_BYTES)
        files.append(TokenizerFile(name=name, bytes=size, sha256=_hex(item, "sha256", where)))
    return tuple(files)


def _shards(items: list[Any], seq_len: int, rows_per_shard: int) -> list[ShardEntry]:
    if not items:
        raise CacheError("manifest lists no shards; the cache is empty")
    if len(items) > MAX_SHARDS:
        raise CacheError(f"manifest lists {len(items)} shards, more than the {MAX_SHARDS} a reader accepts")
    shards: list[ShardEntry] = []
    next_seq = 0
    for number, item in enumerate(items):
        where = f"shards[{number}]."
        if not isinstance(item, dict):
            raise CacheError(f"manifest: shards[{number}] should be an object, got {_json_type(item)}")
        name = _field(item, "name", str, where)
        if name != shard_name(number):
            raise CacheError(f"manifest: shard {number} is named {name[:80]!r}, expected '{shard_name(number)}'")
        rows = _int_in(item, "rows", where, 1, rows_per_shard)
        if rows != rows_per_shard and number != len(items) - 1:
            raise CacheError(f"manifest: shard '{name}' has {rows} rows; every shard but the last has rows_per_shard")
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
    return shards
