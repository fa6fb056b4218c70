import json
import subprocess
import sys

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from pipeline.fingerprint import CURRENT_TOKENIZER_FINGERPRINT, TokenStreamHasher, tokenizer_fingerprint


def hand_built_tokenizer(pattern: str | None = None, merges: list[tuple[str, str]] | None = None):
    """A tiny BPE tokenizer with a fixed vocabulary; ``pattern`` replaces the whitespace pre-tokenizer."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3, "a": 4, "b": 5, "c": 6, " ": 7, "ab": 8, "abc": 9}
    merges = [("a", "b"), ("ab", "c")] if merges is None else merges
    core = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    if pattern is None:
        core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    else:
        core.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>"
    )


def test_version_1_fingerprint_is_the_one_existing_caches_were_written_with():
    # Computed by the unversioned function that wrote every cache before version 2.
    assert tokenizer_fingerprint(hand_built_tokenizer(), 1) == (
        "8c29e422109f8f10d26b21fe826cd6e6424cb567e1621d46ddc892dc2a73436b"
    )


def test_version_2_fingerprint_is_pinned():
    assert CURRENT_TOKENIZER_FINGERPRINT == 2
    assert tokenizer_fingerprint(hand_built_tokenizer()) == (
        "3c26b03ab672cb4fd4ece082e514aeb86246bac68c571d107aeb18b6eb861fd6"
    )


def test_tokenizers_that_split_text_differently_differ_in_version_2_only(tokenizer_dir):
    """Same vocabulary, merges and special tokens; only the pre-tokenizer's split pattern differs (Qwen2 vs Qwen3.5)."""
    from tokenizers import Tokenizer

    def with_split(pattern: str) -> PreTrainedTokenizerFast:
        spec = json.loads((tokenizer_dir / "tokenizer.json").read_text())
        spec["pre_tokenizer"] = {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
            ],
        }
        core = Tokenizer.from_str(json.dumps(spec))
        return PreTrainedTokenizerFast(
            tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>"
        )

    words, chunks = with_split(r" ?\p{L}+|\s+|[^\s\p{L}]+"), with_split(r" ?\p{L}{1,3}|\s+|[^\s\p{L}]+")
    text = "The teacher writes every distribution."
    assert words(text)["input_ids"] != chunks(text)["input_ids"]  # the two really encode differently
    assert tokenizer_fingerprint(words, 1) == tokenizer_fingerprint(chunks, 1)
    assert tokenizer_fingerprint(words, 2) != tokenizer_fingerprint(chunks, 2)


def test_version_2_sees_different_merges_over_the_same_vocabulary():
    plain, reordered = hand_built_tokenizer(), hand_built_tokenizer(merges=[("a", "b")])
    assert tokenizer_fingerprint(plain, 1) == tokenizer_fingerprint(reordered, 1)
    assert tokenizer_fingerprint(plain, 2) != tokenizer_fingerprint(reordered, 2)


@pytest.mark.parametrize("version", [1, 2])
def test_fingerprint_survives_save_and_load(tokenizer_dir, tmp_path, version):
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    before = tokenizer_fingerprint(tokenizer, version)
    tokenizer("the tokenizer is called before saving")
    tokenizer.save_pretrained(str(tmp_path))
    reloaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert tokenizer_fingerprint(reloaded, version) == before == tokenizer_fingerprint(tokenizer, version)


@pytest.mark.parametrize("version", [1, 2])
def test_fingerprint_does_not_change_when_the_tokenizer_pads_and_truncates(tokenizer_dir, version):
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    before = tokenizer_fingerprint(tokenizer, version)
    tokenizer(["a long text to be cut short", "b"], padding="max_length", truncation=True, max_length=4)
    assert tokenizer.backend_tokenizer.truncation is not None  # the call did leave runtime state behind
    assert tokenizer_fingerprint(tokenizer, version) == before


def test_unknown_fingerprint_version_is_refused(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    for version in (0, 3):
        with pytest.raises(ValueError, match=f"version {version} is unknown"):
            tokenizer_fingerprint(tokenizer, version)


def test_tokenizer_without_readable_rules_raises_rather_than_guessing():
    class VocabularyOnly:
        def get_vocab(self):
            return {"a": 0, "b": 1}

    assert len(tokenizer_fingerprint(VocabularyOnly(), 1)) == 64
    with pytest.raises(ValueError, match="neither a `tokenizers` backend nor a sentencepiece model"):
        tokenizer_fingerprint(VocabularyOnly(), 2)


def test_slow_sentencepiece_tokenizer_is_fingerprinted_by_its_model(tmp_path):
    import io

    import sentencepiece as spm
    from conftest import make_documents
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    def trained(vocab_size: int, name: str) -> SentencePieceBackend:
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(make_documents(100, 1)), model_writer=model, vocab_size=vocab_size, minloglevel=2
        )
        (tmp_path / name).write_bytes(model.getvalue())
        return SentencePieceBackend(vocab_file=str(tmp_path / name), bos_token="<s>", eos_token="</s>")

    first, second = trained(120, "a.model"), trained(110, "b.model")
    fingerprint = tokenizer_fingerprint(first)
    assert fingerprint != tokenizer_fingerprint(second)
    first.save_pretrained(str(tmp_path / "saved"))
    assert tokenizer_fingerprint(SentencePieceBackend.from_pretrained(str(tmp_path / "saved"))) == fingerprint


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
