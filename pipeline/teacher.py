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
import platform
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import chat, distributed, models, paths, remote, row_stats
from pipeline import hidden as hidden_states
from pipeline.capture import capture
from pipeline.capture_spec import CaptureSpec
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
from pipeline.errors import CacheError, ConfigError, DatasetError
from pipeline.fingerprint import TokenStreamHasher, sha256_file
from pipeline.manifest import Column, ShardEntry
from pipeline.manifest_header import cache_header, finish_manifest, hidden_spec
from pipeline.progress import progress as progress_bar
from pipeline.resume import OutputPlan, plan_output
from pipeline.row_writer import WRITE_QUEUE_BATCHES, BackgroundWriter, RowEncoder
from pipeline.rows import SparseRow
from pipeline.store import atomic, journal, layout, reader, writer

log = logging.getLogger(__name__)

# Upper bound on logits held at once: positions per head chunk = this // vocab.
HEAD_CHUNK_ELEMENTS = 1 << 27


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


@dataclass
class StreamCount:
    """Sequences the packed stream gave (every rank sees them all)."""

    sequences: int = 0


def owned_batches(
    sequences: Iterator[PackedSequence],
    batch_size: int,
    rows_per_shard: int,
    owned: Callable[[int], bool],
    hasher: TokenStreamHasher,
    count: StreamCount,
    first_index: int = 0,
) -> Iterator[tuple[int, list[PackedSequence]]]:
    """``(first sequence index, batch)`` for the sequences of the shards ``owned(shard)`` says to write.

    ``sequences`` starts at sequence ``first_index`` of the stream. Every sequence is hashed
    and counted, written here or not. Batches never
    straddle a shard boundary and start at its first row, so a shard's batches (and with
    them its bytes) are the same whichever process writes it, and whether the pass resumed.
    """
    batch: list[PackedSequence] = []
    first = 0
    for seq_index, sequence in enumerate(sequences, start=first_index):
        hasher.update(sequence.input_ids)
        count.sequences = seq_index + 1
        if not owned(seq_index // rows_per_shard):
            continue
        if not batch:
            first = seq_index
        batch.append(sequence)
        if len(batch) == batch_size or (seq_index + 1) % rows_per_shard == 0:
            yield first, batch
            batch = []
    if batch:
        yield first, batch


def _to_host(values: torch.Tensor) -> torch.Tensor:
    """``values`` on the CPU; from a GPU, copied into pinned memory without waiting, so the next chunk's
    LM head is queued while the copy runs (read it only after the stream is synchronised)."""
    return values.to("cpu", non_blocking=values.device.type == "cuda")


@torch.inference_mode()
def capture_batch(
    head: models.LMHead,
    input_ids: torch.Tensor,
    spec: CaptureSpec,
    first_seq: int,
    chunk_positions: int,
    measure: bool = True,
    layers: hidden_states.HiddenSpec | None = None,
    projection: torch.Tensor | None = None,
    document_starts: torch.Tensor | None = None,
) -> tuple[list[SparseRow], list[bytes] | None]:
    """Teacher forward on ``(B, T)`` int64 ids whose first row is sequence ``first_seq``; one row per sequence,
    and each row's ``row_stats`` cell (:mod:`pipeline.row_stats`).

    The LM head runs ``chunk_positions`` positions at a time; each chunk's captured values
    and its positions' top-1 probability and entropy (from the full distribution, on the
    device, before the capture may overwrite the logits) are copied to the CPU as they are
    made, without the host waiting for each copy (one synchronisation per batch).
    Position ``t`` of sequence ``s`` is global position ``s * T + t``, which keys the draws
    of sampled captures. With ``layers``, each row also carries those layers' hidden states,
    multiplied by ``projection`` (``(H, D)`` float32, on the device) when given. With
    ``document_starts`` (``(B, T)`` bool) attention stays within each document.
    """
    batch, seq_len = input_ids.shape
    if layers is None:
        final = head.hidden_states(input_ids, document_starts)
        kept: dict[int, torch.Tensor] = {}
    else:
        final, kept = head.hidden_states_of(input_ids, layers.layers, document_starts)
        if projection is not None:
            kept = {layer: states.float() @ projection.to(states.device) for layer, states in kept.items()}
        kept = {layer: _to_host(states.float()) for layer, states in kept.items()}
    hidden = final.reshape(batch * seq_len, -1)
    positions = first_seq * seq_len + torch.arange(batch * seq_len, dtype=torch.int64, device=hidden.device)
    parts: list[dict[str, torch.Tensor]] = []
    for start in range(0, hidden.shape[0], chunk_positions):
        logits = head.logits(hidden[start : start + chunk_positions])
        # Captures that compute log-probabilities measure the statistics on the way; the others here.
        measured = row_stats.position_stats(logits) if measure and not spec.has_logprobs else None
        captured = capture(logits, spec, positions[start : start + chunk_positions], overwrite=True, measure=measure)
        del logits  # free this chunk's (N, V) buffer before the next one is allocated
        fields = ("ids", "lengths", "logprobs", "tail_logmass", "counts")
        parts.append(
            {name: _to_host(getattr(captured, name)) for name in fields if getattr(captured, name) is not None}
        )
        if measure:
            top1_prob, entropy = measured or (captured.top1_prob, captured.entropy)
            parts[-1].update(top1_prob=_to_host(top1_prob), entropy=_to_host(entropy))
    if hidden.device.type == "cuda":
        torch.cuda.current_stream(hidden.device).synchronize()  # the copies above were queued, not waited for
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
                hidden={layer: states[row].numpy() for layer, states in kept.items()} if kept else None,
            )
        )
    return rows, stats


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

    Under torchrun every process runs this; rank ``r`` of ``W`` writes shards ``r``, ``r + W``,
    ... and rank 0 the manifest, once all are committed (:func:`_write_cache`). An ``--out``
    URL is written to a local staging folder first (where a killed pass resumes), then
    uploaded by rank 0 with the manifest last (:mod:`pipeline.remote`).
    """
    world = distributed.current_world(models.pick_device(cfg.device).type)
    if not remote.is_remote(cfg.out):
        return _run_local(cfg, progress, world)
    remote.check_remote_out(cfg.out, cfg.overwrite)
    staging = remote.staging_folder(cfg.out)
    log.info("writing %s through the local staging folder %s", cfg.out, staging)
    summary = _run_local(dataclasses.replace(cfg, out=str(staging)), progress, world)
    if world.is_main:
        remote.upload_cache(staging, cfg.out)
        shutil.rmtree(staging, ignore_errors=True)
    return dataclasses.replace(summary, path=cfg.out)


@contextlib.contextmanager
def _claimed_output(
    out: Path, header: dict[str, Any], overwrite: bool, world: distributed.World
) -> Iterator[OutputPlan]:
    """The plan for ``out`` (fresh, resume, complete), with the folder locked while the pass runs.

    Rank 0 creates and locks the folder, tidies it (:func:`~pipeline.resume.plan_output`) and
    records the shards already committed in its journal; the other ranks wait for it, then
    read that journal. Folders this run created are removed again if it fails before using them.
    """
    if not world.is_main:
        if world.broadcast_int(-1):
            yield OutputPlan("complete")
            return
        found = journal.read_journal(out)
        if found is None or found[0] != header:
            raise ConfigError(
                f"rank {world.rank}: --out '{out}' does not hold rank 0's journal for these settings; "
                "every process must see the same --out folder (a filesystem shared by all nodes)"
            )
        yield OutputPlan("resume" if found[1] else "fresh", found[1])
        return
    new_folders = paths.make_output_folder(out)
    try:
        with journal.CacheLock(out):
            plan = plan_output(out, header, overwrite)
            if plan.action != "complete":
                journal.write_journal(out, header, plan.committed)
            world.broadcast_int(int(plan.action == "complete"))
            yield plan
    except BaseException:
        for folder in reversed(new_folders):  # only folders this run made, and only while empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def _run_local(cfg: TeacherCacheConfig, progress: bool, world: distributed.World) -> CacheSummary:
    """The teacher pass into a local folder (on every rank, into the same one)."""
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
    window = models.sliding_window(config)
    if cfg.document_attention and window is not None and cfg.seq_len > window:
        raise ConfigError(
            f"--document-attention replaces the teacher's attention mask, and this teacher restricts some layers to "
            f"a window of {window} positions that the mask would not keep; use --seq-len {window} or less"
        )
    unembeddable = check_embeddable(tokenizer, width)
    if cfg.chat_template:
        chat.check_chat_tokenizer(tokenizer, teacher_source.display)
    column = cfg.messages_column if cfg.chat_template else cfg.text_column
    stream = open_text_stream(
        cfg.dataset,
        cfg.dataset_config,
        cfg.split,
        column,
        cfg.txt_sample_by,
        cfg.txt_encoding_errors,
        messages=cfg.chat_template,
    )
    device = world.device(models.pick_device(cfg.device))
    dtype = models.pick_dtype(cfg.dtype, device)
    header = cache_header(cfg, stream.display, teacher_source, config, tokenizer, width, dtype, device)
    with _claimed_output(out, header, cfg.overwrite, world) as plan:
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
            world,
        )
    seconds = time.time() - started
    resumed_tokens = sum(entry.tokens for entry in plan.committed)
    finished = dataclasses.replace(
        summary, seconds=seconds, resumed_tokens=resumed_tokens, skipped_files=stream.skipped_files
    )
    if world.is_main:
        journal.write_run_log(
            out,
            {
                "command": "teacher-cache",
                "argv": sys.argv,
                "config": cfg.to_json(),
                "host": platform.node(),
                "device": str(device),
                "dtype": str(dtype),
                "world_size": world.size,
                "resumed_shards": len(plan.committed),
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
    world: distributed.World,
) -> CacheSummary:
    """The loop: batch, forward, capture, encode, write; then the tokenizer and the manifest.

    This rank writes the shards ``r, r + W, ...`` not yet ``committed``; every rank reads
    (and hashes) the whole stream. Documents holding an id ``>= skip_from_id`` (one the
    teacher cannot embed) are left out. Rank 0 writes the manifest once every rank's shards
    are committed; on the other ranks the summary is of this rank's shards alone.
    """
    spec, settings = cfg.capture_spec(), cfg.codec_settings()
    schema = layout.schema_v2([Column(**column) for column in header["columns"]], settings.label)
    shard_writer = writer.ShardWriter(
        out,
        cfg.rows_per_shard,
        committed if world.is_main else [],
        on_commit=lambda done: journal.write_journal(out, header, done, world.rank),
        schema=schema,
    )
    finished = {entry.first_seq // cfg.rows_per_shard for entry in committed}

    def owned(shard: int) -> bool:
        return shard % world.size == world.rank and shard not in finished

    hasher, skipped = TokenStreamHasher(), SkippedDocuments()
    chat_stats = chat.ChatStats()
    sequences, first_index = resumed_stream(
        out, committed, cfg, stream, tokenizer, skip_from_id, skipped, hasher, chat_stats
    )
    count = StreamCount(first_index)
    try:
        with shard_writer:
            gpus = world.gpus() if world.is_distributed and device.type == "cuda" else None
            model = models.load_teacher(teacher_source, dtype, device, cfg.trust_remote_code, gpus)
            head = models.LMHead(model)
            atomic.crash_point("teacher-loaded")
            log.info(
                "teacher %s (%d logits) on %s in %s; dataset %s; capture %s, seq_len=%d%s%s",
                teacher_source.display,
                width,
                device,
                dtype,
                stream.display,
                ", ".join(f"{key}={value}" for key, value in spec.to_json().items()),
                cfg.seq_len,
                f"; {len(committed)} shard(s) already committed" if committed else "",
                f"; rank {world.rank} of {world.size} writes shards {world.rank}, {world.rank + world.size}, ..."
                if world.is_distributed
                else "",
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
            single = not world.is_distributed and not committed
            total = cfg.max_sequences * cfg.seq_len if cfg.max_sequences and single else None
            bar = progress_bar(total, "teacher pass", "tok", 0, enabled=progress and world.is_main, unit_scale=True)
            checked = False
            background = BackgroundWriter(shard_writer, cfg.seq_len, WRITE_QUEUE_BATCHES * cfg.batch_size)
            layers = hidden_spec(cfg, model.config)
            matrix = layers.projection_matrix() if layers else None
            projection = None if matrix is None else torch.from_numpy(matrix).to(input_device)
            with RowEncoder(spec, settings, hidden=cfg.hidden_encoding) as encoder, background:
                batches = owned_batches(
                    sequences, cfg.batch_size, cfg.rows_per_shard, owned, hasher, count, first_index
                )
                for first, batch in batches:
                    token_ids = np.stack([packed.input_ids for packed in batch])
                    assert int(token_ids.max()) < embedding_rows, "documents with unembeddable ids are skipped upstream"
                    input_ids = torch.from_numpy(token_ids).to(input_device)
                    if not checked:
                        head.check_parity(input_ids[:1, : min(cfg.seq_len, 32)])
                        checked = True
                    starts = None
                    if cfg.document_attention:
                        starts = torch.from_numpy(np.stack([packed.document_starts for packed in batch]))
                    rows, stats = capture_batch(
                        head, input_ids, spec, first, chunk_positions, cfg.row_stats, layers, projection,
                        None if starts is None else starts.to(input_device),
                    )  # fmt: skip
                    # Rows encode on worker threads and are written, in order, on the writer's
                    # thread while the teacher runs the next batches.
                    background.put(encoder.encode(first, batch, rows, stats))
                    bar.update(token_ids.size)
            bar.close()
    except BaseException:
        if world.is_main and not shard_writer.shards and not journal.rank_journals(out):
            journal.remove_journals(out)  # nothing worth resuming: leave no trace of this pass
        raise
    if not count.sequences:
        if world.is_main:
            journal.remove_journals(out)
        because = (
            f" ({skipped.count} document(s) skipped: they hold ids the teacher cannot embed)" if skipped.count else ""
        )
        raise DatasetError(
            f"dataset '{stream.display}' gave fewer than {cfg.seq_len} tokens, not one full sequence{because}; "
            "add data or lower --seq-len"
        )
    if cfg.chat_template:
        log.info(
            "chat: assistant turns found by prefix rendering in %d conversation(s), by content search in %d; "
            "%d without an assistant turn (nothing of them counts in the losses)",
            chat_stats.prefix_spans,
            chat_stats.content_search,
            chat_stats.without_assistant,
        )
    world.barrier()  # every rank's shards are committed and journaled
    if not world.is_main:
        mine = shard_writer.shards
        return CacheSummary(
            str(out),
            sum(entry.rows for entry in mine),
            sum(entry.tokens for entry in mine),
            len(mine),
            sum(entry.bytes for entry in mine),
            0.0,
            skipped_documents=skipped.count,
        )
    every_shard = all_committed(out, header, count.sequences, cfg.rows_per_shard)
    tokenizer_files = _save_tokenizer(tokenizer, out)
    atomic.crash_point("tokenizer-saved")
    manifest = finish_manifest(header, hasher, every_shard, tokenizer_files, stream.file_starts)
    writer.write_manifest(out, manifest)
    journal.remove_journals(out)
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


def resumed_stream(
    out: Path,
    committed: list[ShardEntry],
    cfg: TeacherCacheConfig,
    stream: TextStream,
    tokenizer: Any,
    skip_from_id: int | None,
    skipped: SkippedDocuments,
    hasher: TokenStreamHasher,
    chat_stats: chat.ChatStats | None = None,
) -> tuple[Iterator[PackedSequence], int]:
    """The packed stream from the first sequence after the cache's committed prefix, and that sequence's index.

    The prefix (shards 0, 1, ... committed without a gap) is not tokenized again: its token
    ids are read back from its shards into ``hasher``, the dataset's records before the last
    written sequence's are passed over without tokenizing, and packing restarts at that
    sequence's record and offset (:func:`pipeline.store.reader.written_stream`).
    """
    prefix: list[ShardEntry] = []
    for entry in sorted(committed, key=lambda entry: entry.first_seq):
        if entry.first_seq != len(prefix) * cfg.rows_per_shard:
            break
        prefix.append(entry)
    position = reader.written_stream(out, prefix, cfg.seq_len, hasher)
    first_record = 0 if position is None else position.source_record
    documents = itertools.islice(iter(stream.documents), first_record, None)
    if cfg.chat_template:
        tokenized = chat.tokenize_chat_records(documents, tokenizer, chat_stats, first_record)
    else:
        tokenized = tokenize_records(documents, tokenizer, first_record=first_record)
    records = skip_documents_with_ids_from(tokenized, skip_from_id, skipped)
    packing = {"masked": cfg.chat_template, "documents": cfg.document_attention}
    if position is None:
        return pack_records(records, cfg.seq_len, cfg.max_sequences, **packing), 0
    last_written = position.sequences - 1
    sequences = pack_records(records, cfg.seq_len, cfg.max_sequences, position.record_offset, last_written, **packing)
    next(sequences, None)  # the last written sequence again: where the next one starts
    log.info(
        "resuming the stream at sequence %d (dataset record %d): the first %d were read back from their shards",
        position.sequences,
        position.source_record,
        position.sequences,
    )
    return sequences, position.sequences


def all_committed(out: Path, header: dict[str, Any], sequences: int, rows_per_shard: int) -> list[ShardEntry]:
    """Every rank's committed shards, from their journals, checked to cover the ``sequences`` of the stream."""
    entries: dict[str, ShardEntry] = {}
    for name, content in journal.read_journals(out):
        if content is None or content[0] != header:
            raise CacheError(f"--out '{out}': the journal {name} is unreadable or of other settings; run again")
        entries.update((entry.name, entry) for entry in content[1])
    expected = [layout.shard_name(index) for index in range(-(-sequences // rows_per_shard))]
    missing = [name for name in expected if name not in entries]
    if missing or len(entries) != len(expected):
        raise CacheError(
            f"--out '{out}': shard(s) {', '.join(missing[:3]) or 'beyond the stream'} not committed when every "
            "rank had finished; every process must write to the same folder (on several machines, a filesystem "
            "they share); run the same command again to complete the cache"
        )
    return [entries[name] for name in expected]
