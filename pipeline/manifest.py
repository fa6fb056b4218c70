"""The manifest: building its checksum and validating one field by field (pure: bytes in, values out).

A cache may come from another team, so every field a reader relies on is checked for
type, range and consistency before anything is opened; an error names the field.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline import codec, row_stats
from pipeline.capture_spec import MAX_SAMPLES, STRATEGIES, CaptureSpec
from pipeline.errors import CacheError

FORMAT_NAME = "distill-cache"
FORMAT_VERSION = 2
# Versions this reader accepts: 1 (top-k, codec shuffle-zstd/1) and 2 (every capture, column registry).
FORMAT_VERSIONS = (1, 2)
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
MAX_LOGIT_WIDTH = 1 << 32
MAX_LOGIT_WIDTH_V1 = 1 << 24
MAX_COLUMNS = 64
COLUMN_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
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
    row_stats: dict[str, float] | None = None

    def to_json(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "name": self.name,
            "rows": self.rows,
            "tokens": self.tokens,
            "bytes": self.bytes,
            "sha256": self.sha256,
            "first_seq": self.first_seq,
        }
        if self.row_stats is not None:
            entry["row_stats"] = dict(self.row_stats)
        return entry


@dataclass(frozen=True)
class TokenizerFile:
    """One file of the cache's ``tokenizer/`` copy as the manifest lists it."""

    name: str
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Column:
    """One entry of a version 2 manifest's column registry.

    Attributes:
        name: the Arrow column's name.
        kind: what it holds (``tokens``, ``ids``, ``logprobs``, ...).
        encoding: how its cells are encoded, with a version (e.g. a codec's name).
        required: whether a reader that does not know ``encoding`` must refuse the cache
            (``False``: it may skip the column).
    """

    name: str
    kind: str
    encoding: str
    required: bool

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "encoding": self.encoding, "required": self.required}


@dataclass(frozen=True)
class Manifest:
    """A validated manifest. ``raw`` is the parsed JSON; the fields are what readers need.

    ``k`` is the most ids a position holds (``capture.slots``): ``k`` for top-k caches.
    ``columns`` is the version 2 column registry (empty for version 1, whose columns are fixed).
    """

    raw: dict[str, Any]
    seq_len: int
    k: int
    logit_width: int
    format_version: int
    capture: CaptureSpec
    codec: dict[str, Any]
    columns: tuple[Column, ...]
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

    @functools.cached_property
    def hidden(self) -> Any:
        """The stored hidden states' :class:`~pipeline.hidden.HiddenSpec` (``None``: none stored), checked once."""
        from pipeline.hidden import spec_from_manifest

        return spec_from_manifest(self.raw, [column.to_json() for column in self.columns], self.seq_len)

    @property
    def has_row_stats(self) -> bool:
        """Whether the shards hold the per-row teacher statistics (:mod:`pipeline.row_stats`) and list their
        summaries."""
        registered = any(
            (column.name, column.encoding) == (row_stats.COLUMN, row_stats.ENCODING) for column in self.columns
        )
        return registered and all(shard.row_stats is not None for shard in self.shards)


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
    if version not in FORMAT_VERSIONS:
        raise CacheError(
            f"cache format version {version} is not supported (this reader knows "
            f"{', '.join(map(str, FORMAT_VERSIONS))}); upgrade the package to read it"
        )
    _check_numbers(raw)
    stored = _field(raw, CHECKSUM_FIELD, str, "")
    if stored != content_checksum(raw):
        raise CacheError(f"{MANIFEST_NAME} fails its own checksum ({CHECKSUM_FIELD}); the manifest is damaged")
    codec_info = _field(raw, "codec", dict, "")
    width = _int_in(raw, "logit_width", "", 1, MAX_LOGIT_WIDTH if version >= 2 else MAX_LOGIT_WIDTH_V1)
    capture_info = _field(raw, "capture", dict, "")
    _equal(capture_info, "logprob_temperature", "capture.", 1.0, "log-probabilities are stored at temperature")
    _equal(capture_info, "log_base", "capture.", "e", "log-probabilities are natural logs:")
    if version == 1:
        _check_codec_v1(codec_info)
        if capture_info.get("strategy") != "topk":
            shown = str(capture_info.get("strategy"))[:40]
            raise CacheError(f"capture strategy {shown!r} is not part of format version 1; the manifest is damaged")
        capture = CaptureSpec("topk", k=_int_in(capture_info, "k", "capture.", 1, min(MAX_K, width)))
        columns: tuple[Column, ...] = ()
    else:
        capture = _capture(capture_info, width)
        columns = _columns(_field(raw, "columns", list, ""))
        check_codec_v2(codec_info, columns, capture)
    k = capture.slots
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
    shards = _shards(_field(raw, "shards", list, ""), seq_len, rows_per_shard, width)
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
    if "files" in dataset:
        _dataset_files(_field(dataset, "files", list, "dataset."))
    return Manifest(
        raw=raw,
        seq_len=seq_len,
        k=k,
        logit_width=width,
        format_version=version,
        capture=capture,
        codec=codec_info,
        columns=columns,
        tokenizer_fingerprint=fingerprint,
        tokenizer_fingerprint_version=fingerprint_version,
        token_stream_sha256=token_stream,
        tokenizer_files=tokenizer_files,
        shards=tuple(shards),
    )


