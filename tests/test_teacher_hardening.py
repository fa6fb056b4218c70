"""The teacher pass against hostile or unlucky input: bad text encodings, foreign lock files,
teachers that cannot embed every tokenizer id, and output paths that overlap an input."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import LOGIT_WIDTH, make_documents, run_cli

import pipeline
from pipeline.store.layout import JOURNAL_NAME, LOCK_NAME, MANIFEST_NAME, RUN_LOG_NAME

SMALL = ("--seq-len", "16", "--top-k", "4", "--shard-tokens", "64", "--batch-size", "2")


def bad(*args: str) -> str:
    """Run ``teacher-cache``; it must fail with exactly one ``error:`` line and no traceback."""
    result = run_cli("teacher-cache", *args)
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def good(teacher: Path, dataset: Path, out: Path, *options: str):
    result = run_cli("teacher-cache", "--teacher", str(teacher), "--dataset", str(dataset), "--out", str(out), *options)
    assert result.exit_code == 0, result.output
    return result


def iter_rows_with_provenance(cache: Path):
    """``(seq_index, (source_record, record_offset))`` of each row, from the shards' provenance columns."""
    from pipeline.store.reader import iter_shard_frames, read_manifest

    manifest = read_manifest(cache)
    for entry in manifest.shards:
        for seq_index, cells in iter_shard_frames(cache, entry, manifest):
            yield seq_index, (cells["source_record"], cells["record_offset"])


def shard_bytes(cache: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(cache.glob("shard-*.arrow"))}


@pytest.fixture()
def no_teacher_load(monkeypatch):
    """Fail the test if the teacher's weights are loaded."""
    from pipeline import models

    monkeypatch.setattr(models, "load_teacher", lambda *a, **k: pytest.fail("the teacher was loaded"))


def txt_folder(folder: Path, count: int = 8) -> Path:
    folder.mkdir()
    for index, text in enumerate(make_documents(count, 5)):
        (folder / f"doc{index}.txt").write_text(text)
    return folder


# ------------------------------------------------------------------ A. versioned fingerprint


def test_teacher_pass_records_fingerprint_failure_as_one_line(teacher_dir, corpus, tmp_path, monkeypatch):
    from pipeline import manifest_header

    def unreadable(*args, **kwargs):
        raise ValueError("no rules")

    monkeypatch.setattr(manifest_header, "tokenizer_fingerprint", unreadable)
    line = bad("--teacher", str(teacher_dir), "--dataset", str(corpus["heldout"]), "--out", str(tmp_path / "c"), *SMALL)
    assert "cannot fingerprint the tokenizer" in line and "no rules" in line
    assert not (tmp_path / "c").exists()


# ------------------------------------------------------------------ B. text that is not UTF-8


@pytest.fixture()
def mixed_txt(tmp_path) -> Path:
    """Good .txt files, and one sorted last whose byte 3 is Latin-1, not UTF-8."""
    folder = txt_folder(tmp_path / "texts", count=12)
    (folder / "z_latin1.txt").write_bytes("Caf\u00e9 au lait, every token.".encode("latin-1"))
    return folder


def test_non_utf8_txt_is_refused_before_the_teacher_loads_naming_file_byte_and_choices(
    teacher_dir, mixed_txt, tmp_path, no_teacher_load
):
    line = bad("--teacher", str(teacher_dir), "--dataset", str(mixed_txt), "--out", str(tmp_path / "c"), *SMALL)
    assert "z_latin1.txt" in line and "byte 3" in line
    assert "--txt-encoding-errors replace" in line and "skip-file" in line
    assert not (tmp_path / "c").exists()


def test_skip_file_leaves_the_file_out_and_names_it_in_the_run_log(teacher_dir, mixed_txt, tmp_path):
    good(teacher_dir, mixed_txt, tmp_path / "skipped", *SMALL, "--txt-encoding-errors", "skip-file")
    (mixed_txt / "z_latin1.txt").unlink()
    good(teacher_dir, mixed_txt, tmp_path / "without", *SMALL)
    assert shard_bytes(tmp_path / "skipped") == shard_bytes(tmp_path / "without")
    run = json.loads((tmp_path / "skipped" / RUN_LOG_NAME).read_text())
    assert run["skipped_files_not_utf8"] == ["z_latin1.txt"]
    manifest = json.loads((tmp_path / "skipped" / MANIFEST_NAME).read_text())
    assert manifest["packing"]["txt_encoding_errors"] == "skip-file"
    assert json.loads((tmp_path / "without" / MANIFEST_NAME).read_text())["packing"]["txt_encoding_errors"] == "strict"


