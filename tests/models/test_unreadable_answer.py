"""A provider's 2xx answer whose body arrived whole but cannot be read (the simulator's
``[[garbage]]``: its JSON cut in half, as ``application/json``) was answered, and billed: the call
ends once with the non-retryable ``InvalidProviderResponse`` (code ``upstream_response_invalid``),
over the own transport, the SDK's and a stream alike. It used to be the retryable
``ProviderUnavailable("malformed provider response")`` (a bare ``JSONDecodeError`` in a stream),
so every retry paid the provider again. A connection cut mid-body is no answer: still retryable."""

from __future__ import annotations

import httpx2
import openai
import pytest
from openai import DefaultAioHttpClient

from models import (
    InvalidProviderResponse,
    OpenAIChatCompletionClient,
    ProviderUnavailable,
    RequestUsage,
    StreamInterrupted,
    UserMessage,
)
from models.openai.errors import from_openai_error
from models.openai.results import RESPONSE_INVALID
from models.retry import RetryPolicy
from simulator import SimulatorServer


def client_for(simulator: SimulatorServer, *, through_sdk: bool = False) -> OpenAIChatCompletionClient:
    # A retry policy that would retry anything retryable at once: none of it may apply here.
    return OpenAIChatCompletionClient(
        model="gpt-4o",
        api_key="sk-test-garbage",
        base_url=simulator.base_url,
        http_client=DefaultAioHttpClient() if through_sdk else None,
        retry_policy=RetryPolicy(max_attempts=4, base_delay=0.0, max_delay=0.0),
    )


def user(text: str) -> UserMessage:
    return UserMessage(content=text, source="user")


@pytest.mark.parametrize("through_sdk", [False, True], ids=["own-transport", "sdk"])
async def test_an_unreadable_2xx_fails_once_not_retryable(
    simulator: SimulatorServer, through_sdk: bool
) -> None:
    client = client_for(simulator, through_sdk=through_sdk)
    try:
        sane = await client.create([user("hello")])
        with pytest.raises(InvalidProviderResponse) as caught:
            await client.create([user("hello [[garbage]]")])
        assert client.total_usage() == sane.usage, "nothing counted for the unreadable answer"
    finally:
        await client.close()
    error = caught.value
    assert error.retryable is False
    assert error.code == RESPONSE_INVALID
    assert error.provider == "openai-compatible"
    assert error.model == "gpt-4o"
    assert (error.request_id or "").startswith("req_"), "the answer's id, to trace it upstream"
    assert simulator.stats()["requests"] == 2, "one upstream call for the unreadable answer, no retry"


async def test_an_unreadable_stream_fails_once_not_retryable(simulator: SimulatorServer) -> None:
    client = client_for(simulator)
    try:
        with pytest.raises(InvalidProviderResponse) as caught:
            async for _ in client.create_stream([user("hello [[garbage]]")], include_usage=True):
                pass
        assert client.total_usage() == RequestUsage()
    finally:
        await client.close()
    error = caught.value
    assert error.retryable is False
    assert error.code == RESPONSE_INVALID
    assert error.model == "gpt-4o"
    assert (error.request_id or "").startswith("req_")
    assert simulator.stats()["requests"] == 1


async def test_a_stream_that_breaks_after_it_started_is_still_interrupted(simulator: SimulatorServer) -> None:
    client = client_for(simulator)
    try:
        with pytest.raises(StreamInterrupted) as caught:
            async for _ in client.create_stream([user("story [[words 100]] [[break_stream 3]]")]):
                pass
    finally:
        await client.close()
    assert caught.value.retryable


@pytest.mark.parametrize("through_sdk", [False, True], ids=["own-transport", "sdk"])
async def test_a_connection_cut_mid_body_is_retried(simulator: SimulatorServer, through_sdk: bool) -> None:
    """Headers sent, the body never complete: no answer was read, so asking again is right."""
    simulator.configure(rate_timeout=1.0, timeout_s=0.0)
    client = client_for(simulator, through_sdk=through_sdk)
    try:
        with pytest.raises(ProviderUnavailable) as caught:
            await client.create([user("hello")])
    finally:
        await client.close()
    assert caught.value.retryable
    assert simulator.stats()["requests"] == 4, "retried by the policy, as before"


def test_the_sdks_response_validation_error_is_invalid_not_unavailable() -> None:
    """What the SDK raises for a 2xx it cannot validate maps as the own transport's reading does."""
    request = httpx2.Request("POST", "http://upstream.test/v1/chat/completions")
    response = httpx2.Response(200, headers={"x-request-id": "req-sdk"}, content=b"<html>", request=request)
    exc = openai.APIResponseValidationError(response=response, body="<html>", message="not a completion")
    error = from_openai_error(exc, provider="openai", model="gpt-4o")
    assert type(error) is InvalidProviderResponse
    assert error.retryable is False
    assert error.code == RESPONSE_INVALID
    assert (error.provider, error.model, error.request_id) == ("openai", "gpt-4o", "req-sdk")
    assert "not a completion" in error.message
