"""OpenAI ``chat.completion`` bodies (and streamed chunks) to ``CreateResult``, and back.

The provider's JSON body is parsed once with ``json.loads`` and read as plain dicts: no SDK model
is built on the hot path, and ``raw_response`` is the body exactly as the provider sent it.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from typing import Any

from models.errors import InvalidProviderResponse
from models.openai.messages import openai_tool_call
from models.types import (
    ChatCompletionTokenLogprob,
    CreateResult,
    FinishReasons,
    FunctionCall,
    RequestUsage,
)

__all__ = [
    "MAX_USAGE_TOKENS",
    "RESPONSE_INVALID",
    "USAGE_INVALID",
    "StreamAccumulator",
    "chat_completion_body",
    "result_from_completion",
    "unreadable_answer",
    "usage_from_openai",
]

_FINISH_REASONS: Mapping[str | None, FinishReasons] = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "function_calls",
    "function_call": "function_calls",
    "content_filter": "content_filter",
}
_BACK_TO_OPENAI: Mapping[str, str] = {"function_calls": "tool_calls", "unknown": "stop"}
_THINK_OPEN = "<think>"
_THINK_CLOSE = "</think>"
_EMPTY_USAGE = RequestUsage()


# The most tokens one call may report, in any field and in prompt + completion + cached together:
# the ledger keeps a result's tokens in INTEGER columns (``results``, ``discarded_answers``:
# int4, not BIGINT) and adds them up per row (the dashboard's prompt + completion), so past this
# a usage cannot be recorded, and no model's call comes near it. Such a call is recorded failed
# with 0 tokens: not NULL (the token columns are NOT NULL, and every sum over them would need to
# skip it), nor the provider's figure (unstorable, and no measure of anything); what it really
# billed is for the provider's invoice, traced by the answer's id kept on the row.
MAX_USAGE_TOKENS = 2**31 - 1
USAGE_INVALID = "upstream_usage_invalid"
# A 2xx answer (so billed) whose body arrived whole but is no JSON object, or a stream event whose
# data is no JSON: ``InvalidProviderResponse`` with this code, never asked again.
RESPONSE_INVALID = "upstream_response_invalid"


def unreadable_answer(reason: str) -> InvalidProviderResponse:
    """The error for a 2xx answer that cannot be read (``reason``: why), code
    ``RESPONSE_INVALID``; the caller names its provider, model and the answer's request id."""
    return InvalidProviderResponse(
        f"the provider answered 2xx with a body that cannot be read (billed, so not asked again): {reason}",
        code=RESPONSE_INVALID,
    )


def _usage_field(usage: Mapping[str, Any], name: str, where: str = "usage") -> int:
    """``usage[name]`` as a count of tokens (absent or null is 0); anything else (a negative,
    a fraction, a string, a boolean, past ``MAX_USAGE_TOKENS``: all the provider's error) raises
    ``InvalidProviderResponse``."""
    value = usage.get(name)
    if value is None:
        return 0
    if isinstance(value, float) and value.is_integer():  # 12.0; a huge int orjson read as float
        value = int(value) if abs(value) <= MAX_USAGE_TOKENS else value
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_USAGE_TOKENS:
        shown = repr(value)
        raise InvalidProviderResponse(
            f"the provider's {where}.{name} is not a token count of at most {MAX_USAGE_TOKENS}: "
            f"{shown[:40]}{'...' if len(shown) > 40 else ''}",
            code=USAGE_INVALID,
        )
    return value


