"""Global rate limits and concurrency caps per (endpoint, model).

Three limits guard each upstream call, all checked and taken in one atomic step:

* **requests per minute** and **tokens per minute**: GCRA (a token bucket kept as a "theoretical
  arrival time"). Each granted call is *scheduled*: the answer says how long to sleep before
  calling, so successive calls leave exactly ``60 / rpm`` seconds apart and nobody polls to find
  out when a slot frees. Schedules are handed out at most ``horizon`` seconds ahead; beyond that the
  answer is "ask again in N seconds". Tokens are reserved from an estimate when the call is granted
  and corrected with the real usage when it ends (``release``): an excess is charged at once, a
  refund never reaches into the past. A reservation is clamped (``reservation``): its completion
  part to the model's output limit, the whole to the tpm limit itself, so one request cannot book
  the schedule far ahead; a prompt alone larger than the limit can never go (``RequestTooLarge``).
* **in flight**: a lease per call in a sorted set scored by its expiry, so the slots of a killed
  worker come back after ``lease_seconds``. The cap is ``max_in_flight`` (none when the model has
  no entry) lowered by AIMD: a 429 multiplies it by ``decrease_factor`` (at most once per
  ``decrease_cooldown`` seconds, since one overload answers many calls at once), every success adds
  ``1 / cap`` (one slot per cap's worth of successes, as TCP does), and ``recovery_seconds`` after
  the last 429 the cap is dropped altogether. An unlimited model's first 429 starts the cap at the
  number of calls then in flight.

Waiting is bounded (``acquire``): a denied caller asks again after at most ``recheck_seconds``
(sooner when a call of this process gives tokens back), and after ``max_wait_seconds`` in all it
gets ``RetryLater`` with the wait still ahead, to hand its request back to the queue instead of
holding a worker slot. A cancelled token ends any of these waits at once.

``RedisRateLimiter`` runs each step as a Lua script with the Redis server's clock, so every worker
on every machine shares one state. ``LocalRateLimiter`` is the same algorithm in process, for the
embedded mode which has no Redis.

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
import uuid
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from models.cancellation import CancellationToken
from models.errors import BadRequest
from models.openai import resolve_model_info
from models.retry import RetryLater, sleep_unless_cancelled, wait_or_cancel
from workers.constants import DEFAULT_KEY_PREFIX, limit_key, limit_leases_key
from workers.settings import ModelLimits

__all__ = [
    "CallOutcome",
    "LimitDecision",
    "LimiterError",
    "LimiterState",
    "LimiterTuning",
    "LimiterUnavailable",
    "LocalRateLimiter",
    "RateLimiter",
    "RedisRateLimiter",
    "RequestTooLarge",
    "Slot",
    "SplitRateLimiter",
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


def _limit_args(limits: ModelLimits | None, headroom: float) -> tuple[float, float, int]:
    if limits is None:
        return 0, 0, 0
    return (limits.rpm or 0) * headroom, (limits.tpm or 0) * headroom, limits.max_in_flight or 0


class RateLimiter(ABC):
    """Acquire before every upstream attempt (retries included); release after it."""

    def __init__(self, limits: Mapping[str, ModelLimits], tuning: LimiterTuning | None = None) -> None:
        self.limits = dict(limits)
        self.tuning = tuning or LimiterTuning()
        self._waiters: dict[tuple[str, str], set[asyncio.Future[None]]] = {}

    def limits_for(self, model: str) -> ModelLimits | None:
        return self.limits.get(model)

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
        limit. Raises
        ``RequestTooLarge`` when the prompt alone exceeds the limit."""
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


# KEYS[1] state hash, KEYS[2] leases sorted set.
# ARGV: rpm, tpm, max_in_flight, tokens, lease_id, lease_seconds, horizon, poll
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rpm, tpm, max_in_flight = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tokens, lease_id, lease_seconds = tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6])
local horizon, poll = tonumber(ARGV[7]), tonumber(ARGV[8])
-- No reservation books more than a minute of the limit (callers clamp too: see reservation).
if tpm > 0 and tokens > tpm then tokens = tpm end

redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local s = redis.call('HMGET', KEYS[1], 'tat_r', 'tat_t', 'cap', 'cap_until')
local cap = tonumber(s[3])
if cap and now >= (tonumber(s[4]) or 0) then
  cap = nil
  redis.call('HDEL', KEYS[1], 'cap', 'cap_until', 'decreased_at')
end
local limit = nil
if max_in_flight > 0 then limit = max_in_flight end
if cap and (not limit or cap < limit) then limit = cap end
if limit and redis.call('ZCARD', KEYS[2]) >= math.max(1, math.floor(limit)) then
  return {0, string.format('%.6f', poll)}
end

local start = now
if rpm > 0 then start = math.max(start, tonumber(s[1]) or 0) end
if tpm > 0 and tokens > 0 then start = math.max(start, tonumber(s[2]) or 0) end
if start - now > horizon then
  return {0, string.format('%.6f', start - now - horizon)}
end
if rpm > 0 then redis.call('HSET', KEYS[1], 'tat_r', string.format('%.6f', start + 60 / rpm)) end
if tpm > 0 and tokens > 0 then
  redis.call('HSET', KEYS[1], 'tat_t', string.format('%.6f', start + tokens * 60 / tpm))
end
redis.call('ZADD', KEYS[2], start + lease_seconds, lease_id)
local ttl = math.ceil((horizon + lease_seconds) * 1000) + 60000
redis.call('PEXPIRE', KEYS[2], ttl)
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('PEXPIRE', KEYS[1], ttl) end
return {1, string.format('%.6f', start - now)}
"""

# KEYS[1] state hash, KEYS[2] leases sorted set.
# ARGV: lease_id, tpm, max_in_flight, estimated, actual (-1 = unknown), outcome,
#       decrease_factor, decrease_cooldown, recovery
_RELEASE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local lease_id, tpm, max_in_flight = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local estimated, actual, outcome = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
local factor, cooldown, recovery = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])

local in_flight = redis.call('ZCARD', KEYS[2])
redis.call('ZREM', KEYS[2], lease_id)
if tpm > 0 and actual >= 0 and actual ~= estimated then
  local tat = tonumber(redis.call('HGET', KEYS[1], 'tat_t')) or now
  if actual > estimated then
    tat = math.max(tat, now) + (actual - estimated) * 60 / tpm
  else
    tat = math.max(now, tat - (estimated - actual) * 60 / tpm)
  end
  redis.call('HSET', KEYS[1], 'tat_t', string.format('%.6f', tat))
end
local s = redis.call('HMGET', KEYS[1], 'cap', 'cap_until', 'decreased_at')
local cap = tonumber(s[1])
if cap and now >= (tonumber(s[2]) or 0) then cap = nil end
if outcome == 'rate_limited' then
  if now - (tonumber(s[3]) or 0) >= cooldown then
    if not cap then
      cap = math.max(1, in_flight)
      if max_in_flight > 0 and max_in_flight < cap then cap = max_in_flight end
    end
    cap = math.max(1, cap * factor)
    redis.call('HSET', KEYS[1], 'cap', string.format('%.6f', cap),
      'cap_until', string.format('%.6f', now + recovery), 'decreased_at', string.format('%.6f', now))
  end
elseif outcome == 'succeeded' and cap then
  cap = cap + 1 / cap
  if max_in_flight > 0 and cap >= max_in_flight then
    redis.call('HDEL', KEYS[1], 'cap', 'cap_until', 'decreased_at')
  else
    redis.call('HSET', KEYS[1], 'cap', string.format('%.6f', cap))
  end
end
redis.call('PEXPIRE', KEYS[1], math.ceil(recovery * 1000) + 120000)
return 1
"""

