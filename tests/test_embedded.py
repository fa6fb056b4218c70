"""The embedded default's licence gate and idempotence, and the demo corpus (no download needed)."""

import json

import pytest

from pipeline import demo, embedded
from pipeline.errors import ConfigError, OutputExistsError


def test_licence_must_be_accepted_before_anything_happens(tmp_path, monkeypatch):
    monkeypatch.delenv(embedded.ACCEPT_ENV, raising=False)
    with pytest.raises(ConfigError, match=r"Gemma Terms of Use .*ACCEPT_GEMMA_TERMS=1"):
        embedded.prepare_teacher(tmp_path / "teacher")
    assert not (tmp_path / "teacher").exists()
    assert embedded.main(["--out", str(tmp_path / "teacher")]) == 2


def test_a_finished_conversion_is_reused(tmp_path, monkeypatch):
    monkeypatch.setenv(embedded.ACCEPT_ENV, "1")
    dest = tmp_path / "teacher"
    dest.mkdir()
    files = {}
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (dest / name).write_text(name)
        files[name] = len(name)
    marker = {"format": embedded.MARKER_FORMAT, "gguf_sha256": embedded.GGUF_SHA256, "files": files}
    (dest / embedded.MARKER_NAME).write_text(json.dumps(marker))
    monkeypatch.setattr(embedded, "_import_package", lambda: pytest.fail("tried to install or convert"))
    assert embedded.prepare_teacher(dest) == dest.resolve()


def test_a_folder_in_the_way_is_not_overwritten(tmp_path, monkeypatch):
    monkeypatch.setenv(embedded.ACCEPT_ENV, "1")
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "notes.txt").write_text("keep")
    with pytest.raises(OutputExistsError, match="not a finished teacher conversion"):
        embedded.prepare_teacher(tmp_path / "teacher")
    assert (tmp_path / "teacher" / "notes.txt").read_text() == "keep"


def test_demo_corpus_splits_topics_deterministically(tmp_path):
    counts = demo.write_corpus(tmp_path / "a")
    demo.write_corpus(tmp_path / "b")
    assert counts["heldout"] > 0 and counts["train"] > 5 * counts["heldout"]
    for name in ("train.jsonl", "heldout.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    topics = {
        split: {json.loads(line)["topic"] for line in (tmp_path / "a" / f"{split}.jsonl").read_text().splitlines()}
        for split in ("train", "heldout")
    }
    assert not topics["train"] & topics["heldout"]
