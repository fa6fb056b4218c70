"""student-train against hostile or mistaken input: its --out, a cache's tokenizer copy, bad overrides, mismatched
caches and students. Each case ends in one ``error:`` line, with nothing deleted, run or leaked."""

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import LOGIT_WIDTH, edit_manifest, run_cli, tiny_llama_config

from pipeline.fingerprint import sha256_file, tokenizer_fingerprint
from pipeline.store.layout import TOKENIZER_DIR

QUICK = ["--max-steps", "1", "--batch-size", "2"]


def args(cache, student, out, *extra) -> list[str]:
    return ["student-train", "--cache", str(cache), "--student", str(student), "--out", str(out), *QUICK, *extra]


def ok(*cli_args: str):
    result = run_cli(*cli_args)
    assert result.exit_code == 0, result.output
    return result


def bad(*cli_args: str) -> str:
    result = run_cli(*cli_args)
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


def snapshot(folder) -> dict[str, bytes]:
    """Every file under ``folder`` (links not followed) and its bytes."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = Path(root) / name
            files[str(path.relative_to(folder))] = b"<link>" if path.is_symlink() else path.read_bytes()
    return files


def relist_tokenizer(cache) -> None:
    """Make the manifest list exactly the files now in the cache's tokenizer folder, with their sizes and hashes."""
    folder = cache / TOKENIZER_DIR

    def change(manifest):
        manifest["tokenizer"]["files"] = [
            {"name": path.name, "bytes": path.stat().st_size, "sha256": sha256_file(path)}
            for path in sorted(folder.iterdir())
        ]

    edit_manifest(cache, change)


@pytest.fixture()
def cache_copy(train_cache, tmp_path):
    return shutil.copytree(train_cache, tmp_path / "cache")


@pytest.fixture(scope="module")
def finished_run(train_cache, student_config_dir, tmp_path_factory):
    """A finished run with a checkpoint: what --overwrite may replace."""
    out = tmp_path_factory.mktemp("finished") / "run"
    ok(*args(train_cache, student_config_dir, out, "--max-steps", "2", "--save-every", "1"))
    return out


# ------------------------------------------------------------------ --out


def test_overwrite_replaces_a_previous_run_and_records_what_it_wrote(
    finished_run, train_cache, student_config_dir, tmp_path
):
    out = shutil.copytree(finished_run, tmp_path / "run")
    recorded = json.loads((out / "outputs.json").read_text())["files"]
    assert "model.safetensors" in recorded and "config.json" in recorded and "tokenizer.json" in recorded
    assert json.loads((out / "training.json").read_text())["outputs"] == recorded
    # Leftovers of a crash mid-save are the run's own too.
    (out / ".final.tmp").mkdir()
    (out / ".training.json.tmp").write_text("{")
    ok(*args(train_cache, student_config_dir, out, "--overwrite"))
    assert sorted(path.name for path in out.iterdir()) == sorted(
        [*recorded, "metrics.jsonl", "training.json", "outputs.json"]
    )
    assert json.loads((out / "training.json").read_text())["steps"] == 1


def test_overwrite_refuses_a_run_folder_that_also_holds_other_files(
    finished_run, train_cache, student_config_dir, tmp_path
):
    out = shutil.copytree(finished_run, tmp_path / "run")
    (out / "notes.txt").write_text("keep")
    (out / "data").mkdir()
    before = snapshot(out)
    message = bad(*args(train_cache, student_config_dir, out, "--overwrite"))
    assert "did not write (data, notes.txt)" in message and "deleted nothing" in message
    assert snapshot(out) == before


def test_overwrite_refuses_a_symlink_where_the_run_writes_a_folder(
    finished_run, train_cache, student_config_dir, tmp_path
):
    out = shutil.copytree(finished_run, tmp_path / "run")
    shutil.rmtree(out / "checkpoints")
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    (out / "checkpoints").symlink_to(precious)
    assert "did not write (checkpoints)" in bad(*args(train_cache, student_config_dir, out, "--overwrite"))
    assert (precious / "thesis.tex").read_text() == "years of work"


