"""Scripted tool calls, recall and structured outputs through the openai SDK."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, Literal

import openai
import pytest
from pydantic import BaseModel

from simulator.testing import SimulatorServer

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}},
    },
}


@pytest.fixture
def client(simulator: SimulatorServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=simulator.base_url, api_key="sim", max_retries=0, timeout=10) as client:
        yield client


def complete(client: openai.OpenAI, messages: list[dict[str, Any]], **options: Any) -> Any:
    # Messages built as plain dicts, as an agent loop appends them; the SDK's TypedDicts add nothing here.
    return client.chat.completions.create(model="sim-small", messages=messages, **options)  # type: ignore[arg-type]


def answer_calls(messages: list[dict[str, Any]], message: Any, results: dict[str, str]) -> None:
    """Append the assistant's tool-call message and one tool result per call, as an agent would."""
    messages.append(message.model_dump(exclude_none=True))
    for call in message.tool_calls:
        messages.append({"role": "tool", "tool_call_id": call.id, "content": results[call.function.name]})


def test_parallel_then_sequential_calls_then_text(client: openai.OpenAI) -> None:
    prompt = (
        '[[call get_weather {"city": "Paris", "days": 2}]] [[call add {"a": 1, "b": 2}]] '
        '[[then]] [[call add {"a": 3, "b": 4}]]'
    )
    messages: list[dict[str, Any]] = [{"role": "user", "content": prompt}]
    first = complete(client, messages, tools=[WEATHER, ADD])
    assert first.choices[0].finish_reason == "tool_calls"
    calls = first.choices[0].message.tool_calls
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris", "days": 2}),
        ("add", {"a": 1, "b": 2}),
    ]
    assert len({c.id for c in calls}) == 2
    assert all(c.id.startswith("call_") for c in calls)
    again = complete(client, messages, tools=[WEATHER, ADD])
    assert [c.id for c in again.choices[0].message.tool_calls] == [c.id for c in calls]  # deterministic ids

    answer_calls(messages, first.choices[0].message, {"get_weather": "sunny", "add": "3"})
    second = complete(client, messages, tools=[WEATHER, ADD])
    [call] = second.choices[0].message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("add", {"a": 3, "b": 4})

    answer_calls(messages, second.choices[0].message, {"add": "7"})
    final = complete(client, messages, tools=[WEATHER, ADD])
    assert final.choices[0].finish_reason == "stop"
    assert final.choices[0].message.tool_calls is None
    assert final.choices[0].message.content == "tool results: get_weather=sunny; add=3; add=7"


def test_no_tools_offered_means_no_calls(client: openai.OpenAI) -> None:
    reply = complete(client, [{"role": "user", "content": '[[call add {"a": 1}]]'}])
    assert reply.choices[0].message.tool_calls is None
    assert reply.choices[0].finish_reason == "stop"
    none_choice = complete(
        client, [{"role": "user", "content": "[[call add]]"}], tools=[ADD], tool_choice="none"
    )
    assert none_choice.choices[0].message.tool_calls is None


def test_arguments_generated_from_schema_when_omitted(client: openai.OpenAI) -> None:
    reply = complete(client, [{"role": "user", "content": "[[call get_weather]]"}], tools=[WEATHER])
    [call] = reply.choices[0].message.tool_calls
    arguments = json.loads(call.function.arguments)
    assert isinstance(arguments["city"], str)
    assert 1 <= arguments["days"] <= 7


def test_tool_choice_required_calls_a_tool_once(client: openai.OpenAI) -> None:
    messages: list[dict[str, Any]] = [{"role": "user", "content": "weather?"}]
    first = complete(client, messages, tools=[WEATHER, ADD], tool_choice="required")
    [call] = first.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    named = complete(
        client, messages, tools=[WEATHER, ADD], tool_choice={"type": "function", "function": {"name": "add"}}
    )
    assert named.choices[0].message.tool_calls[0].function.name == "add"
    answer_calls(messages, first.choices[0].message, {"get_weather": "rain"})
    final = complete(client, messages, tools=[WEATHER, ADD], tool_choice="required")
    assert final.choices[0].message.content == "tool results: get_weather=rain"