def usage_from_openai(usage: Any) -> RequestUsage:
    """The one place a provider's ``usage`` becomes a ``RequestUsage`` (``create`` over the own
    transport or the SDK, ``create_stream``): every figure is checked here, and one beyond what
    the ledger holds raises ``InvalidProviderResponse`` (not retryable: the answer was billed)."""
    if not isinstance(usage, Mapping):
        return _EMPTY_USAGE
    prompt_details = usage.get("prompt_tokens_details")
    completion_details = usage.get("completion_tokens_details")
    prompt = _usage_field(usage, "prompt_tokens")
    completion = _usage_field(usage, "completion_tokens")
    cached = (
        _usage_field(prompt_details, "cached_tokens", "usage.prompt_tokens_details")
        if isinstance(prompt_details, Mapping)
        else 0
    )
    reasoning = (
        _usage_field(completion_details, "reasoning_tokens", "usage.completion_tokens_details")
        if isinstance(completion_details, Mapping)
        else 0
    )
    if prompt + completion + cached > MAX_USAGE_TOKENS:
        raise InvalidProviderResponse(
            f"the provider's usage adds up past {MAX_USAGE_TOKENS} tokens: prompt_tokens {prompt}"
            f" + completion_tokens {completion} + cached_tokens {cached}",
            code=USAGE_INVALID,
        )
    return RequestUsage.model_construct(
        prompt_tokens=prompt,
        completion_tokens=completion,
        cached_prompt_tokens=cached,
        reasoning_tokens=reasoning,
    )


def _split_think(content: str, thought: str | None) -> tuple[str, str | None]:
    """Models served by vLLM/Ollama often put their reasoning in a leading ``<think>`` block."""
    if not content.lstrip().startswith(_THINK_OPEN):
        return content, thought
    head, sep, tail = content.partition(_THINK_CLOSE)
    if not sep:
        return content, thought
    inner = head.lstrip()[len(_THINK_OPEN) :].strip()
    return tail.lstrip(), (f"{thought}\n{inner}" if thought else inner)


def _reasoning_of(message: Mapping[str, Any]) -> str | None:
    reasoning = message.get("reasoning_content")
    if reasoning is None:
        reasoning = message.get("reasoning")
    return reasoning if isinstance(reasoning, str) and reasoning else None


def _logprobs(choice: Mapping[str, Any]) -> list[ChatCompletionTokenLogprob] | None:
    logprobs = choice.get("logprobs")
    if not isinstance(logprobs, Mapping) or not isinstance(logprobs.get("content"), list):
        return None
    return [ChatCompletionTokenLogprob.model_validate(item) for item in logprobs["content"]]


def _content_and_reason(
    text: str | None, calls: list[FunctionCall], finish_reason: str | None, thought: str | None
) -> tuple[str | list[FunctionCall], FinishReasons, str | None]:
    if calls:
        # Some providers (Gemini) answer tool calls with finish_reason "stop"; the calls decide.
        if text:
            thought = f"{thought}\n{text}" if thought else text
        return calls, "function_calls", thought
    content, thought = _split_think(text or "", thought)
    return content, _FINISH_REASONS.get(finish_reason, "unknown"), thought


def result_from_completion(body: dict[str, Any], *, model: str | None = None) -> CreateResult:
    """A ``CreateResult`` from a ``chat.completion`` body (its first choice); the body is kept as
    ``raw_response``."""
    choices = body.get("choices") or ()
    choice: Mapping[str, Any] = choices[0] if choices else {}
    message: Mapping[str, Any] = choice.get("message") or {}
    tool_calls = message.get("tool_calls")
    calls = (
        [
            FunctionCall.model_construct(
                id=call.get("id") or "",
                name=(call.get("function") or {}).get("name") or "",
                arguments=(call.get("function") or {}).get("arguments") or "",
            )
            for call in tool_calls
        ]
        if tool_calls
        else []
    )
    text = message.get("content")
    content, finish_reason, thought = _content_and_reason(
        text if isinstance(text, str) else None, calls, choice.get("finish_reason"), _reasoning_of(message)
    )
    return CreateResult.model_construct(
        finish_reason=finish_reason,
        content=content,
        usage=usage_from_openai(body.get("usage")),
        cached=False,
        logprobs=_logprobs(choice) if choice.get("logprobs") else None,
        thought=thought,
        model=body.get("model") or model,
        response_id=body.get("id"),
        raw_response=body,
    )


