"""OpenAIChatCompletionClient against the simulator over real HTTP: the seed page's examples and more."""

from __future__ import annotations

import asyncio
import json
from typing import Any, Literal

import pytest
from pydantic import BaseModel

from models import (
    AssistantMessage,
    AuthenticationFailed,
    BadRequest,
    CancellationToken,
    CreateResult,
    FunctionCall,
    FunctionExecutionResult,
    FunctionExecutionResultMessage,
    Image,
    LLMCall,
    LLMStreamEnd,
    LLMStreamStart,
    OpenAIChatCompletionClient,
    ProviderUnavailable,
    RequestUsage,
    StreamInterrupted,
    SystemMessage,
    ToolSchema,
    UserMessage,
)
from models.openai import ToolSpec
from simulator import SimulatorServer
from tests.models.event_capture import Captured

KEY = "sk-test-client-key"

WEATHER: ToolSchema = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


class AgentResponse(BaseModel):
    thoughts: str
    response: Literal["happy", "sad", "neutral"]


def client_for(simulator: SimulatorServer, **kwargs: Any) -> OpenAIChatCompletionClient:
    kwargs.setdefault("model", "gpt-4o")
    return OpenAIChatCompletionClient(api_key=KEY, base_url=simulator.base_url, **kwargs)


def user(text: str) -> UserMessage:
    return UserMessage(content=text, source="user")


async def test_create_as_on_the_seed_page(simulator: SimulatorServer, events: Captured) -> None:
    client = client_for(simulator, temperature=0.3)
    result = await client.create([user("What is the capital of France?")])
    await client.close()

    assert result.finish_reason == "stop"
    assert isinstance(result.content, str)
    assert result.content
    assert result.usage.prompt_tokens > 0
    assert result.usage.completion_tokens > 0
    assert result.cached is False
    assert result.model == "gpt-4o"
    assert result.response_id
    assert result.raw_response is not None
    assert result.raw_response["choices"][0]["message"]["content"] == result.content
    assert client.actual_usage() == client.total_usage() == result.usage
    calls = [e for e in events.events if isinstance(e, LLMCall)]
    assert len(calls) == 1
    call = calls[0]
    assert (call.model, call.attempt, call.error, call.finish_reason) == ("gpt-4o", 1, None, "stop")
    assert call.prompt_tokens == result.usage.prompt_tokens
    assert call.endpoint == "127.0.0.1"
    assert call.request_id is not None
    assert call.latency_ms > 0
    assert json.loads(events.lines[0])["type"] == "LLMCall"


async def test_default_create_args_reach_the_request(simulator: SimulatorServer) -> None:
    client = client_for(simulator, temperature=0.3, seed=7, max_tokens=3)
    body = client.request_body([user("hi")], extra_create_args={"top_p": 0.5, "max_tokens": 2})
    assert body["temperature"] == 0.3
    assert body["seed"] == 7
    assert body["top_p"] == 0.5
    assert body["max_tokens"] == 2, "a request's args override the client's"
    result = await client.create(
        [user("a long reply please [[words 40]]")], extra_create_args={"max_tokens": 2}
    )
    await client.close()
    assert result.finish_reason == "length"
    assert result.usage.completion_tokens <= 2


@pytest.mark.parametrize("include_usage", [None, True])
async def test_stream_as_on_the_seed_page(
    simulator: SimulatorServer, events: Captured, include_usage: bool | None
) -> None:
    client = client_for(simulator)
    messages = [user("Write a very short story about a dragon. [[words 60]]")]
    chunks: list[str] = []
    final: list[CreateResult] = []
    async for item in client.create_stream(messages, include_usage=include_usage):
        if isinstance(item, str):
            assert not final, "the CreateResult comes last"
            chunks.append(item)
        else:
            final.append(item)
    await client.close()

    assert len(chunks) > 1
    assert len(final) == 1
    result = final[0]
    assert result.content == "".join(chunks)
    assert result.finish_reason == "stop"
    if include_usage:
        assert result.usage.prompt_tokens > 0
        assert result.usage.completion_tokens > 0
    else:
        assert result.usage == RequestUsage(), "usage in a stream is zero unless asked for"
    assert client.actual_usage() == result.usage
    assert any(isinstance(e, LLMStreamStart) for e in events.events)
    ends = [e for e in events.events if isinstance(e, LLMStreamEnd)]
    assert len(ends) == 1
    assert ends[0].error is None
    assert ends[0].chunks >= len(chunks)


