"""End-to-end teacher pass on a tiny model: what it stores, and every bad input."""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import LOGIT_WIDTH, make_cache, run_cli, with_custom_code
from transformers import AutoModelForCausalLM

import pipeline
from pipeline.store.layout import MANIFEST_NAME


def check_against_teacher(cache_path, teacher_dir, tolerance: float, sqrt_step: float | None = None) -> None:
    """Stored top-k ids are the teacher's most probable, values within the codec's bound, tail consistent.

    Log-probabilities must be within ``tolerance``; with ``sqrt_step``, square roots of
    probabilities within ``sqrt_step / 2`` instead.
    """
    model = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32).eval()
    cache = pipeline.open_cache(cache_path)
    rows = [row for _, row in zip(range(3), cache)]
    input_ids = torch.from_numpy(np.stack([r.input_ids for r in rows]))
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids).logits.float(), dim=-1)
    for index, row in enumerate(rows):
        reference = logprobs[index]  # (T, V): position t predicts token t + 1
        stored = torch.from_numpy(row.logprobs)
        ids = torch.from_numpy(row.ids)
        # Ties allowed: every stored id's probability is at least the k-th largest.
        kth = reference.topk(cache.manifest.k, dim=-1).values[:, -1:]
        assert torch.all(reference.gather(-1, ids) >= kth - 1e-5)
        if sqrt_step is None:
            torch.testing.assert_close(stored, reference.gather(-1, ids), rtol=2**-10, atol=tolerance)
        else:
            roots = (reference.gather(-1, ids) / 2).exp()
            torch.testing.assert_close((stored / 2).exp(), roots, rtol=0, atol=sqrt_step / 2 + 1e-6)
        assert (stored[:, :-1] >= stored[:, 1:]).all()  # most probable first, as the reader promises
        # Tail = log of everything else, consistent with the stored top-k.
        mass = torch.logaddexp(torch.logsumexp(reference.gather(-1, ids), -1), torch.from_numpy(row.tail_logmass))
        torch.testing.assert_close(mass, torch.zeros_like(mass), atol=1e-4, rtol=0)


def test_stored_topk_matches_the_teacher_recomputed_here(train_cache, teacher_dir):
    # The default codec quantises square roots of probabilities to 1/128: each within 1/256 of the teacher's.
    check_against_teacher(train_cache, teacher_dir, tolerance=0.0, sqrt_step=1 / 128)


def test_log_quantized_codec_keeps_log_probabilities_within_half_a_step(teacher_dir, corpus, tmp_path):
    options = ("--seq-len", "16", "--top-k", "8", "--max-tokens", "64", "--codec-mode", "quantized")
    out = make_cache(teacher_dir, corpus["heldout"], tmp_path / "quantized", *options, "--logprob-step", "0.25")
    assert pipeline.open_cache(out).manifest.codec["logprob_step"] == 0.25
    check_against_teacher(out, teacher_dir, tolerance=0.125 + 1e-6)


def test_lossless_codec_keeps_log_probabilities_at_float16(teacher_dir, corpus, tmp_path):
    options = ("--seq-len", "16", "--top-k", "8", "--max-tokens", "64", "--codec-mode", "lossless")
    out = make_cache(teacher_dir, corpus["heldout"], tmp_path / "lossless", *options)
    assert pipeline.open_cache(out).manifest.codec["mode"] == "lossless"
    check_against_teacher(out, teacher_dir, tolerance=1e-4)


def test_manifest_describes_the_cache(train_cache):
    manifest = json.loads((train_cache / MANIFEST_NAME).read_text())
    assert manifest["format_version"] == 2
    assert manifest["capture"] == {"strategy": "topk", "k": 16, "logprob_temperature": 1.0, "log_base": "e"}
    assert manifest["codec"] == {
        "name": "sparse-zstd",
        "version": 2,
        "mode": "sqrt",
        "sqrt_step": 1 / 128,
        "zstd_level": 3,
    }
    assert [column["name"] for column in manifest["columns"]] == [
        "input_ids",
        "ids",
        "logprobs",
        "tail_logmass",
        "source_record",
        "record_offset",
        "row_stats",
    ]
    assert all(set(entry["row_stats"]) == {"mean_top1_prob", "mean_entropy"} for entry in manifest["shards"])
    assert manifest["dataset"]["files"] == [{"name": "train.jsonl", "first_record": 0}]
    assert manifest["logit_width"] == LOGIT_WIDTH
    assert manifest["tokenizer"]["length"] == 300
    assert manifest["tokenizer"]["fingerprint_version"] == 2
    assert manifest["seq_len"] == 32
    assert manifest["dataset"]["source"] == "train.jsonl"
    assert len(manifest["teacher"]["weights_sha256"]) == 64
    assert manifest["totals"]["shards"] == len(manifest["shards"]) > 1
    assert all(s["rows"] <= 16 for s in manifest["shards"])  # 512 tokens per shard / 32
    text = json.dumps(manifest)
    assert str(train_cache.parent) not in text  # no absolute paths
    for entry in manifest["shards"]:
        assert (train_cache / entry["name"]).stat().st_size == entry["bytes"]


