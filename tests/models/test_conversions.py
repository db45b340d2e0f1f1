"""OpenAI JSON <-> our types: batch bodies run through create() with nothing lost."""

from __future__ import annotations

import json
from typing import Any

import pytest

from models import (
    AssistantMessage,
    BadRequest,
    CreateResult,
    FunctionCall,
    FunctionExecutionResultMessage,
    OpenAIChatCompletionClient,
    RequestUsage,
    SystemMessage,
    ToolSpec,
    UserMessage,
    chat_completion_body,
    messages_from_openai,
    request_from_openai_body,
    to_openai_messages,
)
from models.openai import result_from_completion
from simulator import SimulatorServer

CONVERSATION: list[dict[str, Any]] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris and Oslo?"},
    {
        "role": "assistant",
        "content": "Checking both.",
        "tool_calls": [
            {
                "id": "c1",
                "type": "function",
                "function": {"name": "weather", "arguments": '{"city":"Paris"}'},
            },
            {"id": "c2", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Oslo"}'}},
        ],
    },
    {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    {"role": "tool", "tool_call_id": "c2", "content": "snow"},
    {"role": "assistant", "content": "Paris sunny, Oslo snow."},
    {
        "role": "user",
        "name": "alice",
        "content": [
            {"type": "text", "text": "And this?"},
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png", "detail": "low"}},
        ],
    },
]

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "Weather of a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def test_messages_round_trip() -> None:
    ours = messages_from_openai(CONVERSATION)
    assert [type(m) for m in ours] == [
        SystemMessage,
        UserMessage,
        AssistantMessage,
        FunctionExecutionResultMessage,
        AssistantMessage,
        UserMessage,
    ]
    results = ours[3]
    assert isinstance(results, FunctionExecutionResultMessage)
    assert [(r.call_id, r.name, r.content) for r in results.content] == [
        ("c1", "weather", "sunny"),
        ("c2", "weather", "snow"),
    ]
    assert ours[2].thought == "Checking both."  # type: ignore[union-attr]
    assert ours[5].source == "alice"  # type: ignore[union-attr]
    assert to_openai_messages(ours) == CONVERSATION


def test_developer_role_and_text_parts_are_read_and_sent_as_they_were() -> None:
    sent = [
        {"role": "developer", "content": [{"type": "text", "text": "Rules."}]},
        {"role": "user", "content": "hi"},
    ]
    ours = messages_from_openai(sent)
    assert [(type(m), m.content) for m in ours] == [(SystemMessage, "Rules."), (UserMessage, "hi")]
    assert to_openai_messages(ours) == sent


# Every field a provider accepts on a message, on every role (was: names equal to the role's default
# and a system message's name dropped, audio/file/refusal parts and the legacy function role refused).
EVERY_FIELD: list[dict[str, Any]] = [
    {"role": "system", "name": "rules", "content": "Be brief."},
    {"role": "developer", "name": "ops", "content": [{"type": "text", "text": "Cite."}]},
    {"role": "user", "name": "user", "content": "hello"},
    {
        "role": "user",
        "name": "bob",
        "content": [
            {"type": "text", "text": "Listen"},
            {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
            {"type": "file", "file": {"file_id": "file-abc", "filename": "a.pdf"}},
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png", "detail": "auto"}},
        ],
    },
    {
        "role": "assistant",
        "name": "assistant",
        "content": None,
        "refusal": "I cannot.",
        "audio": {"id": "au_1"},
    },
    {"role": "assistant", "content": [{"type": "refusal", "refusal": "No."}, {"type": "text", "text": "Ok"}]},
    {
        "role": "assistant",
        "name": "planner",
        "content": None,
        "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
    },
    {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "42"}]},
    {"role": "assistant", "content": None, "function_call": {"name": "g", "arguments": "{}"}},
    {"role": "function", "name": "g", "content": "7"},
    {"role": "assistant", "content": "Prefix", "prefix": True},
]


def test_every_message_field_reaches_the_provider_unchanged() -> None:
    request = request_from_openai_body({"model": "m", "messages": EVERY_FIELD})
    client = OpenAIChatCompletionClient(model="m", api_key="k", base_url="http://127.0.0.1:9/v1")
    assert client.request_body(request.messages, **request.create_kwargs())["messages"] == EVERY_FIELD
    system = request.messages[0]
    assert isinstance(system, SystemMessage)
    assert system.content == "Be brief."


