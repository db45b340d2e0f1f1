"""OpenAI ``chat.completion`` bodies (and streamed chunks) to ``CreateResult``, and back.

The provider's JSON body is parsed once with ``json.loads`` and read as plain dicts: no SDK model
is built on the hot path, and ``raw_response`` is the body exactly as the provider sent it, but for
a message content sent as a list of parts: a copy says it as the string OpenAI's SDK reads
(``NON_TEXT_PARTS``).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from models.errors import InvalidProviderResponse
from models.openai.messages import openai_tool_call, tool_call_fields
from models.types import (
    ChatCompletionTokenLogprob,
    CreateResult,
    FinishReasons,
    FunctionCall,
    RequestUsage,
)

__all__ = [
    "MAX_USAGE_TOKENS",
    "NON_TEXT_PARTS",
    "RESPONSE_INVALID",
    "RESPONSE_TOO_LARGE",
    "USAGE_INVALID",
    "StreamAccumulator",
    "chat_completion_body",
    "oversized_answer",
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
_EMPTY: Mapping[str, Any] = {}


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
# A 2xx answer (so billed) larger than the client holds (``models.openai.transport``): never asked
# again, the same upstream would answer the same.
RESPONSE_TOO_LARGE = "upstream_response_too_large"
# Content sent as a list of parts (Mistral, some OpenAI-compatible servers): its text parts joined
# in order are the answer's text, the body served and kept says it as a string (what OpenAI's SDK
# reads), and the parts that are no text (an image, a reference, a type unknown here) are kept,
# as sent, under this key of the message: neither dropped nor taken for text.
NON_TEXT_PARTS = "tokenmill_non_text_parts"


def oversized_answer(limit: int) -> InvalidProviderResponse:
    """The error for a 2xx answer past ``limit`` bytes, code ``RESPONSE_TOO_LARGE``; the caller
    names its provider, model and the answer's request id."""
    return InvalidProviderResponse(
        f"the provider answered 2xx with a body larger than {limit} bytes (billed, so not asked again)",
        code=RESPONSE_TOO_LARGE,
    )


def unreadable_answer(reason: str) -> InvalidProviderResponse:
    """The error for a 2xx answer that cannot be read (``reason``: why), code
    ``RESPONSE_INVALID``; the caller names its provider, model and the answer's request id."""
    return InvalidProviderResponse(
        f"the provider answered 2xx with a body that cannot be read (billed, so not asked again): {reason}",
        code=RESPONSE_INVALID,
    )


