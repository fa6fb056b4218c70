"""Recoding a cache without the teacher: another codec mode, a coarser step, or fewer ids per position.

``distill recode --cache SRC --out DST`` reads every row of SRC through the checked reader
(format version 1 or 2), changes what the flags ask, and writes DST as a version 2 cache
through the teacher pass's own machinery: the shard writer, the journal, the folder lock,
the resume rules of :mod:`pipeline.resume`, and the manifest written last. A killed recode
run again with the same command continues after its last committed shard and gives the
same bytes as an uninterrupted one; DST's shards match SRC's one for one.

What can be done, and what is refused (precision a cache rounded away is gone):

- **Codec mode and step.** A ``lossless`` source (version 1 caches are float16, so
  lossless) may take any quantized mode and step: each recoded value is within half a
  step of the source's, whose own float16 error (at most ``2^-11 |logprob|``) comes on
  top. A source quantized on a grid (``quantized``: log-probability, step ``s`` nats;
  ``sqrt``: square root of probability, step ``s``) cannot become lossless, move to the
  other grid (each value would carry both roundings), or take a smaller step. It may
  take an odd multiple ``n s`` of its step: its values lie on its grid, ``n`` odd leaves
  no ties, so re-rounding moves each by at most ``(n - 1) s / 2`` and every value stays
  within ``n s / 2`` of the teacher's, the codec's promise. Any other step (``2 s``
  included) has ties that re-round by ``n s / 2`` on top of the source's ``s / 2``, and
  the captured mass can then miss 1 by more than the codec's check allows; it is refused.
- **Fewer ids** (``--top-k K``, at most the source's). ``topk``: each position keeps its
  ``K`` most probable ids (ties: ascending id, after the source's rounding). ``topp``:
  positions holding more than ``K`` ids keep ``K``; the manifest records ``max_k = K``
  (and ``min_k`` lowered to ``K`` if it was larger), which is what a teacher pass with
  those bounds keeps. The dropped probability joins the tail exactly:
  ``tail' = logaddexp(tail, logsumexp(dropped))`` in float64. ``sample`` and ``hybrid``
  captures are refused: sampled ids are draws, not the most probable ids, and a hybrid's
  samples were drawn from outside its head.

Every recoded row is decoded again with the checks a reader applies before it is written,
so DST never holds a row its readers would refuse. DST's manifest carries SRC's teacher,
tokenizer, dataset, packing and compute sections, the new ``codec``, ``capture`` and
``columns`` (row provenance kept where SRC has it), and ``recoded_from``: SRC's
``manifest_sha256``, codec and capture. The tokenizer copy is carried over file by file,
each checked against SRC's manifest.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import codec_v2, paths, remote, row_stats
from pipeline import hidden as hidden_states
from pipeline.capture_spec import CaptureSpec
from pipeline.codec_v2 import MAX_LOGPROB_STEP, MAX_SQRT_STEP, CodecSettings
from pipeline.config import RecodeConfig
from pipeline.errors import CacheError, ConfigError
from pipeline.fingerprint import TokenStreamHasher
from pipeline.manifest import CHECKSUM_FIELD, FORMAT_VERSION, Column, Manifest, ShardEntry
from pipeline.progress import progress as progress_bar
from pipeline.resume import header_of, plan_output
from pipeline.rows import SparseRow
from pipeline.store import atomic, journal, layout, reader, writer

log = logging.getLogger(__name__)

# Manifest sections a recode carries from its source unchanged; it writes format_version,
# codec, capture, columns and recoded_from itself, and drops sections it does not know
# (they may describe columns it does not carry).
CARRIED_SECTIONS = (
    "format",
    "position_convention",
    "teacher",
    "compute",
    "tokenizer",
    "logit_width",
    "seq_len",
    "rows_per_shard",
    "packing",
    "dataset",
    "hidden",
)
REWRITTEN_SECTIONS = ("format_version", "codec", "capture", "columns", "recoded_from")
# Relative slack when comparing steps given as decimal fractions (0.3 / 0.1 = 2.9999999999999996).
STEP_RATIO_SLACK = 1e-9


@dataclass(frozen=True)
class RecodeSummary:
    """What a recode wrote."""

    path: str
    source: str
    sequences: int
    tokens: int
    shards: int
    bytes: int
    source_bytes: int
    codec: str
    ids_per_position: int
    seconds: float
    status: str = "written"  # or "already complete": nothing was rewritten
    resumed_shards: int = 0  # shards already in DST when this run started

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / self.tokens if self.tokens else 0.0

    @property
    def source_bytes_per_token(self) -> float:
        return self.source_bytes / self.tokens if self.tokens else 0.0


@dataclass(frozen=True)
class RecodePlan:
    """What a recode decided from SRC's manifest and the flags, before anything is written.

    ``header`` is DST's manifest without its results (what the journal records and a
    resumed or repeated recode must find again). ``provenance`` and ``row_stats``: SRC's
    optional columns of those names are carried over.
    """

    source: Manifest
    source_settings: CodecSettings
    spec: CaptureSpec
    settings: CodecSettings
    provenance: bool
    header: dict[str, Any]
    row_stats: bool = False


# ---------------------------------------------------------------------------- decisions (pure)


def source_codec(manifest: Manifest) -> CodecSettings:
    """The codec settings SRC's values were written with: version 1 stores float16, i.e. ``lossless``."""
    if manifest.format_version == 1:
        return CodecSettings.for_mode("lossless")
    return reader.codec_settings(manifest)


