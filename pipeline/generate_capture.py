"""``distill generate --capture-out``: a cache of the teacher's distributions over its own samples, in the same pass.

One row per (prompt, return sequence): the prompt's tokens, the response's, then the
padding id up to ``--capture-seq-len``. Position ``t`` holds the teacher's top-k
distribution at temperature 1 over token ``t + 1``, from the very logits the generation
computed (the prompt's prefill, then each step): no second teacher pass. The loss mask
counts the response's tokens alone (the targets of positions ``L - 1 .. L + n - 2`` for a
prompt of ``L`` tokens and a response of ``n``); positions after the response repeat its
last distribution and are masked. Provenance cells hold the prompt's index
(``source_record``) and the return sequence (``record_offset``).

The cache is written through the teacher pass's shard writer, journal and manifest-last
commit. A killed run resumes both outputs together: generation restarts at the part
holding the first row the cache lacks, rewrites the parts from there (the same text, by
the keyed draws) and adds only the rows the cache lacks.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import codec_v2, models, paths
from pipeline.capture_spec import CaptureSpec
from pipeline.config import TeacherCacheConfig
from pipeline.errors import ConfigError
from pipeline.fingerprint import TokenStreamHasher
from pipeline.manifest import Column, ShardEntry
from pipeline.resume import plan_output
from pipeline.rows import SparseRow
from pipeline.store import journal, layout, reader, writer


@dataclasses.dataclass(frozen=True)
class CaptureSettings:
    out: str
    seq_len: int
    top_k: int
    shard_tokens: int


class CaptureSink:
    """Rows of generated samples -> a cache, resumable with the generation (module docstring)."""

    def __init__(self, out: Path, header: dict[str, Any], rows_per_shard: int, overwrite: bool) -> None:
        self.out, self.header = out, header
        self.seq_len = int(header["seq_len"])
        self.spec = header_spec_from(header)
        self.codec = codec_v2.CodecSettings.for_mode(header["codec"]["mode"], header["codec"].get("sqrt_step"))
        self.hasher = TokenStreamHasher()
        self.new_folders = paths.make_output_folder(out)
        self.lock = journal.CacheLock(out)
        self.lock.__enter__()
        self.released = False
        try:
            plan = plan_output(out, header, overwrite)
            if plan.action == "complete":
                raise ConfigError(
                    f"--capture-out '{out}' holds a finished cache of these settings while the generated data is "
                    "unfinished; pass --overwrite to write both again"
                )
            prefix: list[ShardEntry] = []
            for entry in plan.committed:
                if entry.first_seq != len(prefix) * rows_per_shard:
                    break
                prefix.append(entry)
            journal.write_journal(out, header, prefix)
            position = reader.written_stream(out, prefix, self.seq_len, self.hasher)
            self.rows_written = 0 if position is None else position.sequences
            schema = layout.schema_v2([Column(**column) for column in header["columns"]], self.codec.label)
            self.writer = writer.ShardWriter(
                out,
                rows_per_shard,
                prefix,
                on_commit=lambda done: journal.write_journal(out, header, done),
                schema=schema,
            )
        except BaseException:
            self.close_lock()
            raise
        self.next_row = self.rows_written

    def _release(self) -> None:
        """Give the folder's lock back, once."""
        if not self.released:
            self.released = True
            self.lock.__exit__(None, None, None)

    def close_lock(self) -> None:
        self._release()
        for folder in reversed(self.new_folders):
            with contextlib.suppress(OSError):
                folder.rmdir()

    def add(self, row: SparseRow, prompt_index: int, sample_index: int) -> None:
        """Append the next row (rows already in the cache, from a run this one resumes, are skipped)."""
        if self.next_row >= self.rows_written:
            cells: dict[str, bytes | int] = {**codec_v2.encode_row(row, self.spec, self.codec)}
            cells["source_record"], cells["record_offset"] = prompt_index, sample_index
            self.hasher.update(row.input_ids)
            self.writer.add(self.next_row, cells, self.seq_len)
        self.next_row += 1

    def finish(self, tokenizer: Any) -> None:
        from pipeline.manifest_header import finish_manifest
        from pipeline.teacher import _save_tokenizer

        committed = self.writer.close()
        tokenizer_files = _save_tokenizer(tokenizer, self.out)
        manifest = finish_manifest(self.header, self.hasher, committed, tokenizer_files)
        writer.write_manifest(self.out, manifest)
        journal.remove_journals(self.out)
        self._release()

    def abort(self) -> None:
        """Drop the shard in progress and release the lock (nothing, once the cache is finished)."""
        if not self.released:
            self.writer.abort()
        self._release()


