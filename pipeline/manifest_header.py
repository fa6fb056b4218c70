"""The manifest of a teacher pass: the header (every setting that decides the cache's bytes) and its results."""

from __future__ import annotations

from typing import Any

import torch

from pipeline import codec_v2, models
from pipeline import hidden as hidden_states
from pipeline.capture_spec import GENERATOR_NAME, CaptureSpec
from pipeline.config import TeacherCacheConfig
from pipeline.errors import ConfigError
from pipeline.fingerprint import CURRENT_TOKENIZER_FINGERPRINT, TokenStreamHasher, tokenizer_fingerprint
from pipeline.manifest import FORMAT_VERSION, ShardEntry
from pipeline.store import layout


def _fingerprint(tokenizer: Any, teacher_source: models.Source) -> str:
    try:
        return tokenizer_fingerprint(tokenizer, CURRENT_TOKENIZER_FINGERPRINT)
    except ValueError as exc:
        raise ConfigError(
            f"cannot fingerprint the tokenizer of teacher '{teacher_source.display}' ({exc}); "
            "give a teacher whose tokenizer loads as a fast (tokenizer.json) or sentencepiece tokenizer"
        ) from exc


DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def hidden_spec(cfg: TeacherCacheConfig, config: Any) -> hidden_states.HiddenSpec | None:
    """What ``--hidden-layers`` asks the pass to store of this teacher, checked against its config."""
    return hidden_states.spec_for(cfg.hidden_layers, cfg.hidden_encoding, cfg.hidden_dim, cfg.hidden_seed, config)


def cache_header(
    cfg: TeacherCacheConfig,
    dataset_display: str,
    teacher_source: models.Source,
    config: Any,
    tokenizer: Any,
    width: int,
    dtype: torch.dtype,
    device: torch.device,
) -> dict[str, Any]:
    """Every setting that decides the cache's bytes, and nothing that varies between identical runs.

    The manifest is this header plus the results (token-stream hash, tokenizer files,
    totals, shards); a resumed or repeated pass must find the same header.
    """
    layers = hidden_spec(cfg, config)
    return {
        "format": layout.FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "codec": cfg.codec_settings().to_json(),
        "capture": capture_header(cfg.capture_spec()),
        "columns": codec_v2.columns(
            cfg.capture_spec(),
            cfg.codec_settings(),
            row_stats=cfg.row_stats,
            loss_mask=cfg.chat_template,
            document_starts=cfg.document_attention,
        )
        + (layers.columns() if layers else []),
        **({"hidden": layers.to_json()} if layers else {}),
        "position_convention": "row position t holds the teacher's distribution over token t+1",
        "teacher": {**models.teacher_identity(teacher_source, config), "dtype": DTYPE_NAMES[dtype]},
        "compute": {"device_type": device.type, "batch_size": cfg.batch_size},
        "tokenizer": {
            "fingerprint": _fingerprint(tokenizer, teacher_source),
            "fingerprint_version": CURRENT_TOKENIZER_FINGERPRINT,
            "length": len(tokenizer),
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        },
        "logit_width": width,
        "seq_len": cfg.seq_len,
        "rows_per_shard": cfg.rows_per_shard,
        "packing": {
            "bos": "as the tokenizer adds by default",
            "eos_after_document": tokenizer.eos_token_id is not None,
            "cross_document_attention": not cfg.document_attention,
            "trailing_partial_sequence": "dropped",
            "txt_sample_by": cfg.txt_sample_by,
            "txt_encoding_errors": cfg.txt_encoding_errors,
            "unembeddable_ids": "documents skipped",
            "embedding_rows": width,
            **(
                {
                    "chat_template": "the tokenizer's, one BOS (the template's), then EOS",
                    "loss_mask": "assistant turns: spans by prefix rendering, else content search",
                }
                if cfg.chat_template
                else {}
            ),
        },
        "dataset": {
            "source": dataset_display,
            "config": cfg.dataset_config,
            "split": cfg.split,
            "text_column": cfg.messages_column if cfg.chat_template else cfg.text_column,
            "max_tokens": cfg.max_tokens,
        },
    }


def capture_header(spec: CaptureSpec) -> dict[str, Any]:
    """The manifest's ``capture`` object: the strategy, its parameters, and how values and draws are defined."""
    info: dict[str, Any] = {**spec.to_json(), "logprob_temperature": 1.0, "log_base": "e"}
    if spec.strategy in ("sample", "hybrid"):
        info["generator"] = GENERATOR_NAME
    return info


def finish_manifest(
    header: dict[str, Any],
    hasher: TokenStreamHasher,
    committed: list[ShardEntry],
    tokenizer_files: list[dict[str, Any]],
    file_starts: list[tuple[str, int]] | None = None,
) -> dict[str, Any]:
    """The header plus what the pass produced (``file_starts``: each local file's name and first record)."""
    committed = sorted(committed, key=lambda entry: entry.first_seq)
    dataset = {**header["dataset"], "token_stream_sha256": hasher.hexdigest()}
    if file_starts:
        dataset["files"] = [{"name": name, "first_record": first} for name, first in file_starts]
    return {
        **header,
        "tokenizer": {**header["tokenizer"], "files": tokenizer_files},
        "dataset": dataset,
        "totals": {
            "sequences": sum(s.rows for s in committed),
            "tokens": sum(s.tokens for s in committed),
            "shards": len(committed),
            "bytes": sum(s.bytes for s in committed),
        },
        "shards": [s.to_json() for s in committed],
    }