@dataclass(frozen=True)
class Grid:
    """A quantized codec mode's grid, as the recode rules and messages need it."""

    flag: str
    largest: float
    unit: str

    def describe(self, step: float) -> str:
        return f"{step:g} {self.unit}"


GRIDS = {
    "quantized": Grid("--logprob-step", MAX_LOGPROB_STEP, "nats"),
    "sqrt": Grid("--sqrt-step", MAX_SQRT_STEP, "on the square root of probability"),
}


def describe_codec(settings: CodecSettings) -> str:
    """How a codec stores values, in words: ``lossless (float16)``,
    ``quantized at 0.125 nats`` or ``sqrt at 0.0078125 on the square root of probability``."""
    if settings.mode == "lossless":
        return "lossless (float16)"
    return f"{settings.mode} at {GRIDS[settings.mode].describe(float(settings.step))}"


def _odd_multiple(step: float, base: float) -> bool:
    ratio = step / base
    nearest = round(ratio)
    return nearest % 2 == 1 and abs(ratio - nearest) <= STEP_RATIO_SLACK * nearest


def allowed_steps(base: float, largest: float) -> str:
    """The steps a source on a grid of step ``base`` may be recoded to, in words: ``0.125, 0.375, 0.625 or ...``."""
    steps = [base * n for n in range(1, 2 * int(largest / base) + 2, 2) if base * n <= largest * (1 + STEP_RATIO_SLACK)]
    if len(steps) > 3:
        return ", ".join(f"{step:g}" for step in steps[:3]) + f" or another odd multiple up to {largest:g}"
    return ", ".join(f"{step:g}" for step in steps[:-1]) + (" or " if len(steps) > 1 else "") + f"{steps[-1]:g}"


