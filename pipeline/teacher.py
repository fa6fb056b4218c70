"""The teacher pass: dataset -> packed sequences -> teacher forward -> capture -> shards -> manifest.

The loop reads top to bottom: batch, forward (backbone once, LM head a chunk of
positions at a time so full-vocabulary logits never exist for the whole batch and never
leave the device), capture, encode, write. The manifest is written last.

Everything that can be checked is checked before the teacher loads or a shard is
written: the paths (``--out`` local, not overlapping ``--dataset`` or ``--teacher``),
the dataset's text encoding, and whether the teacher can embed every id its tokenizer
produces. A teacher with fewer embedding rows than tokenizer ids (Llama 3: 128,256 rows,
128,257 ids) cannot run a document holding one of the extra ids; such documents are
skipped, deterministically (so a resumed pass skips the same ones), the policy is
recorded in the manifest's ``packing`` section and the count in ``run.json``. A
tokenizer whose ordinary vocabulary is larger than the embedding, or whose BOS/EOS is
beyond it, does not belong to the teacher and is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import platform
import shutil
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import codec_v2, models, paths, remote, row_stats
from pipeline.capture import capture
from pipeline.capture_spec import GENERATOR_NAME, CaptureSpec
from pipeline.config import TeacherCacheConfig
from pipeline.data import (
    PackedSequence,
    SkippedDocuments,
    TextStream,
    open_text_stream,
    pack_records,
    skip_documents_with_ids_from,
    tokenize_records,
)
from pipeline.errors import ConfigError, DatasetError
from pipeline.fingerprint import CURRENT_TOKENIZER_FINGERPRINT, TokenStreamHasher, sha256_file, tokenizer_fingerprint
from pipeline.manifest import FORMAT_VERSION, Column, ShardEntry
from pipeline.progress import progress as progress_bar
from pipeline.resume import plan_output
from pipeline.rows import SparseRow
from pipeline.store import atomic, journal, layout, reader, writer

log = logging.getLogger(__name__)

# Upper bound on logits held at once: positions per head chunk = this // vocab.
HEAD_CHUNK_ELEMENTS = 1 << 27
# Threads encoding rows while the teacher runs (the encoder measured ~150k+ tokens/s per core at top-64).
ENCODE_THREADS = max(1, min(4, (os.cpu_count() or 1) - 1))


@dataclass(frozen=True)
class CacheSummary:
    """What a teacher pass wrote."""

    path: str
    sequences: int
    tokens: int
    shards: int
    bytes: int
    seconds: float
    status: str = "written"  # or "already complete": nothing was run or rewritten
    resumed_tokens: int = 0  # tokens already in the cache when this run started
    skipped_documents: int = 0  # documents holding ids the teacher cannot embed
    skipped_files: tuple[str, ...] = ()  # text files left out as not UTF-8

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / self.tokens if self.tokens else 0.0

    @property
    def tokens_per_second(self) -> float:
        """Tokens this run put through the teacher, per second."""
        return (self.tokens - self.resumed_tokens) / self.seconds if self.seconds > 0 else 0.0


def _batched(
    sequences: Iterator[PackedSequence], batch_size: int, rows_per_shard: int, first_seq: int
) -> Iterator[list[PackedSequence]]:
    """Group sequences into batches that never straddle a shard boundary.

    A resumed pass starts at a shard boundary, so aligning batches to shards gives it the
    very batches an uninterrupted pass runs, and with them the same bytes.
    """
    seq_index = first_seq
    while True:
        room = rows_per_shard - seq_index % rows_per_shard
        batch = list(itertools.islice(sequences, min(batch_size, room)))
        if not batch:
            return
        seq_index += len(batch)
        yield batch


@torch.inference_mode()
def capture_batch(
    head: models.LMHead,
    input_ids: torch.Tensor,
    spec: CaptureSpec,
    first_seq: int,
    chunk_positions: int,
    measure: bool = True,
) -> tuple[list[SparseRow], list[bytes] | None]:
    """Teacher forward on ``(B, T)`` int64 ids whose first row is sequence ``first_seq``; one row per sequence,
    and each row's ``row_stats`` cell (:mod:`pipeline.row_stats`).

    The LM head runs ``chunk_positions`` positions at a time; each chunk's captured values
    and its positions' top-1 probability and entropy (from the full distribution, on the
    device, before the capture may overwrite the logits) move to the CPU as they are made.
    Position ``t`` of sequence ``s`` is global position ``s * T + t``, which keys the draws
    of sampled captures.
    """
    batch, seq_len = input_ids.shape
    hidden = head.hidden_states(input_ids).reshape(batch * seq_len, -1)
    positions = first_seq * seq_len + torch.arange(batch * seq_len, dtype=torch.int64, device=hidden.device)
    parts: list[dict[str, torch.Tensor]] = []
    for start in range(0, hidden.shape[0], chunk_positions):
        logits = head.logits(hidden[start : start + chunk_positions])
        # Captures that compute log-probabilities measure the statistics on the way; the others here.
        measured = row_stats.position_stats(logits) if measure and not spec.has_logprobs else None
        captured = capture(logits, spec, positions[start : start + chunk_positions], overwrite=True, measure=measure)
        del logits  # free this chunk's (N, V) buffer before the next one is allocated
        fields = ("ids", "lengths", "logprobs", "tail_logmass", "counts")
        parts.append({name: getattr(captured, name).cpu() for name in fields if getattr(captured, name) is not None})
        if measure:
            top1_prob, entropy = measured or (captured.top1_prob, captured.entropy)
            parts[-1].update(top1_prob=top1_prob.cpu(), entropy=entropy.cpu())
    joined = {name: torch.cat([part[name] for part in parts]).numpy() for name in parts[0]}
    host_ids = input_ids.cpu().numpy()
    stats = None
    if measure:
        top1_means = row_stats.row_means(joined["top1_prob"], batch)
        entropy_means = row_stats.row_means(joined["entropy"], batch)
        stats = [row_stats.encode_cell(top1, entropy) for top1, entropy in zip(top1_means, entropy_means, strict=True)]
    rows = []
    for row in range(batch):
        window = slice(row * seq_len, (row + 1) * seq_len)
        rows.append(
            SparseRow(
                input_ids=host_ids[row],
                ids=joined["ids"][window],
                logprobs=joined["logprobs"][window] if "logprobs" in joined else None,
                tail_logmass=joined["tail_logmass"][window] if "tail_logmass" in joined else None,
                counts=joined["counts"][window] if "counts" in joined else None,
                lengths=joined["lengths"][window] if "lengths" in joined else None,
            )
        )
    return rows, stats


class RowEncoder:
    """Encodes captured rows on worker threads, one batch behind the teacher (zstd and numpy release the GIL).

    :meth:`submit` queues a batch and returns the previous batch's ``(sequence, cells)``
    in order; :meth:`drain` returns the last. ``pending`` counts rows queued but not yet
    returned. Output is the same whatever the number of threads.
    """

    def __init__(self, spec: CaptureSpec, settings: codec_v2.CodecSettings, threads: int | None = None) -> None:
        self.spec, self.settings = spec, settings
        self.pool = ThreadPoolExecutor(max_workers=threads or ENCODE_THREADS, thread_name_prefix="encode")
        self.queued: list[tuple[PackedSequence, bytes | None, Future[dict[str, bytes]]]] = []

    @property
    def pending(self) -> int:
        return len(self.queued)

    def _encode(self, row: SparseRow) -> dict[str, bytes]:
        return codec_v2.encode_row(row, self.spec, self.settings)

    def submit(
        self, batch: list[PackedSequence], rows: list[SparseRow], stats: list[bytes] | None
    ) -> list[tuple[PackedSequence, dict[str, bytes | int]]]:
        """Queue a batch of rows and their ``row_stats`` cells (``None``: none); the previous batch's cells."""
        done = self.drain()
        cells = stats if stats is not None else [None] * len(rows)
        self.queued = [
            (packed, cell, self.pool.submit(self._encode, row))
            for packed, row, cell in zip(batch, rows, cells, strict=True)
        ]
        return done

    def drain(self) -> list[tuple[PackedSequence, dict[str, bytes | int]]]:
        done = []
        for packed, stats_cell, future in self.queued:
            cells: dict[str, bytes | int] = {**future.result()}
            cells["source_record"] = packed.source_record
            cells["record_offset"] = packed.record_offset
            if stats_cell is not None:
                cells[row_stats.COLUMN] = stats_cell
            done.append((packed, cells))
        self.queued = []
        return done

    def __enter__(self) -> RowEncoder:
        return self

    def __exit__(self, *exc: object) -> None:
        for _, _, future in self.queued:
            future.cancel()
        self.pool.shutdown(wait=True)


