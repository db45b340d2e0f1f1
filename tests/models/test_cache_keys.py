"""The cache key: every argument that changes an answer changes it; nothing else does."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
from pydantic import BaseModel, SecretStr

from models.cache import UncacheableRequestError, request_key
from models.types import (
    AssistantMessage,
    FunctionCall,
    FunctionExecutionResult,
    FunctionExecutionResultMessage,
    Image,
    LLMMessage,
    SystemMessage,
    ToolSchema,
    UserMessage,
)
from tests.models.counting_client import CountingClient

IDENTITY = {"provider": "openai", "endpoint": "https://api.example.test/v1", "model": "gpt-4o-mini"}
MESSAGES: list[LLMMessage] = [SystemMessage(content="be brief"), UserMessage(content="hi", source="user")]
WEATHER: ToolSchema = {
    "name": "weather",
    "description": "weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


class Answer(BaseModel):
    text: str


class OtherAnswer(BaseModel):
    text: str
    score: float


class NamedTool:
    """A Tool by protocol: name, schema, run_json."""

    def __init__(self, schema: ToolSchema) -> None:
        self._schema = schema

    @property
    def name(self) -> str:
        return self._schema["name"]

    @property
    def schema(self) -> ToolSchema:
        return self._schema

    async def run_json(self, args: Mapping[str, Any]) -> Any:
        return args


def key(**changes: Any) -> str:
    args: dict[str, Any] = {"identity": IDENTITY, "messages": MESSAGES, **changes}
    identity = args.pop("identity")
    messages = args.pop("messages")
    return request_key(identity, messages, **args)


BASE = key()


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"identity": {**IDENTITY, "model": "gpt-4o"}}, id="model"),
        pytest.param({"identity": {**IDENTITY, "endpoint": "https://other.test/v1"}}, id="endpoint"),
        pytest.param({"identity": {**IDENTITY, "provider": "azure"}}, id="provider"),
        pytest.param({"identity": {**IDENTITY, "temperature": 0.2}}, id="client-default-args"),
        pytest.param(
            {"messages": [*MESSAGES[:1], UserMessage(content="hi!", source="user")]}, id="message-text"
        ),
        pytest.param({"messages": MESSAGES[1:]}, id="message-dropped"),
        pytest.param(
            {"messages": [UserMessage(content=["look", Image.from_url("https://img.test/a.png")])]},
            id="image",
        ),
        pytest.param({"tools": [WEATHER]}, id="tools"),
        pytest.param(
            {"tools": [{**WEATHER, "description": "weather, in Celsius"}]},
            id="tool-schema",
        ),
        pytest.param({"tool_choice": "required"}, id="tool-choice-required"),
        pytest.param({"tool_choice": "none"}, id="tool-choice-none"),
        pytest.param({"json_output": True}, id="json-output"),
        pytest.param({"json_output": Answer}, id="json-output-model"),
        pytest.param({"extra_create_args": {"response_format": Answer}}, id="response-format"),
        pytest.param({"extra_create_args": {"temperature": 0.7}}, id="extra-args"),
        pytest.param({"extra_create_args": {"max_tokens": 5}}, id="max-tokens"),
        pytest.param({"extra_create_args": {"seed": 1}}, id="seed"),
    ],
)
def test_every_answer_changing_argument_changes_the_key(changes: dict[str, Any]) -> None:
    assert key(**changes) != BASE


def test_the_key_is_stable_and_a_sha256_hex() -> None:
    assert key() == BASE
    assert len(BASE) == 64
    int(BASE, 16)


def test_tool_choice_naming_a_tool_differs_by_tool() -> None:
    other: ToolSchema = {**WEATHER, "name": "forecast"}
    tools = [WEATHER, other]
    first = key(tools=tools, tool_choice=NamedTool(WEATHER))
    second = key(tools=tools, tool_choice=NamedTool(other))
    assert first != second
    assert first != key(tools=tools)


def test_a_tool_object_keys_like_its_schema() -> None:
    assert key(tools=[NamedTool(WEATHER)]) == key(tools=[WEATHER])


def test_different_response_schemas_differ() -> None:
    assert key(json_output=Answer) != key(json_output=OtherAnswer)
    assert key(extra_create_args={"response_format": Answer}) != key(
        extra_create_args={"response_format": OtherAnswer}
    )


def test_dict_key_order_does_not_matter() -> None:
    reordered_tool: ToolSchema = {
        "parameters": {"required": ["city"], "properties": {"city": {"type": "string"}}, "type": "object"},
        "description": "weather for a city",
        "name": "weather",
    }
    assert key(tools=[WEATHER]) == key(tools=[reordered_tool])
    assert key(extra_create_args={"temperature": 0.5, "top_p": 0.9}) == key(
        extra_create_args={"top_p": 0.9, "temperature": 0.5}
    )
    assert key(identity=dict(reversed(list(IDENTITY.items())))) == BASE


def test_integral_floats_key_like_integers() -> None:
    assert key(extra_create_args={"temperature": 1}) == key(extra_create_args={"temperature": 1.0})


@pytest.mark.parametrize(
    ("with_secret", "other_secret", "without"),
    [
        pytest.param({"api_key": "sk-one"}, {"api_key": "sk-two"}, {}, id="api_key"),
        pytest.param(
            {"extra_headers": {"Authorization": "Bearer sk-one", "OpenAI-Beta": "x"}},
            {"extra_headers": {"Authorization": "Bearer sk-two", "OpenAI-Beta": "x"}},
            {"extra_headers": {"OpenAI-Beta": "x"}},
            id="auth-header",
        ),
        pytest.param(
            {"extra_headers": {"api-key": "azure-one"}},
            {"extra_headers": {"API-Key": "azure-two"}},
            {"extra_headers": {}},
            id="azure-header",
        ),
        pytest.param(
            {"extra_query": {"api-key": "azure-one"}},
            {"extra_query": {"api-key": "azure-two"}},
            {"extra_query": {}},
            id="query-key",
        ),
        pytest.param({"api_key": SecretStr("sk-one")}, {"api_key": SecretStr("sk-two")}, {}, id="secretstr"),
        pytest.param({"timeout": 30}, {"timeout": 5.5}, {}, id="timeout"),
    ],
)
def test_secrets_and_transport_settings_are_not_in_the_key(
    with_secret: dict[str, Any], other_secret: dict[str, Any], without: dict[str, Any]
) -> None:
    one = key(extra_create_args={"temperature": 0, **with_secret})
    assert one == key(extra_create_args={"temperature": 0, **other_secret})
    assert one == key(extra_create_args={"temperature": 0, **without})


def test_a_secret_in_the_identity_is_not_in_the_key() -> None:
    assert key(identity={**IDENTITY, "api_key": "sk-leaked"}) == BASE


def test_a_tool_parameter_named_like_a_secret_still_counts() -> None:
    with_param: ToolSchema = {
        **WEATHER,
        "parameters": {"type": "object", "properties": {"api_key": {"type": "string"}}},
    }
    without_param: ToolSchema = {**WEATHER, "parameters": {"type": "object", "properties": {}}}
    assert key(tools=[with_param]) != key(tools=[without_param])


def test_tool_call_messages_are_keyed() -> None:
    call = FunctionCall(id="c1", name="weather", arguments='{"city":"Oslo"}')
    other = FunctionCall(id="c1", name="weather", arguments='{"city":"Rome"}')
    assert key(messages=[*MESSAGES, AssistantMessage(content=[call])]) != key(
        messages=[*MESSAGES, AssistantMessage(content=[other])]
    )


def test_an_argument_without_canonical_form_is_uncacheable() -> None:
    with pytest.raises(UncacheableRequestError):
        key(extra_create_args={"logit_bias": object()})
    with pytest.raises(UncacheableRequestError):
        key(extra_create_args={"temperature": float("nan")})


def test_two_models_of_one_client_class_never_share_a_key() -> None:
    first, second = CountingClient(model="a"), CountingClient(model="b")
    assert request_key(first.cache_identity, MESSAGES) != request_key(second.cache_identity, MESSAGES)


class UnhashableTool(NamedTool):
    """A Tool compared by value, hence unhashable (as a plain pydantic model would be)."""

    __hash__ = None  # type: ignore[assignment]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NamedTool) and other.schema == self.schema


def test_an_unhashable_tool_can_be_the_tool_choice() -> None:
    tool = UnhashableTool(WEATHER)
    assert key(tools=[tool], tool_choice=tool) == key(tools=[WEATHER], tool_choice=NamedTool(WEATHER))
    assert key(tools=[tool], tool_choice=tool) != key(tools=[tool])


def test_a_namespace_partitions_keys_and_the_empty_one_keeps_the_old_keys() -> None:
    plain = request_key(IDENTITY, MESSAGES)
    assert request_key(IDENTITY, MESSAGES, namespace="") == plain
    tenant_a = request_key(IDENTITY, MESSAGES, namespace="tenant:a")
    tenant_b = request_key(IDENTITY, MESSAGES, namespace="tenant:b")
    assert len({plain, tenant_a, tenant_b}) == 3


def test_every_field_of_a_message_read_from_openai_is_in_the_key() -> None:
    """Two requests that differ only in a field our types leave to the verbatim message (a
    system message's ``name``, a user's ``name`` of "user", an assistant's ``refusal``) are two
    answers; the order of a message's keys is not."""
    from models.openai import messages_from_openai

    def read_key(*messages: dict[str, Any]) -> str:
        return request_key(IDENTITY, messages_from_openai(list(messages)))

    plain = read_key({"role": "system", "content": "x"}, {"role": "user", "content": "hi"})
    keys = {
        plain,
        read_key({"role": "system", "content": "x", "name": "a"}, {"role": "user", "content": "hi"}),
        read_key({"role": "system", "content": "x"}, {"role": "user", "content": "hi", "name": "user"}),
        read_key({"role": "system", "content": "x"}, {"role": "assistant", "content": None, "refusal": "no"}),
        read_key({"role": "system", "content": "x"}, {"role": "assistant", "content": None, "refusal": "No"}),
    }
    assert len(keys) == 5
    assert read_key({"content": "x", "role": "system"}, {"content": "hi", "role": "user"}) == plain


def test_a_message_its_typed_fields_say_in_full_keys_as_one_built_in_code() -> None:
    """A request read from JSON whose messages our types say in full has the key the same
    request built in code has (a redo of a line finds what an earlier attempt cached)."""
    from models.openai import messages_from_openai

    read = messages_from_openai(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    )
    assert request_key(IDENTITY, read) == BASE


def test_keys_of_messages_built_in_code_did_not_change() -> None:
    """Messages built in code carry no OpenAI message, and their keys are the ones already stored."""
    assert UserMessage(content="hi").model_dump_json(exclude={"openai_message"}) == (
        '{"content":"hi","source":"user","type":"UserMessage"}'
    )


def test_keys_of_a_conversation_with_tool_calls_did_not_change() -> None:
    """Keys as the entries already stored were written under (pinned from the code before the key
    was derived with a pre-rendered identity and pydantic's serializer called directly)."""
    conversation: list[LLMMessage] = [
        SystemMessage(content="be brief"),
        UserMessage(content="hi ü", source="user"),
        AssistantMessage(content=[FunctionCall(id="c1", name="weather", arguments='{"city":"Paris"}')]),
        FunctionExecutionResultMessage(
            content=[FunctionExecutionResult(content="sunny", name="weather", call_id="c1")]
        ),
        AssistantMessage(content="It is sunny.", thought="easy"),
    ]
    pinned: list[tuple[dict[str, Any], str]] = [
        ({}, "a5b16a128bbc7a44fdcbb5c587bae8f16150d83ac782932a760838f7d318bd7f"),
        (
            {"tools": [WEATHER], "tool_choice": "required"},
            "e50ee8557326c775ae88732a02e8ea2564af895101c93c35b1e9be3fbf92b30f",
        ),
        (
            {"extra_create_args": {"temperature": 1.0, "api_key": "x"}},
            "d3f7f170dbb30eadea233851d9cccf4fe29bbc592d6bb638e6d96c4175dc65ba",
        ),
        ({"namespace": "t"}, "7e1309cebd261ec9a54db4a3e6c553b583a507c217952fb54b852484e02424af"),
    ]
    for arguments, key in pinned:
        assert request_key(IDENTITY, conversation, **arguments) == key
