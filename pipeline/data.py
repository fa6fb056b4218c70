"""Text -> packed token sequences.

Documents are streamed with ``datasets`` (never fully in memory), tokenized as the
teacher's tokenizer does by default (its BOS included where it adds one), followed by
EOS, concatenated, and cut into sequences of ``seq_len`` tokens. The trailing partial
sequence is dropped. Nothing masks attention across document boundaries inside a
sequence.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
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
TOKENIZE_BATCH = 64


@dataclass(frozen=True)
class TextStream:
    """An opened dataset: its documents, and how to name it in a manifest (no absolute paths)."""

    documents: Iterable[str]
    display: str
    builder: str


def _local_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in LOCAL_BUILDERS)
    if not files:
        raise DatasetError(
            f"dataset folder '{path}' holds no {', '.join(sorted(LOCAL_BUILDERS))} files; point --dataset at data files"
        )
    return files


def open_text_stream(
    source: str,
    config: str | None = None,
    split: str = "train",
    text_column: str = "text",
    txt_sample_by: TxtSampleBy = "document",
) -> TextStream:
    """Stream the ``text_column`` of a Hub dataset or of local files.

    The first record is read here, so a missing column or an empty dataset fails before
    any model is loaded.
    """
    from datasets import load_dataset

    path = Path(source).expanduser()
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
        kwargs: dict[str, Any] = {"data_files": {split: [str(p) for p in files]}, "split": split, "streaming": True}
        if builder == "text":
            # datasets' text loader yields one row per line unless told otherwise.
            kwargs["sample_by"] = txt_sample_by
        display = path.resolve().name
        load_args: tuple[Any, ...] = (builder,)
    else:
        if looks_like_path(source):
            raise SourceNotFoundError(f"dataset path '{source}' does not exist; check the path")
        builder = "hub"
        kwargs = {"split": split, "streaming": True}
        display = source
        load_args = (source, config) if config else (source,)
    try:
        dataset = load_dataset(*load_args, **kwargs)
        records = iter(dataset)
        first = next(records, None)
    except Exception as exc:  # datasets raises its own hierarchy for missing ids, configs and splits
        raise SourceNotFoundError(
            f"cannot read dataset '{display}' split '{split}' ({first_line(exc)}); check the id, config, split or files"
        ) from None
    if first is None:
        raise DatasetError(f"dataset '{display}' split '{split}' is empty; point --dataset at data with text")
    if text_column not in first:
        raise DatasetError(
            f"dataset '{display}' has no column '{text_column}' (columns: {', '.join(sorted(first))}); "
            "pick one with --text-column"
        )
    documents = (_text_of(record, text_column) for record in itertools.chain([first], records))
    return TextStream(documents=documents, display=display, builder=builder)


def _text_of(record: dict[str, Any], column: str) -> str:
    value = record[column]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DatasetError(
            f"column '{column}' holds {type(value).__name__}, not text; pick a text column with --text-column"
        )
    return value


def tokenize_documents(
    documents: Iterable[str], tokenizer: Any, batch_size: int = TOKENIZE_BATCH
) -> Iterator[list[int]]:
    """Token ids of each document as the tokenizer encodes it by default, then EOS (if it has one)."""
    eos = tokenizer.eos_token_id
    iterator = iter(documents)
    while batch := [text for text in itertools.islice(iterator, batch_size)]:
        batch = [text for text in batch if text.strip()]
        if not batch:
            continue
        encoded = tokenizer(batch, add_special_tokens=True, verbose=False)["input_ids"]
        for ids in encoded:
            yield list(ids) + ([eos] if eos is not None else [])


def pack_sequences(
    token_lists: Iterable[list[int]], seq_len: int, max_sequences: int | None = None
) -> Iterator[np.ndarray]:
    """Concatenate documents and cut the stream into ``(seq_len,)`` int64 sequences.

    The trailing partial sequence is dropped; at most ``max_sequences`` are produced.
    """
    if max_sequences is not None and max_sequences <= 0:
        return
    pending: list[int] = []
    produced = 0
    for ids in token_lists:
        pending.extend(ids)
        while len(pending) >= seq_len:
            yield np.asarray(pending[:seq_len], dtype=np.int64)
            del pending[:seq_len]
            produced += 1
            if max_sequences is not None and produced >= max_sequences:
                return