def target_codec(cfg: RecodeConfig, source: CodecSettings, spec: CaptureSpec) -> CodecSettings:
    """DST's codec settings: the flags, else SRC's; refuses what would need precision SRC no longer has.

    See the module docstring for the rules. ``spec`` is the capture (without
    log-probabilities there is nothing to round, and any mode is allowed).
    """
    mode = cfg.codec_mode or (
        "quantized" if cfg.logprob_step is not None else "sqrt" if cfg.sqrt_step is not None else source.mode
    )
    step = {"quantized": cfg.logprob_step, "sqrt": cfg.sqrt_step}.get(mode)
    if step is None and mode == source.mode:
        step = source.step
    target = CodecSettings.for_mode(mode, step, source.level)
    if not spec.has_logprobs or source.mode == "lossless":
        return target
    grid, base = GRIDS[source.mode], float(source.step)
    keep = f"keep --codec-mode {source.mode} with {grid.flag} {allowed_steps(base, grid.largest)}"
    if target.mode == "lossless":
        raise ConfigError(
            f"--codec-mode lossless cannot restore what the source's {source.mode} codec rounded away "
            f"(its log-probabilities were written at a step of {grid.describe(base)}); {keep}"
        )
    if target.mode != source.mode:
        asked = f"--codec-mode {target.mode}" if cfg.codec_mode else GRIDS[target.mode].flag
        raise ConfigError(
            f"{asked} would round again, on another grid, log-probabilities the source's "
            f"{source.mode} codec already rounded (step {grid.describe(base)}), and carry both errors; "
            f"{keep}, or recode a lossless cache"
        )
    step = float(target.step)
    if step < base * (1 - STEP_RATIO_SLACK):
        raise ConfigError(
            f"{grid.flag} {step:g} is finer than the source's {grid.describe(base)}, and precision the source "
            f"rounded away cannot be recovered; {keep}"
        )
    if not _odd_multiple(step, base):
        raise ConfigError(
            f"{grid.flag} {step:g} is not an odd multiple of the source's {grid.describe(base)}: re-rounding "
            f"would leave some values up to {grid.describe((base + step) / 2)} from the teacher's, beyond the "
            f"codec's step / 2; {keep}"
        )
    return target


def target_capture(top_k: int | None, spec: CaptureSpec) -> CaptureSpec:
    """DST's capture: SRC's, with at most ``top_k`` ids per position where that can be done exactly."""
    if top_k is None:
        return spec
    if spec.strategy == "sample":
        raise ConfigError(
            "--top-k cannot shrink a sample capture: its ids are draws with counts, not the most probable ids, "
            "and dropping some would bias the estimate; recode without --top-k"
        )
    if spec.strategy == "hybrid":
        raise ConfigError(
            f"--top-k cannot shrink a hybrid capture: its samples were drawn from outside its top-{spec.k} head, "
            "so ids dropped from the head could never have been drawn; recode without --top-k"
        )
    have = spec.slots
    if top_k > have:
        flag = "--top-k" if spec.strategy == "topk" else "--max-k"
        raise ConfigError(
            f"--top-k {top_k} is more than the {have} ids per position the source kept; a recode cannot add ids "
            f"the teacher pass dropped: run teacher-cache again with {flag} {top_k}"
        )
    if spec.strategy == "topk":
        return dataclasses.replace(spec, k=top_k)
    return dataclasses.replace(spec, max_k=top_k, min_k=min(int(spec.min_k), top_k))


def recode_header(
    source: Manifest, spec: CaptureSpec, settings: CodecSettings, provenance: bool, with_row_stats: bool = False
) -> dict[str, Any]:
    """DST's manifest without its results: SRC's carried sections plus the new codec, capture and columns."""
    settings_part = header_of(source.raw)
    dropped = sorted(set(settings_part) - set(CARRIED_SECTIONS) - set(REWRITTEN_SECTIONS))
    if dropped:
        log.warning("the source manifest's section(s) %s are unknown here and not carried over", ", ".join(dropped))
    header = {key: copy.deepcopy(settings_part[key]) for key in CARRIED_SECTIONS if key in settings_part}
    header.update(
        format_version=FORMAT_VERSION,
        codec=settings.to_json(),
        capture={**copy.deepcopy(source.raw["capture"]), **spec.to_json()},
        columns=codec_v2.columns(
            spec,
            settings,
            provenance=provenance,
            row_stats=with_row_stats,
            loss_mask=any(column.name == codec_v2.LOSS_MASK for column in source.columns),
            document_starts=any(column.name == codec_v2.DOCUMENT_STARTS for column in source.columns),
        )
        + (source.hidden.columns() if source.hidden is not None else []),
        recoded_from={
            "manifest_sha256": source.raw[CHECKSUM_FIELD],
            "codec": copy.deepcopy(source.codec),
            "capture": copy.deepcopy(source.raw["capture"]),
        },
    )
    return header


