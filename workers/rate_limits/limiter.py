"""The rate limiter's front: what every backend answers to, and the bounded wait around it.

``RateLimiter`` is what the model-call pipeline holds. A backend (``backends/redis.py``,
``backends/local.py``) answers ``try_acquire`` / ``release`` / ``state``; this module turns those
answers into ``acquire``: a denied caller asks again after at most ``recheck_seconds`` (sooner when
a call of this process gives tokens back), and after ``max_wait_seconds`` in all it gets
``RetryLater`` with the wait still ahead, to hand its request back to the queue instead of holding
a worker slot. A cancelled token ends any of these waits at once. ``reservation`` sizes the tokens
one call books (see the package's docstring).

Exceptions::

    LimiterError
     ├── LimiterUnavailable     the limiter's Redis did not answer
     └── RequestTooLarge        (also a ``BadRequest``) the prompt alone exceeds the tpm limit
"""

from __future__ import annotations

import asyncio
import enum
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass

from config import ModelLimits
from models.cancellation import CancellationToken
from models.errors import BadRequest
from models.openai import resolve_model_info
from models.retry import RetryLater, sleep_unless_cancelled, wait_or_cancel

__all__ = [
    "CallOutcome",
    "LimitDecision",
    "LimiterError",
    "LimiterState",
    "LimiterTuning",
    "LimiterUnavailable",
    "RateLimiter",
    "RequestTooLarge",
    "Slot",
]


class LimiterError(Exception):
    """Base of the limiter's errors."""


class LimiterUnavailable(LimiterError):
    """The Redis that holds the limits did not answer."""


class RequestTooLarge(LimiterError, BadRequest):
    """The request's prompt alone needs more tokens than the model's tokens-per-minute limit
    allows: it can never be admitted, so it fails (permanently) instead of waiting for ever."""

    def __init__(self, message: str, *, model: str) -> None:
        super().__init__(message, model=model, status_code=400, code=REQUEST_TOO_LARGE)


REQUEST_TOO_LARGE = "request_exceeds_token_limit"


class CallOutcome(enum.Enum):
    """How an upstream call ended, as far as the limiter cares."""

    SUCCEEDED = "succeeded"
    RATE_LIMITED = "rate_limited"
    FAILED = "failed"


@dataclass(frozen=True)
class LimiterTuning:
    """Knobs of the algorithm; the defaults suit a provider answering in 10 ms to 60 s."""

    horizon_seconds: float = 1.0
    # Pace at this fraction of rpm / tpm: a call scheduled on time can still leave late (a busy
    # event loop, a cold connection) and bunch with the next one at the provider's end.
    rate_headroom: float = 0.97
    lease_seconds: float = 120.0
    poll_seconds: float = 0.02
    decrease_factor: float = 0.5
    decrease_cooldown_seconds: float = 1.0
    recovery_seconds: float = 60.0
    # A denied caller asks again at least this often: a refund by another process is seen soon.
    recheck_seconds: float = 1.0
    # The longest ``acquire`` waits in all before raising ``RetryLater``.
    max_wait_seconds: float = 30.0


@dataclass(frozen=True)
class LimitDecision:
    """One answer. Granted: sleep ``wait_seconds`` then call, holding ``lease_id``. Denied: ask
    again after ``wait_seconds``."""

    granted: bool
    wait_seconds: float
    lease_id: str | None = None


@dataclass(frozen=True)
class Slot:
    """A granted call: give it back with ``RateLimiter.release``."""

    endpoint: str
    model: str
    lease_id: str
    estimated_tokens: int


@dataclass(frozen=True)
class LimiterState:
    """What the limiter holds now for one (endpoint, model); for progress views and tests."""

    in_flight: int
    cap: float | None


