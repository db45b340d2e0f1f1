"""A provider's answer with absurd token usage (the simulator's ``[[reasoning N]]``) was answered and
billed: the call ends once with the non-retryable ``InvalidProviderResponse``, over the own
transport, the SDK's and a stream alike, and the client's running usage stays as it was (it used
to raise a pydantic ValidationError, which the lane took for a crash and ran the call again)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from models import InvalidProviderResponse, OpenAIChatCompletionClient, RequestUsage
from models.openai.results import MAX_USAGE_TOKENS, USAGE_INVALID, usage_from_openai
from simulator import SimulatorServer
from tests.models.retry_ready import client_for, user

# 2^64-1: beyond any integer column; orjson reads its sum with the content tokens as a float.
HUGE = 2**64 - 1


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


@pytest.mark.parametrize(
    ("usage", "field"),
    [
        ({"prompt_tokens": -1}, "usage.prompt_tokens"),
        ({"prompt_tokens": True}, "usage.prompt_tokens"),
        ({"completion_tokens": "12"}, "usage.completion_tokens"),
        ({"completion_tokens": 1.5}, "usage.completion_tokens"),
        ({"completion_tokens": float("inf")}, "usage.completion_tokens"),
        ({"completion_tokens": MAX_USAGE_TOKENS + 1}, "usage.completion_tokens"),
        ({"prompt_tokens_details": {"cached_tokens": 2**63}}, "usage.prompt_tokens_details.cached_tokens"),
        (
            {"completion_tokens_details": {"reasoning_tokens": -5}},
            "usage.completion_tokens_details.reasoning_tokens",
        ),
        ({"prompt_tokens": MAX_USAGE_TOKENS, "completion_tokens": 1}, "adds up past"),
    ],
)
def test_usage_figures_the_ledger_cannot_hold_are_refused(usage: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidProviderResponse) as caught:
        usage_from_openai(usage)
    assert field in caught.value.message
    assert caught.value.retryable is False


def test_usage_at_the_bound_and_absent_fields_are_kept() -> None:
    assert usage_from_openai({"prompt_tokens": MAX_USAGE_TOKENS, "completion_tokens": None}) == RequestUsage(
        prompt_tokens=MAX_USAGE_TOKENS
    )
    assert usage_from_openai({"prompt_tokens": 12.0, "completion_tokens": 3}) == RequestUsage(
        prompt_tokens=12, completion_tokens=3
    )
    assert usage_from_openai(None) == RequestUsage()