def test_overwrite_refuses_a_record_of_outputs_that_names_files_elsewhere(
    finished_run, train_cache, student_config_dir, tmp_path
):
    out = shutil.copytree(finished_run, tmp_path / "run")
    (tmp_path / "victim.txt").write_text("keep")
    (out / "outputs.json").write_text(json.dumps({"files": ["../victim.txt", "config.json"]}))
    before = snapshot(out)
    assert "not plain file names" in bad(*args(train_cache, student_config_dir, out, "--overwrite"))
    assert snapshot(out) == before and (tmp_path / "victim.txt").exists()


@pytest.mark.parametrize("where", ["cache", "inside-cache", "holds-cache"])
def test_out_that_overlaps_the_cache_is_refused_and_the_cache_is_kept(where, cache_copy, student_config_dir, tmp_path):
    out = {"cache": cache_copy, "inside-cache": cache_copy / "student", "holds-cache": tmp_path}[where]
    before = snapshot(cache_copy)
    message = bad(*args(cache_copy, student_config_dir, out, "--overwrite"))
    assert "overlaps --cache" in message
    assert snapshot(cache_copy) == before


def test_out_that_is_the_student_is_refused_and_the_student_is_kept(finished_run, train_cache, tmp_path):
    student = shutil.copytree(finished_run, tmp_path / "student")
    before = snapshot(student)
    assert "overlaps --student" in bad(*args(train_cache, student, student, "--overwrite"))
    assert snapshot(student) == before


def test_out_inside_the_eval_cache_is_refused(train_cache, heldout_cache, student_config_dir):
    message = bad(*args(train_cache, student_config_dir, heldout_cache / "s", "--eval-cache", str(heldout_cache)))
    assert "overlaps --eval-cache" in message
    assert not (heldout_cache / "s").exists()


def test_resume_with_out_overlapping_the_cache_is_refused(cache_copy, student_config_dir):
    assert "overlaps --cache" in bad(*args(cache_copy, student_config_dir, cache_copy, "--resume"))


def test_out_that_is_a_symlink_is_refused(finished_run, train_cache, student_config_dir, tmp_path):
    target = shutil.copytree(finished_run, tmp_path / "run")
    before = snapshot(target)
    link = tmp_path / "link"
    link.symlink_to(target)
    assert "symbolic link" in bad(*args(train_cache, student_config_dir, link, "--overwrite"))
    assert snapshot(target) == before


def test_out_that_is_a_url_is_refused(train_cache, student_config_dir):
    assert "--out 's3://bucket/student' is a URL" in bad(*args(train_cache, student_config_dir, "s3://bucket/student"))


def test_out_is_checked_before_the_student_loads(train_cache, tmp_path):
    # A student that cannot load: the --out problem is reported first, so nothing was loaded.
    student = tmp_path / "student"
    student.mkdir()
    (student / "config.json").write_text("{broken")
    assert "overlaps --student" in bad(*args(train_cache, student, student / "out"))


# ------------------------------------------------------------------ the cache's tokenizer copy


