import subprocess
import sys

from transformers import AutoTokenizer

from pipeline.fingerprint import TokenStreamHasher, tokenizer_fingerprint


def test_fingerprint_survives_save_and_load(tokenizer_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    before = tokenizer_fingerprint(tokenizer)
    tokenizer("the tokenizer is called before saving")
    tokenizer.save_pretrained(str(tmp_path))
    reloaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert tokenizer_fingerprint(reloaded) == before == tokenizer_fingerprint(tokenizer)


def test_fingerprint_is_the_same_in_another_process(tokenizer_dir):
    code = (
        "from transformers import AutoTokenizer; from pipeline.fingerprint import tokenizer_fingerprint; "
        f"print(tokenizer_fingerprint(AutoTokenizer.from_pretrained({str(tokenizer_dir)!r})))"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert other == tokenizer_fingerprint(AutoTokenizer.from_pretrained(str(tokenizer_dir)))


def test_fingerprint_differs_between_tokenizers(tokenizer_dir, other_tokenizer_dir):
    first = tokenizer_fingerprint(AutoTokenizer.from_pretrained(str(tokenizer_dir)))
    second = tokenizer_fingerprint(AutoTokenizer.from_pretrained(str(other_tokenizer_dir)))
    assert first != second


def test_fingerprint_sees_a_changed_special_token(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    before = tokenizer_fingerprint(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<extra>"]})
    assert tokenizer_fingerprint(tokenizer) != before


def test_token_stream_hash_depends_on_order():
    import numpy as np

    a, b = TokenStreamHasher(), TokenStreamHasher()
    a.update(np.array([1, 2]))
    a.update(np.array([3, 4]))
    b.update(np.array([3, 4]))
    b.update(np.array([1, 2]))
    assert a.hexdigest() != b.hexdigest()


def test_hub_commit_is_read_from_the_local_hub_cache(tmp_path, monkeypatch):
    from pipeline.models import hub_commit

    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "models--org--tiny" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "models--org--tiny" / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert hub_commit("org/tiny") == commit
    assert hub_commit("org/absent") is None
