"""Deterministic fingerprints of tokenizers, model files, configs and token streams.

A fingerprint that cannot be computed raises; it never falls back to a random value.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

HASH_BLOCK = 1 << 20
# Tokenizer fingerprint versions: 1 hashes the vocabulary and special tokens only; 2 also
# hashes how text becomes ids (normalizer, pre-tokenizer, model and merges, post-processor).
CURRENT_TOKENIZER_FINGERPRINT = 2
TOKENIZER_FINGERPRINT_VERSIONS = (1, 2)
# Parts of a ``tokenizers`` JSON serialisation that decide the ids a text encodes to.
# Left out: ``version`` (of the file format), ``truncation`` and ``padding`` (runtime
# state that calling the tokenizer sets) and ``decoder`` (ids -> text only).
BACKEND_ENCODING_PARTS = ("added_tokens", "normalizer", "pre_tokenizer", "model", "post_processor")
# Settings of a slow sentencepiece tokenizer that change its ids besides the model proto.
SENTENCEPIECE_OPTIONS = ("add_bos_token", "add_eos_token", "legacy", "sp_model_kwargs")


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def sha256_json(value: Any) -> str:
    """Hex sha256 of ``value`` as canonical JSON (sorted keys, no whitespace)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _vocabulary_parts(tokenizer: Any) -> dict[str, Any]:
    """Version 1: the id -> token mapping, the added tokens and the named special ids."""
    vocab = tokenizer.get_vocab()
    if not vocab:
        raise ValueError("the tokenizer has an empty vocabulary; cannot fingerprint it")
    by_id = sorted((int(index), str(token)) for token, index in vocab.items())
    added = sorted(
        (int(index), str(token.content), bool(token.special))
        for index, token in getattr(tokenizer, "added_tokens_decoder", {}).items()
    )
    named = {name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "pad", "unk")}
    return {"vocab": by_id, "added": added, "special_ids": named}


def _without_unset(value: Any) -> Any:
    """``value`` with every ``null`` or ``false`` object member dropped, at any depth.

    A ``tokenizers`` release that starts serialising a new option (as 0.20 did with BPE's
    ``ignore_merges``) writes it as ``false``/``null`` where it is off, so dropping those
    keeps fingerprints of unchanged tokenizers stable across releases.
    """
    if isinstance(value, dict):
        return {key: _without_unset(item) for key, item in value.items() if item is not None and item is not False}
    if isinstance(value, list):
        return [_without_unset(item) for item in value]
    return value


def _encoding_rules(tokenizer: Any) -> dict[str, Any]:
    """How text becomes ids: the fast backend's pipeline, or a slow tokenizer's sentencepiece model."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        serialised = json.loads(backend.to_str())
        return {"backend": {part: _without_unset(serialised.get(part)) for part in BACKEND_ENCODING_PARTS}}
    sp_model = getattr(tokenizer, "sp_model", None)
    if sp_model is not None and hasattr(sp_model, "serialized_model_proto"):
        options = {name: getattr(tokenizer, name, None) for name in SENTENCEPIECE_OPTIONS}
        return {
            "sentencepiece_sha256": hashlib.sha256(sp_model.serialized_model_proto()).hexdigest(),
            "options": options,
        }
    raise ValueError(
        f"cannot fingerprint how {type(tokenizer).__name__} splits text: it has neither a `tokenizers` backend "
        "nor a sentencepiece model; use a fast tokenizer"
    )


def tokenizer_fingerprint(tokenizer: Any, version: int = CURRENT_TOKENIZER_FINGERPRINT) -> str:
    """sha256 that identifies a tokenizer, as computed by fingerprint ``version``.

    Version 1 serialises the vocabulary sorted by id, then each added token with its id
    and ``special`` flag, then the ids of the named special tokens (bos, eos, pad, unk).
    Two tokenizers that split text differently over the same vocabulary share it (Qwen2
    and Qwen3.5 differ only in the pre-tokenizer's split pattern). Version 2 adds how
    text becomes ids: for a fast tokenizer the backend's added-token options, normalizer,
    pre-tokenizer, model (type, vocabulary, merges, options) and post-processor; for a
    slow one the serialised sentencepiece model and its encoding options.

    Both survive ``save_pretrained``/``from_pretrained`` and do not change when the
    tokenizer is called (padding and truncation settings are not hashed). Raises
    ``ValueError`` for an unknown version or a tokenizer whose rules cannot be read.
    """
    if version == 1:
        return sha256_json(_vocabulary_parts(tokenizer))
    if version == 2:
        return sha256_json({"version": 2, **_vocabulary_parts(tokenizer), **_encoding_rules(tokenizer)})
    raise ValueError(
        f"tokenizer fingerprint version {version!r} is unknown (known: {TOKENIZER_FINGERPRINT_VERSIONS}); "
        "upgrade the package"
    )


def config_fingerprint(config: Any) -> str:
    """sha256 of a transformers config's ``to_dict()``, minus fields that name a host or run."""
    values = dict(config.to_dict())
    for volatile in ("_name_or_path", "_commit_hash", "transformers_version", "_attn_implementation_autoset"):
        values.pop(volatile, None)
    return sha256_json(values)


def files_fingerprint(paths: Iterable[Path], hasher: Callable[[Path], str] = sha256_file) -> str:
    """sha256 over the names and sha256 of ``paths`` (sorted by name); ``hasher`` gives each file's."""
    entries = sorted((Path(path).name, hasher(path)) for path in paths)
    if not entries:
        raise ValueError("no weight files to fingerprint")
    return sha256_json(entries)


class TokenStreamHasher:
    """Running sha256 of the packed token stream, as little-endian uint32 ids."""

    def __init__(self) -> None:
        self._digest = hashlib.sha256()

    def update(self, input_ids: np.ndarray) -> None:
        """Add one packed sequence, ``(T,)`` integer ids."""
        self._digest.update(np.asarray(input_ids, dtype="<u4").tobytes())

    def hexdigest(self) -> str:
        return self._digest.hexdigest()