def test_replace_reads_the_file_with_replacement_characters(teacher_dir, mixed_txt, tmp_path):
    good(teacher_dir, mixed_txt, tmp_path / "c", *SMALL, "--txt-encoding-errors", "replace")
    manifest = json.loads((tmp_path / "c" / MANIFEST_NAME).read_text())
    assert manifest["packing"]["txt_encoding_errors"] == "replace"


@pytest.mark.parametrize(
    "damage",
    [b'{"text": "cut off in the mid', '{"text": "caf\u00e9"}\n'.encode("latin-1")],
    ids=["broken-json", "latin1-json"],
)
def test_dataset_read_error_mid_pass_is_one_line_naming_the_file_and_resumes_once_fixed(
    teacher_dir, corpus, tmp_path, damage
):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.jsonl").write_text("".join(corpus["train"].read_text().splitlines(keepends=True)[:100]))
    (data / "b.jsonl").write_bytes(damage)
    fast = ("--seq-len", "32", "--top-k", "4", "--shard-tokens", "256", "--batch-size", "8")
    args = ["--teacher", str(teacher_dir), "--dataset", str(data), "--out", str(tmp_path / "c"), *fast]
    for _ in range(2):  # a rerun fails the same way, and keeps what was committed
        line = bad(*args)
        assert "file 'b.jsonl' of dataset 'data'" in line
        assert (tmp_path / "c" / JOURNAL_NAME).exists() and list((tmp_path / "c").glob("shard-*.arrow"))
    (data / "b.jsonl").write_text(json.dumps({"text": "Fixed now."}) + "\n")
    result = run_cli("teacher-cache", *args)
    assert result.exit_code == 0 and "resumed after" in result.output, result.output


# ------------------------------------------------------------------ C. a .lock that is not ours


def test_foreign_lock_file_is_refused_and_left_untouched(teacher_dir, corpus, tmp_path):
    out = tmp_path / "c"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    (out / LOCK_NAME).write_text("locked by my own backup script\n")
    before = (out / LOCK_NAME).stat().st_mtime_ns
    args = ["--teacher", str(teacher_dir), "--dataset", str(corpus["heldout"]), "--out", str(out), *SMALL]
    assert "did not write" in bad(*args)
    (out / "thesis.tex").unlink()
    assert "did not write" in bad(*args, "--overwrite")
    assert (out / LOCK_NAME).read_text() == "locked by my own backup script\n"
    assert (out / LOCK_NAME).stat().st_mtime_ns == before


def test_symlinked_lock_is_refused_without_writing_through_it(teacher_dir, corpus, tmp_path):
    out = tmp_path / "c"
    out.mkdir()
    target = tmp_path / "elsewhere.txt"
    target.write_text("not a lock")
    (out / LOCK_NAME).symlink_to(target)
    line = bad("--teacher", str(teacher_dir), "--dataset", str(corpus["heldout"]), "--out", str(out), *SMALL)
    assert LOCK_NAME in line
    assert target.read_text() == "not a lock" and (out / LOCK_NAME).is_symlink()


def test_lock_that_is_a_folder_is_refused_in_one_line(teacher_dir, corpus, tmp_path):
    out = tmp_path / "c"
    (out / LOCK_NAME).mkdir(parents=True)
    bad("--teacher", str(teacher_dir), "--dataset", str(corpus["heldout"]), "--out", str(out), *SMALL)
    assert (out / LOCK_NAME).is_dir()


def test_stale_lock_of_a_killed_pass_is_taken_over_and_removed(teacher_dir, corpus, tmp_path):
    out = tmp_path / "c"
    out.mkdir()
    (out / LOCK_NAME).write_text("pid 999999 on some-host\n")
    good(teacher_dir, corpus["heldout"], out, *SMALL)
    assert not (out / LOCK_NAME).exists()
    assert pipeline.open_cache(out).manifest.tokens > 0