def plant_custom_tokenizer_code(cache, marker, list_the_code: bool) -> None:
    folder = cache / TOKENIZER_DIR
    (folder / "tokenization_evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n\n"
        "from transformers import PreTrainedTokenizerFast\n\n\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    settings["auto_map"] = {"AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    relist_tokenizer(cache)
    if not list_the_code:

        def unlist(manifest):
            files = manifest["tokenizer"]["files"]
            manifest["tokenizer"]["files"] = [item for item in files if not item["name"].endswith(".py")]

        edit_manifest(cache, unlist)


@pytest.mark.parametrize("list_the_code", [True, False])
def test_cache_tokenizer_that_asks_for_custom_code_is_refused_and_never_run(
    list_the_code, cache_copy, student_config_dir, tmp_path
):
    marker = tmp_path / "code-ran"
    plant_custom_tokenizer_code(cache_copy, marker, list_the_code)
    # --trust-remote-code is for the user's student; it never extends to a cache's files.
    message = bad(*args(cache_copy, student_config_dir, tmp_path / "s", "--trust-remote-code"))
    assert "a cache may not run code" in message
    assert not marker.exists()
    assert not (tmp_path / "s").exists()


def test_unlisted_file_in_the_cache_tokenizer_is_neither_loaded_nor_copied(cache_copy, student_config_dir, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("{{ 'SECRET-PASSWORD' }}")
    (cache_copy / TOKENIZER_DIR / "chat_template.jinja").symlink_to(secret)
    (cache_copy / TOKENIZER_DIR / "notes.txt").write_text("SECRET-PASSWORD")
    out = tmp_path / "s"
    ok(*args(cache_copy, student_config_dir, out))
    assert not (out / "chat_template.jinja").exists()
    assert all(b"SECRET-PASSWORD" not in content for content in snapshot(out).values())


def test_listed_tokenizer_file_that_is_a_symlink_is_refused_even_without_verify(
    cache_copy, student_config_dir, tmp_path
):
    real = tmp_path / "tokenizer.json"
    shutil.move(cache_copy / TOKENIZER_DIR / "tokenizer.json", real)
    (cache_copy / TOKENIZER_DIR / "tokenizer.json").symlink_to(real)  # same bytes: the hash alone would pass
    message = bad(*args(cache_copy, student_config_dir, tmp_path / "s", "--no-verify"))
    assert "tokenizer file 'tokenizer.json' is missing or is a symbolic link" in message


def test_cache_tokenizer_folder_that_is_a_symlink_is_refused(cache_copy, student_config_dir, tmp_path):
    real = shutil.move(cache_copy / TOKENIZER_DIR, tmp_path / "elsewhere")
    (cache_copy / TOKENIZER_DIR).symlink_to(real)
    message = bad(*args(cache_copy, student_config_dir, tmp_path / "s", "--no-verify"))
    assert "'tokenizer' folder is missing or is a symbolic link" in message


def test_cache_tokenizer_files_are_hashed_even_with_no_verify(cache_copy, student_config_dir, tmp_path):
    path = cache_copy / TOKENIZER_DIR / "tokenizer.json"
    data = path.read_bytes()
    path.write_bytes(data.replace(b"teacher", b"TEACHER", 1))  # same size, other bytes
    message = bad(*args(cache_copy, student_config_dir, tmp_path / "s", "--no-verify"))
    assert "tokenizer file 'tokenizer.json' fails its checksum in the cache" in message


def test_cache_tokenizer_setting_that_names_an_outside_file_is_refused(cache_copy, student_config_dir, tmp_path):
    settings_path = cache_copy / TOKENIZER_DIR / "tokenizer_config.json"
    settings = json.loads(settings_path.read_text())
    settings["vocab_file"] = "/etc/passwd"
    settings_path.write_text(json.dumps(settings))
    relist_tokenizer(cache_copy)
    assert "names a file outside its copy" in bad(*args(cache_copy, student_config_dir, tmp_path / "s"))


def test_tokenizer_option_pointing_into_a_cache_is_refused(cache_copy, student_config_dir, tmp_path):
    marker = tmp_path / "code-ran"
    plant_custom_tokenizer_code(cache_copy, marker, list_the_code=True)
    tokenizer = cache_copy / TOKENIZER_DIR
    common = args(cache_copy, student_config_dir, tmp_path / "s", "--tokenizer", str(tokenizer), "--trust-remote-code")
    assert "--tokenizer" in bad(*common) and "lies inside --cache" in bad(*common)
    assert not marker.exists()


BOGUS_TOKENIZER_JSON = json.dumps({"version": "1.0", "added_tokens": [], "model": {"type": "Bogus"}})


def test_malformed_tokenizer_json_in_the_cache_is_one_line_error(cache_copy, student_config_dir, tmp_path):
    (cache_copy / TOKENIZER_DIR / "tokenizer.json").write_text(BOGUS_TOKENIZER_JSON)
    relist_tokenizer(cache_copy)  # the hash matches: the file itself is what gets judged
    message = bad(*args(cache_copy, student_config_dir, tmp_path / "s"))
    assert "the cache's tokenizer copy does not load" in message


def test_malformed_tokenizer_json_in_the_student_folder_is_one_line_error(
    train_cache, student_config_dir, tokenizer_dir, tmp_path
):
    student = shutil.copytree(student_config_dir, tmp_path / "student")
    for item in tokenizer_dir.iterdir():
        shutil.copy(item, student / item.name)
    (student / "tokenizer.json").write_text(BOGUS_TOKENIZER_JSON)
    message = bad(*args(train_cache, student, tmp_path / "s"))
    assert "cannot load student tokenizer" in message


# ------------------------------------------------------------------ the student


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("hidden_size=-1", "cannot be built with --student-config hidden_size=-1"),
        ("num_attention_heads=0", "cannot be built with --student-config num_attention_heads=0"),
        ("vocab_size=abc", "'vocab_size' is a number, got a string"),
        ("num_hidden_layers=null", "'num_hidden_layers' is a number, got a null"),
        ("tie_word_embeddings=3", "'tie_word_embeddings' is a boolean, got a number"),
        ('rope_parameters={"rope_type": null}', "cannot be built with --student-config rope_parameters="),
        ('rope_parameters={"rope_type": "default", "rope_theta": null}', "cannot be built"),
    ],
)
def test_bad_student_config_overrides_are_one_line_errors(
    override, expected, train_cache, student_config_dir, tmp_path
):
    message = bad(*args(train_cache, student_config_dir, tmp_path / "s", "--student-config", override))
    assert expected in message
    assert not (tmp_path / "s").exists()


