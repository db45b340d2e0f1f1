"""A 2xx answer that is a JSON object of the wrong shape (``"choices": "x"``, a message that is a
string, tool calls that are no list, ``finish_reason`` an object, ``usage`` a string, ...) was
answered, and billed, as much as one that is no JSON at all: reading it raises the non-retryable
``InvalidProviderResponse`` (code ``upstream_response_invalid``) naming what was wrong, never a
bare AttributeError/TypeError/KeyError that the lane and the runner took for a crash and ran the
call again (paying the provider again). A stream's chunks likewise. Legitimate variations (absent
optional fields, null content with tool calls, ``refusal``, unknown fields, ``logprobs``) read as
they did."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import pytest

from models import CreateResult, FunctionCall, InvalidProviderResponse
from models.openai.results import RESPONSE_INVALID, StreamAccumulator, result_from_completion

HUGE = "x" * 100_000


def completion(**message: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-shape",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": "gpt-4o",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "hi", **message},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    }


def call(**function: Any) -> dict[str, Any]:
    return {"id": "call_1", "type": "function", "function": {"name": "get", "arguments": "{}", **function}}


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A change putting ``value`` at ``path`` (dotted; numbers index lists) of a completion."""

    def change(body: dict[str, Any]) -> None:
        *head, last = path.split(".")
        target: Any = body
        for part in head:
            target = target[int(part)] if part.isdigit() else target[part]
        if last.isdigit():
            target[int(last)] = value
        else:
            target[last] = value

    return change


BAD_COMPLETIONS: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "choices-a-string": (_set("choices", "x"), "choices"),
    "choices-an-object": (_set("choices", {"0": {}}), "choices"),
    "choices-a-huge-string": (_set("choices", HUGE), "choices"),
    "choice-a-number": (_set("choices", [1]), "choices[0]"),
    "choice-null": (_set("choices", [None]), "choices[0]"),
    "second-choice-a-string": (lambda body: body["choices"].append("x"), "choices[1]"),
    "second-message-a-string": (
        lambda body: body["choices"].append({"index": 1, "message": "hi"}),
        "choices[1].message",
    ),
    "message-a-string": (_set("choices.0.message", "hi"), "choices[0].message"),
    "message-an-array": (_set("choices.0.message", ["hi"]), "choices[0].message"),
    "content-a-number": (_set("choices.0.message.content", 5), "choices[0].message.content"),
    "content-an-object": (_set("choices.0.message.content", {"text": "hi"}), "choices[0].message.content"),
    "content-a-boolean": (_set("choices.0.message.content", True), "choices[0].message.content"),
    "tool-calls-a-string": (_set("choices.0.message.tool_calls", "call"), "choices[0].message.tool_calls"),
    "tool-calls-an-object": (
        _set("choices.0.message.tool_calls", call()),
        "choices[0].message.tool_calls",
    ),
    "tool-call-a-number": (_set("choices.0.message.tool_calls", [1]), "choices[0].message.tool_calls[0]"),
    "tool-call-without-function": (
        _set("choices.0.message.tool_calls", [{"id": "call_1", "type": "function"}]),
        "choices[0].message.tool_calls[0].function",
    ),
    "tool-call-function-a-string": (
        _set("choices.0.message.tool_calls", [{"id": "call_1", "function": "get"}]),
        "choices[0].message.tool_calls[0].function",
    ),
    "arguments-a-number": (
        _set("choices.0.message.tool_calls", [call(arguments=5)]),
        "choices[0].message.tool_calls[0].function.arguments",
    ),
    "arguments-an-array": (
        _set("choices.0.message.tool_calls", [call(arguments=["a"])]),
        "choices[0].message.tool_calls[0].function.arguments",
    ),
    "name-a-number": (
        _set("choices.0.message.tool_calls", [call(name=7)]),
        "choices[0].message.tool_calls[0].function.name",
    ),
    "call-id-an-object": (
        _set("choices.0.message.tool_calls", [{**call(), "id": {"a": 1}}]),
        "choices[0].message.tool_calls[0].id",
    ),
    "finish-reason-an-object": (_set("choices.0.finish_reason", {"x": 1}), "choices[0].finish_reason"),
    "finish-reason-an-array": (_set("choices.0.finish_reason", ["stop"]), "choices[0].finish_reason"),
    "logprob-a-number": (_set("choices.0.logprobs", {"content": [1]}), "choices[0].logprobs.content[0]"),
    "logprob-token-a-number": (
        _set("choices.0.logprobs", {"content": [{"token": 5, "logprob": -0.1}]}),
        "choices[0].logprobs.content[0]",
    ),
    "usage-a-string": (_set("usage", "12"), "usage"),
    "usage-an-array": (_set("usage", [3, 1]), "usage"),
    "id-an-array": (_set("id", ["chatcmpl-shape"]), "id"),
    "model-a-number": (_set("model", 4), "model"),
}