def plan_recode(cfg: RecodeConfig, source: Manifest) -> RecodePlan:
    """Decide DST's capture, codec and manifest header from SRC's manifest and the flags; refuse what cannot be done."""
    spec = target_capture(cfg.top_k, source.capture)
    source_settings = source_codec(source)
    settings = target_codec(cfg, source_settings, spec)
    provenance = {column.name for column in source.columns} >= set(codec_v2.PROVENANCE_COLUMNS)
    unknown = [column.name for column in source.columns if column.name not in reader.read_columns(source, True)]
    if unknown:
        log.warning("the source's optional column(s) %s are unknown here and not carried over", ", ".join(unknown))
    header = recode_header(source, spec, settings, provenance, source.has_row_stats)
    return RecodePlan(source, source_settings, spec, settings, provenance, header, source.has_row_stats)


# ---------------------------------------------------------------------------- row math (pure)


def on_source_grid(logprobs: np.ndarray, settings: CodecSettings) -> np.ndarray:
    """``(T, K)`` float32 decoded log-probabilities -> float64, snapped back onto a quantized source's grid.

    A decoded value stands for a grid point (``-Q * step`` in log-probability, or level
    ``q`` on the square root of probability) but went through float32; the exact point
    lets a coarser step re-round it with no float32 error in between. Square-root level 0
    (below the grid's first point) and ``-inf`` padding stay as they are.
    """
    values = logprobs.astype(np.float64)
    finite = np.isfinite(values)
    if settings.mode == "quantized":
        step = float(settings.logprob_step)
        return np.where(finite, -np.rint(-values / step) * step, values)
    if settings.mode == "sqrt":
        step = float(settings.sqrt_step)
        levels = codec_v2.sqrt_levels(np.where(finite, values, 0.0), step)
        return np.where(finite & (levels > 0), 2.0 * np.log(np.maximum(levels, 1) * step), values)
    return values


def truncate_row(row: SparseRow, k: int) -> SparseRow:
    """Keep each position's ``k`` most probable ids; fold the dropped probability into the tail.

    ``row`` is a top-k or top-p row with log-probabilities, most probable first (as the
    reader returns it). Returns ids ``(T, min(K, k))``, log-probabilities float64 of the
    same shape, and ``tail' = logaddexp(tail, logsumexp(dropped))`` ``(T,)`` float64, both
    computed in float64; lengths capped at ``k`` for top-p rows.
    """
    if row.width <= k:
        return row
    logprobs = row.logprobs.astype(np.float64)
    dropped = np.where(row.valid()[:, k:], logprobs[:, k:], -np.inf)
    peak = dropped.max(axis=1)
    any_dropped = np.isfinite(peak)
    dropped_mass = np.full(peak.shape, -np.inf)
    shifted = np.exp(dropped[any_dropped] - peak[any_dropped, None])
    dropped_mass[any_dropped] = peak[any_dropped] + np.log(shifted.sum(axis=1))
    tail = np.logaddexp(row.tail_logmass.astype(np.float64), dropped_mass)
    lengths = None if row.lengths is None else np.minimum(row.lengths, k).astype(np.int32)
    return SparseRow(
        row.input_ids,
        row.ids[:, :k].copy(),
        logprobs[:, :k],
        tail,
        None,
        lengths,
        loss_mask=row.loss_mask,
        document_starts=row.document_starts,
    )


def recode_row(row: SparseRow, plan: RecodePlan) -> SparseRow:
    """One decoded SRC row as DST stores it (before encoding): values on SRC's grid, at most DST's ids."""
    if not plan.spec.has_logprobs:
        return row
    row = dataclasses.replace(row, logprobs=on_source_grid(row.logprobs, plan.source_settings))
    if plan.spec.slots < plan.source.capture.slots:
        row = truncate_row(row, plan.spec.slots)
    return row


def encode_checked(row: SparseRow, plan: RecodePlan, seq_index: int) -> dict[str, bytes]:
    """Encode a recoded row and decode it back with a reader's checks; raise naming the sequence if it fails."""
    frames = codec_v2.encode_row(row, plan.spec, plan.settings)
    source = plan.source
    try:
        codec_v2.decode_row(frames, source.seq_len, plan.spec, plan.settings, source.logit_width)
    except CacheError as exc:
        raise ConfigError(
            f"sequence {seq_index} recoded {describe_codec(plan.settings)} fails the reader's check ({exc}); "
            "keep the source's codec settings for this cache"
        ) from exc
    return frames