async def test_stream_usage_through_stream_options_and_empty_chunks(simulator: SimulatorServer) -> None:
    client = client_for(simulator)
    items = [
        item
        async for item in client.create_stream(
            [user("tell me [[empty_chunks]] [[words 30]]")],
            extra_create_args={"stream_options": {"include_usage": True}},
        )
    ]
    await client.close()
    result = items[-1]
    assert isinstance(result, CreateResult)
    assert result.usage.completion_tokens > 0
    assert result.content == "".join(item for item in items[:-1] if isinstance(item, str))


async def test_stream_that_breaks_raises_stream_interrupted(
    simulator: SimulatorServer, events: Captured
) -> None:
    client = client_for(simulator)
    received: list[str] = []

    async def consume() -> None:
        async for item in client.create_stream([user("story [[words 100]] [[break_stream 3]]")]):
            if isinstance(item, str):
                received.append(item)

    with pytest.raises(StreamInterrupted) as caught:
        await consume()
    await client.close()
    assert caught.value.retryable
    assert received, "chunks before the break were handed out"
    ends = [e for e in events.events if isinstance(e, LLMStreamEnd)]
    assert ends
    assert ends[0].error is not None
    assert "StreamInterrupted" in ends[0].error


async def test_stream_tool_call_deltas_are_assembled(simulator: SimulatorServer) -> None:
    simulator.configure(stream_chunk_chars=3)
    client = client_for(simulator)
    items = [
        item
        async for item in client.create_stream(
            [user('weather? [[call get_weather {"city": "Paris"}]] [[call get_weather {"city": "Oslo"}]]')],
            tools=[WEATHER],
        )
    ]
    await client.close()
    result = items[-1]
    assert isinstance(result, CreateResult)
    assert result.finish_reason == "function_calls"
    assert isinstance(result.content, list)
    assert [json.loads(call.arguments) for call in result.content] == [{"city": "Paris"}, {"city": "Oslo"}]
    assert all(call.name == "get_weather" and call.id for call in result.content)


async def test_structured_output_on_the_client(simulator: SimulatorServer) -> None:
    client = client_for(simulator, response_format=AgentResponse)
    result = await client.create([user("I am happy.")])
    await client.close()
    assert isinstance(result.content, str)
    parsed = AgentResponse.model_validate_json(result.content)
    assert parsed.response in ("happy", "sad", "neutral")


async def test_structured_output_per_request(simulator: SimulatorServer) -> None:
    client = client_for(simulator)
    body = client.request_body([user("x")], extra_create_args={"response_format": AgentResponse})
    assert body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["strict"] is True
    result = await client.create([user("I am happy.")], extra_create_args={"response_format": AgentResponse})
    by_json_output = await client.create([user("I am sad.")], json_output=AgentResponse)
    await client.close()
    assert isinstance(result.content, str)
    assert isinstance(by_json_output.content, str)
    AgentResponse.model_validate_json(result.content)
    AgentResponse.model_validate_json(by_json_output.content)


async def test_json_output_true_asks_for_a_json_object(simulator: SimulatorServer) -> None:
    client = client_for(simulator)
    assert client.request_body([user("x")], json_output=True)["response_format"] == {"type": "json_object"}
    assert "response_format" not in client.request_body([user("x")], json_output=False)
    result = await client.create([user("Give me JSON.")], json_output=True)
    await client.close()
    assert isinstance(result.content, str)
    assert isinstance(json.loads(result.content), dict)


async def test_tool_calls_and_results_round(simulator: SimulatorServer) -> None:
    client = client_for(simulator)
    question = user('Weather in Paris? [[call get_weather {"city": "Paris"}]]')
    first = await client.create([question], tools=[WEATHER])
    assert first.finish_reason == "function_calls"
    assert isinstance(first.content, list)
    assert len(first.content) == 1
    call = first.content[0]
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Paris"})

    second = await client.create(
        [
            question,
            AssistantMessage(content=first.content, source="assistant"),
            FunctionExecutionResultMessage(
                content=[FunctionExecutionResult(content="sunny", name="get_weather", call_id=call.id)]
            ),
        ],
        tools=[WEATHER],
    )
    await client.close()
    assert second.finish_reason == "stop"
    assert isinstance(second.content, str)
    assert "get_weather=sunny" in second.content