def bad_completion(name: str) -> dict[str, Any]:
    body = completion()
    BAD_COMPLETIONS[name][0](body)
    return body


@pytest.mark.parametrize("name", list(BAD_COMPLETIONS))
def test_a_completion_of_the_wrong_shape_is_invalid(name: str) -> None:
    body = bad_completion(name)
    with pytest.raises(InvalidProviderResponse) as caught:
        result_from_completion(body, model="gpt-4o")
    error = caught.value
    assert error.code == RESPONSE_INVALID
    assert error.retryable is False
    assert BAD_COMPLETIONS[name][1] in error.message, error.message
    assert "cannot be read" in error.message
    assert len(error.message) < 300, "names what was wrong, never echoes it"


def _with_tool_call(**message: Any) -> dict[str, Any]:
    return completion(content=None, tool_calls=[call(arguments='{"q": 1}')], **message)


# (A list of content parts is read in tests/models/test_content_parts.py: its body is served read.)
GOOD_COMPLETIONS: dict[str, tuple[dict[str, Any], Any]] = {
    "no-choices": ({"id": "chatcmpl-x", "object": "chat.completion"}, ""),
    "choices-null": ({"id": "chatcmpl-x", "choices": None}, ""),
    "choices-empty": ({"id": "chatcmpl-x", "choices": []}, ""),
    "message-null": ({"choices": [{"index": 0, "message": None, "finish_reason": "stop"}]}, ""),
    "message-absent": ({"choices": [{"index": 0, "finish_reason": "stop"}]}, ""),
    "content-null-with-tool-calls": (
        _with_tool_call(),
        [FunctionCall(id="call_1", name="get", arguments='{"q": 1}')],
    ),
    "tool-calls-null": (completion(tool_calls=None), "hi"),
    "tool-calls-empty": (completion(tool_calls=[]), "hi"),
    "tool-call-id-null": (
        completion(content=None, tool_calls=[{**call(), "id": None}]),
        [FunctionCall(id="", name="get", arguments="{}")],
    ),
    "arguments-null": (
        completion(content=None, tool_calls=[call(arguments=None)]),
        [FunctionCall(id="call_1", name="get", arguments="")],
    ),
    # Some OpenAI-compatible servers answer the arguments as an object; AutoGen's client takes its
    # JSON text (``json.dumps``), and so do we.
    "arguments-an-object": (
        completion(content=None, tool_calls=[call(arguments={"q": 1})]),
        [FunctionCall(id="call_1", name="get", arguments=json.dumps({"q": 1}))],
    ),
    "refusal": (completion(content=None, refusal="I can't help with that."), ""),
    "unknown-fields": (
        completion(annotations=[], audio=None, x_vendor={"a": [1, 2]}, function_call=None),
        "hi",
    ),
    "reasoning": (completion(reasoning_content="because"), "hi"),
    "two-choices": (
        {**completion(), "choices": [*completion()["choices"], {**completion()["choices"][0], "index": 1}]},
        "hi",
    ),
}


@pytest.mark.parametrize("name", list(GOOD_COMPLETIONS))
def test_legitimate_variations_read_as_before(name: str) -> None:
    body, content = GOOD_COMPLETIONS[name]
    kept = copy.deepcopy(body)
    result = result_from_completion(body, model="gpt-4o")
    assert result.content == content
    assert result.raw_response == kept, "the body is kept exactly as sent"


