"""A provider's 2xx answer whose body arrived whole but cannot be read (the simulator's
``[[garbage]]``: its JSON cut in half, as ``application/json``) was answered, and billed: the call
ends once with the non-retryable ``InvalidProviderResponse`` (code ``upstream_response_invalid``),
over the own transport, the SDK's and a stream alike. It used to be the retryable
``ProviderUnavailable("malformed provider response")`` (a bare ``JSONDecodeError`` in a stream),
so every retry paid the provider again. A connection cut mid-body is no answer: still retryable."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from http.server import BaseHTTPRequestHandler
from typing import Any

import httpx2
import openai
import pytest

from models import (
    InvalidProviderResponse,
    ModelClientError,
    OpenAIChatCompletionClient,
    ProviderUnavailable,
    RequestUsage,
    StreamInterrupted,
)
from models.openai.errors import from_openai_error
from models.openai.results import RESPONSE_INVALID
from simulator import SimulatorServer
from tests.models.local_http import serving
from tests.models.retry_ready import client_for, user
from tests.models.test_answer_shape import BAD_CHUNKS
from tests.models.test_answer_shape import chunk as shape_chunk


@asynccontextmanager
async def opened(client: OpenAIChatCompletionClient) -> AsyncIterator[OpenAIChatCompletionClient]:
    try:
        yield client
    finally:
        await client.close()


async def stream_failure(
    client: OpenAIChatCompletionClient,
    text: str,
    expected: type[ModelClientError] = InvalidProviderResponse,
    *,
    include_usage: bool = False,
) -> Any:
    """The ``expected`` error a stream of ``text`` ends in; nothing of it counted in the usage."""
    before = client.total_usage()
    with pytest.raises(expected) as caught:
        async for _ in client.create_stream([user(text)], include_usage=include_usage):
            pass
    assert client.total_usage() == before, "nothing counted for the failed stream"
    return caught.value


def assert_billed_once(error: ModelClientError) -> None:
    """The error of an answer already billed: not retryable, coded ``upstream_response_invalid``."""
    assert type(error) is InvalidProviderResponse
    assert error.retryable is False
    assert error.code == RESPONSE_INVALID


@pytest.mark.parametrize("through_sdk", [False, True], ids=["own-transport", "sdk"])
async def test_an_unreadable_2xx_fails_once_not_retryable(
    simulator: SimulatorServer, through_sdk: bool
) -> None:
    async with opened(client_for(simulator, through_sdk=through_sdk)) as client:
        sane = await client.create([user("hello")])
        with pytest.raises(InvalidProviderResponse) as caught:
            await client.create([user("hello [[garbage]]")])
        assert client.total_usage() == sane.usage, "nothing counted for the unreadable answer"
    error = caught.value
    assert_billed_once(error)
    assert error.provider == "openai-compatible"
    assert error.model == "gpt-4o"
    assert (error.request_id or "").startswith("req_"), "the answer's id, to trace it upstream"
    assert simulator.stats()["requests"] == 2, "one upstream call for the unreadable answer, no retry"


async def test_an_unreadable_stream_fails_once_not_retryable(simulator: SimulatorServer) -> None:
    async with opened(client_for(simulator)) as client:
        error = await stream_failure(client, "hello [[garbage]]", include_usage=True)
        assert client.total_usage() == RequestUsage()
    assert_billed_once(error)
    assert error.model == "gpt-4o"
    assert (error.request_id or "").startswith("req_")
    assert simulator.stats()["requests"] == 1


async def test_a_stream_that_breaks_after_it_started_is_still_interrupted(simulator: SimulatorServer) -> None:
    async with opened(client_for(simulator)) as client:
        error = await stream_failure(client, "story [[words 100]] [[break_stream 3]]", StreamInterrupted)
    assert error.retryable


@pytest.mark.parametrize("through_sdk", [False, True], ids=["own-transport", "sdk"])
async def test_a_connection_cut_mid_body_is_retried(simulator: SimulatorServer, through_sdk: bool) -> None:
    """Headers sent, the body never complete: no answer was read, so asking again is right."""
    simulator.configure(rate_timeout=1.0, timeout_s=0.0)
    async with opened(client_for(simulator, through_sdk=through_sdk)) as client:
        with pytest.raises(ProviderUnavailable) as caught:
            await client.create([user("hello")])
    assert caught.value.retryable
    assert simulator.stats()["requests"] == 4, "retried by the policy, as before"


def test_the_sdks_response_validation_error_is_invalid_not_unavailable() -> None:
    """What the SDK raises for a 2xx it cannot validate maps as the own transport's reading does."""
    request = httpx2.Request("POST", "http://upstream.test/v1/chat/completions")
    response = httpx2.Response(200, headers={"x-request-id": "req-sdk"}, content=b"<html>", request=request)
    exc = openai.APIResponseValidationError(response=response, body="<html>", message="not a completion")
    error = from_openai_error(exc, provider="openai", model="gpt-4o")
    assert_billed_once(error)
    assert (error.provider, error.model, error.request_id) == ("openai", "gpt-4o", "req-sdk")
    assert "not a completion" in error.message


