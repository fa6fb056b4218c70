"""Text -> packed token sequences.

Documents are streamed with ``datasets`` (never fully in memory), tokenized as the
teacher's tokenizer does by default (its BOS included where it adds one), followed by
EOS, concatenated, and cut into sequences of ``seq_len`` tokens. The trailing partial
sequence is dropped. Nothing masks attention across document boundaries inside a
sequence.
"""

from __future__ import annotations

import codecs
import itertools
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pipeline.errors import DatasetError, SourceNotFoundError, first_line
from pipeline.models import looks_like_path

# File suffix -> the ``datasets`` builder that reads it.
LOCAL_BUILDERS: dict[str, str] = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".arrow": "arrow",
}
TxtSampleBy = Literal["document", "paragraph", "line"]
TxtEncodingErrors = Literal["strict", "replace", "skip-file"]
TOKENIZE_BATCH = 64
# Bytes read at a time when checking that a text file is UTF-8.
UTF8_CHECK_BLOCK = 1 << 20

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TextStream:
    """An opened dataset: its documents, and how to name it in a manifest (no absolute paths).

    ``documents`` yields one string per dataset record, empty ones included, so the
    ``i``-th document is record ``i`` (counted from 0 across all files). ``file_starts``
    fills in as the documents are read: ``(file name, index of its first record)`` for
    each local file reached so far.
    """

    documents: Iterable[str]
    display: str
    builder: str
    skipped_files: tuple[str, ...] = ()  # text files left out as not UTF-8 (--txt-encoding-errors skip-file)
    file_starts: list[tuple[str, int]] = field(default_factory=list)


@dataclass
class SkippedDocuments:
    """A running count of the documents a filter left out of the token stream."""

    count: int = 0


def _local_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in LOCAL_BUILDERS)
    if not files:
        raise DatasetError(
            f"dataset folder '{path}' holds no {', '.join(sorted(LOCAL_BUILDERS))} files; point --dataset at data files"
        )
    return files


def first_invalid_utf8(path: Path, block_size: int = UTF8_CHECK_BLOCK) -> int | None:
    """Byte offset of the first byte of ``path`` that is not valid UTF-8, or ``None`` if all of it is.

    Decodes ``block_size`` bytes at a time with an incremental decoder, so memory stays
    small whatever the file's size.
    """
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    fed = 0  # bytes handed to the decoder before this block
    with open(path, "rb") as handle:
        while True:
            block = handle.read(block_size)
            pending = len(decoder.getstate()[0])  # an incomplete character carried over from the last block
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as exc:
                return fed - pending + exc.start
            if not block:
                return None
            fed += len(block)


def _utf8_text_files(files: list[Path], root: Path, policy: TxtEncodingErrors) -> tuple[list[Path], list[str]]:
    """The files to read under ``policy``, and the names of those left out; ``strict`` fails on the first bad one."""
    keep: list[Path] = []
    skipped: list[str] = []
    for path in files:
        try:
            offset = first_invalid_utf8(path)
        except OSError as exc:
            raise DatasetError(f"cannot read dataset file '{path}' ({exc.strerror}); check its permissions") from exc
        if offset is None:
            keep.append(path)
        elif policy == "strict":
            raise DatasetError(
                f"dataset file '{path}' is not valid UTF-8 (byte {offset}); convert it to UTF-8, or pass "
                "--txt-encoding-errors replace (bad bytes become U+FFFD) or skip-file (leave such files out)"
            )
        else:
            skipped.append(_relative_name(path, root))
    if skipped:
        log.warning(
            "left out %d file(s) that are not valid UTF-8 (--txt-encoding-errors skip-file): %s",
            len(skipped),
            ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""),
        )
    if not keep:
        raise DatasetError(
            f"no file of dataset '{root}' is valid UTF-8; convert the files, or pass --txt-encoding-errors replace"
        )
    return keep, skipped


def _relative_name(path: Path, root: Path) -> str:
    return path.name if root.is_file() else str(path.relative_to(root))