class RateLimiter(ABC):
    """Acquire before every upstream attempt (retries included); release after it."""

    def __init__(self, limits: Mapping[str, ModelLimits], tuning: LimiterTuning | None = None) -> None:
        self.limits = dict(limits)
        self.tuning = tuning or LimiterTuning()
        self._waiters: dict[tuple[str, str], set[asyncio.Future[None]]] = {}

    def limits_for(self, model: str) -> ModelLimits | None:
        return self.limits.get(model)

    def _paced_limits(self, model: str) -> tuple[float, float, int]:
        """``(rpm, tpm, max_in_flight)`` a backend enforces for ``model``, the rates at
        ``rate_headroom``; 0 is "no limit"."""
        limits = self.limits_for(model)
        if limits is None:
            return 0, 0, 0
        headroom = self.tuning.rate_headroom
        return (limits.rpm or 0) * headroom, (limits.tpm or 0) * headroom, limits.max_in_flight or 0

    @abstractmethod
    async def try_acquire(self, endpoint: str, model: str, *, estimated_tokens: int) -> LimitDecision: ...

    @abstractmethod
    async def release(self, slot: Slot, *, outcome: CallOutcome, actual_tokens: int | None = None) -> None:
        """Free the slot; ``actual_tokens`` corrects the reservation, the outcome drives AIMD."""

    @abstractmethod
    async def state(self, endpoint: str, model: str) -> LimiterState: ...

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections; the local limiter has none."""

    def reservation(self, model: str, *, prompt_tokens: int, completion_budget: int, choices: int = 1) -> int:
        """Tokens to reserve for one call of ``model``: the prompt plus its ``max_tokens`` clamped to
        the model's output limit, once per choice (``n``), and never more than the tpm limit itself
        (the excess a call really uses is charged at ``release``). 0 when the model has no tpm
        limit. Raises ``RequestTooLarge`` when the prompt alone exceeds the limit."""
        limits = self.limits_for(model)
        if limits is None or limits.tpm is None:
            return 0
        prompt = max(0, prompt_tokens)
        if prompt > limits.tpm:
            raise RequestTooLarge(
                f"the request needs about {prompt} prompt tokens, more than the {limits.tpm} tokens "
                f"per minute allowed for {model}: it can never be sent",
                model=model,
            )
        output_limit = limits.max_output_tokens or resolve_model_info(model)["context_window"]
        completion = min(max(0, completion_budget), output_limit) * max(1, choices)
        return min(prompt + completion, limits.tpm)

    async def acquire(
        self,
        endpoint: str,
        model: str,
        *,
        estimated_tokens: int,
        cancellation_token: CancellationToken | None = None,
        max_wait: float | None = None,
    ) -> Slot:
        """Wait until a call may go, then return its slot (the scheduled wait already slept).

        Waits at most ``max_wait`` (default ``tuning.max_wait_seconds``) in all, then raises
        ``RetryLater`` with the wait the limiter still announces; raises ``CancelledError`` as soon
        as ``cancellation_token`` fires."""
        budget = self.tuning.max_wait_seconds if max_wait is None else max_wait
        deadline = time.monotonic() + budget
        while True:
            if cancellation_token is not None and cancellation_token.is_cancelled():
                raise asyncio.CancelledError("cancelled while waiting for a rate-limit slot")
            decision = await self.try_acquire(endpoint, model, estimated_tokens=estimated_tokens)
            if decision.granted:
                assert decision.lease_id is not None
                slot = Slot(endpoint, model, decision.lease_id, estimated_tokens)
                if decision.wait_seconds > 0:
                    try:
                        await sleep_unless_cancelled(decision.wait_seconds, cancellation_token)
                    except BaseException:
                        await asyncio.shield(self.release(slot, outcome=CallOutcome.FAILED, actual_tokens=0))
                        raise
                return slot
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RetryLater(
                    decision.wait_seconds,
                    f"no rate-limit slot for {model} within {budget:.0f} s",
                )
            # Jitter so that waiters told the same time do not all come back at once; never longer
            # than recheck_seconds, so a refund (which moves the schedule back) is noticed.
            pause = min(decision.wait_seconds * (1.0 + random.random() * 0.25), self.tuning.recheck_seconds)
            await self._pause(endpoint, model, min(pause, remaining), cancellation_token)

    async def _pause(
        self, endpoint: str, model: str, seconds: float, cancellation_token: CancellationToken | None
    ) -> None:
        """Sleep ``seconds``, or less if a call of this process releases a slot of the same model."""
        woken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters = self._waiters.setdefault((endpoint, model), set())
        waiters.add(woken)
        try:
            if cancellation_token is None:
                await asyncio.wait({woken}, timeout=seconds)
            else:
                await wait_or_cancel(woken, seconds, cancellation_token)
        finally:
            waiters.discard(woken)
            woken.cancel()

    def _wake(self, endpoint: str, model: str) -> None:
        """A slot or tokens came back: let this process's waiters on the model ask again now."""
        for waiter in self._waiters.pop((endpoint, model), set()):
            if not waiter.done() and not waiter.get_loop().is_closed():
                waiter.set_result(None)
