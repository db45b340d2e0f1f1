"""Suites written for AutoGen's clients stub the provider by replacing the SDK's
``AsyncCompletions.create`` on the class; the clients must then ask the stub, not the network.

Every client here points at a port nobody listens on: a call that bypassed the stub would fail
with ``ProviderUnavailable`` (connection refused).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncGenerator
from typing import Any

import httpx2
import openai
import pytest
from openai.resources.chat.completions import AsyncCompletions
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessage
from openai.types.chat.chat_completion import Choice
from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice
from openai.types.chat.chat_completion_chunk import (
    ChoiceDelta,
    ChoiceDeltaToolCall,
    ChoiceDeltaToolCallFunction,
)
from openai.types.chat.chat_completion_message_function_tool_call import (
    ChatCompletionMessageFunctionToolCall,
    Function,
)
from openai.types.completion_usage import CompletionUsage

from models import (
    AzureOpenAIChatCompletionClient,
    CancellationToken,
    CreateResult,
    FunctionCall,
    LLMCall,
    LLMStreamEnd,
    OpenAIChatCompletionClient,
    ProviderUnavailable,
    RateLimited,
    RequestUsage,
    StreamInterrupted,
    ToolSchema,
    UserMessage,
)
from tests.models.event_capture import Captured

KEY = "sk-test-patched-create"
HELLO = [UserMessage(content="Hello", source="user")]
WEATHER: ToolSchema = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


def unreachable_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again before the call: nobody listens there
    return f"http://127.0.0.1:{port}"


def completion(message: ChatCompletionMessage, finish_reason: Any = "stop") -> ChatCompletion:
    return ChatCompletion(
        id="cmpl-stub",
        choices=[Choice(finish_reason=finish_reason, index=0, message=message)],
        created=0,
        model="gpt-4o-2024-08-06",
        object="chat.completion",
        usage=CompletionUsage(prompt_tokens=11, completion_tokens=4, total_tokens=15),
    )


def chunk(delta: ChoiceDelta, finish_reason: Any = None) -> ChatCompletionChunk:
    return ChatCompletionChunk(
        id="chunk-stub",
        choices=[ChunkChoice(delta=delta, finish_reason=finish_reason, index=0)],
        created=0,
        model="gpt-4o-2024-08-06",
        object="chat.completion.chunk",
    )


def usage_chunk() -> ChatCompletionChunk:
    return ChatCompletionChunk(
        id="chunk-stub",
        choices=[],
        created=0,
        model="gpt-4o-2024-08-06",
        object="chat.completion.chunk",
        usage=CompletionUsage(prompt_tokens=9, completion_tokens=3, total_tokens=12),
    )


class StubCreate:
    """Stands in for ``AsyncCompletions.create``: records each call's keyword arguments and
    answers a completion, or the chunks as an async generator when ``stream=True``."""

    def __init__(
        self,
        answer: ChatCompletion | None = None,
        chunks: list[ChatCompletionChunk] | None = None,
        error: Exception | None = None,
    ) -> None:
        self.answer = answer
        self.chunks = chunks or []
        self.error = error
        self.calls: list[dict[str, Any]] = []

    async def __call__(
        self, *args: Any, **kwargs: Any
    ) -> ChatCompletion | AsyncGenerator[ChatCompletionChunk, None]:
        self.calls.append(kwargs)
        if self.error is not None:
            raise self.error
        if kwargs.get("stream"):
            return self._stream()
        assert self.answer is not None
        return self.answer

    async def _stream(self) -> AsyncGenerator[ChatCompletionChunk, None]:
        for item in self.chunks:
            yield item


def patch_create(monkeypatch: pytest.MonkeyPatch, stub: StubCreate) -> None:
    # A plain function on the class, as such suites write it (it receives the resource as self).
    async def create(*args: Any, **kwargs: Any) -> Any:
        return await stub(*args, **kwargs)

    monkeypatch.setattr(AsyncCompletions, "create", create)


def rate_limit_error() -> openai.RateLimitError:
    request = httpx2.Request("POST", "https://api.openai.com/v1/chat/completions")
    response = httpx2.Response(429, request=request, headers={"retry-after": "2"})
    return openai.RateLimitError(
        "Rate limit reached",
        response=response,
        body={"message": "Rate limit reached", "code": "rate_limit_exceeded"},
    )


def connection_error() -> openai.APIConnectionError:
    return openai.APIConnectionError(
        request=httpx2.Request("POST", "https://api.openai.com/v1/chat/completions")
    )


async def collect(stream: AsyncGenerator[str | CreateResult, None]) -> tuple[list[str], CreateResult]:
    texts: list[str] = []
    result: CreateResult | None = None
    async for item in stream:
        if isinstance(item, str):
            texts.append(item)
        else:
            result = item
    assert result is not None
    return texts, result


async def test_create_answers_from_the_stub(monkeypatch: pytest.MonkeyPatch, events: Captured) -> None:
    stub = StubCreate(answer=completion(ChatCompletionMessage(content="Hello back", role="assistant")))
    patch_create(monkeypatch, stub)
    client = OpenAIChatCompletionClient(
        model="gpt-4o", api_key=KEY, base_url=unreachable_url(), temperature=0.5, top_k=3
    )
    result = await client.create(HELLO)
    await client.close()
    assert result.content == "Hello back"
    assert result.finish_reason == "stop"
    assert result.usage == RequestUsage(prompt_tokens=11, completion_tokens=4)
    assert result.response_id == "cmpl-stub"
    assert result.raw_response is not None
    assert result.raw_response["id"] == "cmpl-stub"
    assert client.actual_usage() == RequestUsage(prompt_tokens=11, completion_tokens=4)
    [call] = stub.calls
    assert call["model"] == "gpt-4o"
    assert call["messages"] == client.request_body(HELLO)["messages"]
    assert call["temperature"] == 0.5
    assert call["extra_body"] == {"top_k": 3}  # not a parameter of the SDK's create
    assert "stream" not in call
    [event] = [e for e in events.events if isinstance(e, LLMCall)]
    assert (event.prompt_tokens, event.completion_tokens, event.error) == (11, 4, None)


async def test_create_tool_calls_from_the_stub(monkeypatch: pytest.MonkeyPatch) -> None:
    message = ChatCompletionMessage(
        content=None,
        role="assistant",
        tool_calls=[
            ChatCompletionMessageFunctionToolCall(
                id="call_1",
                type="function",
                function=Function(name="get_weather", arguments='{"city": "Oslo"}'),
            )
        ],
    )
    stub = StubCreate(answer=completion(message, finish_reason="tool_calls"))
    patch_create(monkeypatch, stub)
    client = OpenAIChatCompletionClient(model="gpt-4o", api_key=KEY, base_url=unreachable_url())
    result = await client.create(HELLO, tools=[WEATHER])
    await client.close()
    assert result.finish_reason == "function_calls"
    assert result.content == [FunctionCall(id="call_1", name="get_weather", arguments='{"city": "Oslo"}')]
    assert stub.calls[0]["tools"][0]["function"]["name"] == "get_weather"


async def test_a_stub_set_as_a_bound_method_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    # Set as an object's bound method, the stub is called without the resource as self.
    stub = StubCreate(answer=completion(ChatCompletionMessage(content="bound", role="assistant")))
    monkeypatch.setattr(AsyncCompletions, "create", stub.__call__)
    client = OpenAIChatCompletionClient(model="gpt-4o", api_key=KEY, base_url=unreachable_url())
    result = await client.create(HELLO)
    await client.close()
    assert result.content == "bound"


async def test_azure_create_answers_from_the_stub(monkeypatch: pytest.MonkeyPatch) -> None:
    stub = StubCreate(answer=completion(ChatCompletionMessage(content="from azure", role="assistant")))
    patch_create(monkeypatch, stub)
    client = AzureOpenAIChatCompletionClient(
        model="gpt-4o",
        azure_endpoint=unreachable_url(),
        azure_deployment="gpt-4o-1",
        api_version="2024-06-01",
        api_key=KEY,
    )
    result = await client.create(HELLO)
    await client.close()
    assert result.content == "from azure"
    assert client.actual_usage() == RequestUsage(prompt_tokens=11, completion_tokens=4)


async def test_create_stream_content_and_usage_from_the_stub(
    monkeypatch: pytest.MonkeyPatch, events: Captured
) -> None:
    stub = StubCreate(
        chunks=[
            chunk(ChoiceDelta(content="Hello", role="assistant")),
            chunk(ChoiceDelta(content=" there")),
            chunk(ChoiceDelta(content=None), finish_reason="stop"),
            usage_chunk(),
        ]
    )
    patch_create(monkeypatch, stub)
    client = OpenAIChatCompletionClient(model="gpt-4o", api_key=KEY, base_url=unreachable_url())
    texts, result = await collect(client.create_stream(HELLO, include_usage=True))
    await client.close()
    assert texts == ["Hello", " there"]
    assert result.content == "Hello there"
    assert result.finish_reason == "stop"
    assert result.usage == RequestUsage(prompt_tokens=9, completion_tokens=3)
    assert client.actual_usage() == RequestUsage(prompt_tokens=9, completion_tokens=3)
    [call] = stub.calls
    assert call["stream"] is True
    assert call["stream_options"] == {"include_usage": True}
    [end] = [e for e in events.events if isinstance(e, LLMStreamEnd)]
    assert (end.prompt_tokens, end.completion_tokens, end.chunks, end.error) == (9, 3, 4, None)


async def test_create_stream_tool_calls_from_the_stub(monkeypatch: pytest.MonkeyPatch) -> None:
    def call_delta(**kwargs: Any) -> ChoiceDelta:
        return ChoiceDelta(tool_calls=[ChoiceDeltaToolCall(index=0, **kwargs)])

    stub = StubCreate(
        chunks=[
            chunk(
                call_delta(
                    id="call_7", type="function", function=ChoiceDeltaToolCallFunction(name="get_weather")
                )
            ),
            chunk(call_delta(function=ChoiceDeltaToolCallFunction(arguments='{"city": '))),
            chunk(call_delta(function=ChoiceDeltaToolCallFunction(arguments='"Oslo"}'))),
            chunk(ChoiceDelta(), finish_reason="tool_calls"),
        ]
    )
    patch_create(monkeypatch, stub)
    client = OpenAIChatCompletionClient(model="gpt-4o", api_key=KEY, base_url=unreachable_url())
    texts, result = await collect(client.create_stream(HELLO, tools=[WEATHER]))
    await client.close()
    assert texts == []
    assert result.finish_reason == "function_calls"
    assert result.content == [FunctionCall(id="call_7", name="get_weather", arguments='{"city": "Oslo"}')]


async def test_create_maps_a_stubbed_rate_limit(monkeypatch: pytest.MonkeyPatch, events: Captured) -> None:
    patch_create(monkeypatch, StubCreate(error=rate_limit_error()))
    client = OpenAIChatCompletionClient(model="gpt-4o", api_key=KEY, base_url=unreachable_url())
    with pytest.raises(RateLimited) as caught:
        await client.create(HELLO)
    await client.close()
    assert caught.value.status_code == 429
    assert caught.value.retryable
    assert isinstance(caught.value.__cause__, openai.RateLimitError)
    [event] = [e for e in events.events if isinstance(e, LLMCall)]
    assert event.status_code == 429
    assert event.error is not None


async def test_create_maps_a_stubbed_connection_error(monkeypatch: pytest.MonkeyPatch) -> None:
    patch_create(monkeypatch, StubCreate(error=connection_error()))
    client = OpenAIChatCompletionClient(model="gpt-4o", api_key=KEY, base_url=unreachable_url())
    with pytest.raises(ProviderUnavailable) as caught:
        await client.create(HELLO)
    await client.close()
    assert isinstance(caught.value.__cause__, openai.APIConnectionError)


async def test_create_stream_maps_a_stubbed_rate_limit(
    monkeypatch: pytest.MonkeyPatch, events: Captured
) -> None:
    patch_create(monkeypatch, StubCreate(error=rate_limit_error()))
    client = OpenAIChatCompletionClient(model="gpt-4o", api_key=KEY, base_url=unreachable_url())
    with pytest.raises(RateLimited) as caught:
        await collect(client.create_stream(HELLO))
    await client.close()
    assert caught.value.status_code == 429
    [end] = [e for e in events.events if isinstance(e, LLMStreamEnd)]
    assert end.status_code == 429


async def test_create_stream_maps_a_stubbed_connection_error(monkeypatch: pytest.MonkeyPatch) -> None:
    stub = StubCreate(error=connection_error())
    patch_create(monkeypatch, stub)
    client = OpenAIChatCompletionClient(model="gpt-4o", api_key=KEY, base_url=unreachable_url())
    with pytest.raises(ProviderUnavailable) as caught:
        await collect(client.create_stream(HELLO))
    await client.close()
    assert len(stub.calls) == 1  # the stub's error, not the unreachable port's
    assert caught.value.status_code is None


async def test_a_stub_stream_breaking_midway_is_interrupted(monkeypatch: pytest.MonkeyPatch) -> None:
    async def breaking(*args: Any, **kwargs: Any) -> AsyncGenerator[ChatCompletionChunk, None]:
        async def chunks() -> AsyncGenerator[ChatCompletionChunk, None]:
            yield chunk(ChoiceDelta(content="Hel"))
            raise connection_error()

        return chunks()

    monkeypatch.setattr(AsyncCompletions, "create", breaking)
    client = OpenAIChatCompletionClient(model="gpt-4o", api_key=KEY, base_url=unreachable_url())
    stream = client.create_stream(HELLO)
    assert await anext(stream) == "Hel"
    with pytest.raises(StreamInterrupted):
        await anext(stream)
    await client.close()


async def test_a_cancelled_stub_stream_stops_and_closes_the_stub(monkeypatch: pytest.MonkeyPatch) -> None:
    closed: list[bool] = []

    async def endless(*args: Any, **kwargs: Any) -> AsyncGenerator[ChatCompletionChunk, None]:
        async def chunks() -> AsyncGenerator[ChatCompletionChunk, None]:
            try:
                while True:
                    yield chunk(ChoiceDelta(content="more"))
            finally:
                closed.append(True)

        return chunks()

    monkeypatch.setattr(AsyncCompletions, "create", endless)
    client = OpenAIChatCompletionClient(model="gpt-4o", api_key=KEY, base_url=unreachable_url())
    token = CancellationToken()
    stream = client.create_stream(HELLO, cancellation_token=token)
    assert await anext(stream) == "more"
    token.cancel()
    with pytest.raises(asyncio.CancelledError):
        await anext(stream)
    await client.close()
    assert closed == [True]


async def test_create_cancelled_before_the_stub_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    stub = StubCreate(answer=completion(ChatCompletionMessage(content="late", role="assistant")))
    patch_create(monkeypatch, stub)
    client = OpenAIChatCompletionClient(model="gpt-4o", api_key=KEY, base_url=unreachable_url())
    token = CancellationToken()
    token.cancel()
    with pytest.raises(asyncio.CancelledError):
        await client.create(HELLO, cancellation_token=token)
    await client.close()
    assert stub.calls == []