def open_text_stream(
    source: str,
    config: str | None = None,
    split: str = "train",
    text_column: str = "text",
    txt_sample_by: TxtSampleBy = "document",
    txt_encoding_errors: TxtEncodingErrors = "strict",
    messages: bool = False,
) -> TextStream:
    """Stream the ``text_column`` of a Hub dataset or of local files (with ``messages``, a chat
    column instead: each document a list of ``{"role", "content"}`` messages, checked).

    Local text files (``.txt``, ``.text``, ``.md``) are checked to be UTF-8 here, before
    anything else runs: ``strict`` refuses a file that is not, naming it and the byte;
    ``skip-file`` leaves such files out (``TextStream.skipped_files``); ``replace`` reads
    them with bad bytes replaced by U+FFFD. The first record is read here, so a missing
    column or an empty dataset fails before any model is loaded. Any error the dataset
    library raises later, while the documents are iterated, becomes a :class:`DatasetError`
    naming the dataset and, for local files, the file.
    """
    from datasets import load_dataset
    from datasets.utils import logging as datasets_logging

    # Its error logs repeat the exception that we turn into one line of our own.
    datasets_logging.set_verbosity(logging.CRITICAL)
    path = Path(source).expanduser()
    files: list[Path] = []
    skipped: list[str] = []
    if path.exists():
        files = _local_files(path)
        builders = {LOCAL_BUILDERS.get(p.suffix) for p in files}
        if None in builders or len(builders) != 1:
            suffixes = sorted({p.suffix for p in files})
            raise DatasetError(
                f"dataset '{source}' mixes or uses unsupported file types {suffixes}; "
                f"use one of {', '.join(sorted(LOCAL_BUILDERS))}"
            )
        builder = builders.pop()
        if all(p.stat().st_size == 0 for p in files):
            raise DatasetError(f"dataset '{source}' is empty; point --dataset at data with text")
        kwargs: dict[str, Any] = {"split": split, "streaming": True}
        if builder == "text":
            # datasets' text loader yields one row per line unless told otherwise.
            kwargs["sample_by"] = txt_sample_by
            if txt_encoding_errors == "replace":
                kwargs["encoding_errors"] = "replace"
            else:
                files, skipped = _utf8_text_files(files, path, txt_encoding_errors)
        kwargs["data_files"] = {split: [str(p) for p in files]}
        display = path.resolve().name
        load_args: tuple[Any, ...] = (builder,)
    else:
        if looks_like_path(source):
            raise SourceNotFoundError(f"dataset path '{source}' does not exist; check the path")
        builder = "hub"
        kwargs = {"split": split, "streaming": True}
        display = source
        load_args = (source, config) if config else (source,)
    names = [_relative_name(p, path) for p in files]
    file_starts: list[tuple[str, int]] = []
    try:
        dataset = load_dataset(*load_args, **kwargs)
        records = _records(dataset, display, names, file_starts)
        first = next(records, None)
    except DatasetError:
        raise
    except Exception as exc:  # datasets raises its own hierarchy for missing ids, configs and splits
        raise SourceNotFoundError(
            f"cannot read dataset '{display}' split '{split}' ({first_line(exc)}); check the id, config, split or files"
        ) from exc
    if first is None:
        raise DatasetError(f"dataset '{display}' split '{split}' is empty; point --dataset at data with text")
    if text_column not in first:
        raise DatasetError(
            f"dataset '{display}' has no column '{text_column}' (columns: {', '.join(sorted(first))}); "
            "pick one with --text-column"
        )
    convert = _messages_of if messages else _text_of
    documents = (convert(record, text_column) for record in itertools.chain([first], records))
    return TextStream(
        documents=documents,
        display=display,
        builder=builder,
        skipped_files=tuple(skipped),
        file_starts=file_starts,
    )


