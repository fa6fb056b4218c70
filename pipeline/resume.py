"""The teacher pass's output folder: start afresh, resume an unfinished pass, or find it complete.

A pass in progress keeps ``progress.json`` (the journal): the *header* of the cache it is
writing (every setting that decides the cache's bytes) and the shards committed so far.
Running the same command again continues after the last committed shard that still
matches its recorded size and sha256; anything later is deleted and written again.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline.errors import CacheError, OutputExistsError
from pipeline.fingerprint import sha256_file
from pipeline.manifest import CHECKSUM_FIELD, MANIFEST_NAME, ShardEntry
from pipeline.store import journal, layout, reader

log = logging.getLogger(__name__)

# Fields a finished manifest adds to the header: results, not settings.
RESULT_FIELDS = ("totals", "shards", CHECKSUM_FIELD)
RESULT_SUBFIELDS = (("dataset", "token_stream_sha256"), ("dataset", "files"), ("tokenizer", "files"))
CACHE_NAMES = (MANIFEST_NAME, layout.RUN_LOG_NAME, layout.JOURNAL_NAME, layout.LOCK_NAME, layout.TOKENIZER_DIR)


@dataclass
class OutputPlan:
    """What the teacher pass should do with its output folder."""

    action: Literal["fresh", "resume", "complete"]
    committed: list[ShardEntry] = field(default_factory=list)


def header_of(manifest: dict[str, Any]) -> dict[str, Any]:
    """The settings part of a manifest (what a journal's header holds)."""
    header = {key: value for key, value in manifest.items() if key not in RESULT_FIELDS}
    for section, key in RESULT_SUBFIELDS:
        if isinstance(header.get(section), dict):
            header[section] = {k: v for k, v in header[section].items() if k != key}
    return header


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): value}


def describe_difference(found: dict[str, Any], wanted: dict[str, Any]) -> str:
    """``capture.k: 16 here, 8 asked`` for the first few settings that differ."""
    old, new = _flatten(found), _flatten(wanted)
    keys = sorted(key for key in set(old) | set(new) if old.get(key) != new.get(key))
    parts = [f"{key}: {str(old.get(key))[:40]} there, {str(new.get(key))[:40]} asked" for key in keys[:3]]
    more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
    return "; ".join(parts) + more


def _is_cache_name(name: str) -> bool:
    return (
        name in CACHE_NAMES
        or layout.SHARD_PATTERN.fullmatch(name) is not None
        or layout.RANK_JOURNAL_PATTERN.fullmatch(name) is not None
    )


def is_temporary_entry(path: Path) -> bool:
    """Whether ``path`` is the temporary name a cache file is written under (``.shard-00003.arrow.tmp``)."""
    name = path.name
    return name.startswith(".") and name.endswith(".tmp") and _is_cache_name(name[1:-4])


def is_cache_entry(path: Path) -> bool:
    """Whether ``path`` is something a teacher pass writes (so ``--overwrite`` may delete it)."""
    return _is_cache_name(path.name) or is_temporary_entry(path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _intact(out: Path, journaled: list[ShardEntry]) -> list[ShardEntry]:
    """The journaled shards whose files are there with their recorded size and sha256, by first sequence.

    A shard is defined by its sequence range alone, so each one stands by itself: a missing or
    damaged shard is written again without rewriting the shards after it.
    """
    intact: dict[str, ShardEntry] = {}
    for entry in journaled:
        path = out / entry.name
        if entry.name in intact or not path.is_file() or path.is_symlink() or path.stat().st_size != entry.bytes:
            continue
        if sha256_file(path) == entry.sha256:
            intact[entry.name] = entry
    return sorted(intact.values(), key=lambda entry: entry.first_seq)


def plan_output(out: Path, header: dict[str, Any], overwrite: bool) -> OutputPlan:
    """Decide between a fresh pass, a resumed one, or nothing to do; tidy the folder accordingly.

    Must run under the folder's :class:`~pipeline.journal.CacheLock`.
    """
    entries = [p for p in out.iterdir() if p.name != layout.LOCK_NAME]
    strangers = sorted(p.name for p in entries if not is_cache_entry(p))
    if strangers:
        raise OutputExistsError(
            f"--out '{out}' holds files that are not part of a cache ({', '.join(strangers[:3])}); "
            "choose an empty or new folder"
        )
    # A pass writes its journal before anything else and deletes it only after the
    # manifest, so cache-named files without either were not left by a pass: not ours to delete.
    lasting = sorted(p.name for p in entries if not is_temporary_entry(p))
    if lasting and not (out / MANIFEST_NAME).exists() and not any(_is_journal(p.name) for p in entries):
        raise OutputExistsError(
            f"--out '{out}' holds {', '.join(lasting[:3])} but no {MANIFEST_NAME} or {layout.JOURNAL_NAME}, "
            "so no pass of this tool left them; move them away or choose another folder"
        )
    if overwrite:
        for path in entries:
            _remove(path)
        return OutputPlan("fresh")
    for path in entries:  # temporary files of an interrupted write are never worth keeping
        if is_temporary_entry(path):
            _remove(path)
    if (out / MANIFEST_NAME).exists():
        try:
            existing = header_of(reader.read_manifest(out).raw)
        except CacheError as exc:
            raise OutputExistsError(
                f"--out '{out}' holds a damaged cache ({exc}); pass --overwrite to replace it"
            ) from exc
        if existing != header:
            raise OutputExistsError(
                f"--out '{out}' holds a finished cache made with other settings "
                f"({describe_difference(existing, header)}); "
                "pass --overwrite to replace it, or choose another folder"
            )
        journal.remove_journals(out)
        return OutputPlan("complete")
    found = journal.read_journals(out)
    if not any(content is not None for _, content in found):
        if any(p.exists() for p in entries):
            raise OutputExistsError(
                f"--out '{out}' holds a partial cache without a readable {layout.JOURNAL_NAME}; "
                "pass --overwrite to start afresh"
            )
        return OutputPlan("fresh")
    journaled: list[ShardEntry] = []
    for name, content in found:
        if content is None:
            raise OutputExistsError(
                f"--out '{out}': the journal {name} of an unfinished pass is unreadable; "
                "pass --overwrite to start afresh"
            )
        recorded, shards = content
        if recorded != header:
            raise OutputExistsError(
                f"--out '{out}' holds an unfinished pass of another command "
                f"({describe_difference(recorded, header)}); "
                "run that command to finish it, or pass --overwrite to start afresh"
            )
        journaled += shards
    committed = _intact(out, journaled)
    # One journal from here on (rank 0's), written before the others are deleted, so a crash
    # in between leaves journals that still agree.
    journal.write_journal(out, header, committed)
    keep = {entry.name for entry in committed} | {layout.JOURNAL_NAME}
    for path in out.iterdir():
        if path.name != layout.LOCK_NAME and path.name not in keep:
            _remove(path)
    lost = sorted({entry.name for entry in journaled} - keep)
    if lost:
        log.warning("shard(s) %s missing or damaged; writing them again", ", ".join(lost[:5]))
    return OutputPlan("resume", committed)


def _is_journal(name: str) -> bool:
    return name == layout.JOURNAL_NAME or layout.RANK_JOURNAL_PATTERN.fullmatch(name) is not None