def test_a_full_answer_reads_as_before() -> None:
    body = _with_tool_call()
    body["choices"][0]["logprobs"] = {
        "content": [{"token": "a", "logprob": -0.5, "bytes": [97], "top_logprobs": [], "x_extra": 1}],
        "refusal": None,
    }
    body["choices"][0]["finish_reason"] = "tool_calls"
    body["usage"] = None
    body["system_fingerprint"] = "fp_1"
    result = result_from_completion(body, model="asked")
    assert result.finish_reason == "function_calls"
    assert result.logprobs is not None
    assert result.logprobs[0].token == "a"
    assert (result.model, result.response_id) == ("gpt-4o", "chatcmpl-shape")
    assert result.usage.prompt_tokens == 0
    odd = completion()
    odd["choices"][0]["finish_reason"] = "eos"
    odd["choices"][0]["logprobs"] = {"content": None}
    odd["model"] = None
    odd_result = result_from_completion(odd, model="asked")
    assert (odd_result.finish_reason, odd_result.logprobs, odd_result.model) == ("unknown", None, "asked")


# --- streamed chunks ---------------------------------------------------------------------------


def chunk(delta: Any = None, **choice: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-stream",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": "gpt-4o",
        "choices": [{"index": 0, "delta": {} if delta is None else delta, **choice}],
    }


def tool_delta(**fields: Any) -> dict[str, Any]:
    return {"tool_calls": [{"index": 0, "id": "call_1", "type": "function", **fields}]}


BAD_CHUNKS: dict[str, tuple[dict[str, Any], str]] = {
    "choices-a-string": ({**chunk(), "choices": "x"}, "choices"),
    "choice-a-number": ({**chunk(), "choices": [1]}, "choices[0]"),
    "delta-a-string": (chunk("hi"), "choices[0].delta"),
    "delta-an-array": (chunk(["hi"]), "choices[0].delta"),
    "content-a-number": (chunk({"content": 5}), "choices[0].delta.content"),
    "content-an-object": (chunk({"content": {"text": "hi"}}), "choices[0].delta.content"),
    "tool-calls-a-string": (chunk({"tool_calls": "x"}), "choices[0].delta.tool_calls"),
    "tool-call-a-number": (chunk({"tool_calls": [1]}), "choices[0].delta.tool_calls[0]"),
    "tool-call-index-a-string": (
        chunk({"tool_calls": [{"index": "0", "function": {"name": "get"}}]}),
        "choices[0].delta.tool_calls[0].index",
    ),
    "tool-call-id-a-number": (chunk(tool_delta(id=5)), "choices[0].delta.tool_calls[0].id"),
    "function-a-string": (chunk(tool_delta(function="get")), "choices[0].delta.tool_calls[0].function"),
    "function-name-a-number": (
        chunk(tool_delta(function={"name": 5})),
        "choices[0].delta.tool_calls[0].function.name",
    ),
    "arguments-a-number": (
        chunk(tool_delta(function={"name": "get", "arguments": 5})),
        "choices[0].delta.tool_calls[0].function.arguments",
    ),
    "arguments-an-object": (
        chunk(tool_delta(function={"name": "get", "arguments": {"q": 1}})),
        "choices[0].delta.tool_calls[0].function.arguments",
    ),
    "finish-reason-an-object": (chunk(finish_reason={"x": 1}), "choices[0].finish_reason"),
    "logprob-token-a-number": (
        chunk(logprobs={"content": [{"token": 5, "logprob": -0.1}]}),
        "choices[0].logprobs.content[0]",
    ),
    "usage-a-string": ({**chunk(), "usage": "12"}, "usage"),
    "id-a-number": ({**chunk(), "id": 5}, "id"),
    "model-an-object": ({**chunk(), "model": {"name": "gpt-4o"}}, "model"),
}


def fold(accumulator: StreamAccumulator, *chunks: dict[str, Any]) -> CreateResult:
    for each in chunks:
        accumulator.add(each)
    return accumulator.result()