def test_manifest_fingerprint_is_version_2_of_the_teacher_tokenizer(train_cache, tokenizer_dir):
    from transformers import AutoTokenizer

    from pipeline.fingerprint import tokenizer_fingerprint

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    manifest = pipeline.open_cache(train_cache).manifest
    assert manifest.tokenizer_fingerprint_version == 2
    assert manifest.tokenizer_fingerprint == tokenizer_fingerprint(tokenizer, 2) != tokenizer_fingerprint(tokenizer, 1)


def test_sequences_start_with_bos_and_contain_eos(train_cache, tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    first = next(iter(pipeline.open_cache(train_cache)))
    assert first.input_ids[0] == tokenizer.bos_token_id
    assert tokenizer.eos_token_id in first.input_ids


def test_same_inputs_give_byte_identical_caches(teacher_dir, corpus, tmp_path):
    options = ("--seq-len", "16", "--top-k", "4", "--max-tokens", "160")
    outputs = [make_cache(teacher_dir, corpus["heldout"], tmp_path / name, *options) for name in ("a", "b")]
    files = sorted(p.name for p in outputs[0].iterdir() if p.is_file() and p.name != "run.json")
    for name in files:
        assert (outputs[0] / name).read_bytes() == (outputs[1] / name).read_bytes(), name
    assert json.loads((outputs[0] / MANIFEST_NAME).read_text())["totals"]["tokens"] == 160


def test_missing_gguf_file_is_reported(tmp_path):
    # The GGUF loading path itself is exercised by the demo (no small GGUF model ships with a package).
    result = run_cli(
        "teacher-cache", "--teacher", str(tmp_path / "model.gguf"), "--dataset", "x", "--out", str(tmp_path / "c")
    )
    assert result.exit_code == 1
    assert "does not exist" in result.output


def test_full_vocabulary_capture_has_no_tail(teacher_dir, corpus, tmp_path):
    options = ("--seq-len", "16", "--top-k", str(LOGIT_WIDTH), "--max-tokens", "32")
    out = make_cache(teacher_dir, corpus["heldout"], tmp_path / "full", *options)
    row = next(iter(pipeline.open_cache(out)))
    assert np.isneginf(row.tail_logmass).all()


# ------------------------------------------------------------------ bad input


def bad(*args: str):
    result = run_cli("teacher-cache", *args)
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


@pytest.fixture()
def base(teacher_dir, corpus, tmp_path):
    return [
        "--teacher",
        str(teacher_dir),
        "--dataset",
        str(corpus["heldout"]),
        "--out",
        str(tmp_path / "out"),
        "--seq-len",
        "16",
    ]


def test_unknown_model_path(base, tmp_path):
    base[1] = str(tmp_path / "missing-model")
    assert "does not exist" in bad(*base)


def test_unreachable_hub_model(base):
    base[1] = "nobody/no-such-model"
    assert "cannot load teacher" in bad(*base)


def test_missing_text_column(base):
    assert "--text-column" in bad(*base, "--text-column", "body")


def test_empty_dataset(base, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    base[3] = str(tmp_path / "empty.txt")
    assert "empty" in bad(*base)


def test_dataset_shorter_than_one_sequence_leaves_no_cache(base, tmp_path):
    (tmp_path / "short.txt").write_text("tiny")
    base[3] = str(tmp_path / "short.txt")
    assert "fewer than" in bad(*base, "--seq-len", "64")
    assert not (tmp_path / "out").exists()


def test_seq_len_out_of_range(base):
    assert "--seq-len" in bad(*base, "--seq-len", "1")
    assert "--seq-len 4096 exceeds" in bad(*base, "--seq-len", "4096")


def test_top_k_out_of_range(base):
    assert "--top-k 0" in bad(*base, "--top-k", "0")
    assert f"between 1 and the teacher's {LOGIT_WIDTH} logits" in bad(*base, "--top-k", str(LOGIT_WIDTH + 1))


def test_max_tokens_below_one_sequence(base):
    assert "--max-tokens" in bad(*base, "--seq-len", "32", "--max-tokens", "10")


def test_finished_cache_is_left_alone_or_replaced_only_with_overwrite(base, tmp_path, monkeypatch):
    args = [*base, "--max-tokens", "32", "--top-k", "4"]
    assert run_cli("teacher-cache", *args).exit_code == 0
    out = tmp_path / "out"
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir() if p.is_file()}
    # The same command again: no teacher forward, no file rewritten.
    from pipeline import teacher

    monkeypatch.setattr(teacher, "capture_batch", lambda *a, **k: pytest.fail("teacher ran again"))
    result = run_cli("teacher-cache", *args)
    assert result.exit_code == 0 and "already complete" in result.output
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir() if p.is_file()} == before
    monkeypatch.undo()
    # Another command is refused, naming what differs.
    message = bad(*base, "--max-tokens", "32", "--top-k", "8")
    assert "capture.k: 4 there, 8 asked" in message and "--overwrite" in message
    assert (out / MANIFEST_NAME).read_bytes() == before[MANIFEST_NAME][0]
    assert run_cli("teacher-cache", *base, "--max-tokens", "32", "--top-k", "8", "--overwrite").exit_code == 0
    assert pipeline.open_cache(out).manifest.k == 8


