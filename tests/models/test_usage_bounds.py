"""A provider's answer with absurd token usage (the simulator's ``[[reasoning N]]``) was answered and
billed: the call ends once with the non-retryable ``InvalidProviderResponse``, over the own
transport, the SDK's and a stream alike, and the client's running usage stays as it was (it used
to raise a pydantic ValidationError, which the lane took for a crash and ran the call again)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from openai import DefaultAioHttpClient

from models import InvalidProviderResponse, OpenAIChatCompletionClient, RequestUsage, UserMessage
from models.openai.results import MAX_USAGE_TOKENS, USAGE_INVALID
from models.retry import RetryPolicy
from simulator import SimulatorServer

# 2^64-1: beyond any integer column; orjson reads its sum with the content tokens as a float.
HUGE = 2**64 - 1


def client_for(simulator: SimulatorServer, *, through_sdk: bool = False) -> OpenAIChatCompletionClient:
    # A retry policy that would retry anything retryable at once: none of it may apply here.
    return OpenAIChatCompletionClient(
        model="gpt-4o",
        api_key="sk-test-usage",
        base_url=simulator.base_url,
        http_client=DefaultAioHttpClient() if through_sdk else None,
        retry_policy=RetryPolicy(max_attempts=4, base_delay=0.0, max_delay=0.0),
    )


def user(text: str) -> UserMessage:
    return UserMessage(content=text, source="user")


async def overflowing_sum(simulator: SimulatorServer) -> int:
    """A reasoning count whose completion_tokens is exactly MAX_USAGE_TOKENS (each field fits),
    so only prompt + completion goes past it: measured on a probe call of as many digits."""
    client = client_for(simulator)
    try:
        probe = await client.create([user("hello [[reasoning 1000000000]]")])
    finally:
        await client.close()
    content_tokens = probe.usage.completion_tokens - probe.usage.reasoning_tokens
    assert probe.usage.prompt_tokens > 0
    simulator.reset()
    return MAX_USAGE_TOKENS - content_tokens


async def streamed(client: OpenAIChatCompletionClient, text: str) -> AsyncIterator[object]:
    async for item in client.create_stream([user(text)], include_usage=True):
        yield item


@pytest.mark.parametrize("through_sdk", [False, True], ids=["own-transport", "sdk"])
@pytest.mark.parametrize("case", ["2^64-1", "sum-past-int32"])
async def test_absurd_usage_fails_once_not_retryable(
    simulator: SimulatorServer, through_sdk: bool, case: str
) -> None:
    reasoning = HUGE if case == "2^64-1" else await overflowing_sum(simulator)
    client = client_for(simulator, through_sdk=through_sdk)
    try:
        sane = await client.create([user("hello")])
        with pytest.raises(InvalidProviderResponse) as caught:
            await client.create([user(f"hello [[reasoning {reasoning}]]")])
        # The running totals count the sane call only, and never raise.
        assert client.total_usage() == sane.usage
        assert client.actual_usage() == sane.usage
        again = await client.create([user("hello")])
        assert client.total_usage() == sane.usage + again.usage
    finally:
        await client.close()
    error = caught.value
    assert error.retryable is False
    assert error.code == USAGE_INVALID
    assert error.provider
    assert error.model == "gpt-4o"
    assert error.request_id, "the billed answer's id, to trace it upstream"
    if case == "2^64-1":
        assert "usage.completion_tokens" in error.message
    else:
        assert "adds up past" in error.message
    assert simulator.stats()["requests"] == 3, "one upstream call for the absurd answer, no retry"


async def test_absurd_usage_in_a_stream_fails_once(simulator: SimulatorServer) -> None:
    client = client_for(simulator)
    try:
        with pytest.raises(InvalidProviderResponse) as caught:
            async for _ in streamed(client, f"hello [[reasoning {HUGE}]]"):
                pass
        assert client.total_usage() == RequestUsage()
    finally:
        await client.close()
    assert caught.value.retryable is False
    assert caught.value.code == USAGE_INVALID
    assert simulator.stats()["requests"] == 1


async def test_sane_usage_is_untouched(simulator: SimulatorServer) -> None:
    client = client_for(simulator)
    try:
        result = await client.create([user("hello [[reasoning 1234567]]")])
    finally:
        await client.close()
    assert result.usage.reasoning_tokens == 1234567
    assert result.usage.completion_tokens > 1234567
    assert client.total_usage() == result.usage