def test_messages_built_in_code_keep_autogens_shape() -> None:
    built = [
        SystemMessage(content="Be brief."),
        UserMessage(content="hi", source="alice"),
        AssistantMessage(content="hello", source="helper"),
        UserMessage(content="again", source="user"),
    ]
    assert to_openai_messages(built) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi", "name": "alice"},
        {"role": "assistant", "content": "hello", "name": "helper"},
        {"role": "user", "content": "again"},
    ]
    assert to_openai_messages(built, include_name=False)[1] == {"role": "user", "content": "hi"}


def test_a_read_message_changed_in_code_goes_as_its_fields_say() -> None:
    (read,) = messages_from_openai([{"role": "user", "name": "bob", "content": "old", "x_vendor": 1}])
    changed = read.model_copy(update={"content": "new"})
    assert to_openai_messages([changed]) == [{"role": "user", "content": "new", "name": "bob"}]
    assert to_openai_messages([read]) == [{"role": "user", "name": "bob", "content": "old", "x_vendor": 1}]


def test_include_name_false_drops_names_of_read_messages_too() -> None:
    ours = messages_from_openai([{"role": "system", "name": "rules", "content": "x"}])
    assert to_openai_messages(ours, include_name=False) == [{"role": "system", "content": "x"}]


@pytest.mark.parametrize(
    "message",
    [
        {"role": "narrator", "content": "x"},
        {"role": "user", "content": 5},
        {"role": "user", "content": ["not a part"]},
    ],
)
def test_what_is_not_a_chat_message_is_refused(message: dict[str, Any]) -> None:
    with pytest.raises(BadRequest):
        messages_from_openai([message])


def test_request_from_body_keeps_every_argument() -> None:
    body = {
        "model": "gpt-4o-mini",
        "messages": CONVERSATION,
        "tools": [WEATHER_TOOL],
        "tool_choice": {"type": "function", "function": {"name": "weather"}},
        "temperature": 0.1,
        "n": 2,
        "seed": 42,
        "max_tokens": 50,
        "logprobs": True,
        "top_logprobs": 2,
        "metadata": {"k": "v"},
        "stream": False,
        "stream_options": {"include_usage": True},
        "response_format": {"type": "json_object"},
    }
    request = request_from_openai_body(body)
    assert request.model == "gpt-4o-mini"
    assert request.tools == [WEATHER_TOOL["function"]]
    assert isinstance(request.tool_choice, ToolSpec)
    assert request.tool_choice.name == "weather"
    assert request.json_output is True
    assert request.response_format is None
    assert request.extra_create_args == {
        "temperature": 0.1,
        "n": 2,
        "seed": 42,
        "max_tokens": 50,
        "logprobs": True,
        "top_logprobs": 2,
        "metadata": {"k": "v"},
    }

    client = OpenAIChatCompletionClient(model=request.model, api_key="k", base_url="http://127.0.0.1:9/v1")
    sent = client.request_body(request.messages, **request.create_kwargs())
    expected = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    assert sent == expected, "the body the client sends is the body the batch line had"


def test_schema_response_format_passes_unchanged() -> None:
    schema_format = {
        "type": "json_schema",
        "json_schema": {"name": "x", "schema": {"type": "object", "properties": {}}, "strict": True},
    }
    request = request_from_openai_body(
        {"model": "m", "messages": [{"role": "user", "content": "q"}], "response_format": schema_format}
    )
    client = OpenAIChatCompletionClient(model="m", api_key="k", base_url="http://127.0.0.1:9/v1")
    assert (
        client.request_body(request.messages, **request.create_kwargs())["response_format"] == schema_format
    )


@pytest.mark.parametrize(
    "body",
    [
        {"messages": [{"role": "user", "content": "x"}]},
        {"model": "m", "messages": []},
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "tool_choice": {"type": "function"}},
    ],
)
def test_bad_bodies_are_bad_requests(body: dict[str, Any]) -> None:
    with pytest.raises(BadRequest):
        request_from_openai_body(body)