# KEYS[1] state hash, KEYS[2] leases sorted set -> {in_flight, cap or ''}
_STATE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local n = redis.call('ZCOUNT', KEYS[2], '(' .. now, '+inf')
local s = redis.call('HMGET', KEYS[1], 'cap', 'cap_until')
if s[1] and now < (tonumber(s[2]) or 0) then return {n, s[1]} end
return {n, ''}
"""


class RedisRateLimiter(RateLimiter):
    """The limiter shared by every worker: state in Redis, each step one Lua script.

    Holds a ``redis.asyncio`` client, which belongs to the event loop it was first used on:
    build one per loop (the chunk runner does).
    """

    def __init__(
        self,
        client: aioredis.Redis[Any],  # type: ignore[type-arg, unused-ignore]
        limits: Mapping[str, ModelLimits],
        *,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        tuning: LimiterTuning | None = None,
    ) -> None:
        super().__init__(limits, tuning)
        self.client = client
        self.key_prefix = key_prefix
        self._acquire = client.register_script(_ACQUIRE)
        self._release = client.register_script(_RELEASE)
        self._state = client.register_script(_STATE)

    @classmethod
    def from_url(
        cls,
        url: str,
        limits: Mapping[str, ModelLimits],
        *,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        tuning: LimiterTuning | None = None,
    ) -> RedisRateLimiter:
        return cls(aioredis.Redis.from_url(url), limits, key_prefix=key_prefix, tuning=tuning)

    def _keys(self, endpoint: str, model: str) -> list[str]:
        return [
            limit_key(self.key_prefix, endpoint, model),
            limit_leases_key(self.key_prefix, endpoint, model),
        ]

    async def _run(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        try:
            return await script(keys=keys, args=args)
        except (RedisError, OSError) as e:
            raise LimiterUnavailable(f"rate limiter Redis failed: {e}") from e

    async def try_acquire(self, endpoint: str, model: str, *, estimated_tokens: int) -> LimitDecision:
        rpm, tpm, max_in_flight = _limit_args(self.limits_for(model), self.tuning.rate_headroom)
        lease_id = uuid.uuid4().hex
        tuning = self.tuning
        granted, wait = await self._run(
            self._acquire,
            self._keys(endpoint, model),
            [
                rpm,
                tpm,
                max_in_flight,
                max(0, estimated_tokens),
                lease_id,
                tuning.lease_seconds,
                tuning.horizon_seconds,
                tuning.poll_seconds,
            ],
        )
        if int(granted) == 1:
            return LimitDecision(True, float(wait), lease_id)
        return LimitDecision(False, float(wait))

    async def release(self, slot: Slot, *, outcome: CallOutcome, actual_tokens: int | None = None) -> None:
        _, tpm, max_in_flight = _limit_args(self.limits_for(slot.model), self.tuning.rate_headroom)
        tuning = self.tuning
        await self._run(
            self._release,
            self._keys(slot.endpoint, slot.model),
            [
                slot.lease_id,
                tpm,
                max_in_flight,
                slot.estimated_tokens,
                -1 if actual_tokens is None else actual_tokens,
                outcome.value,
                tuning.decrease_factor,
                tuning.decrease_cooldown_seconds,
                tuning.recovery_seconds,
            ],
        )
        self._wake(slot.endpoint, slot.model)

    async def state(self, endpoint: str, model: str) -> LimiterState:
        in_flight, cap = await self._run(self._state, self._keys(endpoint, model), [])
        cap_text = cap.decode() if isinstance(cap, bytes) else str(cap)
        return LimiterState(int(in_flight), float(cap_text) if cap_text else None)

    async def close(self) -> None:
        await self.client.aclose()  # type: ignore[attr-defined, unused-ignore]


@dataclass
class _LocalLimit:
    tat_requests: float = 0.0
    tat_tokens: float = 0.0
    cap: float | None = None
    cap_until: float = 0.0
    decreased_at: float = float("-inf")
    leases: dict[str, float] = field(default_factory=dict)


class LocalRateLimiter(RateLimiter):
    """The same algorithm for one process (embedded mode): no Redis, the monotonic clock."""

    def __init__(self, limits: Mapping[str, ModelLimits], tuning: LimiterTuning | None = None) -> None:
        super().__init__(limits, tuning)
        self._states: dict[tuple[str, str], _LocalLimit] = {}

    def _state_of(self, endpoint: str, model: str, now: float) -> _LocalLimit:
        state = self._states.setdefault((endpoint, model), _LocalLimit())
        state.leases = {lease: expiry for lease, expiry in state.leases.items() if expiry > now}
        if state.cap is not None and now >= state.cap_until:
            state.cap = None
            state.decreased_at = float("-inf")
        return state

    async def try_acquire(self, endpoint: str, model: str, *, estimated_tokens: int) -> LimitDecision:
        rpm, tpm, max_in_flight = _limit_args(self.limits_for(model), self.tuning.rate_headroom)
        now = time.monotonic()
        state = self._state_of(endpoint, model, now)
        limit: float | None = max_in_flight or None
        if state.cap is not None and (limit is None or state.cap < limit):
            limit = state.cap
        if limit is not None and len(state.leases) >= max(1, int(limit)):
            return LimitDecision(False, self.tuning.poll_seconds)
        tokens: float = max(0, estimated_tokens)
        if tpm:
            tokens = min(tokens, tpm)  # no reservation books more than a minute of the limit
        start = now
        if rpm:
            start = max(start, state.tat_requests)
        if tpm and tokens:
            start = max(start, state.tat_tokens)
        if start - now > self.tuning.horizon_seconds:
            return LimitDecision(False, start - now - self.tuning.horizon_seconds)
        if rpm:
            state.tat_requests = start + 60 / rpm
        if tpm and tokens:
            state.tat_tokens = start + tokens * 60 / tpm
        lease_id = uuid.uuid4().hex
        state.leases[lease_id] = start + self.tuning.lease_seconds
        return LimitDecision(True, start - now, lease_id)

    async def release(self, slot: Slot, *, outcome: CallOutcome, actual_tokens: int | None = None) -> None:
        _, tpm, max_in_flight = _limit_args(self.limits_for(slot.model), self.tuning.rate_headroom)
        now = time.monotonic()
        state = self._state_of(slot.endpoint, slot.model, now)
        in_flight = len(state.leases)
        state.leases.pop(slot.lease_id, None)
        if tpm and actual_tokens is not None and actual_tokens != slot.estimated_tokens:
            if actual_tokens > slot.estimated_tokens:
                state.tat_tokens = (
                    max(state.tat_tokens, now) + (actual_tokens - slot.estimated_tokens) * 60 / tpm
                )
            else:
                refund = (slot.estimated_tokens - actual_tokens) * 60 / tpm
                state.tat_tokens = max(now, state.tat_tokens - refund)
        tuning = self.tuning
        if outcome is CallOutcome.RATE_LIMITED:
            if now - state.decreased_at >= tuning.decrease_cooldown_seconds:
                cap = state.cap
                if cap is None:
                    cap = float(max(1, in_flight))
                    if max_in_flight and max_in_flight < cap:
                        cap = float(max_in_flight)
                state.cap = max(1.0, cap * tuning.decrease_factor)
                state.cap_until = now + tuning.recovery_seconds
                state.decreased_at = now
        elif outcome is CallOutcome.SUCCEEDED and state.cap is not None:
            state.cap += 1 / state.cap
            if max_in_flight and state.cap >= max_in_flight:
                state.cap = None
                state.decreased_at = float("-inf")
        self._wake(slot.endpoint, slot.model)

    async def state(self, endpoint: str, model: str) -> LimiterState:
        state = self._state_of(endpoint, model, time.monotonic())
        return LimiterState(len(state.leases), state.cap)


class SplitRateLimiter(RateLimiter):
    """Models with configured limits go through ``shared`` (global, in Redis); the others through
    ``local``, one per process. An unconfigured model has no limit to share, and still backs off
    on the 429s each process sees, without two Redis round trips on every call."""

    def __init__(self, shared: RateLimiter, local: RateLimiter) -> None:
        super().__init__(shared.limits, shared.tuning)
        self.shared = shared
        self.local = local

    def _for(self, model: str) -> RateLimiter:
        return self.shared if self.limits_for(model) is not None else self.local

    async def try_acquire(self, endpoint: str, model: str, *, estimated_tokens: int) -> LimitDecision:
        return await self._for(model).try_acquire(endpoint, model, estimated_tokens=estimated_tokens)

    async def release(self, slot: Slot, *, outcome: CallOutcome, actual_tokens: int | None = None) -> None:
        await self._for(slot.model).release(slot, outcome=outcome, actual_tokens=actual_tokens)
        self._wake(slot.endpoint, slot.model)

    async def state(self, endpoint: str, model: str) -> LimiterState:
        return await self._for(model).state(endpoint, model)

    async def close(self) -> None:
        await self.shared.close()
