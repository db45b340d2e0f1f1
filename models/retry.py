"""Retrying model calls: exponential backoff with full jitter that honours ``Retry-After``.

The SDK's own retries are off (``max_retries=0``) so every upstream attempt is one we count. A
caller either hands a call to ``RetryPolicy.call`` or runs its own loop with ``next_delay`` (the
worker does, to re-check leases and rate limits between attempts).

A worker must not spend its slots waiting out a provider's overload: with ``hand_back_after`` set,
rate-limited calls are retried by time rather than by a count a storm would exhaust in seconds,
and a wait that would take a call past ``hand_back_after`` seconds in process raises ``RetryLater``
instead, so the caller puts the work back in line with that delay (its completion window, not an
attempt count, is then the bound).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TypeVar

from models.cancellation import CancellationToken
from models.errors import ModelClientError, ProviderUnavailable, QuotaExceeded, RateLimited
from models.events import Retry, emit

__all__ = [
    "RATE_LIMIT_DEADLINE",
    "RetryLater",
    "RetryPolicy",
    "is_rate_limited",
    "sleep_unless_cancelled",
    "wait_or_cancel",
]

T = TypeVar("T")

RATE_LIMIT_DEADLINE: ContextVar[float | None] = ContextVar("tokenmill_rate_limit_deadline", default=None)
"""When (epoch seconds) the calls made in this context stop retrying rate limits: the retry budget
of the request a worker runs (None: no budget, the completion window bounds it)."""


class RetryLater(Exception):
    """Not now: try the call again ``delay`` seconds from now, from the queue, without holding a
    worker slot meanwhile. ``error`` is the last refusal, if a provider's (None: our own limiter)."""

    def __init__(self, delay: float, reason: str, error: ModelClientError | None = None) -> None:
        super().__init__(f"retry in {delay:.1f} s: {reason}")
        self.delay = max(0.0, delay)
        self.reason = reason
        self.error = error
        self.attempts = 0  # upstream attempts made before it was raised (filled in by the caller)


def is_rate_limited(error: BaseException) -> bool:
    """A refusal for load (429) that waiting cures; an exhausted quota is not one."""
    return isinstance(error, RateLimited) and not isinstance(error, QuotaExceeded) and error.retryable


async def sleep_unless_cancelled(delay: float, token: CancellationToken | None) -> None:
    """Sleep ``delay`` seconds; raise ``CancelledError`` at once if ``token`` fires meanwhile (a
    plain sleep would outlive the cancel by the whole delay)."""
    if token is None:
        await asyncio.sleep(delay)
        return
    if token.is_cancelled():
        raise asyncio.CancelledError("cancelled before waiting")
    await wait_or_cancel(asyncio.get_running_loop().create_future(), delay, token)


async def wait_or_cancel(woken: asyncio.Future[None], delay: float, token: CancellationToken) -> None:
    """Wait up to ``delay`` seconds for ``woken``; raise ``CancelledError`` if ``token`` fired.
    The callback put on the token is taken off again, so waits do not pile up on it."""
    loop = woken.get_loop()

    def wake() -> None:
        if not woken.done():
            woken.set_result(None)

    def cancel() -> None:
        loop.call_soon_threadsafe(wake)

    token.add_callback(cancel)
    try:
        await asyncio.wait({woken}, timeout=delay)
    finally:
        token.remove_callback(cancel)
        woken.cancel()
    if token.is_cancelled():
        raise asyncio.CancelledError("cancelled while waiting")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When and how long to wait before another attempt.

    Attempt ``n`` (1-based) that failed with a retryable error is followed by a wait drawn
    uniformly from ``[0, min(max_delay, base_delay * multiplier ** (n - 1))]`` ("full jitter", so
    many workers hit by the same 429 do not come back in step), raised to at least the error's
    ``retry_after``. A ``retry_after`` above ``max_retry_after`` is not waited out in-process: the
    error is raised so the caller can re-queue the work instead of holding a worker slot.

    ``hand_back_after`` (seconds; None: off) turns on the worker's mode: rate-limited errors are
    retried whatever their count and whatever their ``retry_after`` (always honoured), and the
    caller hands a call back (``RetryLater``) rather than wait in process past that bound.
    Other retryable errors keep ``max_attempts``.
    """

    max_attempts: int = 6
    base_delay: float = 0.5
    max_delay: float = 60.0
    multiplier: float = 2.0
    max_retry_after: float = 600.0
    hand_back_after: float | None = None
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.base_delay < 0 or self.max_delay < 0 or self.multiplier < 1:
            raise ValueError("delays must be >= 0 and multiplier >= 1")

    def backoff_ceiling(self, attempt: int) -> float:
        """The largest jittered wait after failed attempt ``attempt`` (before ``retry_after``)."""
        # Cap the exponent so a huge attempt number cannot overflow a float.
        return min(self.max_delay, self.base_delay * self.multiplier ** min(attempt - 1, 64))

    def delays(self) -> Iterator[float]:
        """Jittered waits between attempts: ``max_attempts - 1`` of them."""
        for attempt in range(1, self.max_attempts):
            yield self.rng.uniform(0.0, self.backoff_ceiling(attempt))

    def should_retry(self, attempt: int, error: BaseException, *, counted: int | None = None) -> bool:
        """``counted``: the failures so far that count against ``max_attempts`` (default
        ``attempt``; a caller retrying rate limits by time leaves those out)."""
        if not isinstance(error, ModelClientError) or not error.retryable:
            return False
        if self.hand_back_after is not None and is_rate_limited(error):
            return True  # bounded by time: the caller hands it back past ``hand_back_after``
        if (attempt if counted is None else counted) >= self.max_attempts:
            return False
        retry_after = error.retry_after if isinstance(error, RateLimited) else None
        return retry_after is None or retry_after <= self.max_retry_after

    def next_delay(self, attempt: int, error: BaseException, *, counted: int | None = None) -> float | None:
        """Seconds to wait after failed attempt ``attempt`` (1-based), or None: do not retry."""
        if not self.should_retry(attempt, error, counted=counted):
            return None
        delay = self.rng.uniform(0.0, self.backoff_ceiling(attempt))
        retry_after = self._asked_wait(error)
        if retry_after is not None and retry_after > delay:
            delay = retry_after
        return delay

    def _asked_wait(self, error: BaseException) -> float | None:
        """The wait the provider asked for: a 429's Retry-After, or a 5xx's (a 503 "overloaded",
        which the SDK's own retries honour too), that one at most ``max_retry_after``."""
        if isinstance(error, RateLimited):
            return error.retry_after
        if isinstance(error, ProviderUnavailable) and error.retry_after is not None:
            return min(error.retry_after, self.max_retry_after)
        return None

    async def call(
        self,
        fn: Callable[[], Awaitable[T]],
        *,
        on_retry: Callable[[int, float, ModelClientError], None] | None = None,
        model: str | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> T:
        """Run ``fn`` until it succeeds, a permanent error occurs or attempts run out.

        ``on_retry(attempt, delay, error)`` is called before each wait, after the ``Retry`` event.
        The last error is raised unchanged.
        """
        attempt = 1
        while True:
            try:
                return await fn()
            except ModelClientError as error:
                delay = self.next_delay(attempt, error)
                if delay is None:
                    raise
                emit(
                    Retry(
                        model=model or error.model,
                        attempt=attempt,
                        delay_s=delay,
                        error=f"{type(error).__name__}: {error.message}",
                        retry_after=error.retry_after if isinstance(error, RateLimited) else None,
                    )
                )
                if on_retry is not None:
                    on_retry(attempt, delay, error)
                await sleep(delay)
                attempt += 1
