"""Hostile version 2 caches, one per capture strategy, made by the real teacher pass.

Each forgery rewrites one row's stored arrays by hand (``lengths``; the ``ids`` frame's row
dictionary and per-group index gaps; ``count - 1``; quantised, square-root or float16
``logprobs``; ``tail_logmass``) into bytes :func:`pipeline.codec_v2.encode_row` would never
write, then reseals the shard's size and sha256, so only the codec's own checks stand between
the forgery and the user. Each must be refused in one line naming the shard and the problem, by
``open_cache``, ``verify --deep`` and ``student-train`` alike, with nothing trained. Then the
column registry and the versions a reader does not know, and a property-based round trip of
``encode_row`` / ``decode_row`` for every strategy and codec mode.
"""

from __future__ import annotations

import dataclasses
import math
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import zstandard
from conftest import LOGIT_WIDTH, edit_manifest, make_cache, run_cli
from helpers import reseal_shard, rewrite_rows, write_table
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pipeline
from pipeline import codec_v2
from pipeline.capture_spec import CaptureSpec
from pipeline.codec import decode_array, encode_array, shuffle_bytes, unshuffle_bytes
from pipeline.errors import CacheError
from pipeline.manifest import Manifest
from pipeline.rows import SparseRow
from pipeline.store.reader import codec_settings, read_manifest

# 8 sequences of 16 tokens in 2 shards of 4 rows: one student batch of 8 reads every row.
COMMON = ("--seq-len", "16", "--max-tokens", "128", "--shard-tokens", "64", "--batch-size", "4")
CAPTURES = {
    "topk": ("--capture", "topk", "--top-k", "6", "--codec-mode", "quantized"),
    "topp": ("--capture", "topp", "--top-p", "0.25", "--min-k", "2", "--max-k", "8", "--codec-mode", "quantized"),
    "sample": ("--capture", "sample", "--samples", "8"),
    "sample-logprobs": ("--capture", "sample", "--samples", "8", "--sample-logprobs", "--codec-mode", "lossless"),
    "hybrid": ("--capture", "hybrid", "--top-k", "4", "--samples", "8", "--codec-mode", "quantized"),
    "topp-sqrt": ("--capture", "topp", "--top-p", "0.25", "--min-k", "2", "--max-k", "8", "--codec-mode", "sqrt"),
    "hybrid-sqrt": ("--capture", "hybrid", "--top-k", "4", "--samples", "8", "--codec-mode", "sqrt"),
}
VARIABLE = ("topp", "sample", "sample-logprobs", "hybrid", "topp-sqrt", "hybrid-sqrt")
COUNTED = ("sample", "sample-logprobs", "hybrid", "hybrid-sqrt")
WITH_LOGPROBS = ("topk", "topp", "sample-logprobs", "hybrid", "topp-sqrt", "hybrid-sqrt")
QUANTIZED = ("topk", "topp", "hybrid")
# The damage goes into the last shard, so a message naming the first one is wrong.
FORGED_SHARD, FORGED_ROW, SHARD_NAME = 1, 1, "shard-00001.arrow"
POSITION = 5