def test_refused_run_removes_only_the_lock_it_created(teacher_dir, corpus, tmp_path):
    out = tmp_path / "c"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    bad("--teacher", str(teacher_dir), "--dataset", str(corpus["heldout"]), "--out", str(out), *SMALL)
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]


def test_lock_file_replaced_while_held_is_not_deleted_on_exit(tmp_path):
    from pipeline.store.journal import CacheLock

    with CacheLock(tmp_path):
        assert (tmp_path / LOCK_NAME).read_text() == f"pid {os.getpid()} on {os.uname().nodename}\n"
        (tmp_path / LOCK_NAME).unlink()
        (tmp_path / LOCK_NAME).write_text("someone else's\n")
    assert (tmp_path / LOCK_NAME).read_text() == "someone else's\n"


# ------------------------------------------------------------------ D. ids the teacher cannot embed


def teacher_with_extra_tokens(teacher_dir: Path, folder: Path, extra: int, eos: str | None = None) -> Path:
    """The tiny teacher (320 rows) with ``extra`` tokens added to its 300-id tokenizer (ids 300...)."""
    from transformers import AutoTokenizer

    shutil.copytree(teacher_dir, folder)
    tokenizer = AutoTokenizer.from_pretrained(str(teacher_dir))
    tokenizer.add_tokens([f"<x{index}>" for index in range(extra)])
    if eos is not None:
        tokenizer.add_special_tokens({"eos_token": eos})
    tokenizer.save_pretrained(str(folder))
    return folder


def test_documents_holding_ids_beyond_the_embedding_are_skipped_not_failed(teacher_dir, tmp_path, caplog, monkeypatch):
    teacher = teacher_with_extra_tokens(teacher_dir, tmp_path / "teacher", extra=25)  # ids 320-324 unembeddable
    documents = make_documents(40, 7)
    marked = {index for index in range(len(documents)) if index % 5 == 4}  # the first one after some shards
    full, kept = tmp_path / "full.jsonl", tmp_path / "kept.jsonl"
    with open(full, "w") as all_docs, open(kept, "w") as kept_docs:
        for index, text in enumerate(documents):
            if index in marked:
                all_docs.write(json.dumps({"text": f"{text} <x22> {text}"}) + "\n")
            else:
                all_docs.write(json.dumps({"text": text}) + "\n")
                kept_docs.write(json.dumps({"text": text}) + "\n")
    with caplog.at_level("WARNING", logger="pipeline"):
        result = good(teacher, full, tmp_path / "skipping", *SMALL)
    assert f"skipped {len(marked)} document(s)" in result.output
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert "5 id(s) the teacher cannot embed" in warning and "320 '<x20>'" in warning
    good(teacher_dir, kept, tmp_path / "filtered", *SMALL)
    skipping, filtered = (pipeline.open_cache(tmp_path / name) for name in ("skipping", "filtered"))
    for row, same in zip(skipping, filtered, strict=True):
        for field in ("input_ids", "ids", "logprobs", "tail_logmass"):
            np.testing.assert_array_equal(getattr(row, field), getattr(same, field))
    # Provenance counts the skipped documents: rows point at records of the original file.
    starts = [cells for _, cells in iter_rows_with_provenance(tmp_path / "skipping")]
    kept_starts = [cells for _, cells in iter_rows_with_provenance(tmp_path / "filtered")]
    assert starts[-1][0] > kept_starts[-1][0]
    assert all(record not in marked for record, _ in starts)
    manifest = json.loads((tmp_path / "skipping" / MANIFEST_NAME).read_text())
    assert manifest["packing"]["unembeddable_ids"] == "documents skipped"
    assert manifest["packing"]["embedding_rows"] == LOGIT_WIDTH
    run = json.loads((tmp_path / "skipping" / RUN_LOG_NAME).read_text())
    assert run["skipped_documents_unembeddable_ids"] == len(marked)


def test_eos_beyond_the_embedding_is_refused_before_the_teacher_loads(teacher_dir, corpus, tmp_path, no_teacher_load):
    teacher = teacher_with_extra_tokens(teacher_dir, tmp_path / "teacher", extra=25, eos="<end>")
    line = bad("--teacher", str(teacher), "--dataset", str(corpus["heldout"]), "--out", str(tmp_path / "c"), *SMALL)
    assert "adds id 325 ('<end>') to every document" in line
    assert not (tmp_path / "c").exists()