# ---------------------------------------------------------------------------- the pass


def run_recode(cfg: RecodeConfig, progress: bool = True) -> RecodeSummary:
    """Recode SRC into DST as ``cfg`` says, resuming an unfinished recode; return what was written.

    Either may be a URL (:mod:`pipeline.remote`): SRC is read through its checked local
    mirror, DST written to local staging and uploaded with its manifest last.
    """
    if not remote.is_remote(cfg.out):
        return _recode_into_a_folder(cfg, progress)
    remote.check_remote_out(cfg.out, cfg.overwrite)
    staging = remote.staging_folder(cfg.out)
    summary = _recode_into_a_folder(dataclasses.replace(cfg, out=str(staging)), progress)
    remote.upload_cache(staging, cfg.out)
    shutil.rmtree(staging, ignore_errors=True)
    return dataclasses.replace(summary, path=cfg.out)


def _recode_into_a_folder(cfg: RecodeConfig, progress: bool) -> RecodeSummary:
    """The recode into a local folder."""
    started = time.time()
    src, out = _checked_paths(cfg)
    source = reader.read_manifest(src)
    problems = reader.tokenizer_file_problems(src, source)
    if problems:
        raise CacheError(f"--cache '{src}': {problems[0]}; the cache is damaged")
    plan = plan_recode(cfg, source)
    new_folders = paths.make_output_folder(out)
    try:
        with journal.CacheLock(out):
            output = plan_output(out, plan.header, cfg.overwrite)
            if output.action == "complete":
                log.info("cache %s is already this recode of %s; nothing to do", out, src)
                return _summary(cfg, reader.read_manifest(out), plan, 0.0, "already complete")
            _write_recode(plan, src, out, output.committed, progress)
    except BaseException:
        for folder in reversed(new_folders):  # only folders this run made, and only while empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    seconds = time.time() - started
    journal.write_run_log(
        out,
        {
            "command": "recode",
            "argv": sys.argv,
            "config": cfg.to_json(),
            "source": str(src),
            "host": platform.node(),
            "resumed_after_shards": len(output.committed),
            "started_unix": started,
            "seconds": round(seconds, 3),
        },
    )
    summary = _summary(cfg, reader.read_manifest(out), plan, seconds, "written")
    return dataclasses.replace(summary, resumed_shards=len(output.committed))


def _summary(cfg: RecodeConfig, written: Manifest, plan: RecodePlan, seconds: float, status: str) -> RecodeSummary:
    return RecodeSummary(
        path=cfg.out,
        source=cfg.cache,
        sequences=written.sequences,
        tokens=written.tokens,
        shards=len(written.shards),
        bytes=written.bytes,
        source_bytes=plan.source.bytes,
        codec=describe_codec(plan.settings),
        ids_per_position=plan.spec.slots,
        seconds=seconds,
        status=status,
    )


def _checked_paths(cfg: RecodeConfig) -> tuple[Path, Path]:
    """``--cache`` and ``--out`` as local paths that do not overlap; refused before anything is read or created.

    A URL ``--cache`` becomes its checked local mirror (``--out`` is local here).
    """
    out = Path(cfg.out).expanduser()
    if remote.is_remote(cfg.cache):
        paths.check_out_folder(out)
        return remote.local_copy(cfg.cache), out
    src = Path(cfg.cache).expanduser()
    try:
        same = src.resolve() == out.resolve()
        if not same:
            paths.reject_overlap(out, "--out", src, "--cache")
    except (OSError, RuntimeError) as exc:  # a symlink loop, an unreadable folder
        raise ConfigError(f"cannot resolve --out '{out}' or --cache '{src}' ({exc}); fix the path") from exc
    if same:
        raise ConfigError(
            f"--out '{out}' is the --cache folder itself; a recode writes a new cache: choose another --out folder"
        )
    paths.check_out_folder(out)
    return src, out