@pytest.fixture(scope="module")
def caches(teacher_dir: Path, corpus: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """``cache_for(name)``: the cache of capture ``name`` (a key of ``CAPTURES``), made once per module."""
    built: dict[str, Path] = {}

    def cache_for(name: str) -> Path:
        if name not in built:
            out = tmp_path_factory.mktemp(f"v2-{name}") / "cache"
            built[name] = make_cache(teacher_dir, corpus["train"], out, *COMMON, *CAPTURES[name])
        return built[name]

    return cache_for


@pytest.fixture()
def copy_of(caches, tmp_path: Path):
    """``copy(name)``: a private copy of that capture's cache, free to damage."""

    def copy(name: str) -> Path:
        target = tmp_path / f"cache-{name}"
        shutil.copytree(caches(name), target)
        return target

    return copy


# ----------------------------------------------------------------------------- stored rows


@dataclasses.dataclass
class Stored:
    """One row's arrays as the codec stores them, before gap coding, ``count - 1``, shuffling and zstd.

    Entries (``n`` = sum of ``lengths``) are in stored order: ascending id within each sorted
    group (a position; in hybrid rows its head, then its samples). The ``ids`` frame holds the
    row's distinct ids (``dictionary``, ascending) and each entry's index among them; ``ids``
    here are the entries' ids themselves, and :func:`pack` derives the dictionary and indices
    unless a forgery sets ``dictionary`` or ``listed`` (the frame's count of distinct ids).
    Integer columns are int64 so that a forgery can hold values the unsigned frames wrap, as a
    careless writer would. ``layout`` keeps the lengths the row was written with: the other
    frames are packed by it, so a forgery that edits ``lengths`` changes that frame alone.
    """

    spec: CaptureSpec
    settings: codec_v2.CodecSettings
    input_ids: np.ndarray  # (T,) int64
    lengths: np.ndarray  # (T,) int64
    ids: np.ndarray  # (n,) int64 absolute ids
    counts: np.ndarray | None  # (m,) int64 counts of the sampled entries
    logprobs: np.ndarray | None  # (n,) float16 (lossless)
    reference: np.ndarray | None  # (T,) int64 each position's smallest Q (quantized)
    excess: np.ndarray | None  # (n,) int64 each entry's Q over its position's reference (quantized)
    levels: np.ndarray | None  # (n,) int64 round(sqrt(p) / step) (sqrt)
    tail: np.ndarray | None  # (T,) float32
    layout: np.ndarray  # (T,) int64
    dictionary: np.ndarray | None = None  # (d,) int64 the distinct ids as stored; None: those of ``ids``
    listed: int | None = None  # the ids frame's count of distinct ids; None: the dictionary's size

    @property
    def head(self) -> int:
        return int(self.spec.k) if self.spec.strategy == "hybrid" else 0

    def offset(self, t: int) -> int:
        return int(self.lengths[:t].sum())

    def span(self, t: int) -> slice:
        """Position ``t``'s entries."""
        return slice(self.offset(t), self.offset(t) + int(self.lengths[t]))

    def sampled(self, t: int) -> slice:
        """Position ``t``'s sampled entries (hybrid: after the head)."""
        return slice(self.offset(t) + self.head, self.offset(t) + int(self.lengths[t]))

    def count_index(self, entry: int) -> int:
        """Index into ``counts`` of entry ``entry``, or -1 for a hybrid head entry."""
        position = int(np.searchsorted(np.cumsum(self.lengths), entry, side="right"))
        within = entry - self.offset(position)
        if within < self.head:
            return -1
        return int((self.lengths[:position] - self.head).sum()) + within - self.head

    def log_probabilities(self, t: int) -> np.ndarray:
        """Position ``t``'s log-probabilities as the decoder computes them, float64."""
        if self.logprobs is not None:
            return self.logprobs[self.span(t)].astype(np.float32).astype(np.float64)
        if self.levels is not None:
            return codec_v2.sqrt_logprobs(self.levels[self.span(t)], float(self.settings.sqrt_step)).astype(np.float64)
        step = float(self.settings.logprob_step)
        q = self.reference[t] + self.excess[self.span(t)]
        return (-(q.astype(np.float64)) * step).astype(np.float32).astype(np.float64)

    def sort_group(self, start: int, stop: int) -> None:
        """Sort entries ``start:stop`` (one sorted group) by id, carrying their values and counts."""
        order = start + np.argsort(self.ids[start:stop], kind="stable")
        for values in (self.ids, self.logprobs, self.excess, self.levels):
            if values is not None:
                values[start:stop] = values[order]
        at = [self.count_index(entry) for entry in range(start, stop)]
        if self.counts is not None and min(at) >= 0:
            self.counts[at] = self.counts[[self.count_index(int(entry)) for entry in order]]

    def swap(self, i: int, j: int) -> None:
        """Exchange entries ``i`` and ``j`` (id, log-probability, count) without reordering anything else."""
        for values in (self.ids, self.logprobs, self.excess, self.levels):
            if values is not None:
                values[[i, j]] = values[[j, i]]
        ci, cj = self.count_index(i), self.count_index(j)
        if self.counts is not None and ci >= 0 and cj >= 0:
            self.counts[[ci, cj]] = self.counts[[cj, ci]]


def group_starts(lengths: np.ndarray, head: int) -> np.ndarray:
    """``(n,)`` bool: the entries that start a sorted group (their gap is the value itself)."""
    starts = np.zeros(int(lengths.sum()), dtype=bool)
    offset = 0
    for length in lengths.tolist():
        starts[offset] = True
        if head:
            starts[offset + head] = True
        offset += length
    return starts


def gaps_of(values: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Each group's first value, then each next value's gap to the previous minus one (may be negative)."""
    previous = np.concatenate([[0], values[:-1]]).astype(np.int64)
    return np.where(starts, values, values - previous - 1)


def ungap(gaps: np.ndarray, starts: np.ndarray) -> np.ndarray:
    values = np.empty(gaps.size, dtype=np.int64)
    for entry, start in enumerate(starts.tolist()):
        values[entry] = gaps[entry] if start else values[entry - 1] + gaps[entry] + 1
    return values


def index_dtype(distinct: int) -> str:
    """The ids frame's index type for a row of ``distinct`` ids."""
    return "<u2" if distinct <= 1 << 16 else "<u4"


def compress(raw: bytes, level: int) -> bytes:
    return zstandard.ZstdCompressor(level=level, write_content_size=True).compress(raw)


def unpack(cells: dict, manifest: Manifest) -> Stored:
    """The stored arrays of a row's frames, decoded here without any of the decoder's checks."""
    spec, mode_settings, seq_len = manifest.capture, codec_settings(manifest), manifest.seq_len
    head = int(spec.k) if spec.strategy == "hybrid" else 0
    input_ids = decode_array(cells["input_ids"], "<u4", seq_len).astype(np.int64)
    if spec.variable_length:
        lengths = decode_array(cells["lengths"], "<u4", seq_len).astype(np.int64)
    else:
        lengths = np.full(seq_len, spec.slots, dtype=np.int64)
    n = int(lengths.sum())
    raw = zstandard.ZstdDecompressor().decompress(cells["ids"])
    distinct = int.from_bytes(raw[:4], "little")
    dictionary = ungap(
        unshuffle_bytes(raw[4 : 4 + 4 * distinct], "<u4", distinct).astype(np.int64), np.arange(distinct) == 0
    )
    index_gaps = unshuffle_bytes(raw[4 + 4 * distinct :], index_dtype(distinct), n).astype(np.int64)
    ids = dictionary[ungap(index_gaps, group_starts(lengths, head))]
    counts = logprobs = reference = excess = levels = tail = None
    if spec.has_counts:
        m = n - head * seq_len
        counts = decode_array(cells["counts"], "<u4", m).astype(np.int64) + 1
    if spec.has_logprobs:
        if mode_settings.mode == "lossless":
            logprobs = decode_array(cells["logprobs"], "<f2", n).copy()
        elif mode_settings.mode == "sqrt":
            levels = decode_array(cells["logprobs"], "<u2", n).astype(np.int64)
        else:
            raw = zstandard.ZstdDecompressor().decompress(cells["logprobs"])
            reference = unshuffle_bytes(raw[: 4 * seq_len], "<u4", seq_len).astype(np.int64)
            excess = unshuffle_bytes(raw[4 * seq_len :], "<u4", n).astype(np.int64)
        tail = decode_array(cells["tail_logmass"], "<f4", seq_len).copy()
    return Stored(
        spec, mode_settings, input_ids, lengths, ids, counts, logprobs, reference, excess, levels, tail, lengths.copy()
    )


def pack(stored: Stored, manifest: Manifest) -> dict[str, bytes]:
    """Frames of ``stored`` laid out exactly as the writer lays them out, with whatever values it
    holds (unsigned columns keep their low bits, as a writer with unsigned arithmetic would store them)."""
    spec, level = manifest.capture, codec_settings(manifest).level

    def unsigned(values: np.ndarray, dtype: str = "<u4") -> np.ndarray:
        return (np.asarray(values, dtype=np.int64) & (1 << (8 * np.dtype(dtype).itemsize)) - 1).astype(dtype)

    def u32(values: np.ndarray) -> bytes:
        return encode_array(unsigned(values), "<u4", level)

    dictionary = np.unique(stored.ids) if stored.dictionary is None else stored.dictionary
    index = np.searchsorted(dictionary, stored.ids)
    listed = dictionary.size if stored.listed is None else stored.listed
    kind = index_dtype(dictionary.size)
    ids_raw = (
        np.array([listed], dtype="<u4").tobytes()
        + shuffle_bytes(unsigned(gaps_of(dictionary, np.arange(dictionary.size) == 0)))
        + shuffle_bytes(unsigned(gaps_of(index, group_starts(stored.layout, stored.head)), kind))
    )
    frames = {"input_ids": u32(stored.input_ids), "ids": compress(ids_raw, level)}
    if spec.variable_length:
        frames["lengths"] = u32(stored.lengths)
    if spec.has_counts:
        frames["counts"] = u32(stored.counts - 1)
    if spec.has_logprobs:
        if stored.logprobs is not None:
            frames["logprobs"] = encode_array(stored.logprobs, "<f2", level)
        elif stored.levels is not None:
            frames["logprobs"] = encode_array(unsigned(stored.levels, "<u2"), "<u2", level)
        else:
            planes = shuffle_bytes(unsigned(stored.reference)) + shuffle_bytes(unsigned(stored.excess))
            frames["logprobs"] = compress(planes, level)
        frames["tail_logmass"] = encode_array(stored.tail, "<f4", level)
    return frames


def forge(cache: Path, edit: Callable[[Stored], None]) -> None:
    """Apply ``edit`` to the stored arrays of one row of the last shard, re-encode and reseal."""
    manifest = read_manifest(cache)

    def change(number: int, cells: dict) -> dict:
        if number != FORGED_ROW:
            return cells
        stored = unpack(cells, manifest)
        edit(stored)
        return {**cells, **pack(stored, manifest)}

    rewrite_rows(cache, FORGED_SHARD, change)


def forge_frame(cache: Path, column: str, damage: Callable[[bytes], bytes]) -> None:
    """Replace one frame of one row of the last shard with ``damage(frame)``, and reseal."""

    def change(number: int, cells: dict) -> dict:
        return {**cells, column: damage(cells[column])} if number == FORGED_ROW else cells

    rewrite_rows(cache, FORGED_SHARD, change)


# ----------------------------------------------------------------------------- refusal


def assert_refused(cache: Path, message: str, student_dir: Path, out: Path, shard: str | None = SHARD_NAME) -> None:
    """``open_cache``, ``verify --deep`` and ``student-train`` refuse ``cache`` in one line matching
    ``message`` (and naming ``shard``, for damage inside one), and the student pass trains nothing."""
    with pytest.raises(CacheError) as caught:
        for _ in pipeline.open_cache(cache):
            pass
    text = str(caught.value)
    assert "\n" not in text and re.search(message, text), text
    assert shard is None or f"shard '{shard}'" in text, text
    verify = run_cli("verify", "--deep", str(cache))
    assert verify.exit_code == 1 and "Traceback" not in verify.output, verify.output
    assert re.search(message, verify.output) and (shard is None or shard in verify.output), verify.output
    args = ("--cache", str(cache), "--student", str(student_dir), "--out", str(out))
    train = run_cli("student-train", *args, "--batch-size", "8", "--max-steps", "1", "--device", "cpu")
    lines = [line for line in train.output.splitlines() if line.strip()]
    assert train.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: "), train.output
    assert re.search(message, lines[0]) and (shard is None or shard in lines[0]), lines[0]
    written = sorted(path.name for path in out.iterdir()) if out.exists() else []
    assert written in ([], ["metrics.jsonl"]), written
    assert not written or (out / "metrics.jsonl").read_text() == "", "a step was trained"


def reads_fine(cache: Path) -> list[SparseRow]:
    rows = list(pipeline.open_cache(cache))
    result = run_cli("verify", "--deep", str(cache))
    assert result.exit_code == 0, result.output
    return rows


def rows_equal(first: list[SparseRow], second: list[SparseRow]) -> bool:
    fields = ("input_ids", "ids", "logprobs", "tail_logmass", "counts", "lengths")
    return len(first) == len(second) and all(
        (getattr(a, name) is None and getattr(b, name) is None) or np.array_equal(getattr(a, name), getattr(b, name))
        for a, b in zip(first, second)
        for name in fields
    )


@pytest.mark.parametrize("name", list(CAPTURES))
def test_forging_without_damage_rewrites_the_writers_own_bytes(copy_of, name):
    """The forging path itself is faithful: unpacking and packing an untouched row gives the
    writer's bytes, so each refusal below is the damage's doing."""
    cache = copy_of(name)
    manifest = read_manifest(cache)
    original = reads_fine(cache)
    seen = []

    def change(number: int, cells: dict) -> dict:
        frames = pack(unpack(cells, manifest), manifest)
        assert all(frames[column] == cells[column] for column in frames), number
        seen.append(number)
        return cells

    rewrite_rows(cache, FORGED_SHARD, change)
    assert seen == [0, 1, 2, 3]
    forge(cache, lambda stored: None)
    assert rows_equal(reads_fine(cache), original)


# ----------------------------------------------------------------------------- forgeries


def position_where(stored: Stored, condition: Callable[[int], bool]) -> int:
    positions = [t for t in range(len(stored.lengths)) if condition(t)]
    assert positions, "the cache has no position this forgery needs; change the capture options"
    return positions[0]


def bounds(stored: Stored) -> tuple[int, int]:
    """The fewest and most ids a position of this capture may hold (the teacher's width is larger)."""
    spec = stored.spec
    if spec.strategy == "topp":
        return int(spec.min_k), int(spec.max_k)
    if spec.strategy == "sample":
        return 1, int(spec.samples)
    return int(spec.k) + 1, int(spec.k) + int(spec.samples)


def move_boundary(stored: Stored, t: int, length: int) -> None:
    """Give position ``t`` ``length`` entries, its neighbour the difference: the total, and so every
    other frame's size, stays the same."""
    stored.lengths[t + 1] += stored.lengths[t] - length
    stored.lengths[t] = length


def counts_off_by_one(stored):
    stored.counts[stored.count_index(stored.sampled(POSITION).start)] += 1


def zero_count_keeping_the_sum(stored):
    t = position_where(stored, lambda t: stored.lengths[t] - stored.head >= 2)
    first = stored.count_index(stored.sampled(t).start)
    stored.counts[first + 1] += stored.counts[first]
    stored.counts[first] = 0  # stored as count - 1 = 2^32 - 1


def counts_on_head_slots(stored):
    """Counts for every entry, the head's included (0 each): a counts frame of ``n`` entries, not ``m``."""
    full = np.zeros(len(stored.ids), dtype=np.int64)
    sampled = [stored.count_index(entry) >= 0 for entry in range(len(stored.ids))]
    full[np.array(sampled)] = stored.counts
    stored.counts = full


def descending_pair(stored):
    """Two ids of a group out of order: the second's index gap is negative, wrapped to 2^16 - k."""
    start = stored.span(POSITION).start
    stored.swap(start, start + 1)


def descending_pair_among_samples(stored):
    t = position_where(stored, lambda t: stored.lengths[t] - stored.head >= 2)
    start = stored.sampled(t).start
    stored.swap(start, start + 1)


def repeated_id(stored):
    start = stored.span(POSITION).start
    stored.ids[start + 1] = stored.ids[start]  # an index gap of -1, stored as 2^16 - 1


def id_at_the_logit_width(stored):
    stored.ids[stored.span(POSITION).stop - 1] = LOGIT_WIDTH  # the largest of its group: still ascending


def input_id_at_the_logit_width(stored):
    stored.input_ids[POSITION] = LOGIT_WIDTH


def sample_repeats_a_head_id(stored):
    """A sampled group holding one of its position's head ids, still ascending and the right size,
    with log-probabilities and counts left in place (the mass and the draws add up)."""
    t = POSITION
    head_ids = stored.ids[stored.span(t).start : stored.sampled(t).start]
    sampled = stored.sampled(t)
    stored.ids[sampled] = np.sort(np.concatenate([stored.ids[sampled][1:], head_ids[:1]]))


def head_outranked_by_a_sample(stored):
    """At a position whose head is strictly more probable than its samples, exchange the least
    probable head entry with the most probable sampled one (each keeps its log-probability; the
    count stays with the sampled slot), then sort both groups by id again. Ids stay distinct, the
    mass and the draws add up, but the head is no longer the position's top-k."""
    head = stored.head

    def split(t: int) -> tuple[np.ndarray, np.ndarray]:
        values = stored.log_probabilities(t)
        return values[:head], values[head:]

    t = position_where(stored, lambda t: split(t)[0].min() > split(t)[1].max())
    start = stored.span(t).start
    weakest, strongest = start + int(np.argmin(split(t)[0])), start + head + int(np.argmax(split(t)[1]))
    for values in (stored.ids, stored.logprobs, stored.excess, stored.levels):
        if values is not None:
            values[[weakest, strongest]] = values[[strongest, weakest]]
    stored.sort_group(start, start + head)
    stored.sort_group(start + head, stored.span(t).stop)


def length_zero(stored):
    move_boundary(stored, POSITION, 0)


def length_above_the_most(stored):
    move_boundary(stored, POSITION, bounds(stored)[1] + 1)


def length_below_the_fewest(stored):
    move_boundary(stored, POSITION, bounds(stored)[0] - 1)


def lengths_adding_up_to_one_more(stored):
    t = position_where(stored, lambda t: stored.lengths[t] < bounds(stored)[1])
    stored.lengths[t] += 1


def lengths_adding_up_to_one_fewer(stored):
    t = position_where(stored, lambda t: stored.lengths[t] > bounds(stored)[0])
    stored.lengths[t] -= 1


def reference_not_the_smallest(stored):
    """Every Q of a position unchanged, but stored against a reference one below its smallest."""
    t = position_where(stored, lambda t: stored.reference[t] >= 1)
    stored.reference[t] -= 1
    stored.excess[stored.span(t)] += 1


def every_entry_certain(stored):
    """Every captured log-probability of a position 0: a captured mass of at least 2."""
    t = position_where(stored, lambda t: stored.lengths[t] >= 2)
    if stored.logprobs is not None:
        stored.logprobs[stored.span(t)] = 0.0
    elif stored.levels is not None:
        stored.levels[stored.span(t)] = round(1 / stored.settings.sqrt_step)
    else:
        stored.reference[t] = 0
        stored.excess[stored.span(t)] = 0


def tail_set_to(stored: Stored, log_total: float) -> None:
    """Position ``POSITION``'s tail chosen so that captured plus tail mass is ``exp(log_total)``."""
    captured = np.exp(stored.log_probabilities(POSITION)).sum()
    assert math.exp(log_total) > captured, "the captured mass leaves no room for this tail"
    stored.tail[POSITION] = np.float32(math.log(math.exp(log_total) - captured))


def tolerance(stored: Stored) -> float:
    return codec_v2.mass_tolerance(stored.spec, stored.settings)


def mass_above_one_beyond_tolerance(stored):
    tail_set_to(stored, 1.5 * tolerance(stored))


def mass_below_one_beyond_tolerance(stored):
    tail_set_to(stored, -1.5 * tolerance(stored))


def tail_dropped(stored):
    """No tail (``-inf``) where the captured ids hold well under all the mass."""
    assert np.exp(stored.log_probabilities(POSITION)).sum() < 0.9
    stored.tail[POSITION] = -np.inf


def tail_above_zero(stored):
    stored.tail[POSITION] = 0.5


def tail_nan(stored):
    stored.tail[POSITION] = np.nan


def logprob_above_zero(stored):
    stored.logprobs[stored.span(POSITION).start] = 0.5


def logprob_nan(stored):
    stored.logprobs[stored.span(POSITION).start] = np.nan


def logprob_infinite(stored):
    stored.logprobs[stored.span(POSITION).start] = -np.inf


def sqrt_level_above_one(stored):
    stored.levels[stored.span(POSITION).start] = round(1 / stored.settings.sqrt_step) + 1


def dictionary_listing_no_ids(stored):
    stored.listed = 0


def dictionary_listing_more_ids_than_entries(stored):
    stored.listed = len(stored.ids) + 1


def dictionary_count_one_more_than_it_holds(stored):
    stored.listed = np.unique(stored.ids).size + 1


def dictionary_missing_the_largest_id(stored):
    """Indices still point at every id, the largest one past the dictionary's end."""
    stored.dictionary = np.unique(stored.ids)[:-1]


def dictionary_listing_an_unused_id_at_the_logit_width(stored):
    stored.dictionary = np.append(np.unique(stored.ids), LOGIT_WIDTH)


def dictionary_listing_an_unused_id(stored):
    """An id no entry uses, below the logit width: the row decodes the same, but its bytes are
    not the ones the writer gives that row."""
    distinct = np.unique(stored.ids)
    unused = next(candidate for candidate in range(LOGIT_WIDTH) if candidate not in set(distinct.tolist()))
    stored.dictionary = np.sort(np.append(distinct, unused))


WIDTH = f"not below logit_width {LOGIT_WIDTH}"
LENGTH = r"number of ids is outside \[\d+, \d+\]"
SIZE = r"zstd frame declares \d+ bytes where \d+ are expected"
IDS_SIZE = r"the ids frame's size does not match its number of distinct ids"
INDEX = "an id's index is beyond the row's distinct ids"
MASS = r"captured and tail probability add up to exp\("
FORGERIES = [
    *[(name, counts_off_by_one, "counts do not add up to the 8 samples drawn") for name in COUNTED],
    *[(name, zero_count_keeping_the_sum, "counts do not add up to the 8 samples drawn") for name in COUNTED],
    *[(name, counts_on_head_slots, SIZE) for name in ("hybrid", "hybrid-sqrt")],
    *[(name, descending_pair, INDEX) for name in CAPTURES],
    *[(name, descending_pair_among_samples, INDEX) for name in ("hybrid", "hybrid-sqrt")],
    *[(name, repeated_id, INDEX) for name in CAPTURES],
    *[(name, id_at_the_logit_width, "a stored id is " + WIDTH) for name in CAPTURES],
    *[(name, input_id_at_the_logit_width, "an input id is " + WIDTH) for name in CAPTURES],
    *[
        (name, sample_repeats_a_head_id, "an id is captured twice at one position")
        for name in ("hybrid", "hybrid-sqrt")
    ],
    *[(name, length_zero, LENGTH) for name in VARIABLE],
    *[(name, length_above_the_most, LENGTH) for name in VARIABLE],
    # top-p: fewer than --min-k; hybrid: the head alone, nothing sampled (sampled rows: see length_zero)
    *[(name, length_below_the_fewest, LENGTH) for name in ("topp", "topp-sqrt", "hybrid", "hybrid-sqrt")],
    *[(name, lengths_adding_up_to_one_more, IDS_SIZE) for name in VARIABLE],
    *[(name, lengths_adding_up_to_one_fewer, IDS_SIZE) for name in VARIABLE],
    *[(name, dictionary_listing_no_ids, r"the ids frame lists 0 distinct ids for \d+ entries") for name in CAPTURES],
    *[(name, dictionary_listing_more_ids_than_entries, r"lists \d+ distinct ids for \d+ entries") for name in CAPTURES],
    *[(name, dictionary_count_one_more_than_it_holds, IDS_SIZE) for name in CAPTURES],
    *[(name, dictionary_missing_the_largest_id, INDEX) for name in CAPTURES],
    *[(name, dictionary_listing_an_unused_id_at_the_logit_width, "a stored id is " + WIDTH) for name in CAPTURES],
    *[(name, reference_not_the_smallest, "not stored relative to their smallest value") for name in QUANTIZED],
    *[(name, every_entry_certain, MASS) for name in WITH_LOGPROBS],
    *[(name, mass_above_one_beyond_tolerance, MASS) for name in WITH_LOGPROBS],
    *[(name, mass_below_one_beyond_tolerance, MASS) for name in WITH_LOGPROBS],
    *[(name, tail_dropped, MASS) for name in WITH_LOGPROBS],
    *[(name, tail_above_zero, "a tail log-mass is NaN or above 0") for name in WITH_LOGPROBS],
    *[(name, tail_nan, "a tail log-mass is NaN or above 0") for name in WITH_LOGPROBS],
    *[
        ("sample-logprobs", damage, "a stored log-probability is not finite or is above 0")
        for damage in (logprob_above_zero, logprob_nan, logprob_infinite)
    ],
    *[(name, sqrt_level_above_one, "a stored probability level is above 1") for name in ("topp-sqrt", "hybrid-sqrt")],
]


@pytest.mark.parametrize(
    ("name", "edit", "message"),
    [pytest.param(*case, id=f"{case[0]}-{case[1].__name__}") for case in FORGERIES],
)
def test_forged_rows_are_refused_naming_the_shard_and_the_problem(
    copy_of, student_config_dir, tmp_path, name, edit, message
):
    cache = copy_of(name)
    forge(cache, edit)
    assert_refused(cache, message, student_config_dir, tmp_path / "student")


@pytest.mark.parametrize("name", WITH_LOGPROBS)
def test_mass_within_the_tolerance_is_accepted(copy_of, name):
    """The other side of the mass check: the same forgery at half the tolerance reads fine."""
    for fraction in (0.5, -0.5):
        cache = copy_of(name)
        forge(cache, lambda stored, fraction=fraction: tail_set_to(stored, fraction * tolerance(stored)))
        reads_fine(cache)
        shutil.rmtree(cache)


@pytest.mark.parametrize("name", ["hybrid", "hybrid-sqrt"])
def test_hybrid_head_less_probable_than_a_sample_is_refused(copy_of, student_config_dir, tmp_path, name):
    cache = copy_of(name)
    forge(cache, head_outranked_by_a_sample)
    assert_refused(cache, "head", student_config_dir, tmp_path / "student")


@pytest.mark.parametrize("name", ["topk", "hybrid-sqrt"])
def test_dictionary_listing_an_unused_id_is_refused(copy_of, student_config_dir, tmp_path, name):
    cache = copy_of(name)
    forge(cache, dictionary_listing_an_unused_id)
    assert_refused(cache, "distinct ids", student_config_dir, tmp_path / "student")


def test_mass_short_of_one_is_reported_as_short(copy_of):
    cache = copy_of("topk")
    forge(cache, mass_below_one_beyond_tolerance)
    with pytest.raises(CacheError, match=r"add up to exp\(-"):
        list(pipeline.open_cache(cache))


# ----------------------------------------------------------------------------- frames


COLUMNS = {
    "topk": ("ids", "logprobs", "tail_logmass"),
    "topp": ("lengths", "ids", "logprobs", "tail_logmass"),
    "sample": ("lengths", "ids", "counts"),
    "sample-logprobs": ("lengths", "ids", "counts", "logprobs", "tail_logmass"),
    "hybrid": ("lengths", "ids", "counts", "logprobs", "tail_logmass"),
    "topp-sqrt": ("lengths", "ids", "logprobs", "tail_logmass"),
    "hybrid-sqrt": ("lengths", "ids", "counts", "logprobs", "tail_logmass"),
}


def itemsize(name: str, column: str) -> int:
    """Bytes per stored value: 2 for float16 and square-root levels, 4 otherwise."""
    return 2 if column == "logprobs" and name in ("sample-logprobs", "topp-sqrt", "hybrid-sqrt") else 4


def one_more_value(frame: bytes, size: int) -> bytes:
    raw = zstandard.ZstdDecompressor().decompress(frame)
    return zstandard.ZstdCompressor(write_content_size=True).compress(raw + b"\0" * size)


def one_fewer_value(frame: bytes, size: int) -> bytes:
    raw = zstandard.ZstdDecompressor().decompress(frame)
    return zstandard.ZstdCompressor(write_content_size=True).compress(raw[:-size])


def truncated(frame: bytes, size: int) -> bytes:
    return frame[:-3]


def size_not_declared(frame: bytes, size: int) -> bytes:
    raw = zstandard.ZstdDecompressor().decompress(frame)
    return zstandard.ZstdCompressor(write_content_size=False).compress(raw)


TRUNCATED = "zstd frame (is followed by extra bytes, or is truncated|is truncated)"
# (damage, message, message for the ids frame, whose size depends on its number of distinct ids)
FRAME_DAMAGE = [
    (one_more_value, SIZE, IDS_SIZE),
    (one_fewer_value, SIZE, IDS_SIZE),
    (truncated, TRUNCATED, TRUNCATED),
    (
        size_not_declared,
        r"zstd frame declares -1 bytes where \d+ are expected",
        r"zstd frame declares -1 bytes where at most \d+ are possible",
    ),
]


@pytest.mark.parametrize(
    ("name", "column", "damage", "message"),
    [
        pytest.param(
            name, column, damage, ids_message if column == "ids" else message, id=f"{name}-{column}-{damage.__name__}"
        )
        for name, columns in COLUMNS.items()
        for column in columns
        for damage, message, ids_message in FRAME_DAMAGE
    ],
)
def test_frames_of_the_wrong_size_are_refused(copy_of, student_config_dir, tmp_path, name, column, damage, message):
    cache = copy_of(name)
    size = itemsize(name, column)
    forge_frame(cache, column, lambda frame: damage(frame, size))
    assert_refused(cache, message, student_config_dir, tmp_path / "student")


# ----------------------------------------------------------------------------- registry and versions


def add_column_to_every_shard(cache: Path, column: str, required: bool) -> None:
    """A column a newer writer might add: in every shard (resealed) and in the manifest's registry."""
    for index, entry in enumerate(read_manifest(cache).shards):
        path = cache / entry.name
        table = pa.ipc.open_file(pa.BufferReader(path.read_bytes())).read_all()
        cells = pa.array([b"\x01 not a frame this reader knows"] * table.num_rows, pa.binary())
        grown = table.append_column(pa.field(column, pa.binary(), nullable=False), cells)
        write_table(path, grown.replace_schema_metadata(table.schema.metadata))
        reseal_shard(cache, index)
    entry = {"name": column, "kind": "scores", "encoding": "future-scores/1", "required": required}
    edit_manifest(cache, lambda manifest: manifest["columns"].append(entry))


@pytest.mark.parametrize("name", list(CAPTURES))
def test_unknown_required_column_is_refused_saying_to_upgrade(copy_of, student_config_dir, tmp_path, name):
    cache = copy_of(name)
    add_column_to_every_shard(cache, "future_scores", required=True)
    message = r"required column 'future_scores' \(future-scores/1\) is unknown to this reader; upgrade the package"
    assert_refused(cache, message, student_config_dir, tmp_path / "student", shard=None)


@pytest.mark.parametrize("name", list(CAPTURES))
def test_unknown_optional_column_is_skipped(caches, copy_of, name):
    cache = copy_of(name)
    add_column_to_every_shard(cache, "future_scores", required=False)
    assert rows_equal(reads_fine(cache), list(pipeline.open_cache(caches(name))))


NEWER = [
    (lambda manifest: manifest.update(format_version=3), r"cache format version 3 is not supported .*; upgrade"),
    (lambda manifest: manifest["codec"].update(version=3), r"codec sparse-zstd/3 is not supported .*; upgrade"),
]


@pytest.mark.parametrize("name", list(CAPTURES))
@pytest.mark.parametrize(("change", "message"), NEWER, ids=["format_version-3", "codec-version-3"])
def test_newer_format_or_codec_versions_are_refused_saying_to_upgrade(
    copy_of, student_config_dir, tmp_path, name, change, message
):
    cache = copy_of(name)
    edit_manifest(cache, change)
    assert_refused(cache, message, student_config_dir, tmp_path / "student", shard=None)


# ----------------------------------------------------------------------------- round trip

ROUND_TRIP = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
STRATEGIES = ("topk", "topp", "sample", "hybrid")
# A few steps per mode, each range's ends included (sqrt's smallest, 2^-16, is the subject of its own test).
STEPS = {"quantized": [2.0**-12, 0.01, 0.125, 1.0], "sqrt": [2.0**-15, 1 / 128, 1 / 16, 0.25], "lossless": [None]}


@st.composite
def capture_specs(draw, strategy: str) -> CaptureSpec:
    if strategy == "topk":
        return CaptureSpec("topk", k=draw(st.integers(1, 8)))
    if strategy == "topp":
        min_k = draw(st.integers(1, 4))
        return CaptureSpec("topp", k=None, top_p=0.9, min_k=min_k, max_k=draw(st.integers(min_k, 9)))
    samples = draw(st.integers(1, 12))
    if strategy == "sample":
        logprobs = draw(st.booleans())
        return CaptureSpec("sample", k=None, samples=samples, sample_temperature=1.0, sample_logprobs=logprobs, seed=0)
    return CaptureSpec("hybrid", k=draw(st.integers(1, 5)), samples=samples, sample_temperature=1.0, seed=0)


def length_bounds(spec: CaptureSpec, width: int) -> tuple[int, int]:
    if spec.strategy == "topk":
        return int(spec.k), int(spec.k)
    if spec.strategy == "topp":
        return int(spec.min_k), int(spec.max_k)
    if spec.strategy == "sample":
        return 1, min(int(spec.samples), width)
    return int(spec.k) + 1, min(int(spec.k) + int(spec.samples), width)


def random_row(spec: CaptureSpec, width: int, seq_len: int, seed: int, scale: float, edges: bool) -> SparseRow:
    """A row as the capture would give it: distinct ids below ``width``, log-probabilities of a real
    distribution (some positions complete, tail ``-inf``), a hybrid head more probable than its
    samples, counts of at least 1 summing to ``samples``. Slots come in a random order within the head
    and within the rest (the encoder sorts them)."""
    rng = np.random.default_rng(seed)
    head = int(spec.k) if spec.strategy == "hybrid" else 0
    low, high = length_bounds(spec, width)
    slots = spec.slots
    ids = np.zeros((seq_len, slots), dtype=np.int64)
    logprobs = np.full((seq_len, slots), -np.inf, dtype=np.float32)
    counts = np.zeros((seq_len, slots), dtype=np.int32)
    tail = np.empty(seq_len, dtype=np.float32)
    lengths = rng.integers(low, high + 1, size=seq_len)
    for t, length in enumerate(lengths.tolist()):
        if spec.strategy == "topp":  # the smallest most-probable prefix reaching top_p, clamped
            candidates = -np.sort(-rng.normal(0.0, scale, size=min(width, high + 1)))
            cumulative = np.cumsum(np.exp(candidates - np.logaddexp.reduce(candidates)))
            length = lengths[t] = int(np.clip((cumulative < spec.top_p).sum() + 1, low, high))
        chosen = rng.choice(width, size=length, replace=False).astype(np.int64)
        if edges:  # the smallest and largest ids a position may hold
            for edge, at in ((0, 0), (width - 1, length - 1)):
                if edge not in chosen:
                    chosen[at] = edge
        complete = rng.random() < 0.2
        logits = rng.normal(0.0, scale, size=length + (0 if complete else 1))
        if spec.strategy == "topp":  # what the prefix leaves out is the tail
            logits = candidates if length < candidates.size else candidates[:length]
            complete = length == candidates.size
        log_p = logits - np.logaddexp.reduce(logits)
        captured = -np.sort(-log_p[:length])  # most probable first: the head's, then the samples'
        tail[t] = -np.inf if complete else np.logaddexp.reduce(log_p[length:])
        order = np.concatenate([rng.permutation(head), head + rng.permutation(length - head)])
        ids[t, :length] = chosen[order]
        logprobs[t, :length] = captured[order]
        if spec.has_counts:
            drawn = length - head
            weights = np.exp(captured[head:] - captured[head:].max())
            extra = rng.multinomial(int(spec.samples) - drawn, weights / weights.sum())
            counts[t, head:length] = (1 + extra)[order[head:] - head]
    with_logprobs = spec.has_logprobs
    return SparseRow(
        input_ids=rng.integers(0, width, size=seq_len),
        ids=ids,
        logprobs=logprobs if with_logprobs else None,
        tail_logmass=tail if with_logprobs else None,
        counts=counts if spec.has_counts else None,
        lengths=lengths.astype(np.int32) if spec.variable_length else None,
    )


def reshuffled(row: SparseRow, spec: CaptureSpec, seed: int) -> SparseRow:
    """The same row with its slots in another order (within the hybrid head, and within the rest)."""
    rng = np.random.default_rng(seed)
    head = int(spec.k) if spec.strategy == "hybrid" else 0
    lengths = row.valid().sum(axis=1)
    fields = {name: getattr(row, name) for name in ("ids", "logprobs", "counts")}
    moved = {name: None if value is None else value.copy() for name, value in fields.items()}
    for t, length in enumerate(lengths.tolist()):
        order = np.concatenate([rng.permutation(head), head + rng.permutation(length - head)]).astype(np.int64)
        for name, value in fields.items():
            if value is not None:
                moved[name][t, :length] = value[t, order]
    return dataclasses.replace(row, **moved)


def by_id(row: SparseRow, t: int) -> dict[int, tuple[float, int]]:
    """Position ``t``'s captured ids, each with its log-probability and count (0 where none)."""
    length = int(row.valid()[t].sum())
    return {
        int(row.ids[t, slot]): (
            float(row.logprobs[t, slot]) if row.logprobs is not None else 0.0,
            int(row.counts[t, slot]) if row.counts is not None else 0,
        )
        for slot in range(length)
    }


def assert_documented_order(row: SparseRow, spec: CaptureSpec) -> None:
    """Most probable first (ties by ascending id) for top-k, top-p and the hybrid head; ascending ids
    for sampled rows and hybrid samples."""
    head = int(spec.k) if spec.strategy == "hybrid" else 0
    for t, length in enumerate(row.valid().sum(axis=1).tolist()):
        ranked = {"topk": length, "topp": length, "sample": 0, "hybrid": head}[spec.strategy]
        keys = [(-float(row.logprobs[t, slot]), int(row.ids[t, slot])) for slot in range(ranked)]
        assert keys == sorted(keys)
        rest = row.ids[t, ranked:length]
        assert (np.diff(rest) > 0).all()


@pytest.mark.parametrize("mode", list(STEPS))
@pytest.mark.parametrize("strategy", STRATEGIES)
@ROUND_TRIP
@given(data=st.data())
def test_encode_then_decode_keeps_every_strategys_rows(strategy, mode, data):
    """Ids, counts, lengths and tails exact; log-probabilities exactly as each mode's rounding
    gives them and within its bound; the documented slot order; the mass within the tolerance the
    decoder enforces; and the same bytes whatever the slots' order."""
    spec = data.draw(capture_specs(strategy), label="spec")
    step = data.draw(st.sampled_from(STEPS[mode]), label="step")
    codec = codec_v2.CodecSettings.for_mode(mode, step)
    assert codec.problem() is None
    width = data.draw(
        st.one_of(st.integers(spec.slots + 1, 600), st.integers(2**31, 2**32 - 1), st.just(spec.slots + 1)),
        label="logit_width",
    )
    seq_len = data.draw(st.integers(1, 6), label="seq_len")
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    scale = data.draw(st.sampled_from([0.01, 1.0, 4.0, 8.0]), label="scale")
    row = random_row(spec, width, seq_len, seed, scale, edges=data.draw(st.booleans(), label="edges"))

    frames = codec_v2.encode_row(row, spec, codec)
    assert frames == codec_v2.encode_row(reshuffled(row, spec, seed + 1), spec, codec)  # slot order is irrelevant
    assert set(frames) == {column["name"] for column in codec_v2.columns(spec, codec, provenance=False)}
    decoded = codec_v2.decode_row(frames, seq_len, spec, codec, width)

    np.testing.assert_array_equal(decoded.input_ids, row.input_ids)
    lengths = row.valid().sum(axis=1)
    if spec.variable_length:
        np.testing.assert_array_equal(decoded.lengths, lengths)
    assert decoded.width == lengths.max()
    assert_documented_order(decoded, spec)
    padding = ~decoded.valid()
    assert (decoded.ids[padding] == 0).all()
    if decoded.counts is not None:
        assert (decoded.counts[padding] == 0).all()
    for t in range(seq_len):
        original, got = by_id(row, t), by_id(decoded, t)
        assert got.keys() == original.keys()
        assert [got[i][1] for i in got] == [original[i][1] for i in got]  # counts exact
    if not spec.has_logprobs:
        assert decoded.logprobs is None and decoded.tail_logmass is None
        return
    assert np.isneginf(decoded.logprobs[padding]).all()
    np.testing.assert_array_equal(decoded.tail_logmass, row.tail_logmass)
    for t in range(seq_len):
        original, got = by_id(row, t), by_id(decoded, t)
        want = np.array([original[i][0] for i in got], dtype=np.float32)
        have = np.array([got[i][0] for i in got], dtype=np.float32)
        if mode == "lossless":
            np.testing.assert_array_equal(have, want.astype(np.float16).astype(np.float32))
        elif mode == "quantized":
            np.testing.assert_array_equal(have, (-codec_v2.quantize_logprobs(want, step) * step).astype(np.float32))
            assert np.abs(have.astype(np.float64) - want).max() <= step / 2 + 1e-5
        else:
            np.testing.assert_array_equal(have, codec_v2.sqrt_logprobs(codec_v2.sqrt_levels(want, step), step))
            roots = np.exp(have.astype(np.float64) / 2), np.exp(want.astype(np.float64) / 2)
            assert np.abs(roots[0] - roots[1]).max() <= step / 2 + 1e-6
        total = np.logaddexp(np.logaddexp.reduce(have.astype(np.float64)), float(row.tail_logmass[t]))
        assert abs(total) <= codec_v2.mass_tolerance(spec, codec)


def test_sqrt_mode_at_its_smallest_step_keeps_a_certain_token():
    spec = CaptureSpec("topk", k=1)
    codec = codec_v2.CodecSettings.for_mode("sqrt", codec_v2.MIN_SQRT_STEP)
    assert codec.problem() is None
    certain = SparseRow(
        input_ids=np.array([7]),
        ids=np.array([[7]]),
        logprobs=np.zeros((1, 1), dtype=np.float32),
        tail_logmass=np.array([-np.inf], dtype=np.float32),
    )
    decoded = codec_v2.decode_row(codec_v2.encode_row(certain, spec, codec), 1, spec, codec, 10)
    assert decoded.logprobs[0, 0] == 0.0