async def test_tool_choice_forms(simulator: SimulatorServer) -> None:
    client = client_for(simulator)
    assert "tool_choice" not in client.request_body([user("x")], tools=[WEATHER])
    assert (
        client.request_body([user("x")], tools=[WEATHER], tool_choice="required")["tool_choice"] == "required"
    )
    named = client.request_body([user("x")], tools=[WEATHER], tool_choice=ToolSpec(WEATHER))
    assert named["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert named["tools"] == [{"type": "function", "function": dict(WEATHER)}]
    with pytest.raises(BadRequest):
        client.request_body([user("x")], tools=[], tool_choice=ToolSpec(WEATHER))
    forced = await client.create([user("anything")], tools=[WEATHER], tool_choice=ToolSpec(WEATHER))
    refused = await client.create([user("[[call get_weather {}]]")], tools=[WEATHER], tool_choice="none")
    await client.close()
    assert forced.finish_reason == "function_calls"
    assert refused.finish_reason == "stop"
    assert isinstance(refused.content, str)


async def test_reasoning_and_cached_tokens_are_reported(simulator: SimulatorServer) -> None:
    client = client_for(simulator)
    result = await client.create([user("think hard [[reasoning 12]] [[cached 5]]")])
    await client.close()
    assert result.usage.reasoning_tokens == 12
    assert result.usage.cached_prompt_tokens == 5
    assert client.actual_usage().reasoning_tokens == 12


async def test_think_block_goes_to_thought(simulator: SimulatorServer) -> None:
    client = client_for(simulator)
    result = await client.create([user("[[say <think>first, the facts</think>The answer is 4.]]")])
    await client.close()
    assert isinstance(result.content, str)
    assert result.thought == "first, the facts"
    assert "<think>" not in result.content
    assert "The answer is 4." in result.content


async def test_messages_of_every_kind_are_accepted(simulator: SimulatorServer) -> None:
    client = client_for(simulator)
    result = await client.create(
        [
            SystemMessage(content="You are a helpful AI assistant."),
            UserMessage(
                content=["What is in this image?", Image.from_bytes(b"\x89PNG fake")], source="alice"
            ),
            AssistantMessage(content="A picture.", source="assistant"),
            user("[[recall]] thanks"),
        ]
    )
    await client.close()
    assert isinstance(result.content, str)
    assert "A picture." in result.content
    body = client.request_body(
        [UserMessage(content=["a", Image.from_url("https://x/y.png")], source="alice")]
    )
    assert body["messages"][0]["name"] == "alice"
    assert body["messages"][0]["content"][1] == {"type": "image_url", "image_url": {"url": "https://x/y.png"}}


async def test_capabilities_are_checked_before_any_request(simulator: SimulatorServer) -> None:
    client = client_for(
        simulator,
        model="local-llama",
        model_info={"vision": False, "function_calling": False, "json_output": False, "family": "unknown"},
    )
    with pytest.raises(BadRequest):
        await client.create([user("x")], tools=[WEATHER])
    with pytest.raises(BadRequest):
        await client.create([UserMessage(content=["look", Image.from_url("https://x/y.png")], source="user")])
    with pytest.raises(BadRequest):
        await client.create([user("x")], json_output=True)
    await client.close()
    assert simulator.stats()["requests"] == 0


async def test_cancellation_token_cancels_a_call(simulator: SimulatorServer) -> None:
    client = client_for(simulator)
    token = CancellationToken()
    task = asyncio.create_task(client.create([user("slow [[delay 5]]")], cancellation_token=token))
    await asyncio.sleep(0.2)
    token.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with pytest.raises(asyncio.CancelledError):
        await client.create([user("never sent")], cancellation_token=token)
    await client.close()
    assert client.actual_usage() == RequestUsage()


async def test_missing_key_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    with pytest.raises(AuthenticationFailed, match="OPENAI_API_KEY"):
        OpenAIChatCompletionClient(model="gpt-4o")
    with pytest.raises(AuthenticationFailed, match="GEMINI_API_KEY"):
        OpenAIChatCompletionClient(model="gemini-2.0-flash")


async def test_key_and_url_from_the_environment(
    simulator: SimulatorServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("OPENAI_BASE_URL", simulator.base_url)
    simulator.configure(require_api_key=KEY)
    client = OpenAIChatCompletionClient(model="gpt-4o-mini")
    result = await client.create([user("hello")])
    await client.close()
    assert result.model == "gpt-4o-mini"
    assert client.model_info["family"] == "gpt-4o"


async def test_a_proxy_in_the_environment_is_used(
    simulator: SimulatorServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HTTP_PROXY reaches a host that does not resolve, as the SDK's own client would; NO_PROXY
    exempts it again. (The simulator answers a proxy's absolute-form request like any other.)"""
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", simulator.url)
    unreachable = "http://upstream.invalid/v1"
    proxied = OpenAIChatCompletionClient(model="gpt-4o-mini", api_key=KEY, base_url=unreachable)
    result = await proxied.create([user("through the proxy")])
    await proxied.close()
    assert isinstance(result.content, str)
    assert simulator.stats()["requests"] == 1

    monkeypatch.setenv("NO_PROXY", "upstream.invalid")
    direct = OpenAIChatCompletionClient(model="gpt-4o-mini", api_key=KEY, base_url=unreachable)
    with pytest.raises(ProviderUnavailable):
        await direct.create([user("not through the proxy")])
    await direct.close()
    assert simulator.stats()["requests"] == 1


def test_gemini_goes_to_its_openai_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GEMINI_API_KEY", "gm-test-key")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")  # must not be used for Gemini
    client = OpenAIChatCompletionClient(model="gemini-2.5-flash")
    assert client.base_url == "https://generativelanguage.googleapis.com/v1beta/openai/"
    assert client.cache_identity["provider"] == "gemini"
    assert client.model_info["context_window"] == 1_048_576

    async def sdk_settings() -> tuple[str, str]:
        sdk = client._sdk()
        settings = (str(sdk.base_url), str(sdk.api_key))
        await client.close()
        return settings

    assert asyncio.run(sdk_settings()) == (
        "https://generativelanguage.googleapis.com/v1beta/openai/",
        "gm-test-key",
    )


def test_one_client_serves_successive_event_loops(simulator: SimulatorServer) -> None:
    """Embedded runs and tests may use one loop after another; the client must follow them."""
    client = client_for(simulator)

    async def one() -> str:
        result = await client.create([user("hello")])
        assert isinstance(result.content, str)
        await client.close()
        return result.content

    assert asyncio.run(one()) == asyncio.run(one())
    assert client.actual_usage().prompt_tokens > 0


def test_cache_identity_carries_settings_and_never_the_key(simulator: SimulatorServer) -> None:
    client = client_for(simulator, temperature=0.2, response_format=AgentResponse)
    identity = client.cache_identity
    assert identity["model"] == "gpt-4o"
    assert identity["provider"] == "openai-compatible"
    assert identity["base_url"] == simulator.base_url.rstrip("/")
    assert identity["create_args"]["temperature"] == 0.2
    assert identity["create_args"]["response_format"]["json_schema"]["name"] == "AgentResponse"
    assert KEY not in json.dumps(identity)
    assert KEY not in repr(client)
    other = client_for(simulator, temperature=0.3)
    assert other.cache_identity != identity


def test_model_info_table_and_permissive_default(simulator: SimulatorServer) -> None:
    assert client_for(simulator, model="gpt-4o-2024-08-06").model_info["family"] == "gpt-4o"
    assert client_for(simulator, model="o3-mini").model_info["vision"] is False
    unknown = client_for(simulator, model="qwen2.5-7b-instruct")
    assert unknown.model_info["family"] == "unknown"
    assert unknown.model_info["function_calling"] is True
    tuned = client_for(simulator, model="qwen2.5-7b-instruct", model_info={"context_window": 32_768})
    messages = [user("hello there")]
    assert tuned.remaining_tokens(messages) == 32_768 - tuned.count_tokens(messages)


def test_function_call_content_is_typed() -> None:
    call = FunctionCall(id="c1", name="f", arguments="{}")
    message = AssistantMessage(content=[call], thought="calling f")
    assert message.content == [call]
