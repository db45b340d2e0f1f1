"""RetryPolicy: backoff bounds, Retry-After, permanent errors, honest attempt counts."""

from __future__ import annotations

import asyncio
import logging
import random
import time

import pytest

from models import (
    EVENT_LOGGER_NAME,
    BadRequest,
    CreateResult,
    LLMCall,
    ModelClientError,
    OpenAIChatCompletionClient,
    ProviderUnavailable,
    QuotaExceeded,
    RateLimited,
    Retry,
    RetryPolicy,
    UserMessage,
)
from models.cancellation import CancellationToken
from models.retry import sleep_unless_cancelled
from simulator import SimulatorServer

KEY = "sk-test-retry-key"


def test_backoff_stays_within_full_jitter_bounds() -> None:
    policy = RetryPolicy(max_attempts=8, base_delay=0.5, max_delay=4.0, rng=random.Random(1))
    error = ProviderUnavailable("down")
    for attempt in range(1, 8):
        ceiling = min(4.0, 0.5 * 2 ** (attempt - 1))
        assert policy.backoff_ceiling(attempt) == ceiling
        draws = [policy.next_delay(attempt, error) for _ in range(200)]
        assert all(d is not None and 0.0 <= d <= ceiling for d in draws)
        assert max(d for d in draws if d is not None) > ceiling / 2, "jitter spreads over the range"
    assert policy.next_delay(8, error) is None, "attempts run out"
    assert len(list(policy.delays())) == 7


def test_retry_after_is_a_floor_and_permanent_errors_stop() -> None:
    policy = RetryPolicy(base_delay=0.1, max_delay=0.2, max_retry_after=60, rng=random.Random(2))
    assert policy.next_delay(1, RateLimited("busy", retry_after=5.0)) == 5.0
    assert policy.next_delay(1, RateLimited("busy", retry_after=600.0)) is None, "too long to hold a slot"
    assert policy.next_delay(1, BadRequest("bad")) is None
    assert policy.next_delay(1, ValueError("not ours")) is None
    assert policy.next_delay(1, BadRequest("odd", retryable=True)) is not None


async def test_call_retries_until_success_and_emits_retry_events(caplog: pytest.LogCaptureFixture) -> None:
    waits: list[float] = []
    seen: list[int] = []

    async def record_sleep(delay: float) -> None:
        waits.append(delay)

    failures = [ProviderUnavailable("down"), RateLimited("busy", retry_after=1.5)]

    async def flaky() -> str:
        if failures:
            raise failures.pop(0)
        return "ok"

    policy = RetryPolicy(base_delay=0.01, max_delay=0.02)
    with caplog.at_level(logging.INFO, logger=EVENT_LOGGER_NAME):
        result = await policy.call(
            flaky, on_retry=lambda attempt, delay, error: seen.append(attempt), model="m", sleep=record_sleep
        )
    assert result == "ok"
    assert seen == [1, 2]
    assert waits[0] <= 0.01
    assert waits[1] == 1.5
    retries = [r.msg for r in caplog.records if isinstance(r.msg, Retry)]
    assert [(r.attempt, r.model, r.retry_after) for r in retries] == [(1, "m", None), (2, "m", 1.5)]


async def test_call_raises_permanent_error_at_once() -> None:
    calls = 0

    async def bad() -> None:
        nonlocal calls
        calls += 1
        raise BadRequest("no")

    with pytest.raises(BadRequest):
        await RetryPolicy().call(bad)
    assert calls == 1


async def test_client_counts_every_upstream_attempt(
    simulator: SimulatorServer, caplog: pytest.LogCaptureFixture
) -> None:
    policy = RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.02)
    client = OpenAIChatCompletionClient(
        model="gpt-4o", api_key=KEY, base_url=simulator.base_url, retry_policy=policy
    )
    with caplog.at_level(logging.INFO, logger=EVENT_LOGGER_NAME), pytest.raises(ProviderUnavailable):
        await client.create([UserMessage(content="[[status 503]]", source="user")])
    assert simulator.stats()["requests"] == 3, "one request per attempt, none hidden"
    attempts = [r.msg.attempt for r in caplog.records if isinstance(r.msg, LLMCall)]
    assert attempts == [1, 2, 3]

    simulator.reset()
    with pytest.raises(BadRequest):
        await client.create([UserMessage(content="[[status 400]]", source="user")])
    assert simulator.stats()["requests"] == 1, "a permanent error is not retried"
    await client.close()


async def test_client_recovers_from_injected_429s(simulator: SimulatorServer) -> None:
    simulator.configure(rate_429=0.5, retry_after_s=0.0, seed=3)
    policy = RetryPolicy(max_attempts=10, base_delay=0.001, max_delay=0.005)
    client = OpenAIChatCompletionClient(
        model="gpt-4o", api_key=KEY, base_url=simulator.base_url, retry_policy=policy
    )
    results: list[CreateResult] = []
    for index in range(10):
        try:
            results.append(await client.create([UserMessage(content=f"q{index}", source="user")]))
        except ModelClientError as e:  # pragma: no cover - would mean 10 429s in a row
            pytest.fail(f"gave up: {e}")
    await client.close()
    stats = simulator.stats()
    assert len(results) == 10
    assert stats["requests"] > 10, "some attempts were refused and retried"
    assert stats["by_status"].get("429", 0) == stats["requests"] - 10


def test_with_hand_back_rate_limits_are_bounded_by_time_not_by_a_count() -> None:
    """A worker's policy retries 429s whatever their count and Retry-After (the caller hands the
    call back past ``hand_back_after``); other retryable errors still stop after max_attempts."""
    policy = RetryPolicy(max_attempts=3, base_delay=0.1, max_delay=0.2, hand_back_after=30.0)
    storm = RateLimited("busy", retry_after=2.0)
    assert policy.next_delay(50, storm) == 2.0, "a storm does not use the attempts up"
    assert policy.next_delay(1, RateLimited("busy", retry_after=900.0)) == 900.0, "the caller hands it back"
    down = ProviderUnavailable("down")
    assert policy.next_delay(50, down, counted=2) is not None, "only counted failures count"
    assert policy.next_delay(3, down, counted=3) is None
    assert policy.next_delay(1, QuotaExceeded("no credit")) is None, "an empty account is not a storm"
    assert policy.next_delay(1, BadRequest("bad")) is None
    # Without hand_back_after the policy is the count-bound one.
    assert RetryPolicy(max_attempts=3).next_delay(3, storm) is None


async def test_a_cancel_ends_a_retry_wait_at_once() -> None:
    token = CancellationToken()
    asyncio.get_running_loop().call_later(0.1, token.cancel)
    started = time.monotonic()
    with pytest.raises(asyncio.CancelledError):
        await sleep_unless_cancelled(30.0, token)
    assert time.monotonic() - started < 2.0
    await sleep_unless_cancelled(0.01, CancellationToken())  # an uncancelled wait just ends