# ------------------------------------------------------------------ E. paths


@pytest.fixture()
def args(teacher_dir, corpus):
    def build(out: Path | str, dataset: Path | None = None, teacher: Path | None = None) -> list[str]:
        return [
            "--teacher",
            str(teacher or teacher_dir),
            "--dataset",
            str(dataset or corpus["heldout"]),
            "--out",
            str(out),
            *SMALL,
        ]

    return build


def test_an_out_url_of_an_unknown_storage_is_refused_and_creates_nothing(args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    message = bad(*args("nosuchstorage://bucket/cache"))
    assert "'nosuchstorage://bucket/cache'" in message and "install the filesystem's package" in message
    assert list(tmp_path.iterdir()) == []


def test_empty_out_is_refused(args):
    assert "--out is empty" in bad(*args(""))


@pytest.mark.parametrize("where", ["inside", "same", "around"])
def test_out_overlapping_the_dataset_folder_is_refused_before_anything_is_created(
    args, tmp_path, where, no_teacher_load
):
    data = txt_folder(tmp_path / "data")
    out = {"inside": data / "cache", "same": data, "around": tmp_path}[where]
    before = sorted(tmp_path.rglob("*"))
    assert "overlaps --dataset" in bad(*args(out, dataset=data))
    assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.parametrize("where", ["inside", "same"])
def test_out_overlapping_the_teacher_folder_is_refused(args, teacher_dir, tmp_path, where, no_teacher_load):
    teacher = shutil.copytree(teacher_dir, tmp_path / "teacher")
    out = teacher / "cache" if where == "inside" else teacher
    assert "overlaps --teacher" in bad(*args(out, teacher=teacher))
    assert not (teacher / "cache").exists() and not (teacher / LOCK_NAME).exists()


def test_symlink_out_into_the_dataset_is_refused(args, tmp_path):
    data = txt_folder(tmp_path / "data")
    (data / "cache").mkdir()
    (tmp_path / "out").symlink_to(data / "cache")
    assert "overlaps --dataset" in bad(*args(tmp_path / "out", dataset=data))


def test_symlinked_out_writes_into_its_target(args, tmp_path):
    (tmp_path / "target").mkdir()
    (tmp_path / "out").symlink_to(tmp_path / "target")
    assert run_cli("teacher-cache", *args(tmp_path / "out")).exit_code == 0
    assert (tmp_path / "target" / MANIFEST_NAME).exists()


def test_dangling_symlink_out_is_one_line(args, tmp_path):
    (tmp_path / "out").symlink_to(tmp_path / "missing")
    assert "does not exist" in bad(*args(tmp_path / "out"))
    assert not (tmp_path / "missing").exists()


def test_out_under_a_file_is_one_line(args, tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    assert "cannot create --out" in bad(*args(tmp_path / "notes.txt" / "cache"))


def test_failed_run_removes_the_folders_it_created_and_no_others(args, tmp_path):
    (tmp_path / "short.txt").write_text("tiny")
    assert "fewer than" in bad(*args(tmp_path / "new" / "deeper" / "out", dataset=tmp_path / "short.txt"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["short.txt"]


# ------------------------------------------------------------------ F. nothing deleted that is not ours


def test_a_users_dot_tmp_file_in_out_is_not_deleted(args, tmp_path):
    out = tmp_path / "c"
    out.mkdir()
    (out / ".draft.tmp").write_text("mine")
    assert "not part of a cache" in bad(*args(out))
    assert "not part of a cache" in bad(*args(out), "--overwrite")
    assert (out / ".draft.tmp").read_text() == "mine"


def test_cache_named_files_no_pass_left_are_not_deleted_even_with_overwrite(args, tmp_path):
    out = tmp_path / "c"
    (out / "tokenizer").mkdir(parents=True)
    (out / "tokenizer" / "vocab.json").write_text("{}")
    (out / RUN_LOG_NAME).write_text("{}")
    for extra in ((), ("--overwrite",)):
        assert "no pass of this tool left them" in bad(*args(out), *extra)
    assert (out / "tokenizer" / "vocab.json").read_text() == "{}" and (out / RUN_LOG_NAME).exists()