def _per_file(dataset: Any, names: list[str]) -> Iterator[tuple[str | None, Any]]:
    """``(file name, that file's records)`` in order, or the whole dataset once where files cannot be told apart.

    Each file is one shard of a streamed local dataset, read in the same order as the whole.
    ``shard()`` costs time in proportion to the shards it splits, so the files are halved
    recursively: O(n log n) in all, where splitting off each file in turn is O(n^2).
    """
    if not names or getattr(dataset, "n_shards", None) != len(names):
        yield None, dataset
        return
    if len(names) == 1:
        yield names[0], dataset
        return
    first = dataset.shard(2, 0, contiguous=True)
    yield from _per_file(first, names[: first.n_shards])
    yield from _per_file(dataset.shard(2, 1, contiguous=True), names[first.n_shards :])


def _records(
    dataset: Any, display: str, names: list[str], file_starts: list[tuple[str, int]]
) -> Iterator[dict[str, Any]]:
    """The dataset's records in order; a read error becomes a :class:`DatasetError` naming the file if known.

    Appends ``(file name, index of its first record)`` to ``file_starts`` as each file begins.
    """
    index = 0
    for name, part in _per_file(dataset, names):
        if name is not None:
            file_starts.append((name, index))
        iterator = iter(part)
        while True:
            try:
                record = next(iterator)
            except StopIteration:
                break
            except Exception as exc:  # datasets, pyarrow and json raise many unrelated types
                where = f"file '{name}' of dataset '{display}'" if name else f"dataset '{display}'"
                raise DatasetError(
                    f"cannot read {where} ({first_line(exc)}); fix or remove the damaged data, "
                    "then run the same command again"
                ) from exc
            index += 1
            yield record


def _text_of(record: dict[str, Any], column: str) -> str:
    value = record[column]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DatasetError(
            f"column '{column}' holds {type(value).__name__}, not text; pick a text column with --text-column"
        )
    return value


def _messages_of(record: dict[str, Any], column: str) -> list[dict[str, str]]:
    """A chat record's messages: a list of ``{"role": str, "content": str}``, refused in one line otherwise."""
    value = record[column]
    fine = isinstance(value, list) and all(
        isinstance(item, dict) and isinstance(item.get("role"), str) and isinstance(item.get("content"), str)
        for item in value
    )
    if not fine:
        raise DatasetError(
            f"column '{column}' holds {type(value).__name__}, not a list of {{role, content}} messages; "
            "pick the chat column with --messages-column"
        )
    return [{"role": item["role"], "content": item["content"]} for item in value]


def tokenize_records(
    documents: Iterable[str], tokenizer: Any, batch_size: int = TOKENIZE_BATCH, first_record: int = 0
) -> Iterator[tuple[int, list[int]]]:
    """``(record index, token ids)`` of each non-blank document: ids as the tokenizer encodes by default, then EOS.

    The record index is the document's position in ``documents`` (blank ones counted), plus
    ``first_record`` (where ``documents`` starts in the dataset).
    """
    eos = tokenizer.eos_token_id
    iterator = enumerate(documents, start=first_record)
    while batch := [(index, text) for index, text in itertools.islice(iterator, batch_size)]:
        batch = [(index, text) for index, text in batch if text.strip()]
        if not batch:
            continue
        encoded = tokenizer([text for _, text in batch], add_special_tokens=True, verbose=False)["input_ids"]
        for (index, _), ids in zip(batch, encoded):
            yield index, list(ids) + ([eos] if eos is not None else [])


def tokenize_documents(
    documents: Iterable[str], tokenizer: Any, batch_size: int = TOKENIZE_BATCH
) -> Iterator[list[int]]:
    """Token ids of each non-blank document as the tokenizer encodes it by default, then EOS (if it has one)."""
    for _, ids in tokenize_records(documents, tokenizer, batch_size):
        yield ids


def skip_documents_with_ids_from(
    records: Iterable[tuple[Any, ...]], limit: int | None, skipped: SkippedDocuments
) -> Iterator[tuple[Any, ...]]:
    """Drop each ``(record, ids, ...)`` holding an id ``>= limit`` (one the teacher cannot embed), counting it.

    ``limit=None`` passes everything through. The decision depends on the document alone,
    so a resumed pass skips exactly the documents an uninterrupted one skips.
    """
    for item in records:
        ids = item[1]
        if limit is not None and ids and max(ids) >= limit:
            skipped.count += 1
            continue
        yield item