async def test_batch_body_through_create_returns_the_provider_body(simulator: SimulatorServer) -> None:
    body = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "Weather? [[call weather]]"}],
        "tools": [WEATHER_TOOL],
        "seed": 1,
    }
    request = request_from_openai_body(body)
    client = OpenAIChatCompletionClient(model=request.model, api_key="k", base_url=simulator.base_url)
    result = await client.create(request.messages, **request.create_kwargs())
    await client.close()
    out = chat_completion_body(result, model=request.model)
    assert out is result.raw_response
    assert out["object"] == "chat.completion"
    assert out["choices"][0]["finish_reason"] == "tool_calls"
    assert result_from_completion(out).content == result.content


def test_chat_completion_body_built_from_a_result() -> None:
    text = CreateResult(
        finish_reason="stop",
        content="hi",
        usage=RequestUsage(prompt_tokens=5, completion_tokens=1, cached_prompt_tokens=2),
        cached=False,
        response_id="r1",
    )
    body = chat_completion_body(text, model="gpt-4o")
    assert body["id"] == "r1"
    assert body["model"] == "gpt-4o"
    assert body["object"] == "chat.completion"
    assert body["usage"]["total_tokens"] == 6
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == 2
    back = result_from_completion(json.loads(json.dumps(body)))
    assert (back.content, back.finish_reason, back.usage) == ("hi", "stop", text.usage)

    calls = CreateResult(
        finish_reason="function_calls",
        content=[FunctionCall(id="c", name="f", arguments="{}")],
        usage=RequestUsage(),
        cached=True,
    )
    body = chat_completion_body(calls, model="m")
    assert body["choices"][0]["finish_reason"] == "tool_calls"
    assert body["choices"][0]["message"]["tool_calls"][0]["function"] == {"name": "f", "arguments": "{}"}
    assert result_from_completion(body).content == calls.content


def test_result_parsing_edge_cases() -> None:
    body = {
        "id": "x",
        "model": "deepseek-r1",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "42", "reasoning_content": "6*7"},
                "finish_reason": "weird",
                "logprobs": {
                    "content": [{"token": "42", "logprob": -0.1, "bytes": [52, 50], "top_logprobs": []}]
                },
            }
        ],
        "usage": {
            "prompt_tokens": 4,
            "completion_tokens": 9,
            "prompt_tokens_details": None,
            "completion_tokens_details": {"reasoning_tokens": 7},
        },
    }
    result = result_from_completion(body)
    assert result.finish_reason == "unknown"
    assert result.thought == "6*7"
    assert result.content == "42"
    assert result.usage == RequestUsage(prompt_tokens=4, completion_tokens=9, reasoning_tokens=7)
    assert result.logprobs is not None
    assert result.logprobs[0].token == "42"
    empty = result_from_completion({"choices": []}, model="m")
    assert (empty.content, empty.model, empty.usage) == ("", "m", RequestUsage())


@pytest.mark.parametrize(
    "tools_and_choice",
    [
        # A free-form tool and a tool_choice of allowed_tools: refused as "only function tools".
        {
            "tools": [
                {"type": "custom", "custom": {"name": "sql", "format": {"type": "text"}}},
                WEATHER_TOOL,
            ],
            "tool_choice": {
                "type": "allowed_tools",
                "allowed_tools": {"mode": "auto", "tools": [{"type": "custom", "custom": {"name": "sql"}}]},
            },
        },
        # Function tools only, but a tool_choice our types cannot say (it is no string to look up).
        {
            "tools": [WEATHER_TOOL],
            "tool_choice": {"type": "allowed_tools", "allowed_tools": {"mode": "required"}},
        },
        # A key beside "function" (some OpenAI-compatible servers read cache_control there).
        {"tools": [{**WEATHER_TOOL, "cache_control": {"type": "ephemeral"}}]},
        # A type this client has never heard of, and a tool_choice string of another server's.
        {"tools": [{"type": "web_search"}], "tool_choice": "any"},
    ],
)
def test_tools_our_types_cannot_say_are_sent_as_written(tools_and_choice: dict[str, Any]) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "q"}], **tools_and_choice}
    request = request_from_openai_body(body)
    client = OpenAIChatCompletionClient(model="m", api_key="k", base_url="http://127.0.0.1:9/v1")
    assert client.request_body(request.messages, **request.create_kwargs()) == body


def test_a_tool_that_is_no_object_with_a_type_is_still_refused() -> None:
    for tools in (["x"], [{"function": {"name": "f"}}], [{"type": 3}]):
        with pytest.raises(BadRequest, match="object with a type"):
            request_from_openai_body(
                {"model": "m", "messages": [{"role": "user", "content": "q"}], "tools": tools}
            )