def test_student_with_too_few_logits_is_told_the_right_numbers(train_cache, student_config_dir, tmp_path):
    message = bad(*args(train_cache, student_config_dir, tmp_path / "s", "--student-config", "vocab_size=300"))
    assert f"ids go up to {LOGIT_WIDTH - 1}, so it needs at least {LOGIT_WIDTH}" in message
    assert f"--student-config vocab_size={LOGIT_WIDTH}" in message


def test_pretrained_student_with_too_few_logits_is_told_how_to_resize(train_cache, tmp_path):
    from transformers import AutoModelForCausalLM

    student = tmp_path / "narrow"
    AutoModelForCausalLM.from_config(tiny_llama_config(300, 32)).save_pretrained(str(student))
    message = bad(*args(train_cache, student, tmp_path / "s"))
    assert f"model.resize_token_embeddings({LOGIT_WIDTH})" in message and "save_pretrained" in message
    assert "--student-config" not in message


def gpt2_config_dir(folder, positions: int):
    from transformers import GPT2Config

    folder.mkdir()
    config = GPT2Config(
        vocab_size=LOGIT_WIDTH, n_positions=positions, n_embd=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2
    )
    (folder / "config.json").write_text(json.dumps(config.to_dict()))
    return folder


def test_student_with_fewer_learned_positions_than_the_cache_is_refused(train_cache, tmp_path):
    student = gpt2_config_dir(tmp_path / "gpt2", positions=16)
    message = bad(*args(train_cache, student, tmp_path / "s"))
    assert "holds sequences of 32 tokens but the student has learned positions for only 16" in message


def test_student_with_fewer_rotary_positions_than_the_cache_trains_with_a_warning(
    train_cache, student_config_dir, tmp_path, caplog
):
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        ok(*args(train_cache, student_config_dir, tmp_path / "s", "--student-config", "max_position_embeddings=16"))
    assert any("max_position_embeddings 16" in record.getMessage() for record in caplog.records)


@pytest.fixture(scope="module")
def long_heldout_cache(teacher_dir, corpus, tmp_path_factory):
    from conftest import make_cache

    out = tmp_path_factory.mktemp("long") / "heldout-64"
    return make_cache(teacher_dir, corpus["heldout"], out, "--seq-len", "64", "--top-k", "16")