def test_overwrite_refuses_a_folder_that_is_not_a_cache(base, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "thesis.tex").write_text("precious")
    assert "not part of a cache" in bad(*base, "--overwrite")
    assert "not part of a cache" in bad(*base)
    assert (tmp_path / "out" / "thesis.tex").read_text() == "precious"


def test_interrupted_pass_leaves_no_manifest(base, tmp_path, monkeypatch):
    from pipeline import teacher

    calls = {"n": 0}
    original = teacher.capture_batch

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # the rows of batches 1-3 were captured: they are written before the pass fails
            raise RuntimeError("simulated crash")
        return original(*args, **kwargs)

    monkeypatch.setattr(teacher, "capture_batch", failing)
    with pytest.raises(RuntimeError):
        run_cli("teacher-cache", *base, "--batch-size", "1", "--shard-tokens", "16", "--top-k", "4")
    out = tmp_path / "out"
    assert not (out / MANIFEST_NAME).exists()
    assert sorted(p.name for p in out.glob("shard-*.arrow")) == [f"shard-0000{i}.arrow" for i in range(3)]
    assert not list(out.glob(".*tmp"))
    result = run_cli("inspect", str(out))
    assert result.exit_code == 1 and "did not finish" in result.output
    shutil.rmtree(out)


def test_tokenizer_larger_than_the_model_is_refused_before_the_teacher_loads(
    base, teacher_dir, tokenizer_dir, tmp_path, monkeypatch
):
    """An ordinary vocabulary larger than the embedding is a wrong tokenizer, not a few extra ids to skip."""
    import shutil as sh

    import torch
    from conftest import tiny_llama_config
    from transformers import AutoModelForCausalLM

    from pipeline import models

    small = tmp_path / "small-teacher"
    model = AutoModelForCausalLM.from_config(tiny_llama_config(100, 32), dtype=torch.float32)
    model.save_pretrained(str(small))
    for item in tokenizer_dir.iterdir():
        sh.copy(item, small / item.name)
    base[1] = str(small)
    monkeypatch.setattr(models, "load_teacher", lambda *a, **k: pytest.fail("the teacher was loaded"))
    line = bad(*base, "--top-k", "4")
    assert "vocabulary has 300 ids but the teacher embeds only 100" in line and "does not belong" in line
    assert not (tmp_path / "out").exists()


def test_models_with_their_own_code_need_trust_remote_code(base, teacher_dir, tmp_path):
    """A local model folder whose config maps to Python files inside it (as custom Hub models do)."""
    custom = with_custom_code(teacher_dir, tmp_path / "custom-teacher")
    base[1] = str(custom)
    assert "pass --trust-remote-code if you trust that code" in bad(*base, "--top-k", "4")
    result = run_cli("teacher-cache", *base, "--top-k", "4", "--max-tokens", "32", "--trust-remote-code")
    assert result.exit_code == 0, result.output
    assert pipeline.open_cache(tmp_path / "out").manifest.raw["teacher"]["model_type"] == "tinycustom"