def _write_recode(plan: RecodePlan, src: Path, out: Path, committed: list[ShardEntry], progress: bool) -> None:
    """The loop: read, decode and check, recode, encode, write; then the tokenizer copy and the manifest.

    DST's shard ``i`` holds SRC's shard ``i``'s rows, so a resumed recode skips SRC's shards
    that are committed already (still reading them, to hash the token stream).
    """
    from pipeline.manifest_header import finish_manifest

    source, header = plan.source, plan.header
    journal.write_journal(out, header, committed)
    schema = layout.schema_v2([Column(**column) for column in header["columns"]], plan.settings.label)
    shard_writer = writer.ShardWriter(
        out,
        int(source.raw["rows_per_shard"]),
        committed,
        on_commit=lambda done: journal.write_journal(out, header, done),
        schema=schema,
    )
    hasher = TokenStreamHasher()
    initial = sum(entry.tokens for entry in committed)
    bar = progress_bar(source.tokens, "recode", "tok", initial, enabled=progress, unit_scale=True)
    try:
        with shard_writer:
            written = {committed_entry.name for committed_entry in committed}
            for number, entry in enumerate(source.shards):
                done = layout.shard_name(number) in written
                for seq_index, cells in reader.iter_shard_frames(src, entry, source, hidden=True):
                    row = reader.decode_checked_row(cells, source, entry.name)
                    hasher.update(row.input_ids)
                    if done:
                        continue
                    recoded: dict[str, bytes | int] = {**encode_checked(recode_row(row, plan), plan, seq_index)}
                    if plan.provenance:
                        for name in codec_v2.PROVENANCE_COLUMNS:
                            recoded[name] = cells[name]
                    if plan.row_stats:
                        cell = cells[row_stats.COLUMN]
                        row_stats.decode_cells([cell], source.logit_width, f"shard '{entry.name}'")  # type: ignore[list-item]
                        recoded[row_stats.COLUMN] = cell
                    for layer in source.hidden.layers if source.hidden is not None else ():
                        name = hidden_states.column_name(layer)  # carried as stored: recoding leaves them alone
                        recoded[name] = cells[name]
                    shard_writer.add(seq_index, recoded, source.seq_len)
                if not done:
                    bar.update(entry.tokens)
        bar.close()
    except BaseException:
        bar.close()
        if not shard_writer.shards:  # nothing worth resuming: leave no trace of this recode
            (out / layout.JOURNAL_NAME).unlink(missing_ok=True)
        raise
    if hasher.hexdigest() != source.token_stream_sha256:
        raise CacheError(
            f"--cache '{src}': the rows' token stream hashes to {hasher.hexdigest()[:12]}, its manifest says "
            f"{source.token_stream_sha256[:12]}; the cache is damaged"
        )
    tokenizer_files = _copy_tokenizer(src, out, source)
    atomic.crash_point("tokenizer-saved")
    file_starts = [(item["name"], item["first_record"]) for item in source.raw["dataset"].get("files", [])]
    manifest = finish_manifest(header, hasher, shard_writer.shards, tokenizer_files, file_starts)
    writer.write_manifest(out, manifest)
    (out / layout.JOURNAL_NAME).unlink(missing_ok=True)
    atomic.fsync_dir(out)


def _copy_tokenizer(src: Path, out: Path, source: Manifest) -> list[dict[str, Any]]:
    """Copy the files SRC's manifest lists in ``tokenizer/`` (each hash-checked, links refused) to DST; list them."""
    from pipeline.cache_tokenizer import copy_listed_files

    if not source.tokenizer_files:
        return []
    staging = out / f".{layout.TOKENIZER_DIR}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    copy_listed_files(src / layout.TOKENIZER_DIR, source.tokenizer_files, staging)
    for item in source.tokenizer_files:
        with open(staging / item.name, "rb") as handle:
            os.fsync(handle.fileno())
    atomic.fsync_dir(staging)
    staging.rename(out / layout.TOKENIZER_DIR)
    atomic.fsync_dir(out)
    return [{"name": item.name, "bytes": item.bytes, "sha256": item.sha256} for item in source.tokenizer_files]