def test_eval_cache_longer_than_the_students_learned_positions_is_refused_before_training(
    train_cache, long_heldout_cache, tmp_path
):
    student = gpt2_config_dir(tmp_path / "gpt2", positions=48)
    message = bad(*args(train_cache, student, tmp_path / "s", "--eval-cache", str(long_heldout_cache)))
    assert "--eval-cache holds sequences of 64 tokens" in message
    assert not (tmp_path / "s").exists()


def test_eval_cache_with_wider_ids_than_the_student_is_refused_before_training(
    train_cache, heldout_cache, student_config_dir, tmp_path
):
    wide = shutil.copytree(heldout_cache, tmp_path / "wide")
    edit_manifest(wide, lambda manifest: manifest.update(logit_width=LOGIT_WIDTH + 80))
    message = bad(*args(train_cache, student_config_dir, tmp_path / "s", "--eval-cache", str(wide)))
    assert f"--eval-cache's ids go up to {LOGIT_WIDTH + 79}" in message
    assert not (tmp_path / "s").exists()


def test_eval_cache_of_another_tokenizer_is_refused_before_training(
    train_cache, heldout_cache, student_config_dir, tmp_path
):
    other = shutil.copytree(heldout_cache, tmp_path / "other")
    edit_manifest(other, lambda manifest: manifest["tokenizer"].update(fingerprint="ab" * 32))
    message = bad(*args(train_cache, student_config_dir, tmp_path / "s", "--eval-cache", str(other)))
    assert "--eval-cache was made with another tokenizer" in message
    assert not (tmp_path / "s").exists()


def test_caches_with_the_older_fingerprint_version_are_checked_at_their_version(
    train_cache, heldout_cache, student_config_dir, tokenizer_dir, tmp_path
):
    from transformers import AutoTokenizer

    old_fingerprint = tokenizer_fingerprint(AutoTokenizer.from_pretrained(str(tokenizer_dir)), version=1)

    def to_version_1(manifest):
        manifest["tokenizer"]["fingerprint"] = old_fingerprint
        manifest["tokenizer"].pop("fingerprint_version", None)

    old_eval = shutil.copytree(heldout_cache, tmp_path / "old-eval")
    edit_manifest(old_eval, to_version_1)
    # A version-2 training cache and a version-1 held-out cache of the same tokenizer go together.
    ok(*args(train_cache, student_config_dir, tmp_path / "s", "--eval-cache", str(old_eval)))
    old_train = shutil.copytree(train_cache, tmp_path / "old-train")
    edit_manifest(old_train, to_version_1)
    ok(*args(old_train, student_config_dir, tmp_path / "s2"))


def test_student_weights_that_do_not_load_are_one_line_errors(finished_run, train_cache, tmp_path):
    student = shutil.copytree(finished_run, tmp_path / "student")
    (student / "model.safetensors").write_bytes(b"not safetensors")
    assert "cannot load student" in bad(*args(train_cache, student, tmp_path / "s"))


def test_bad_values_of_plain_options_are_refused(train_cache, student_config_dir, tmp_path):
    common = args(train_cache, student_config_dir, tmp_path / "s")
    assert "--head-chunk -1" in bad(*common, "--head-chunk", "-1")
    assert "--seed -1" in bad(*common, "--seed", "-1")
    assert "--device tpu" in bad(*common, "--device", "tpu")


def test_batches_started_mid_run_continue_the_same_order(train_cache):
    from itertools import islice

    from pipeline.cache import open_cache
    from pipeline.teachers import OneTeacher

    teacher = OneTeacher(open_cache(train_cache))
    start = len(teacher.cache) + 5  # inside the second epoch
    expected = list(islice(teacher.batches(3, 0, 1, torch.device("cpu")), start, start + 3))
    resumed = list(islice(teacher.batches(3, start, 1, torch.device("cpu")), 3))
    for a, b in zip(resumed, expected, strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["ids"], b["ids"])
    first_epoch = list(islice(teacher.batches(3, 5, 1, torch.device("cpu")), 3))
    assert any(not torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first_epoch, expected))