def _check_codec_v1(codec_info: dict[str, Any]) -> None:
    if codec_info.get("name") != codec.CODEC_NAME or codec_info.get("version") != codec.CODEC_VERSION:
        raise CacheError(
            f"codec {str(codec_info.get('name'))[:40]}/{str(codec_info.get('version'))[:20]} is not supported "
            f"(this reader knows {codec.CODEC_NAME}/{codec.CODEC_VERSION}); upgrade the package"
        )
    _equal(codec_info, "columns", "codec.", codec.COLUMN_DTYPES, f"{codec.CODEC_NAME}/{codec.CODEC_VERSION} stores")


def check_codec_v2(codec_info: dict[str, Any], columns: tuple[Column, ...], capture: CaptureSpec) -> None:
    """Refuse a version 2 codec this reader does not know, or whose settings do not fit the capture."""
    from pipeline import codec_v2

    problem = codec_v2.codec_problem(codec_info, [column.to_json() for column in columns], capture)
    if problem:
        raise CacheError(f"manifest: {problem}")


# capture parameter -> (JSON type, low, high) for the integer and float ones; each strategy uses some.
_CAPTURE_FIELDS: dict[str, tuple[str, ...]] = {
    "topk": ("k",),
    "topp": ("top_p", "min_k", "max_k"),
    "sample": ("samples", "sample_temperature", "sample_logprobs", "seed"),
    "hybrid": ("k", "samples", "sample_temperature", "seed"),
}


def _capture(capture: dict[str, Any], width: int) -> CaptureSpec:
    """The capture strategy and its parameters, each checked for type and range."""
    strategy = _field(capture, "strategy", str, "capture.")
    if strategy not in STRATEGIES:
        raise CacheError(f"capture strategy {strategy[:40]!r} is not supported; upgrade the package")
    values: dict[str, Any] = {}
    for key in _CAPTURE_FIELDS[strategy]:
        if key in ("k", "min_k", "max_k"):
            values[key] = _int_in(capture, key, "capture.", 1, min(MAX_K, width))
        elif key == "samples":
            values[key] = _int_in(capture, key, "capture.", 1, MAX_SAMPLES)
        elif key == "seed":
            values[key] = _int_in(capture, key, "capture.", 0, 2**63 - 1)
        elif key == "sample_logprobs":
            values[key] = _field(capture, key, bool, "capture.")
        else:
            number = capture.get(key)
            if isinstance(number, bool) or not isinstance(number, (int, float)):
                raise CacheError(f"manifest: field 'capture.{key}' should be a number, got {_json_type(number)}")
            values[key] = float(number)
    spec = CaptureSpec(strategy=strategy, **{"k": None, **values})  # type: ignore[arg-type]
    problem = spec.problem(width)
    if problem:
        raise CacheError(f"manifest: capture settings are inconsistent ({problem.replace('--', '')})")
    if spec.slots > MAX_K:
        raise CacheError(f"manifest: capture holds up to {spec.slots} ids per position, more than {MAX_K}")
    return spec


def _columns(items: list[Any]) -> tuple[Column, ...]:
    if not items or len(items) > MAX_COLUMNS:
        raise CacheError(f"manifest: columns lists {len(items)} entries; expected 1 to {MAX_COLUMNS}")
    columns: list[Column] = []
    for number, item in enumerate(items):
        where = f"columns[{number}]."
        if not isinstance(item, dict):
            raise CacheError(f"manifest: columns[{number}] should be an object, got {_json_type(item)}")
        name = _field(item, "name", str, where)
        if not COLUMN_NAME.fullmatch(name) or name == "seq_index":
            raise CacheError(f"manifest: column name {name[:80]!r} is not a lowercase identifier (or is reserved)")
        if any(known.name == name for known in columns):
            raise CacheError(f"manifest: column '{name}' is listed twice")
        column = Column(
            name=name,
            kind=_field(item, "kind", str, where)[:64],
            encoding=_field(item, "encoding", str, where)[:64],
            required=_field(item, "required", bool, where),
        )
        columns.append(column)
    return tuple(columns)


def _dataset_files(items: list[Any]) -> None:
    """``dataset.files``: each local file's name and the index of its first record, in order."""
    previous = -1
    for number, item in enumerate(items):
        where = f"dataset.files[{number}]."
        if not isinstance(item, dict):
            raise CacheError(f"manifest: dataset.files[{number}] should be an object, got {_json_type(item)}")
        _field(item, "name", str, where)
        first = _int_in(item, "first_record", where, 0, 2**63 - 1)
        if first < previous:
            raise CacheError(f"manifest: dataset.files[{number}].first_record goes backwards")
        previous = first


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


def _shards(items: list[Any], seq_len: int, rows_per_shard: int, logit_width: int) -> list[ShardEntry]:
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
        stats = _shard_row_stats(item, where, logit_width) if "row_stats" in item else None
        entry = ShardEntry(
            name=name, rows=rows, tokens=tokens, bytes=size, sha256=digest, first_seq=first_seq, row_stats=stats
        )
        shards.append(entry)
    return shards


def _shard_row_stats(item: dict[str, Any], where: str, logit_width: int) -> dict[str, float]:
    """A shard entry's optional ``row_stats`` summary: each field a number in its range."""
    stats = _field(item, "row_stats", dict, where)
    values = {}
    for name in row_stats.FIELDS:
        value = stats.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CacheError(f"manifest: {where}row_stats.{name} is missing or not a number")
        values[name] = float(value)
    row_stats.check_values(np.array([[values[name] for name in row_stats.FIELDS]]), logit_width, f"manifest {where}")
    return values