def test_parallel_tool_calls_false_makes_one_call_a_turn(client: openai.OpenAI) -> None:
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": '[[call add {"a": 1}]] [[call add {"a": 2}]]'}
    ]
    first = complete(client, messages, tools=[ADD], parallel_tool_calls=False)
    assert len(first.choices[0].message.tool_calls) == 1
    answer_calls(messages, first.choices[0].message, {"add": "1"})
    second = complete(client, messages, tools=[ADD], parallel_tool_calls=False)
    assert json.loads(second.choices[0].message.tool_calls[0].function.arguments) == {"a": 2}


def test_streamed_tool_calls_arrive_in_pieces(client: openai.OpenAI) -> None:
    prompt = (
        '[[call get_weather {"city": "A city with a rather long name", "days": 3}]] '
        '[[call add {"a": 1, "b": 2}]]'
    )
    plain = complete(client, [{"role": "user", "content": prompt}], tools=[WEATHER, ADD])
    chunks = list(complete(client, [{"role": "user", "content": prompt}], tools=[WEATHER, ADD], stream=True))
    assembled: dict[int, dict[str, str]] = {}
    argument_pieces = 0
    for chunk in chunks:
        for delta_call in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            entry = assembled.setdefault(delta_call.index, {"id": "", "name": "", "arguments": ""})
            if delta_call.id:
                assert not entry["id"], "id sent once, first"
                entry["id"] = delta_call.id
                entry["name"] = delta_call.function.name
            elif delta_call.function and delta_call.function.arguments:
                argument_pieces += 1
                entry["arguments"] += delta_call.function.arguments
    expected = {
        i: {"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
        for i, c in enumerate(plain.choices[0].message.tool_calls)
    }
    assert assembled == expected
    assert argument_pieces > 2
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        "tool_calls"
    ]


def test_recall_quotes_earlier_turns(client: openai.OpenAI) -> None:
    messages: list[dict[str, Any]] = [{"role": "user", "content": "first question"}]
    first = complete(client, messages)
    first_text = first.choices[0].message.content
    messages += [
        {"role": "assistant", "content": first_text},
        {"role": "user", "content": "what did you say? [[recall]]"},
    ]
    second = complete(client, messages)
    assert second.choices[0].message.content == f"recall: {first_text}"
    plain = complete(client, [*messages[:-1], {"role": "user", "content": "what did you say?"}])
    assert first_text not in (plain.choices[0].message.content or "")


class Address(BaseModel):
    street: str
    number: int


class Person(BaseModel):
    name: str
    age: int
    height_m: float
    member: bool
    role: Literal["admin", "user", "guest"]
    tags: list[str]
    home: Address
    previous: list[Address]
    nickname: str | None
    manager: Person | None


def test_json_schema_reply_validates(client: openai.OpenAI) -> None:
    schema = Person.model_json_schema()
    assert "$defs" in schema
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "person", "schema": schema, "strict": True},
    }
    reply = complete(
        client, [{"role": "user", "content": "Describe someone."}], response_format=response_format
    )
    content = reply.choices[0].message.content
    person = Person.model_validate_json(content)
    assert (
        reply.choices[0].message.content
        == complete(
            client, [{"role": "user", "content": "Describe someone."}], response_format=response_format
        )
        .choices[0]
        .message.content
    )
    other = Person.model_validate_json(
        complete(client, [{"role": "user", "content": "Someone else."}], response_format=response_format)
        .choices[0]
        .message.content
    )
    assert person != other


def test_sdk_parse_helper_gets_the_model(client: openai.OpenAI) -> None:
    parsed = client.chat.completions.parse(
        model="sim-small", messages=[{"role": "user", "content": "address?"}], response_format=Address
    )
    address = parsed.choices[0].message.parsed
    assert isinstance(address, Address)


def test_json_object_reply_is_an_object(client: openai.OpenAI) -> None:
    reply = complete(
        client, [{"role": "user", "content": "json please"}], response_format={"type": "json_object"}
    )
    assert isinstance(json.loads(reply.choices[0].message.content), dict)