def _kind(value: Any) -> str:
    """What JSON ``value`` is, to name it in an error without echoing it (it may be huge)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, (list, tuple)):
        return "an array"
    return type(value).__name__


class _WrongShape(Exception):
    """Part of an answer is not what it must be; ``reason`` says which, and what it is instead.
    Raised as ``unreadable_answer(reason)`` by the public readers (a chunk's prefixed with it)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _wrong(where: str, value: Any, expected: str) -> _WrongShape:
    return _WrongShape(f"{where} is {_kind(value)}, not {expected}")


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    """``value`` as an object: null is an empty one, anything else but an object is invalid."""
    if isinstance(value, Mapping):
        return value
    if value is None:
        return _EMPTY
    raise _wrong(where, value, "an object")


def _array(value: Any, where: str) -> list[Any] | tuple[Any, ...]:
    """``value`` as an array: null is an empty one, anything else but an array is invalid."""
    if isinstance(value, (list, tuple)):
        return value
    if value is None:
        return ()
    raise _wrong(where, value, "an array")


def _text(value: Any, where: str) -> str | None:
    """``value`` as a string or null; anything else is invalid."""
    if value is None or isinstance(value, str):
        return value
    raise _wrong(where, value, "a string")


class _ContentParts:
    """A list of content parts read: the text parts' text, the ``thinking`` parts' (Mistral's
    reasoning: a string or a list of text parts), and the parts that are neither, as sent."""

    __slots__ = ("other", "text", "thinking")

    def __init__(self) -> None:
        self.text: list[str] = []
        self.thinking: list[str] = []
        self.other: list[Any] = []

    def read(self, parts: list[Any] | tuple[Any, ...], where: str) -> None:
        """Every part of ``parts`` checked and sorted; one of the wrong shape (no object, a type or
        text that is no string) raises ``_WrongShape`` naming it."""
        for i, part in enumerate(parts):
            at = f"{where}[{i}]"
            if not isinstance(part, Mapping):
                raise _wrong(at, part, "an object")
            kind = part.get("type")
            if kind is None and "text" in part:
                kind = "text"  # no type, a text: some servers' text parts
            if kind == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise _wrong(f"{at}.text", text, "a string")
                self.text.append(text)
            elif kind == "thinking":
                self._read_thinking(part.get("thinking"), f"{at}.thinking")
            elif isinstance(kind, str):
                self.other.append(part)
            else:
                raise _wrong(f"{at}.type", kind, "a string")

    def _read_thinking(self, thinking: Any, where: str) -> None:
        if isinstance(thinking, str):
            self.thinking.append(thinking)
            return
        if not isinstance(thinking, (list, tuple)):
            raise _wrong(where, thinking, "a string or an array")
        inner = _ContentParts()
        inner.read(thinking, where)
        self.thinking += inner.text + inner.thinking
        self.other += inner.other


def _message_read(message: Mapping[str, Any], parts: _ContentParts) -> dict[str, Any]:
    """``message`` (whose content was a list of ``parts``) as served: its content the text, the
    thinking added to its ``reasoning_content``, the other parts under ``NON_TEXT_PARTS``."""
    read = {**message, "content": "".join(parts.text) if parts.text or not parts.other else None}
    if parts.thinking:
        read["reasoning_content"] = "".join([_reasoning_of(message) or "", *parts.thinking])
    if parts.other:
        read[NON_TEXT_PARTS] = parts.other
    return read


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
    the ledger holds raises ``InvalidProviderResponse`` (not retryable: the answer was billed); so
    does a ``usage`` that is no object (null or absent: no usage reported, zero)."""
    if not isinstance(usage, Mapping):
        if usage is None:
            return _EMPTY_USAGE
        raise unreadable_answer(_wrong("usage", usage, "an object").reason)
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


def _token_logprobs(items: list[Any], where: str) -> list[ChatCompletionTokenLogprob]:
    """``logprobs.content`` items, each checked (``where[i]`` names a bad one)."""
    validated = []
    for i, item in enumerate(items):
        try:
            validated.append(ChatCompletionTokenLogprob.model_validate(item))
        except ValidationError:
            raise _WrongShape(f"{where}[{i}] is not a token logprob") from None
    return validated


def _logprobs(choice: Mapping[str, Any]) -> list[ChatCompletionTokenLogprob] | None:
    logprobs = choice.get("logprobs")
    if not isinstance(logprobs, Mapping) or not isinstance(logprobs.get("content"), list):
        return None
    return _token_logprobs(logprobs["content"], "choices[0].logprobs.content")


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


def _tool_call(call: Any, where: str) -> FunctionCall:
    """A function call, or a custom tool's (``type: custom``, its ``input`` as the arguments: the
    caller gets the provider's own body; this is the typed view of it)."""
    if not isinstance(call, Mapping):
        raise _wrong(where, call, "an object")
    field_name, arguments_name = tool_call_fields(call.get("type"))
    function = call.get(field_name)
    if not isinstance(function, Mapping):
        raise _wrong(f"{where}.{field_name}", function, "an object")
    arguments = function.get(arguments_name)
    if isinstance(arguments, Mapping):
        # Some OpenAI-compatible servers answer the arguments as an object: AutoGen's client
        # takes its JSON text, and so does this one.
        arguments = json.dumps(arguments)
    return FunctionCall.model_construct(
        id=_text(call.get("id"), f"{where}.id") or "",
        name=_text(function.get("name"), f"{where}.{field_name}.name") or "",
        arguments=_text(arguments, f"{where}.{field_name}.{arguments_name}") or "",
    )


def result_from_completion(body: dict[str, Any], *, model: str | None = None) -> CreateResult:
    """A ``CreateResult`` from a ``chat.completion`` body (its first choice); the body is kept as
    ``raw_response``. A body of the wrong shape (``choices`` no array, a message that is no
    object, content that is no string, ...) raises ``InvalidProviderResponse`` (code
    ``RESPONSE_INVALID``) naming what was wrong; absent or null optional fields are fine."""
    try:
        return _result_from_completion(body, model)
    except _WrongShape as e:
        raise unreadable_answer(e.reason) from None
    except InvalidProviderResponse:  # usage beyond what the ledger holds: its own code
        raise
    except Exception as e:  # a shape not foreseen above: still the answer's, and billed
        raise unreadable_answer(f"the answer could not be read ({type(e).__name__})") from e


def _read_choice(
    choice: Any, where: str
) -> tuple[Mapping[str, Any], Mapping[str, Any], list[FunctionCall], str | None, str | None]:
    """A choice checked: itself, its message, tool calls, text and finish reason."""
    if not isinstance(choice, Mapping):
        raise _wrong(where, choice, "an object")
    message = _mapping(choice.get("message"), f"{where}.message")
    tool_calls = _array(message.get("tool_calls"), f"{where}.message.tool_calls")
    calls = [_tool_call(call, f"{where}.message.tool_calls[{i}]") for i, call in enumerate(tool_calls)]
    text = message.get("content")
    if isinstance(text, list):
        parts = _ContentParts()
        parts.read(text, f"{where}.message.content")
        message = _message_read(message, parts)
        text = message["content"]
    elif not (text is None or isinstance(text, str)):
        raise _wrong(f"{where}.message.content", text, "a string")
    finish_reason = _text(choice.get("finish_reason"), f"{where}.finish_reason")
    return choice, message, calls, text, finish_reason


def _result_from_completion(body: dict[str, Any], model: str | None) -> CreateResult:
    choices = _array(body.get("choices"), "choices")
    choice, message, calls, text, finish_reason = (
        _read_choice(choices[0], "choices[0]") if choices else (_EMPTY, _EMPTY, [], None, None)
    )
    read_messages = [message]
    for i in range(1, len(choices)):  # n > 1: the others are the caller's too (the raw body)
        read_messages.append(_read_choice(choices[i], f"choices[{i}]")[1])
    # A message read anew (its content parts joined) is a dict of its own: the body served is then
    # a copy that holds it.
    if any(
        m is not _EMPTY and m is not c.get("message") for m, c in zip(read_messages, choices, strict=False)
    ):
        body = _body_read(body, choices, read_messages)
    response_id = _text(body.get("id"), "id")
    answered_model = _text(body.get("model"), "model")
    content, reason, thought = _content_and_reason(text, calls, finish_reason, _reasoning_of(message))
    return CreateResult.model_construct(
        finish_reason=reason,
        content=content,
        usage=usage_from_openai(body.get("usage")),
        cached=False,
        logprobs=_logprobs(choice) if choice.get("logprobs") else None,
        thought=thought,
        model=answered_model or model,
        response_id=response_id,
        raw_response=body,
    )


def _body_read(
    body: dict[str, Any], choices: list[Any] | tuple[Any, ...], messages: list[Mapping[str, Any]]
) -> dict[str, Any]:
    """A copy of ``body`` whose choices' messages are as read (content parts joined); the
    provider's own dicts are left as they were."""
    read_choices = [
        {**choice, "message": message}
        if message is not _EMPTY and message is not choice.get("message")
        else choice
        for message, choice in zip(messages, choices, strict=True)
    ]
    return {**body, "choices": read_choices}


class StreamAccumulator:
    """Folds ``chat.completion.chunk`` dicts into one result; tolerates chunks with no choices or
    an empty delta, and assembles tool calls from their deltas by index."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.response_id: str | None = None
        self.created: int | None = None
        self.system_fingerprint: str | None = None
        self.usage_body: dict[str, Any] | None = None
        self.chunks = 0
        self._first = _ChoiceFold()
        # Choices past the first (``n`` > 1): the caller's too, and billed.
        self._other_choices: dict[int, _ChoiceFold] = {}

    @property
    def finish_reason(self) -> str | None:
        """The first choice's ``finish_reason`` so far (None: the stream has not said it)."""
        return self._first.finish_reason

    @property
    def ended(self) -> bool:
        """Whether the stream said all it has to: its usage, and a ``finish_reason`` for every
        choice it began (with ``n`` > 1 a choice may still run after the first finished, and some
        servers send usage on every chunk)."""
        return (
            self.usage_body is not None
            and self._first.finish_reason is not None
            and all(other.finish_reason is not None for other in self._other_choices.values())
        )

    def add(self, chunk: Mapping[str, Any]) -> str | None:
        """Take one chunk; returns its text delta (of the first choice), if any. A chunk of the
        wrong shape (``choices`` no array, a ``delta`` that is no object, content that is no
        string, ...) raises ``InvalidProviderResponse`` (code ``RESPONSE_INVALID``) naming it."""
        self.chunks += 1
        try:
            return self._add(chunk)
        except _WrongShape as e:
            raise unreadable_answer(f"stream chunk {self.chunks}: {e.reason}") from None
        except Exception as e:  # a shape not foreseen: still the answer's, and billed
            raise unreadable_answer(
                f"stream chunk {self.chunks} could not be read ({type(e).__name__})"
            ) from e

    def _add(self, chunk: Mapping[str, Any]) -> str | None:
        # Checked inline, the error's path built only on failure: this runs for every chunk.
        response_id = chunk.get("id")
        if response_id is not None and not isinstance(response_id, str):
            raise _wrong("id", response_id, "a string")
        if self.response_id is None and response_id:
            self.response_id = response_id
            self.created = chunk.get("created")
        model = chunk.get("model")
        if model is not None and not isinstance(model, str):
            raise _wrong("model", model, "a string")
        if model:
            self.model = model
        if chunk.get("system_fingerprint"):
            self.system_fingerprint = chunk["system_fingerprint"]
        usage = chunk.get("usage")
        if usage is not None:
            if not isinstance(usage, dict):
                raise _wrong("usage", usage, "an object")
            self.usage_body = usage
        text: str | None = None
        choices = chunk.get("choices")
        if choices is None:
            return None
        if not isinstance(choices, (list, tuple)):
            raise _wrong("choices", choices, "an array")
        for i, choice in enumerate(choices):
            if not isinstance(choice, Mapping):
                raise _wrong(f"choices[{i}]", choice, "an object")
            index = choice.get("index", 0)
            if index == 0:
                added = self._first.add(choice, f"choices[{i}]")
                if added:
                    text = added if text is None else text + added
                continue
            if isinstance(index, bool) or not isinstance(index, int):
                raise _wrong(f"choices[{i}].index", index, "an integer")
            self._other_choices.setdefault(index, _ChoiceFold()).add(choice, f"choices[{i}]")
        return text

    def result(self) -> CreateResult:
        """The whole answer; ``raw_response`` is the ``chat.completion`` body the chunks add up to."""
        first = self._first
        calls = _function_calls(first.calls)
        raw_text = "".join(first.text)
        reasoning = "".join(first.reasoning) or None
        content, finish_reason, thought = _content_and_reason(raw_text, calls, first.finish_reason, reasoning)
        raw_choices = [first.raw_choice(0)]
        raw_choices += [other.raw_choice(index) for index, other in sorted(self._other_choices.items())]
        raw: dict[str, Any] = {
            "id": self.response_id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": raw_choices,
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
            logprobs=list(first.checked_logprobs) or None,
            thought=thought,
            model=self.model,
            response_id=self.response_id,
            raw_response=raw,
        )


@dataclass
class _ChoiceFold:
    """What a stream's chunks said of one choice, folded as they come."""

    text: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    refusal: list[str] = field(default_factory=list)
    other_parts: list[Any] = field(default_factory=list)  # content parts that are no text
    calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    logprobs: list[Any] = field(default_factory=list)  # as sent (the raw body's)
    checked_logprobs: list[ChatCompletionTokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    # A delta said a content (a string, "" too, or a list of parts): the answer's is a string.
    said_content: bool = False

    def add(self, choice: Mapping[str, Any], where: str) -> str | None:
        """Fold one chunk's ``choice`` in; its text delta, if any. Raises ``_WrongShape``."""
        finish_reason = choice.get("finish_reason")
        if finish_reason is not None and not isinstance(finish_reason, str):
            raise _wrong(f"{where}.finish_reason", finish_reason, "a string")
        if finish_reason:
            self.finish_reason = finish_reason
        logprobs = choice.get("logprobs")
        if isinstance(logprobs, Mapping) and isinstance(logprobs.get("content"), list):
            items = logprobs["content"]
            self.checked_logprobs.extend(_token_logprobs(items, f"{where}.logprobs.content"))
            self.logprobs.extend(items)
        delta = choice.get("delta")
        if delta is None:
            return None
        if not isinstance(delta, Mapping):
            raise _wrong(f"{where}.delta", delta, "an object")
        reasoning = _reasoning_of(delta)
        if reasoning:
            self.reasoning.append(reasoning)
        refusal = delta.get("refusal")
        if refusal:
            if not isinstance(refusal, str):
                raise _wrong(f"{where}.delta.refusal", refusal, "a string")
            self.refusal.append(refusal)
        content = delta.get("content")
        if content is not None:
            self.said_content = True
        if isinstance(content, list):
            parts = _ContentParts()
            parts.read(content, f"{where}.delta.content")
            self.reasoning += parts.thinking
            self.other_parts += parts.other
            content = "".join(parts.text)
        if content is not None and not isinstance(content, str):
            raise _wrong(f"{where}.delta.content", content, "a string")
        if content:
            self.text.append(content)
        calls = delta.get("tool_calls")
        if calls is not None:
            if not isinstance(calls, (list, tuple)):
                raise _wrong(f"{where}.delta.tool_calls", calls, "an array")
            for j, call in enumerate(calls):
                _add_call_delta(self.calls, call, f"{where}.delta.tool_calls[{j}]")
        return content or None

    def raw_choice(self, index: int) -> dict[str, Any]:
        """This choice in the ``chat.completion`` body the stream adds up to."""
        # As a plain call's body says it: text, "" for an answer of none (OpenAI streams its
        # ``content: ""`` first; parts, ``[]`` too, read as ""), null when content never came
        # (tool calls, a refusal).
        said = self.said_content and not self.calls and not self.refusal
        message: dict[str, Any] = {
            "role": "assistant",
            "content": "".join(self.text) or ("" if said else None),
        }
        if self.refusal:
            message["refusal"] = "".join(self.refusal)
        if self.reasoning:
            message["reasoning_content"] = "".join(self.reasoning)
        if self.other_parts:
            message[NON_TEXT_PARTS] = self.other_parts
        if self.calls:
            message["tool_calls"] = [_raw_call(call) for _, call in sorted(self.calls.items())]
        return {
            "index": index,
            "message": message,
            "logprobs": {"content": self.logprobs} if self.logprobs else None,
            "finish_reason": self.finish_reason,
        }


def _add_call_delta(calls: dict[int, dict[str, Any]], delta: Any, where: str) -> None:
    if not isinstance(delta, Mapping):
        raise _wrong(where, delta, "an object")
    index = delta.get("index")
    if index is None:
        index = len(calls)
    elif isinstance(index, bool) or not isinstance(index, int):
        raise _wrong(f"{where}.index", index, "an integer")
    call_id = _text(delta.get("id"), f"{where}.id")
    call = calls.setdefault(index, {"id": "", "type": "function", "name": "", "arguments": []})
    kind = _text(delta.get("type"), f"{where}.type")
    if kind:  # the call's first delta says it; the later ones only carry arguments
        call["type"] = kind
    field_name, arguments_name = tool_call_fields(call["type"])
    function = _mapping(delta.get(field_name), f"{where}.{field_name}")
    name = _text(function.get("name"), f"{where}.{field_name}.name")
    arguments = _text(function.get(arguments_name), f"{where}.{field_name}.{arguments_name}")
    if call_id:
        call["id"] = call_id
    if name:
        call["name"] += name
    if arguments:
        call["arguments"].append(arguments)


def _raw_call(call: Mapping[str, Any]) -> dict[str, Any]:
    """A call folded from a stream's deltas, as the provider's body would say it."""
    field_name, arguments_name = tool_call_fields(call["type"])
    return {
        "id": call["id"],
        "type": call["type"],
        field_name: {"name": call["name"], arguments_name: "".join(call["arguments"])},
    }


def _function_calls(calls: dict[int, dict[str, Any]]) -> list[FunctionCall]:
    return [
        FunctionCall(id=call["id"], name=call["name"], arguments="".join(call["arguments"]))
        for _, call in sorted(calls.items())
    ]


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