def header_spec_from(header: dict[str, Any]) -> CaptureSpec:
    return CaptureSpec("topk", k=int(header["capture"]["k"]))


def sample_row(
    prompt_ids: list[int],
    new_ids: list[int],
    steps: Any,
    row: int,
    width: int,
    seq_len: int,
    pad_id: int,
) -> SparseRow:
    """Row ``row`` of a generated batch as a cache row (module docstring).

    Args:
        steps: the batch's :class:`~pipeline.generate.CapturedSteps`.
        width: the batch's left-padded prompt width ``W``.
    """
    prompt_length, count = len(prompt_ids), len(new_ids)
    ids_parts, logprob_parts, tail_parts = [], [], []
    prefill_ids, prefill_logprobs, prefill_tail = steps.prefill
    window = slice(width - prompt_length, width)
    ids_parts.append(prefill_ids[row, window])
    logprob_parts.append(prefill_logprobs[row, window])
    tail_parts.append(prefill_tail[row, window])
    for step in steps.steps[: count - 1]:
        ids_parts.append(step[0][row : row + 1])
        logprob_parts.append(step[1][row : row + 1])
        tail_parts.append(step[2][row : row + 1])
    ids = torch.cat(ids_parts).numpy()
    logprobs = torch.cat(logprob_parts).numpy()
    tail = torch.cat(tail_parts).numpy()
    filled = ids.shape[0]  # prompt_length + count - 1 positions with their own distribution
    rest = seq_len - filled
    ids = np.concatenate([ids, np.repeat(ids[-1:], rest, axis=0)])
    logprobs = np.concatenate([logprobs, np.repeat(logprobs[-1:], rest, axis=0)])
    tail = np.concatenate([tail, np.repeat(tail[-1:], rest)])
    input_ids = np.array(prompt_ids + new_ids + [pad_id] * (seq_len - prompt_length - count), dtype=np.int64)
    mask = np.zeros(seq_len, dtype=bool)
    mask[prompt_length - 1 : prompt_length + count - 1] = True
    return SparseRow(
        input_ids, ids.astype(np.int64), logprobs.astype(np.float32), tail.astype(np.float32), loss_mask=mask
    )


def capture_header(
    settings: CaptureSettings,
    cfg: Any,
    display: str,
    source: models.Source,
    config: Any,
    tokenizer: Any,
    dtype: torch.dtype,
    device: torch.device,
    pad_id: int,
) -> dict[str, Any]:
    """The capture cache's header: a top-k teacher-pass header whose packing says how rows were made."""
    from pipeline.manifest_header import cache_header as teacher_header

    pass_cfg = TeacherCacheConfig(
        teacher=cfg.teacher,
        dataset=cfg.dataset,
        out=settings.out,
        dataset_config=cfg.dataset_config,
        split=cfg.split,
        text_column=cfg.messages_column or cfg.text_column,
        seq_len=settings.seq_len,
        capture="topk",
        top_k=settings.top_k,
        batch_size=cfg.batch_size,
        shard_tokens=settings.shard_tokens,
        row_stats=False,
        dtype=cfg.dtype,
        device=cfg.device,
        trust_remote_code=cfg.trust_remote_code,
    )
    header = teacher_header(pass_cfg, display, source, config, tokenizer, models.logit_width(config), dtype, device)
    header["columns"] = codec_v2.columns(pass_cfg.capture_spec(), pass_cfg.codec_settings(), loss_mask=True)
    header["packing"] = {
        "rows": "one per (prompt, return sequence) of distill generate: prompt, response, then the padding id",
        "loss_mask": "the response's tokens",
        "after_the_response": "the last response position's distribution, masked",
        "provenance": "source_record = prompt index, record_offset = return sequence",
        "padding_id": pad_id,
    }
    return header