class StreamAccumulator:
    """Folds ``chat.completion.chunk`` dicts into one result; tolerates chunks with no choices or
    an empty delta, and assembles tool calls from their deltas by index."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.response_id: str | None = None
        self.created: int | None = None
        self.system_fingerprint: str | None = None
        self.finish_reason: str | None = None
        self.usage_body: dict[str, Any] | None = None
        self.chunks = 0
        self._text: list[str] = []
        self._reasoning: list[str] = []
        self._calls: dict[int, dict[str, Any]] = {}
        self._logprobs: list[Any] = []

    def add(self, chunk: Mapping[str, Any]) -> str | None:
        """Take one chunk; returns its text delta (of the first choice), if any."""
        self.chunks += 1
        if self.response_id is None and chunk.get("id"):
            self.response_id = chunk["id"]
            self.created = chunk.get("created")
        if chunk.get("model"):
            self.model = chunk["model"]
        if chunk.get("system_fingerprint"):
            self.system_fingerprint = chunk["system_fingerprint"]
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.usage_body = usage
        text: str | None = None
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
            logprobs = choice.get("logprobs")
            if isinstance(logprobs, Mapping) and isinstance(logprobs.get("content"), list):
                self._logprobs.extend(logprobs["content"])
            delta = choice.get("delta") or {}
            reasoning = _reasoning_of(delta)
            if reasoning:
                self._reasoning.append(reasoning)
            content = delta.get("content")
            if isinstance(content, str) and content:
                self._text.append(content)
                text = content if text is None else text + content
            for call in delta.get("tool_calls") or ():
                self._add_call_delta(call)
        return text

    def _add_call_delta(self, delta: Mapping[str, Any]) -> None:
        index = delta.get("index", len(self._calls))
        call = self._calls.setdefault(index, {"id": "", "name": "", "arguments": []})
        if delta.get("id"):
            call["id"] = delta["id"]
        function = delta.get("function") or {}
        if function.get("name"):
            call["name"] += function["name"]
        if function.get("arguments"):
            call["arguments"].append(function["arguments"])

    def result(self) -> CreateResult:
        """The whole answer; ``raw_response`` is the ``chat.completion`` body the chunks add up to."""
        calls = [
            FunctionCall(id=call["id"], name=call["name"], arguments="".join(call["arguments"]))
            for _, call in sorted(self._calls.items())
        ]
        raw_text = "".join(self._text)
        reasoning = "".join(self._reasoning) or None
        content, finish_reason, thought = _content_and_reason(raw_text, calls, self.finish_reason, reasoning)
        logprobs = [ChatCompletionTokenLogprob.model_validate(item) for item in self._logprobs] or None
        message: dict[str, Any] = {"role": "assistant", "content": raw_text or None}
        if reasoning:
            message["reasoning_content"] = reasoning
        if calls:
            message["tool_calls"] = [openai_tool_call(c) for c in calls]
        raw: dict[str, Any] = {
            "id": self.response_id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": {"content": self._logprobs} if self._logprobs else None,
                    "finish_reason": self.finish_reason,
                }
            ],
        }
        if self.system_fingerprint:
            raw["system_fingerprint"] = self.system_fingerprint
        if self.usage_body is not None:
            raw["usage"] = self.usage_body
        return CreateResult(
            finish_reason=finish_reason,
            content=content,
            usage=usage_from_openai(self.usage_body),
            cached=False,
            logprobs=logprobs,
            thought=thought,
            model=self.model,
            response_id=self.response_id,
            raw_response=raw,
        )


def _usage_body(usage: RequestUsage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_prompt_tokens},
        "completion_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
    }


def chat_completion_body(result: CreateResult, *, model: str) -> dict[str, Any]:
    """The ``chat.completion`` object for a result: the provider's own body when we have it
    (a cache hit replays the stored one), else one built from the result's fields."""
    if result.raw_response is not None:
        return result.raw_response
    message: dict[str, Any] = {"role": "assistant", "content": None, "refusal": None}
    if isinstance(result.content, str):
        message["content"] = result.content
    else:
        message["content"] = result.thought
        message["tool_calls"] = [openai_tool_call(call) for call in result.content]
    if result.thought is not None and isinstance(result.content, str):
        message["reasoning_content"] = result.thought
    logprobs = (
        {"content": [item.model_dump(mode="json") for item in result.logprobs]}
        if result.logprobs is not None
        else None
    )
    return {
        "id": result.response_id or f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": result.model or model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": logprobs,
                "finish_reason": _BACK_TO_OPENAI.get(result.finish_reason, result.finish_reason),
            }
        ],
        "usage": _usage_body(result.usage),
    }
