"""Retrying model calls: exponential backoff with full jitter that honours ``Retry-After``.

The SDK's own retries are off (``max_retries=0``) so every upstream attempt is one we count. A
caller either hands a call to ``RetryPolicy.call`` or runs its own loop with ``next_delay`` (the
worker does, to re-check leases and rate limits between attempts).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

from models.errors import ModelClientError, RateLimited
from models.events import Retry, emit

__all__ = ["RetryPolicy"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When and how long to wait before another attempt.

    Attempt ``n`` (1-based) that failed with a retryable error is followed by a wait drawn
    uniformly from ``[0, min(max_delay, base_delay * multiplier ** (n - 1))]`` ("full jitter", so
    many workers hit by the same 429 do not come back in step), raised to at least the error's
    ``retry_after``. A ``retry_after`` above ``max_retry_after`` is not waited out in-process: the
    error is raised so the caller can re-queue the work instead of holding a worker slot.
    """

    max_attempts: int = 6
    base_delay: float = 0.5
    max_delay: float = 60.0
    multiplier: float = 2.0
    max_retry_after: float = 600.0
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

    def should_retry(self, attempt: int, error: BaseException) -> bool:
        if not isinstance(error, ModelClientError) or not error.retryable:
            return False
        if attempt >= self.max_attempts:
            return False
        retry_after = error.retry_after if isinstance(error, RateLimited) else None
        return retry_after is None or retry_after <= self.max_retry_after

    def next_delay(self, attempt: int, error: BaseException) -> float | None:
        """Seconds to wait after failed attempt ``attempt`` (1-based), or None: do not retry."""
        if not self.should_retry(attempt, error):
            return None
        delay = self.rng.uniform(0.0, self.backoff_ceiling(attempt))
        retry_after = error.retry_after if isinstance(error, RateLimited) else None
        if retry_after is not None and retry_after > delay:
            delay = retry_after
        return delay

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
