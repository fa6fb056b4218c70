"""Deterministic fingerprints of tokenizers, model files, configs and token streams.

A fingerprint that cannot be computed raises; it never falls back to a random value.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

HASH_BLOCK = 1 << 20


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


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of the tokenizer's id -> token mapping and its added and special tokens.

    The serialisation is the vocabulary sorted by id, then each added token with its id
    and ``special`` flag, then the ids of the named special tokens (bos, eos, pad, unk).
    It survives ``save_pretrained``/``from_pretrained`` and does not change when the
    tokenizer is called.
    """
    vocab = tokenizer.get_vocab()
    if not vocab:
        raise ValueError("the tokenizer has an empty vocabulary; cannot fingerprint it")
    by_id = sorted((int(index), str(token)) for token, index in vocab.items())
    added = sorted(
        (int(index), str(token.content), bool(token.special))
        for index, token in getattr(tokenizer, "added_tokens_decoder", {}).items()
    )
    named = {name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "pad", "unk")}
    return sha256_json({"vocab": by_id, "added": added, "special_ids": named})


def config_fingerprint(config: Any) -> str:
    """sha256 of a transformers config's ``to_dict()``, minus fields that name a host or run."""
    values = dict(config.to_dict())
    for volatile in ("_name_or_path", "_commit_hash", "transformers_version", "_attn_implementation_autoset"):
        values.pop(volatile, None)
    return sha256_json(values)


def files_fingerprint(paths: Iterable[Path]) -> str:
    """sha256 over the names and sha256 of ``paths`` (sorted by name)."""
    entries = sorted((Path(path).name, sha256_file(path)) for path in paths)
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
