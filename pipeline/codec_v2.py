"""Sparse teacher distributions <-> bytes, codec ``sparse-zstd`` version 2 (pure: arrays in, bytes out).

Every capture strategy (top-k, top-p, sampled, hybrid) is stored with the same few
transforms, each chosen because it measured smaller on real teacher output:

- **ids through a row dictionary.** The row's distinct ids are stored once, ascending, as
  gaps; each position's ids are stored as their indices in that list, in ascending order,
  the first as itself and each next one as its gap to the previous minus one (a top-64
  position picks 64 of a few thousand ids, not of the whole vocabulary). Hybrid rows
  sort the head and the sampled ids as two groups, each restarting the gaps. The decoder
  restores the order :class:`~pipeline.rows.SparseRow` promises (most probable first,
  ties by ascending id, for top-k, top-p and the hybrid head) from the stored values.
- **variable-length positions** carry their number of ids in a ``lengths`` column; the
  entries of all positions are concatenated with no padding.
- **log-probabilities**, in the ids' stored order, in one of three modes:
  ``lossless`` (float16); ``quantized``: ``Q = round(-logprob / step)`` stored as each
  position's smallest ``Q`` and every entry's excess over it, each log-probability within
  ``step / 2`` (about ``step^2 / 24`` nats of KL); ``sqrt``: ``round(sqrt(p) / step)``,
  each square root within ``step / 2``, which spends the error where KL does not see it
  (about ``K step^2 / 6`` nats at most; the fewest bytes for a KL bound).
- **counts** of sampled ids as ``count - 1`` (every stored sampled id was drawn at least once).
- every array is little-endian, *byte-shuffled* (byte plane 0 of all elements, then plane
  1, ...) and compressed as one zstandard frame per row and column, as in version 1.

Columns (the manifest's registry lists exactly those a capture needs, in this order):

=================  ==============================  =================================================
column             stored (before shuffling)       present for
=================  ==============================  =================================================
``input_ids``      ``<u4 [T]``                     every capture
``lengths``        ``<u4 [T]``                     ``topp``, ``sample``, ``hybrid``
``ids``            ``<u4`` D, ``<u4 [D]`` gaps,    every capture (``n`` = sum of lengths, or ``T * k``)
                   ``<u2|<u4 [n]`` index gaps
``counts``         ``<u4 [m]`` count - 1           ``sample`` (m = n), ``hybrid`` (the sampled entries)
``logprobs``       ``<f2 [n]``, or ``<u4 [T]`` +   every capture with log-probabilities
                   ``<u4 [n]``, or ``<u2 [n]``
``tail_logmass``   ``<f4 [T]``                     every capture with log-probabilities
``source_record``  Arrow int64 (no frame)          optional provenance
``record_offset``  Arrow int64 (no frame)          optional provenance
=================  ==============================  =================================================

``docs/FORMAT.md`` specifies the same for readers with numpy and zstandard alone.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import zstandard

from pipeline.capture_spec import CaptureSpec
from pipeline.codec import decode_array, frame_length, shuffle_bytes, unshuffle_bytes
from pipeline.errors import CacheError
from pipeline.row_stats import COLUMN as ROW_STATS_COLUMN
from pipeline.row_stats import ENCODING as ROW_STATS_ENCODING
from pipeline.row_stats import KIND as ROW_STATS_KIND
from pipeline.rows import SparseRow

CODEC_NAME = "sparse-zstd"
CODEC_VERSION = 2
MODES = ("lossless", "quantized", "sqrt")
DEFAULT_MODE = "sqrt"  # for top-k and top-p; see default_mode
DEFAULT_LOGPROB_STEP = 0.125
MIN_LOGPROB_STEP = 2.0**-12
MAX_LOGPROB_STEP = 1.0
DEFAULT_SQRT_STEP = 1.0 / 128
MIN_SQRT_STEP = 2.0**-15  # levels up to 1 / step must fit in 16 bits
MAX_SQRT_STEP = 0.25
ZSTD_LEVEL = 3
MAX_Q = 2**32 - 1
# Encodings named in the column registry (each versioned by the codec's own version).
SHUFFLE_U32 = "u32-shuffle-zstd"
SORTED_IDS = "row-dictionary-sorted-delta-shuffle-zstd"
COUNTS = "count-minus-1-u32-shuffle-zstd"
LOGPROBS_F16 = "f16-shuffle-zstd"
LOGPROBS_QUANTIZED = "quantized-u32-shuffle-zstd"
LOGPROBS_SQRT = "sqrt-prob-u16-shuffle-zstd"
TAIL_F32 = "f32-shuffle-zstd"
INT64 = "int64"
PROVENANCE_COLUMNS = ("source_record", "record_offset")
LOSS_MASK = "loss_mask"
LOSS_MASK_BITS = "bits-lsb-zstd"
DOCUMENT_STARTS = "document_starts"
# float16 rounding can lift a log-probability of -1e-4 to a hair above 0.
LOGPROB_SLACK = 1e-3
# Captured ids a teacher gives no probability (logits masked to -inf) are stored at this
# log-probability: exp(-2^14) is 0 in float64 as well, and it is finite in every mode.
LOGPROB_FLOOR = -(2.0**14)


@dataclass(frozen=True)
class CodecSettings:
    """How a version 2 cache encodes its log-probabilities.

    ``mode``: ``lossless`` (float16), ``quantized`` (uniform in log-probability, step
    ``logprob_step`` nats) or ``sqrt`` (uniform in the square root of probability, step
    ``sqrt_step``). Only the current mode's step is used; the other is ``None``.
    """

    mode: str = DEFAULT_MODE
    logprob_step: float | None = None
    level: int = ZSTD_LEVEL
    sqrt_step: float | None = DEFAULT_SQRT_STEP

    @classmethod
    def for_mode(cls, mode: str, step: float | None = None, level: int = ZSTD_LEVEL) -> CodecSettings:
        """Settings for ``mode`` with its step (the mode's default when ``None``)."""
        if mode == "quantized":
            return cls(mode, logprob_step=DEFAULT_LOGPROB_STEP if step is None else step, level=level)
        if mode == "sqrt":
            return cls(mode, logprob_step=None, sqrt_step=DEFAULT_SQRT_STEP if step is None else step, level=level)
        return cls(mode, logprob_step=None, level=level)

    @property
    def step(self) -> float | None:
        """The current mode's quantisation step (``None`` when lossless)."""
        return {"quantized": self.logprob_step, "sqrt": self.sqrt_step}.get(self.mode)

    def problem(self) -> str | None:
        """What is wrong with these settings, or ``None`` (messages name the CLI flags)."""
        if self.mode not in MODES:
            return f"--codec-mode {self.mode!r} is not one of {', '.join(MODES)}"
        if self.mode == "quantized":
            step = self.logprob_step
            if step is None or not (MIN_LOGPROB_STEP <= step <= MAX_LOGPROB_STEP):
                return f"--logprob-step {step} must be between 2^-12 and 1 nat"
        if self.mode == "sqrt":
            step = self.sqrt_step
            if step is None or not (MIN_SQRT_STEP <= step <= MAX_SQRT_STEP):
                return f"--sqrt-step {step} must be between 2^-15 and 1/4"
        if not 1 <= self.level <= 22:
            return f"--zstd-level {self.level} must be between 1 and 22"
        return None

    def to_json(self) -> dict[str, Any]:
        """The manifest's ``codec`` object."""
        info: dict[str, Any] = {
            "name": CODEC_NAME,
            "version": CODEC_VERSION,
            "mode": self.mode,
            "zstd_level": self.level,
        }
        if self.mode == "quantized":
            info["logprob_step"] = self.logprob_step
        if self.mode == "sqrt":
            info["sqrt_step"] = self.sqrt_step
        return info

    @classmethod
    def from_json(cls, info: dict[str, Any]) -> CodecSettings:
        """From a manifest's ``codec`` object already checked by :func:`codec_problem`."""
        return cls(
            mode=info["mode"],
            logprob_step=info.get("logprob_step"),
            level=int(info.get("zstd_level", ZSTD_LEVEL)),
            sqrt_step=info.get("sqrt_step"),
        )

    @property
    def label(self) -> str:
        """``name/version``, as each shard's schema metadata records it."""
        return f"{CODEC_NAME}/{CODEC_VERSION}"


def default_mode(spec: CaptureSpec) -> str:
    """``sqrt`` where log-probabilities are the target (top-k, top-p): the fewest bytes for a KL bound.

    Sampled and hybrid captures use their log-probabilities as importance weights and the
    rest mass, where relative error matters even for rare ids: ``quantized`` bounds it.
    """
    return DEFAULT_MODE if spec.strategy in ("topk", "topp") else "quantized"


def columns(
    spec: CaptureSpec,
    settings: CodecSettings,
    provenance: bool = True,
    row_stats: bool = False,
    loss_mask: bool = False,
    document_starts: bool = False,
) -> list[dict[str, Any]]:
    """The column registry for a capture: ``{name, kind, encoding, required}`` per column, in shard order.

    ``row_stats`` adds the optional per-row teacher statistics (:mod:`pipeline.row_stats`);
    ``loss_mask`` the required per-position loss mask of chat data (a reader that cannot
    apply it must not read the cache).
    """
    registry = [_column("input_ids", "tokens", SHUFFLE_U32)]
    if loss_mask:
        registry.append(_column(LOSS_MASK, LOSS_MASK, LOSS_MASK_BITS))
    if document_starts:
        registry.append(_column(DOCUMENT_STARTS, DOCUMENT_STARTS, LOSS_MASK_BITS))
    if spec.variable_length:
        registry.append(_column("lengths", "lengths", SHUFFLE_U32))
    registry.append(_column("ids", "ids", SORTED_IDS))
    if spec.has_counts:
        registry.append(_column("counts", "counts", COUNTS))
    if spec.has_logprobs:
        encoding = {"lossless": LOGPROBS_F16, "quantized": LOGPROBS_QUANTIZED, "sqrt": LOGPROBS_SQRT}[settings.mode]
        registry.append(_column("logprobs", "logprobs", encoding))
        registry.append(_column("tail_logmass", "tail_logmass", TAIL_F32))
    if provenance:
        registry.append(_column("source_record", "provenance", INT64, required=False))
        registry.append(_column("record_offset", "provenance", INT64, required=False))
    if row_stats:
        registry.append(_column(ROW_STATS_COLUMN, ROW_STATS_KIND, ROW_STATS_ENCODING, required=False))
    return registry


def _column(name: str, kind: str, encoding: str, required: bool = True) -> dict[str, Any]:
    return {"name": name, "kind": kind, "encoding": encoding, "required": required}


def codec_problem(codec_info: dict[str, Any], registry: list[dict[str, Any]], spec: CaptureSpec) -> str | None:
    """Why a version 2 manifest's ``codec`` and ``columns`` cannot be read by this codec, or ``None``.

    Required columns must be exactly those the capture needs, with this codec's encodings;
    optional columns this reader does not know are allowed (and skipped when reading).
    """
    name, version = codec_info.get("name"), codec_info.get("version")
    if name != CODEC_NAME or version != CODEC_VERSION or isinstance(version, bool):
        return (
            f"codec {str(name)[:40]}/{str(version)[:20]} is not supported for format version 2 "
            f"(this reader knows {CODEC_NAME}/{CODEC_VERSION}); upgrade the package"
        )
    mode = codec_info.get("mode")
    if mode not in MODES:
        return f"codec.mode {str(mode)[:40]!r} is not one of {', '.join(MODES)}; upgrade the package"
    bounds = {
        "quantized": ("logprob_step", MIN_LOGPROB_STEP, MAX_LOGPROB_STEP, "[2^-12, 1]"),
        "sqrt": ("sqrt_step", MIN_SQRT_STEP, MAX_SQRT_STEP, "[2^-15, 1/4]"),
    }
    step = None
    if mode in bounds:
        field, low, high, shown = bounds[mode]
        step = codec_info.get(field)
        if isinstance(step, bool) or not isinstance(step, (int, float)):
            return f"codec.{field} should be a number for the {mode} mode"
        if not low <= step <= high:
            return f"codec.{field} {step} is outside {shown}"
    allowed = {"name", "version", "mode", "zstd_level"} | ({bounds[mode][0]} if mode in bounds else set())
    extra = sorted(set(codec_info) - allowed)
    if extra:
        return f"codec.{str(extra[0])[:40]} does not belong to the {mode} mode"
    level = codec_info.get("zstd_level", ZSTD_LEVEL)
    if isinstance(level, bool) or not isinstance(level, int):
        return "codec.zstd_level should be an integer"
    settings = CodecSettings.for_mode(mode, float(step) if step is not None else None)
    masked = any(column.get("name") == LOSS_MASK for column in registry)
    documents = any(column.get("name") == DOCUMENT_STARTS for column in registry)
    expected = {
        column["name"]: column for column in columns(spec, settings, loss_mask=masked, document_starts=documents)
    }
    for column in registry:
        known = expected.get(column["name"])
        if known is None:
            if column["required"]:
                return (
                    f"required column '{column['name']}' ({column['encoding']}) is unknown to this reader; "
                    "upgrade the package"
                )
            continue
        if column["encoding"] != known["encoding"] or column["kind"] != known["kind"]:
            found, expected_as = f"{column['kind']}/{column['encoding']}", f"{known['kind']}/{known['encoding']}"
            return f"column '{column['name']}' is {found}, expected {expected_as}"
        if column["required"] != known["required"]:
            return f"column '{column['name']}' has required={column['required']}, expected {known['required']}"
    listed = {column["name"] for column in registry}
    missing = [name for name, column in expected.items() if column["required"] and name not in listed]
    if missing:
        return f"columns lack '{missing[0]}', which a {spec.strategy} capture needs"
    return None


# ---------------------------------------------------------------------------- encoding


def _frame(values: np.ndarray, dtype: str, level: int) -> bytes:
    cast = np.ascontiguousarray(values).astype(dtype, copy=False)
    return zstandard.ZstdCompressor(level=level, write_content_size=True).compress(shuffle_bytes(cast))


def _head_size(spec: CaptureSpec) -> int:
    """Slots of a position that form the first sorted group: the hybrid head, else 0 (one group)."""
    return int(spec.k) if spec.strategy == "hybrid" else 0


def _stored_order(row: SparseRow, spec: CaptureSpec) -> tuple[np.ndarray, np.ndarray]:
    """``(T, K)`` slot order putting each position's valid ids in stored order, and the ``(T, K)`` valid mask after it.

    Stored order: ascending id, with hybrid heads sorted apart from (and before) the sampled ids.
    """
    ids = row.ids.astype(np.int64)
    valid = row.valid()
    head = _head_size(spec)
    group = np.where(valid, 1, 2).astype(np.int64)
    if head:
        group[:, :head] = np.where(valid[:, :head], 0, 2)
    order = np.argsort(group * (1 << 33) + ids, axis=1, kind="stable")
    lengths = valid.sum(axis=1)
    return order, np.arange(ids.shape[1])[None, :] < lengths[:, None]


def _group_starts(lengths: np.ndarray, head: int) -> np.ndarray:
    """``(n,)`` bool: entries starting a sorted group (each position's first; in hybrid rows, also its first sample)."""
    n = int(lengths.sum())
    starts = np.zeros(n, dtype=bool)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    starts[offsets[lengths > 0]] = True
    if head:
        starts[offsets + head] = True  # hybrid positions hold head + at least one sampled id
    return starts


def encode_row(row: SparseRow, spec: CaptureSpec, settings: CodecSettings) -> dict[str, bytes]:
    """Encode one row into a zstd frame per registered column (provenance columns excepted).

    ``row`` follows the capture's conventions (see :class:`~pipeline.rows.SparseRow`); its
    slots may come in any order. Equal rows always give equal bytes.
    """
    level = settings.level
    order, stored_valid = _stored_order(row, spec)
    lengths = stored_valid.sum(axis=1).astype(np.int64)
    ids = np.take_along_axis(row.ids.astype(np.int64), order, axis=1)[stored_valid]
    starts = _group_starts(lengths, _head_size(spec))
    frames = {"input_ids": _frame(row.input_ids, "<u4", level)}
    for name, bits in ((LOSS_MASK, row.loss_mask), (DOCUMENT_STARTS, row.document_starts)):
        if bits is not None:
            frames[name] = _frame(np.packbits(bits.astype(bool), bitorder="little"), "u1", level)
    if spec.variable_length:
        frames["lengths"] = _frame(lengths, "<u4", level)
    frames["ids"] = _encode_ids(ids, starts, level)
    if spec.has_counts:
        counts = np.take_along_axis(row.counts, order, axis=1)[stored_valid].astype(np.int64)
        sampled = counts[_sampled_mask(lengths, _head_size(spec))]
        frames["counts"] = _frame(sampled - 1, "<u4", level)
    if spec.has_logprobs:
        logprobs = np.maximum(np.take_along_axis(row.logprobs, order, axis=1)[stored_valid], LOGPROB_FLOOR)
        frames["logprobs"] = _encode_logprobs(logprobs, lengths, settings)
        frames["tail_logmass"] = _frame(row.tail_logmass, "<f4", level)
    return frames


def _sorted_gaps(values: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Ascending runs -> each run's first value, then each next value's gap to the previous minus one."""
    previous = np.concatenate([[0], values[:-1]])
    return np.where(starts, values, values - previous - 1)


def _ungap(gaps: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """The inverse of :func:`_sorted_gaps` (runs strictly ascending by construction)."""
    steps = gaps + 1
    steps[starts] -= 1
    running = np.cumsum(steps)
    # Each run's offset: the running total before its start, carried forward (running never decreases).
    before = np.where(starts, running - steps, 0)
    return running - np.maximum.accumulate(before)


def _index_dtype(entries: int) -> str:
    return "<u2" if entries <= 1 << 16 else "<u4"


def _encode_ids(ids: np.ndarray, starts: np.ndarray, level: int) -> bytes:
    """The row's distinct ids (ascending, gaps) and each entry's index among them (per sorted group, gaps).

    Frame content: ``<u4`` number of distinct ids ``m``; ``<u4 [m]`` their gaps, shuffled;
    ``[n]`` index gaps as ``<u2`` (``m <= 65536``) or ``<u4``, shuffled.
    """
    distinct, index = np.unique(ids, return_inverse=True)
    raw = (
        np.array([distinct.size], dtype="<u4").tobytes()
        + shuffle_bytes(_sorted_gaps(distinct, np.arange(distinct.size) == 0).astype("<u4"))
        + shuffle_bytes(_sorted_gaps(index, starts).astype(_index_dtype(distinct.size)))
    )
    return zstandard.ZstdCompressor(level=level, write_content_size=True).compress(raw)


def _decode_ids(frame: bytes, starts: np.ndarray, logit_width: int) -> np.ndarray:
    """``(n,)`` int64 ids from :func:`_encode_ids`'s frame; sizes checked before anything is allocated."""
    n = starts.size
    raw = _decompress_within(frame, 4 + 8 * n)
    distinct_count = int(np.frombuffer(raw[:4], dtype="<u4")[0]) if len(raw) >= 4 else -1
    if not (min(n, 1) <= distinct_count <= min(n, logit_width)):
        raise CacheError(f"the ids frame lists {distinct_count} distinct ids for {n} entries")
    index_size = np.dtype(_index_dtype(distinct_count)).itemsize
    if len(raw) != 4 + 4 * distinct_count + index_size * n:
        raise CacheError("the ids frame's size does not match its number of distinct ids")
    body = raw[4 : 4 + 4 * distinct_count]
    distinct_gaps = unshuffle_bytes(body, "<u4", distinct_count).astype(np.int64)
    distinct = np.cumsum(distinct_gaps + 1) - 1
    if distinct_count and int(distinct[-1]) >= logit_width:
        raise CacheError(f"a stored id is not below logit_width {logit_width}")
    index_gaps = unshuffle_bytes(raw[4 + 4 * distinct_count :], _index_dtype(distinct_count), n).astype(np.int64)
    index = _ungap(index_gaps, starts)
    if n and int(index.max()) >= distinct_count:
        raise CacheError("an id's index is beyond the row's distinct ids")
    if n and not np.bincount(index, minlength=distinct_count).all():
        raise CacheError("the ids frame lists distinct ids that no entry uses")
    return distinct[index]


def _decompress_within(frame: bytes, limit: int) -> bytes:
    """A frame's content whose declared size is at most ``limit`` bytes, checked before decompressing."""
    try:
        declared = zstandard.frame_content_size(frame)
    except zstandard.ZstdError as exc:
        raise CacheError(f"not a zstd frame ({exc}); the shard is corrupt") from exc
    if not 0 <= declared <= limit:
        raise CacheError(
            f"zstd frame declares {declared} bytes where at most {limit} are possible; the shard is corrupt"
        )
    if frame_length(frame) != len(frame):
        raise CacheError("zstd frame is followed by extra bytes, or is truncated; the shard is corrupt")
    try:
        raw = zstandard.ZstdDecompressor().decompress(frame, max_output_size=max(declared, 1))
    except zstandard.ZstdError as exc:
        raise CacheError(f"zstd frame does not decompress ({exc}); the shard is corrupt") from exc
    if len(raw) != declared:
        raise CacheError(f"zstd frame holds {len(raw)} bytes, declared {declared}")
    return raw


def _sampled_mask(lengths: np.ndarray, head: int) -> np.ndarray:
    """``(n,)`` bool: entries holding sampled ids (all of them, or those after the hybrid head)."""
    n = int(lengths.sum())
    if not head:
        return np.ones(n, dtype=bool)
    within = np.arange(n) - np.repeat(np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    return within >= head


def quantize_logprobs(logprobs: np.ndarray, step: float) -> np.ndarray:
    """``Q = round(-logprob / step)`` as int64, clipped to ``[0, 2^32 - 1]``: ``(n,)`` float -> ``(n,)`` int64."""
    scaled = np.rint(-logprobs.astype(np.float64) / step)
    return np.clip(scaled, 0, MAX_Q).astype(np.int64)


def sqrt_levels(logprobs: np.ndarray, step: float) -> np.ndarray:
    """``round(sqrt(p) / step)`` as int64 for ``p = exp(logprob)``: ``(n,)`` float -> ``(n,)`` int64."""
    return np.rint(np.exp(logprobs.astype(np.float64) / 2) / step).astype(np.int64)


def sqrt_logprobs(levels: np.ndarray, step: float) -> np.ndarray:
    """The log-probabilities that :func:`sqrt_levels` levels stand for: ``(n,)`` int -> ``(n,)`` float32.

    Level ``q >= 1`` is ``2 log(q step)``; level 0 (``p < step^2 / 4``) is ``2 log(step / 4)``,
    inside its interval on the square-root scale.
    """
    roots = np.where(levels > 0, levels.astype(np.float64), 0.25) * step
    return (2.0 * np.log(roots)).astype(np.float32)


def _encode_logprobs(logprobs: np.ndarray, lengths: np.ndarray, settings: CodecSettings) -> bytes:
    if settings.mode == "lossless":
        return _frame(logprobs, "<f2", settings.level)
    if settings.mode == "sqrt":
        return _frame(sqrt_levels(logprobs, float(settings.sqrt_step)), "<u2", settings.level)
    q = quantize_logprobs(logprobs, float(settings.logprob_step))
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    reference = np.minimum.reduceat(q, offsets)
    excess = q - np.repeat(reference, lengths)
    raw = shuffle_bytes(reference.astype("<u4")) + shuffle_bytes(excess.astype("<u4"))
    return zstandard.ZstdCompressor(level=settings.level, write_content_size=True).compress(raw)


# ---------------------------------------------------------------------------- decoding


def decode_row(
    frames: dict[str, bytes], seq_len: int, spec: CaptureSpec, settings: CodecSettings, logit_width: int
) -> SparseRow:
    """Decode and check one row; raise :class:`CacheError` naming the broken invariant.

    Shapes come from the manifest (``seq_len``, the capture's limits), never from the data.
    The row's width is its widest position's number of ids. Checks: lengths within the
    capture's bounds; ids below ``logit_width`` and distinct per position (ascending by
    construction within each sorted group; hybrid heads and samples disjoint); counts
    summing to ``samples``; log-probabilities finite and at most 0, each position's
    smallest quantised value stored as its reference; tails not NaN and at most 0; and
    captured plus tail probability equal to 1 within :func:`mass_tolerance`.
    """
    T = seq_len
    input_ids = decode_array(frames["input_ids"], "<u4", T).astype(np.int64)
    if input_ids.size and int(input_ids.max()) >= logit_width:
        raise CacheError(f"an input id is not below logit_width {logit_width}")
    loss_mask = _decode_bits(frames, LOSS_MASK, T)
    document_starts = _decode_bits(frames, DOCUMENT_STARTS, T)
    head = _head_size(spec)
    if spec.variable_length:
        lengths = decode_array(frames["lengths"], "<u4", T).astype(np.int64)
        low, high = _length_bounds(spec, logit_width)
        if lengths.min() < low or lengths.max() > high:
            raise CacheError(f"a position's number of ids is outside [{low}, {high}] for this {spec.strategy} capture")
    else:
        lengths = np.full(T, spec.slots, dtype=np.int64)
    n = int(lengths.sum())
    ids = _decode_ids(frames["ids"], _group_starts(lengths, head), logit_width)
    width = int(lengths.max())
    valid = np.arange(width)[None, :] < lengths[:, None]
    padded_ids = np.zeros((T, width), dtype=np.int64)
    padded_ids[valid] = ids
    if head:
        _check_disjoint(padded_ids, valid)
    counts = None
    if spec.has_counts:
        sampled = _sampled_mask(lengths, head)
        drawn = decode_array(frames["counts"], "<u4", int(sampled.sum())).astype(np.int64) + 1
        flat_counts = np.zeros(n, dtype=np.int64)
        flat_counts[sampled] = drawn
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        if (np.add.reduceat(flat_counts, offsets) != spec.samples).any():
            raise CacheError(f"a position's counts do not add up to the {spec.samples} samples drawn")
        counts = np.zeros((T, width), dtype=np.int32)
        counts[valid] = flat_counts
    logprobs = tail = keys = None
    if spec.has_logprobs:
        flat, flat_keys = _decode_logprobs(frames["logprobs"], lengths, settings)
        tail = decode_array(frames["tail_logmass"], "<f4", T)
        _check_mass(flat, tail, lengths, mass_tolerance(spec, settings))
        logprobs = np.full((T, width), -np.inf, dtype=np.float32)
        logprobs[valid] = flat
        keys = np.full((T, width), np.iinfo(flat_keys.dtype).max, dtype=flat_keys.dtype)  # padding sorts last
        keys[valid] = flat_keys
        if head:
            _check_head_is_top(keys, valid, head)
        if spec.strategy == "topp":
            _check_top_p_prefix(flat, lengths, spec, mass_tolerance(spec, settings))
    row = SparseRow(
        input_ids=input_ids,
        ids=padded_ids,
        logprobs=logprobs,
        tail_logmass=tail,
        counts=counts,
        lengths=lengths.astype(np.int32) if spec.variable_length else None,
        loss_mask=loss_mask,
        document_starts=document_starts,
    )
    return _most_probable_first(row, keys, spec) if spec.strategy in ("topk", "topp", "hybrid") else row


def _decode_bits(frames: dict[str, bytes], name: str, count: int) -> np.ndarray | None:
    """A ``bits-lsb-zstd`` cell as ``(count,)`` bool, or ``None`` without the column; stray bits refused."""
    if name not in frames:
        return None
    packed = decode_array(frames[name], "u1", (count + 7) // 8)
    if count % 8 and int(packed[-1]) >> (count % 8):
        raise CacheError(f"a {name} frame sets bits past the row's last position; the shard is corrupt")
    return np.unpackbits(packed, count=count, bitorder="little").astype(bool)


def _length_bounds(spec: CaptureSpec, logit_width: int) -> tuple[int, int]:
    if spec.strategy == "topp":
        return int(spec.min_k), int(spec.max_k)
    if spec.strategy == "sample":
        return 1, min(int(spec.samples), logit_width)
    return int(spec.k) + 1, min(int(spec.k) + int(spec.samples), logit_width)


def _check_disjoint(ids: np.ndarray, valid: np.ndarray) -> None:
    marked = np.where(valid, ids, -1 - np.arange(ids.shape[1])[None, :])  # padding never collides
    ordered = np.sort(marked, axis=1)
    if (np.diff(ordered, axis=1) == 0).any():
        raise CacheError("an id is captured twice at one position (in the head and among the samples)")


def _decode_logprobs(frame: bytes, lengths: np.ndarray, settings: CodecSettings) -> tuple[np.ndarray, np.ndarray]:
    """``(n,)`` float32 log-probabilities and ``(n,)`` unsigned keys ascending as they descend (exact order)."""
    n = int(lengths.sum())
    if settings.mode == "lossless":
        halves = decode_array(frame, "<f2", n)
        values = halves.astype(np.float32)
        if not np.isfinite(values).all() or (values > LOGPROB_SLACK).any():
            raise CacheError("a stored log-probability is not finite or is above 0")
        bits = halves.view(np.uint16)
        ascending = np.where(bits & 0x8000, ~bits, bits | 0x8000).astype(np.uint16)  # float16 bits in value order
        return values, np.uint16(0xFFFF) - ascending
    if settings.mode == "sqrt":
        step = float(settings.sqrt_step)
        levels = decode_array(frame, "<u2", n)
        if n and int(levels.max()) > int(np.rint(1.0 / step)):
            raise CacheError("a stored probability level is above 1")
        return sqrt_logprobs(levels, step), np.uint16(0xFFFF) - levels
    T = lengths.shape[0]
    raw = _decompress_exact(frame, 4 * (T + n))
    reference = unshuffle_bytes(raw[: 4 * T], "<u4", T).astype(np.int64)
    excess = unshuffle_bytes(raw[4 * T :], "<u4", n).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    if (np.minimum.reduceat(excess, offsets) != 0).any():
        raise CacheError("a position's quantised log-probabilities are not stored relative to their smallest value")
    q = np.repeat(reference, lengths) + excess
    return (-(q.astype(np.float64)) * float(settings.logprob_step)).astype(np.float32), q


def _decompress_exact(frame: bytes, expected: int) -> bytes:
    """A frame's content, checked to be exactly ``expected`` bytes (see :func:`pipeline.codec.decode_array`)."""
    return decode_array(frame, "<u1", expected).tobytes()


def mass_tolerance(spec: CaptureSpec, settings: CodecSettings) -> float:
    """How far ``log(captured mass + tail mass)`` may stray from 0 in a valid row.

    Lossless: float16 rounds each log-probability ``l`` by at most ``2^-11 |l|``, which
    moves the total by at most ``2^-11`` times the captured entropy (at most ``ln(K + 1)``).
    Quantised: each log-probability moves by at most ``step / 2``, so the total does too.
    Square root: each probability moves by at most ``step sqrt(p) + step^2 / 4``, so the
    captured mass moves by at most ``x = step sqrt(K) + K step^2 / 4`` (Cauchy-Schwarz),
    and its log by at most ``-log(1 - x)``.
    """
    if settings.mode == "lossless":
        return 2.0**-11 * math.log(spec.slots + 1) + 1e-4
    if settings.mode == "sqrt":
        step, slots = float(settings.sqrt_step), spec.slots
        moved = step * math.sqrt(slots) + slots * step * step / 4
        return -math.log(1.0 - moved) + 1e-4 if moved < 1 else math.inf
    return float(settings.logprob_step) / 2 + 1e-4


def _check_head_is_top(keys: np.ndarray, valid: np.ndarray, head: int) -> None:
    """A hybrid head holds the most probable ids: none of its values below a sampled one (ties allowed)."""
    sampled = np.where(valid[:, head:], keys[:, head:], np.iinfo(keys.dtype).max)
    if (keys[:, :head].max(axis=1) > sampled.min(axis=1)).any():
        raise CacheError("a sampled id is more probable than a hybrid head id; the head must be the top-k")


def _check_top_p_prefix(flat: np.ndarray, lengths: np.ndarray, spec: CaptureSpec, tolerance: float) -> None:
    """Top-p positions are the smallest prefix reaching ``top_p`` (within the codec's error), unless clamped."""
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    probs = np.exp(flat.astype(np.float64))
    mass = np.add.reduceat(probs, offsets)
    without_last = mass - np.minimum.reduceat(probs, offsets)
    top_p, slack = float(spec.top_p), math.exp(tolerance)
    short = (lengths < int(spec.max_k)) & (mass * slack < top_p)
    padded = (lengths > int(spec.min_k)) & (without_last > top_p * slack)
    if short.any() or padded.any():
        raise CacheError(f"a top-p position is not the smallest set of ids reaching probability {top_p:g}")


def _check_mass(flat: np.ndarray, tail: np.ndarray, lengths: np.ndarray, tolerance: float) -> None:
    if np.isnan(tail).any() or (tail > LOGPROB_SLACK).any():
        raise CacheError("a tail log-mass is NaN or above 0")
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    values = flat.astype(np.float64)
    peak = np.maximum.reduceat(values, offsets)
    captured = peak + np.log(np.add.reduceat(np.exp(values - np.repeat(peak, lengths)), offsets))
    total = np.logaddexp(captured, tail.astype(np.float64))
    worst = float(total[np.argmax(np.abs(total))]) if total.size else 0.0
    if abs(worst) > tolerance:
        raise CacheError(f"captured and tail probability add up to exp({worst:+.3g}), not 1")


def _most_probable_first(row: SparseRow, keys: np.ndarray, spec: CaptureSpec) -> SparseRow:
    """Reorder top-k, top-p and hybrid-head slots most probable first (ties: ascending id).

    ``keys``: ``(T, W)`` sort keys of the stored values, ascending as probability descends.
    """
    head = _head_size(spec) or row.width
    # Stored ascending by id, so a stable sort keeps ties by id (16-bit keys sort in linear time).
    order = np.argsort(keys[:, :head], axis=1, kind="stable")
    flat = (order + (np.arange(order.shape[0]) * row.width)[:, None]).ravel()
    ids, values = row.ids.copy(), row.logprobs.copy()
    ids[:, :head] = row.ids.ravel()[flat].reshape(order.shape)
    values[:, :head] = row.logprobs.ravel()[flat].reshape(order.shape)
    return dataclasses.replace(row, ids=ids, logprobs=values)