def _save_tokenizer(tokenizer: Any, cache_dir: Path) -> list[dict[str, Any]]:
    staging = cache_dir / ".tokenizer.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    tokenizer.save_pretrained(str(staging))
    files = sorted(p for p in staging.iterdir() if p.is_file())
    listing = [{"name": p.name, "bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in files]
    for path in files:
        atomic.fsync_file(path)
    atomic.fsync_dir(staging)
    staging.rename(cache_dir / layout.TOKENIZER_DIR)
    atomic.fsync_dir(cache_dir)
    return listing


def run_teacher_cache(cfg: TeacherCacheConfig, progress: bool = True) -> CacheSummary:
    """Run the teacher pass described by ``cfg``, resuming an unfinished one; return what was written.

    An ``--out`` URL is written to a local staging folder first (where a killed pass
    resumes), then uploaded with the manifest last (:mod:`pipeline.remote`).
    """
    if not remote.is_remote(cfg.out):
        return _run_local(cfg, progress)
    remote.check_remote_out(cfg.out, cfg.overwrite)
    staging = remote.staging_folder(cfg.out)
    log.info("writing %s through the local staging folder %s", cfg.out, staging)
    summary = _run_local(dataclasses.replace(cfg, out=str(staging)), progress)
    remote.upload_cache(staging, cfg.out)
    shutil.rmtree(staging, ignore_errors=True)
    return dataclasses.replace(summary, path=cfg.out)


def _run_local(cfg: TeacherCacheConfig, progress: bool) -> CacheSummary:
    """The teacher pass into a local folder."""
    started = time.time()
    out = _checked_output(cfg)
    models.quiet_transformers()
    teacher_source = models.resolve_source(cfg.teacher, "teacher")
    tokenizer = models.load_tokenizer(teacher_source, "teacher", cfg.trust_remote_code)
    config = models.load_config(teacher_source, "teacher", cfg.trust_remote_code)
    width = models.logit_width(config)
    problem = cfg.capture_spec().problem(width)
    if problem:
        raise ConfigError(problem)
    limit = models.max_positions(config)
    if limit is not None and cfg.seq_len > limit:
        raise ConfigError(f"--seq-len {cfg.seq_len} exceeds the teacher's {limit} positions; lower it")
    unembeddable = check_embeddable(tokenizer, width)
    stream = open_text_stream(
        cfg.dataset, cfg.dataset_config, cfg.split, cfg.text_column, cfg.txt_sample_by, cfg.txt_encoding_errors
    )
    device = models.pick_device(cfg.device)
    dtype = models.pick_dtype(cfg.dtype, device)
    header = cache_header(cfg, stream.display, teacher_source, config, tokenizer, width, dtype, device)
    new_folders = paths.make_output_folder(out)
    try:
        with journal.CacheLock(out):
            plan = plan_output(out, header, cfg.overwrite)
            if plan.action == "complete":
                log.info("cache %s is already complete for these settings; nothing to do", out)
                manifest = reader.read_manifest(out)
                totals = (manifest.sequences, manifest.tokens, len(manifest.shards), manifest.bytes)
                return CacheSummary(str(out), *totals, seconds=0.0, status="already complete")
            summary = _write_cache(
                cfg,
                out,
                header,
                plan.committed,
                stream,
                teacher_source,
                tokenizer,
                width,
                width if unembeddable else None,
                dtype,
                device,
                progress,
            )
    except BaseException:
        for folder in reversed(new_folders):  # only folders this run made, and only while empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    seconds = time.time() - started
    resumed_tokens = sum(entry.tokens for entry in plan.committed)
    finished = dataclasses.replace(
        summary, seconds=seconds, resumed_tokens=resumed_tokens, skipped_files=stream.skipped_files
    )
    journal.write_run_log(
        out,
        {
            "command": "teacher-cache",
            "argv": sys.argv,
            "config": cfg.to_json(),
            "host": platform.node(),
            "device": str(device),
            "dtype": str(dtype),
            "resumed_after_sequences": plan.committed[-1].first_seq + plan.committed[-1].rows if plan.committed else 0,
            "skipped_documents_unembeddable_ids": finished.skipped_documents,
            "skipped_files_not_utf8": list(stream.skipped_files),
            "started_unix": started,
            "seconds": round(seconds, 3),
            "tokens_per_second": round(finished.tokens_per_second, 2),
        },
    )
    return finished


def _checked_output(cfg: TeacherCacheConfig) -> Path:
    """``--out`` as a local path that overlaps no input; refused before anything is created."""
    if not cfg.out.strip():
        raise ConfigError("--out is empty; give the cache folder's path")
    paths.reject_url(cfg.out, "--out")
    out = Path(cfg.out).expanduser()
    for source, flag in ((cfg.dataset, "--dataset"), (cfg.teacher, "--teacher")):
        if Path(source).expanduser().exists():  # a Hub id names no local folder
            try:
                paths.reject_overlap(cfg.out, "--out", source, flag)
            except (OSError, RuntimeError) as exc:  # a symlink loop, an unreadable folder
                raise ConfigError(f"cannot resolve --out '{out}' or {flag} '{source}' ({exc}); fix the path") from exc
    paths.check_out_folder(out)
    return out


def unembeddable_ids(tokenizer: Any, rows: int) -> list[int]:
    """The ids the tokenizer can produce that a teacher with ``rows`` embedding rows cannot embed, sorted."""
    return sorted({int(index) for index in tokenizer.get_vocab().values() if int(index) >= rows})


def check_embeddable(tokenizer: Any, rows: int) -> list[int]:
    """:func:`unembeddable_ids`, refusing a tokenizer that cannot belong to the teacher.

    Raises :class:`ConfigError` when the tokenizer's ordinary vocabulary alone is larger
    than the embedding, or an id it adds to every document (BOS, EOS) is beyond it.
    Otherwise logs a warning naming the ids (documents holding one are skipped).
    """
    ids = unembeddable_ids(tokenizer, rows)
    if not ids:
        return ids
    base = int(getattr(tokenizer, "vocab_size", 0) or 0)
    if base > rows:
        raise ConfigError(
            f"the tokenizer's vocabulary has {base} ids but the teacher embeds only {rows}; "
            "the tokenizer does not belong to this model: use the teacher's own tokenizer"
        )
    every_document = set(tokenizer("", add_special_tokens=True)["input_ids"]) | {tokenizer.eos_token_id}
    always = sorted(index for index in every_document if index is not None and index >= rows)
    if always:
        raise ConfigError(
            f"the tokenizer adds id {always[0]} ({tokenizer.convert_ids_to_tokens(always[0])!r}) to every document, "
            f"but the teacher embeds only {rows} ids; the tokenizer does not belong to this model"
        )
    shown = ", ".join(f"{index} {tokenizer.convert_ids_to_tokens(index)!r}" for index in ids[:5])
    log.warning(
        "the tokenizer has %d id(s) the teacher cannot embed (%s%s; the teacher has %d embedding rows): "
        "documents that contain one are skipped and counted in %s",
        len(ids),
        shown,
        f" and {len(ids) - 5} more" if len(ids) > 5 else "",
        rows,
        layout.RUN_LOG_NAME,
    )
    return ids


def _write_cache(
    cfg: TeacherCacheConfig,
    out: Path,
    header: dict[str, Any],
    committed: list[ShardEntry],
    stream: TextStream,
    teacher_source: models.Source,
    tokenizer: Any,
    width: int,
    skip_from_id: int | None,
    dtype: torch.dtype,
    device: torch.device,
    progress: bool,
) -> CacheSummary:
    """The loop: batch, forward, capture, encode, write; then the tokenizer and the manifest.

    Documents holding an id ``>= skip_from_id`` (one the teacher cannot embed) are left out.
    """
    journal.write_journal(out, header, committed)
    spec, settings = cfg.capture_spec(), cfg.codec_settings()
    schema = layout.schema_v2([Column(**column) for column in header["columns"]], settings.label)
    shard_writer = writer.ShardWriter(
        out,
        cfg.rows_per_shard,
        committed,
        on_commit=lambda done: journal.write_journal(out, header, done),
        schema=schema,
    )
    done_rows = committed[-1].first_seq + committed[-1].rows if committed else 0
    hasher = TokenStreamHasher()
    skipped = SkippedDocuments()
    records = skip_documents_with_ids_from(tokenize_records(stream.documents, tokenizer), skip_from_id, skipped)
    sequences = pack_records(records, cfg.seq_len, cfg.max_sequences)
    for sequence in itertools.islice(sequences, done_rows):  # already in committed shards
        hasher.update(sequence.input_ids)
    try:
        with shard_writer:
            model = models.load_teacher(teacher_source, dtype, device, cfg.trust_remote_code)
            head = models.LMHead(model)
            atomic.crash_point("teacher-loaded")
            log.info(
                "teacher %s (%d logits) on %s in %s; dataset %s; capture %s, seq_len=%d%s",
                teacher_source.display,
                width,
                device,
                dtype,
                stream.display,
                ", ".join(f"{key}={value}" for key, value in spec.to_json().items()),
                cfg.seq_len,
                f"; resuming after {done_rows} sequences" if done_rows else "",
            )
            input_device = model.get_input_embeddings().weight.device
            embedding_rows = model.get_input_embeddings().weight.shape[0]
            # Ids from ``width`` up are skipped (decided before the load, recorded in the header);
            # an embedding smaller than the config says would leave ids below ``width`` unembeddable.
            between = [index for index in unembeddable_ids(tokenizer, embedding_rows) if index < width]
            if between:
                raise ConfigError(
                    f"the teacher's input embedding has {embedding_rows} rows, fewer than the {width} its config "
                    f"declares, and the tokenizer has ids in between ({between[0]}...); "
                    "fix vocab_size in the teacher's config"
                )
            chunk_positions = max(1, HEAD_CHUNK_ELEMENTS // width)
            total = cfg.max_sequences * cfg.seq_len if cfg.max_sequences else None
            bar = progress_bar(total, "teacher pass", "tok", done_rows * cfg.seq_len, enabled=progress, unit_scale=True)
            seq_index = done_rows
            checked = False
            encoder = RowEncoder(spec, settings)
            with encoder:
                for batch in _batched(sequences, cfg.batch_size, cfg.rows_per_shard, done_rows):
                    token_ids = np.stack([packed.input_ids for packed in batch])
                    assert int(token_ids.max()) < embedding_rows, "documents with unembeddable ids are skipped upstream"
                    input_ids = torch.from_numpy(token_ids).to(input_device)
                    if not checked:
                        head.check_parity(input_ids[:1, : min(cfg.seq_len, 32)])
                        checked = True
                    first = seq_index + encoder.pending
                    rows, stats = capture_batch(head, input_ids, spec, first, chunk_positions, cfg.row_stats)
                    # Rows encode on worker threads while the teacher runs the next batch; they are
                    # written in order, one batch behind.
                    for packed, cells in encoder.submit(batch, rows, stats):
                        hasher.update(packed.input_ids)
                        shard_writer.add(seq_index, cells, cfg.seq_len)
                        seq_index += 1
                    bar.update(token_ids.size)
                for packed, cells in encoder.drain():
                    hasher.update(packed.input_ids)
                    shard_writer.add(seq_index, cells, cfg.seq_len)
                    seq_index += 1
            bar.close()
    except BaseException:
        if not shard_writer.shards:  # nothing worth resuming: leave no trace of this pass
            (out / layout.JOURNAL_NAME).unlink(missing_ok=True)
        raise
    committed = shard_writer.shards
    if not committed:
        (out / layout.JOURNAL_NAME).unlink(missing_ok=True)
        because = (
            f" ({skipped.count} document(s) skipped: they hold ids the teacher cannot embed)" if skipped.count else ""
        )
        raise DatasetError(
            f"dataset '{stream.display}' gave fewer than {cfg.seq_len} tokens, not one full sequence{because}; "
            "add data or lower --seq-len"
        )
    tokenizer_files = _save_tokenizer(tokenizer, out)
    atomic.crash_point("tokenizer-saved")
    manifest = finish_manifest(header, hasher, committed, tokenizer_files, stream.file_starts)
    writer.write_manifest(out, manifest)
    (out / layout.JOURNAL_NAME).unlink(missing_ok=True)
    atomic.fsync_dir(out)
    totals = manifest["totals"]
    return CacheSummary(
        str(out),
        totals["sequences"],
        totals["tokens"],
        totals["shards"],
        totals["bytes"],
        0.0,
        skipped_documents=skipped.count,
    )


def _fingerprint(tokenizer: Any, teacher_source: models.Source) -> str:
    try:
        return tokenizer_fingerprint(tokenizer, CURRENT_TOKENIZER_FINGERPRINT)
    except ValueError as exc:
        raise ConfigError(
            f"cannot fingerprint the tokenizer of teacher '{teacher_source.display}' ({exc}); "
            "give a teacher whose tokenizer loads as a fast (tokenizer.json) or sentencepiece tokenizer"
        ) from exc


DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def cache_header(
    cfg: TeacherCacheConfig,
    dataset_display: str,
    teacher_source: models.Source,
    config: Any,
    tokenizer: Any,
    width: int,
    dtype: torch.dtype,
    device: torch.device,
) -> dict[str, Any]:
    """Every setting that decides the cache's bytes, and nothing that varies between identical runs.

    The manifest is this header plus the results (token-stream hash, tokenizer files,
    totals, shards); a resumed or repeated pass must find the same header.
    """
    return {
        "format": layout.FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "codec": cfg.codec_settings().to_json(),
        "capture": capture_header(cfg.capture_spec()),
        "columns": codec_v2.columns(cfg.capture_spec(), cfg.codec_settings(), row_stats=cfg.row_stats),
        "position_convention": "row position t holds the teacher's distribution over token t+1",
        "teacher": {**models.teacher_identity(teacher_source, config), "dtype": DTYPE_NAMES[dtype]},
        "compute": {"device_type": device.type, "batch_size": cfg.batch_size},
        "tokenizer": {
            "fingerprint": _fingerprint(tokenizer, teacher_source),
            "fingerprint_version": CURRENT_TOKENIZER_FINGERPRINT,
            "length": len(tokenizer),
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        },
        "logit_width": width,
        "seq_len": cfg.seq_len,
        "rows_per_shard": cfg.rows_per_shard,
        "packing": {
            "bos": "as the tokenizer adds by default",
            "eos_after_document": tokenizer.eos_token_id is not None,
            "cross_document_attention": True,
            "trailing_partial_sequence": "dropped",
            "txt_sample_by": cfg.txt_sample_by,
            "txt_encoding_errors": cfg.txt_encoding_errors,
            "unembeddable_ids": "documents skipped",
            "embedding_rows": width,
        },
        "dataset": {
            "source": dataset_display,
            "config": cfg.dataset_config,
            "split": cfg.split,
            "text_column": cfg.text_column,
            "max_tokens": cfg.max_tokens,
        },
    }


def capture_header(spec: CaptureSpec) -> dict[str, Any]:
    """The manifest's ``capture`` object: the strategy, its parameters, and how values and draws are defined."""
    info: dict[str, Any] = {**spec.to_json(), "logprob_temperature": 1.0, "log_base": "e"}
    if spec.strategy in ("sample", "hybrid"):
        info["generator"] = GENERATOR_NAME
    return info


def finish_manifest(
    header: dict[str, Any],
    hasher: TokenStreamHasher,
    committed: list[ShardEntry],
    tokenizer_files: list[dict[str, Any]],
    file_starts: list[tuple[str, int]] | None = None,
) -> dict[str, Any]:
    """The header plus what the pass produced (``file_starts``: each local file's name and first record)."""
    dataset = {**header["dataset"], "token_stream_sha256": hasher.hexdigest()}
    if file_starts:
        dataset["files"] = [{"name": name, "first_record": first} for name, first in file_starts]
    return {
        **header,
        "tokenizer": {**header["tokenizer"], "files": tokenizer_files},
        "dataset": dataset,
        "totals": {
            "sequences": sum(s.rows for s in committed),
            "tokens": sum(s.tokens for s in committed),
            "shards": len(committed),
            "bytes": sum(s.bytes for s in committed),
        },
        "shards": [s.to_json() for s in committed],
    }