@pytest.mark.parametrize("name", list(BAD_CHUNKS))
def test_a_chunk_of_the_wrong_shape_is_invalid(name: str) -> None:
    bad, where = BAD_CHUNKS[name]
    accumulator = StreamAccumulator("gpt-4o")
    accumulator.add(chunk({"role": "assistant", "content": "he"}))
    with pytest.raises(InvalidProviderResponse) as caught:
        fold(accumulator, copy.deepcopy(bad), chunk(finish_reason="stop"))
    error = caught.value
    assert error.code == RESPONSE_INVALID
    assert error.retryable is False
    assert where in error.message, error.message
    assert "stream chunk 2" in error.message, "names the chunk"
    assert len(error.message) < 300


def test_legitimate_chunks_read_as_before() -> None:
    accumulator = StreamAccumulator("asked")
    chunks = [
        {**chunk({"role": "assistant", "content": None, "refusal": None}), "usage": None},
        {**chunk(None), "choices": [{"index": 0, "delta": None}], "x_vendor": [1]},
        chunk(
            {"content": "The"}, logprobs={"content": [{"token": "The", "logprob": -0.1, "top_logprobs": []}]}
        ),
        chunk({"content": " call", "reasoning_content": "think"}, logprobs=None),
        chunk(
            {"tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "get"}}]}
        ),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"q"'}}]}),
        chunk({"tool_calls": [{"index": 0, "id": None, "function": {"name": None, "arguments": ": 1}"}}]}),
        chunk({"content": None, "tool_calls": None}, finish_reason="tool_calls"),
        {**chunk(), "choices": None},
        {**chunk(), "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}},
    ]
    for each in chunks:
        accumulator.add(each)
    result = accumulator.result()
    assert result.content == [FunctionCall(id="call_1", name="get", arguments='{"q": 1}')]
    assert result.finish_reason == "function_calls"
    assert result.thought == "think\nThe call"
    assert result.usage.completion_tokens == 2
    assert result.logprobs is not None
    assert result.logprobs[0].token == "The"
    assert (result.model, result.response_id) == ("gpt-4o", "chatcmpl-stream")


# OpenAI's free-form ("custom") tools: a call says ``custom: {name, input}``. Such a paid answer
# was refused as having no ``function`` object (upstream_response_invalid).
CUSTOM_CALL = {"id": "call_9", "type": "custom", "custom": {"name": "sql", "input": "SELECT 1"}}


def test_a_custom_tool_call_reads_as_a_call_with_its_input() -> None:
    body = completion(content=None, tool_calls=[CUSTOM_CALL])
    body["choices"][0]["finish_reason"] = "tool_calls"
    result = result_from_completion(body, model="gpt-4o")
    assert result.content == [FunctionCall(id="call_9", name="sql", arguments="SELECT 1")]
    assert result.finish_reason == "function_calls"
    assert result.raw_response == body, "the caller gets the provider's own call"
    broken = completion(
        content=None, tool_calls=[{"id": "call_9", "type": "custom", "function": {"name": "sql"}}]
    )
    with pytest.raises(InvalidProviderResponse, match=r"tool_calls\[0\]\.custom"):
        result_from_completion(broken, model="gpt-4o")


def test_a_streamed_custom_tool_call_folds_into_the_providers_shape() -> None:
    accumulator = StreamAccumulator("gpt-4o")
    start = {"index": 0, "id": "call_9", "type": "custom", "custom": {"name": "sql", "input": ""}}
    for each in [
        chunk({"role": "assistant", "content": None, "tool_calls": [start]}),
        chunk({"tool_calls": [{"index": 0, "custom": {"input": "SELECT"}}]}),
        chunk({"tool_calls": [{"index": 0, "custom": {"input": " 1"}}]}),
        chunk(None, finish_reason="tool_calls"),
    ]:
        accumulator.add(each)
    result = accumulator.result()
    assert result.content == [FunctionCall(id="call_9", name="sql", arguments="SELECT 1")]
    assert result.raw_response is not None
    assert result.raw_response["choices"][0]["message"]["tool_calls"] == [CUSTOM_CALL]
