"""Chat data: messages -> token ids and which of them the assistant wrote (the loss mask), no I/O.

A conversation is rendered with the tokenizer's chat template and tokenized without
adding special tokens again (the template writes its own BOS), then EOS follows, as for
every document. A token belongs to the assistant when the character it starts at lies in
an assistant turn's span of the rendered text.

**Spans.** For assistant message ``i`` the span runs from the end of the rendering of
messages ``0 .. i-1`` with a generation prompt to the end of the rendering of messages
``0 .. i``: the assistant's content and whatever the template closes the turn with (its
end-of-turn token), not the header that opens it. This holds for templates whose
renderings of a conversation's prefixes are prefixes of its rendering (Llama 3, Gemma,
ChatML/Qwen, Mistral...). **Fallback**, for a template that is not prefix-stable: each
assistant message's content is searched in the rendered text, left to right, and its
characters are the span (the turn's closing token then stays out). Which of the two was
used is counted per conversation (:class:`ChatStats`) and logged.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.errors import ConfigError, DatasetError

ASSISTANT = "assistant"


@dataclass
class ChatStats:
    """How the assistant spans of the conversations read so far were found."""

    prefix_spans: int = 0
    content_search: int = 0
    without_assistant: int = 0


def assistant_spans(
    tokenizer: Any, messages: list[dict[str, str]], text: str, stats: ChatStats
) -> list[tuple[int, int]]:
    """Character spans ``[start, end)`` of the assistant's turns in ``text`` (the full rendering)."""
    turns = [index for index, message in enumerate(messages) if message["role"] == ASSISTANT]
    if not turns:
        stats.without_assistant += 1
        return []
    spans = []
    for index in turns:
        before = tokenizer.apply_chat_template(messages[:index], add_generation_prompt=True, tokenize=False)
        through = tokenizer.apply_chat_template(messages[: index + 1], tokenize=False)
        if not (text.startswith(before) and text.startswith(through) and len(before) <= len(through)):
            return _searched_spans(messages, turns, text, stats)
        spans.append((len(before), len(through)))
    stats.prefix_spans += 1
    return spans


def _searched_spans(
    messages: list[dict[str, str]], turns: list[int], text: str, stats: ChatStats
) -> list[tuple[int, int]]:
    spans, cursor = [], 0
    for index in turns:
        content = messages[index]["content"]
        start = text.find(content, cursor)
        if start < 0 or not content:
            continue
        spans.append((start, start + len(content)))
        cursor = start + len(content)
    stats.content_search += 1
    return spans


def tokenize_chat(tokenizer: Any, messages: list[dict[str, str]], stats: ChatStats) -> tuple[list[int], list[bool]]:
    """A conversation's token ids (template rendering, then EOS) and, per token, whether the assistant wrote it."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = assistant_spans(tokenizer, messages, text, stats)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(encoded["input_ids"]), encoded["offset_mapping"]
    starts = np.array([start for start, _ in offsets], dtype=np.int64)
    mask = np.zeros(len(ids), dtype=bool)
    for start, end in spans:
        mask |= (starts >= start) & (starts < end)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
        mask = np.append(mask, False)
    return ids, mask.tolist()


def check_chat_tokenizer(tokenizer: Any, display: str) -> None:
    """Refuse, before anything runs, a tokenizer that cannot render chats or map tokens back to characters."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"the tokenizer of '{display}' has no chat template, so --chat-template cannot render the messages; "
            "use a chat model's tokenizer, or a text column without --chat-template"
        )
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(
            f"the tokenizer of '{display}' is not a fast tokenizer, so its tokens cannot be mapped to the "
            "assistant's turns; give a teacher with a tokenizer.json"
        )


def tokenize_chat_records(
    conversations: Iterable[list[dict[str, str]]], tokenizer: Any, stats: ChatStats, first_record: int = 0
) -> Iterator[tuple[int, list[int], list[bool]]]:
    """``(record index, token ids, assistant mask)`` of each non-empty conversation (empty ones counted as records)."""
    for index, messages in enumerate(conversations, start=first_record):
        if not messages:
            continue
        try:
            ids, mask = tokenize_chat(tokenizer, messages, stats)
        except Exception as exc:  # a template raising on a conversation it does not accept (roles, order)
            if isinstance(exc, DatasetError):
                raise
            raise DatasetError(
                f"record {index}: the chat template refuses this conversation ({str(exc).splitlines()[0][:160]}); "
                "fix or drop the record"
            ) from exc
        yield index, ids, mask