class _Plain:
    """A stream request answered 200 with a whole body that is no event stream."""

    def __init__(self) -> None:
        self.requests = 0
        self.reply = b"<html><body>Service temporarily available</body></html>"
        self.content_type = "text/html"


@pytest.fixture
def plain_server() -> Iterator[tuple[str, _Plain]]:
    state = _Plain()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length", "0")))
            state.requests += 1
            self.send_response(200)
            self.send_header("content-type", state.content_type)
            self.send_header("content-length", str(len(state.reply)))
            self.send_header("x-request-id", "req-plain")
            self.end_headers()
            self.wfile.write(state.reply)

        def log_message(self, format: str, *args: Any) -> None:
            return None

    with serving(Handler) as root:
        yield f"{root}/v1", state


def plain_client(base_url: str) -> OpenAIChatCompletionClient:
    return OpenAIChatCompletionClient(model="gpt-4o", api_key="sk-test-garbage", base_url=base_url)


@pytest.mark.parametrize(
    ("content_type", "reply"),
    [
        ("text/html", b"<html><body>Service temporarily available</body></html>"),
        ("application/json", b"not json"),
        ("application/json", json.dumps({"id": "chatcmpl-x", "object": "chat.completion"}).encode()),
    ],
    ids=["html", "no-json", "a-completion-not-a-stream"],
)
async def test_a_stream_answered_with_no_event_stream_fails_once(
    plain_server: tuple[str, _Plain], content_type: str, reply: bytes
) -> None:
    """No event at all, and not ``text/event-stream``: the 2xx answer cannot be read as a stream;
    it used to end as the retryable "stream ended after 0 chunks", asked again by a retry."""
    base_url, state = plain_server
    state.content_type, state.reply = content_type, reply
    async with opened(plain_client(base_url)) as client:
        error = await stream_failure(client, "hello")
    assert_billed_once(error)
    assert error.request_id == "req-plain"
    assert content_type in error.message
    assert state.requests == 1


async def test_an_event_stream_that_ends_empty_is_still_interrupted(plain_server: tuple[str, _Plain]) -> None:
    """An event stream with no chunk (just ``[DONE]``) is what it was: interrupted, retryable."""
    base_url, state = plain_server
    state.content_type, state.reply = "text/event-stream", b"data: [DONE]\n\n"
    async with opened(plain_client(base_url)) as client:
        error = await stream_failure(client, "hello", StreamInterrupted)
    assert error.retryable


def _event_stream(*chunks: Any) -> bytes:
    return b"".join(b"data: " + json.dumps(each).encode() + b"\n\n" for each in chunks) + b"data: [DONE]\n\n"


@pytest.mark.parametrize("name", list(BAD_CHUNKS))
async def test_a_stream_chunk_of_the_wrong_shape_fails_once(
    plain_server: tuple[str, _Plain], name: str
) -> None:
    """A chunk that is a JSON object of the wrong shape (``choices`` no list, ``delta`` a string,
    ...) after the stream started: the answer was billed, so ``InvalidProviderResponse`` naming the
    answer's id, not a bare exception (run again by the lane) nor a retryable interruption."""
    base_url, state = plain_server
    bad, where = BAD_CHUNKS[name]
    state.content_type = "text/event-stream"
    state.reply = _event_stream(
        shape_chunk({"role": "assistant", "content": "he"}), bad, shape_chunk(finish_reason="stop")
    )
    async with opened(plain_client(base_url)) as client:
        error = await stream_failure(client, "hello")
        assert client.total_usage() == RequestUsage()
    assert_billed_once(error)
    assert where in error.message
    assert (error.provider, error.model, error.request_id) == (
        "openai-compatible",
        "gpt-4o",
        "chatcmpl-stream",
    )
    assert state.requests == 1


@pytest.mark.parametrize("through_sdk", [False, True], ids=["own-transport", "sdk"])
async def test_a_wrong_shape_from_the_simulator_fails_once(
    simulator: SimulatorServer, through_sdk: bool
) -> None:
    """``[[garbage shape]]``: a whole JSON object whose ``choices[0].message`` is a string."""
    async with opened(client_for(simulator, through_sdk=through_sdk)) as client:
        with pytest.raises(InvalidProviderResponse) as caught:
            await client.create([user("hello [[garbage shape]]")])
        streamed = await stream_failure(client, "hello [[garbage shape]]")
        assert client.total_usage() == RequestUsage()
    for error in (caught.value, streamed):
        assert_billed_once(error)
        assert (error.request_id or "").startswith("chatcmpl-"), "the answer's id, to trace it upstream"
    assert "choices[0].message" in caught.value.message
    assert "choices[0].delta" in streamed.message
    assert simulator.stats()["requests"] == 2, "one upstream call each, no retry"