@dataclass(frozen=True)
class PackedSequence:
    """One packed sequence and where it starts in the dataset.

    Attributes:
        input_ids: ``(seq_len,)`` int64.
        source_record: index of the dataset record holding the sequence's first token.
        record_offset: that token's offset in the record's token ids (BOS counted).
        target_mask: ``(seq_len,)`` bool, whether the token after each position (its target)
            counts in the losses, or ``None`` when every token does (documents without a mask).
        document_starts: ``(seq_len,)`` bool, where a document's first token lies, or ``None``
            when not tracked (packing asked for it: attention kept within documents).
    """

    input_ids: np.ndarray
    source_record: int
    record_offset: int
    target_mask: np.ndarray | None = None
    document_starts: np.ndarray | None = None


def pack_records(
    records: Iterable[tuple[Any, ...]],
    seq_len: int,
    max_sequences: int | None = None,
    first_offset: int = 0,
    first_index: int = 0,
    masked: bool = False,
    documents: bool = False,
) -> Iterator[PackedSequence]:
    """Concatenate ``(record, ids)`` documents and cut the stream into sequences of ``seq_len`` tokens.

    The trailing partial sequence is dropped; at most ``max_sequences`` are produced, counted
    from sequence ``first_index``. A stream resumed mid-document starts at token ``first_offset``
    of the first record (sequence ``first_index`` starting there). With ``masked``, records are
    ``(record, ids, token_mask)`` and each sequence's ``target_mask[t]`` is the mask of the token
    after position ``t``: the next sequence's first token for the last position, or ``False``
    at the end of the stream. With ``documents``, each sequence also marks where documents begin
    (``document_starts``).
    """
    produced = first_index
    if max_sequences is not None and produced >= max_sequences:
        return
    pending: list[int] = []
    pending_mask: list[bool] = []
    starts: list[tuple[int, int, int]] = []  # (position in pending, record, offset in the record at that position)
    skip_next = first_offset
    lookahead = 1 if masked else 0  # a row's last target is the token after it

    def cut(following: bool) -> PackedSequence:
        nonlocal pending, pending_mask, starts
        _, first_record, first_token = starts[0]
        target_mask = None
        if masked:
            target_mask = np.asarray(pending_mask[1 : seq_len + 1] + ([] if following else [False]), dtype=bool)
        document_starts = None
        if documents:
            document_starts = np.zeros(seq_len, dtype=bool)
            for position, _, offset in starts:
                if position < seq_len and offset == 0:
                    document_starts[position] = True
        sequence = PackedSequence(
            np.asarray(pending[:seq_len], dtype=np.int64), first_record, first_token, target_mask, document_starts
        )
        del pending[:seq_len], pending_mask[:seq_len]
        starts = _after_cut(starts, seq_len)
        return sequence

    for item in records:
        record, ids = item[0], item[1]
        skip, skip_next = skip_next, 0
        starts.append((len(pending), record, skip))
        pending.extend(ids[skip:])
        if masked:
            pending_mask.extend(item[2][skip:])
        while len(pending) >= seq_len + lookahead:
            yield cut(following=True)
            produced += 1
            if max_sequences is not None and produced >= max_sequences:
                return
    if masked and len(pending) == seq_len:  # the last full sequence: nothing follows it
        yield cut(following=False)


def _after_cut(starts: list[tuple[int, int, int]], cut: int) -> list[tuple[int, int, int]]:
    """``starts`` once ``cut`` tokens are taken off the front: the record holding the new first token, then the rest."""
    position, record, offset = [start for start in starts if start[0] <= cut][-1]
    return [(0, record, offset + cut - position)] + [(p - cut, r, o) for p, r, o in starts if p > cut]


def pack_sequences(
    token_lists: Iterable[list[int]], seq_len: int, max_sequences: int | None = None
) -> Iterator[np.ndarray]:
    """Concatenate documents and cut the stream into ``(seq_len,)`` int64 sequences (see :func:`pack_records`)."""
    for packed in pack_records(enumerate(token_lists), seq_len, max_sequences):
        yield packed.input_ids
