"""The limiter for one process (embedded mode, and models with no configured limit on a cluster):
GCRA and AIMD on the monotonic clock, no Redis."""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from config import ModelLimits
from workers.rate_limits.aimd import AimdCap, admits
from workers.rate_limits.gcra import GcraSchedule, clamp_tokens
from workers.rate_limits.limiter import (
    CallOutcome,
    LimitDecision,
    LimiterState,
    LimiterTuning,
    RateLimiter,
    Slot,
)

__all__ = ["LocalRateLimiter"]


@dataclass
class _LocalLimit:
    schedule: GcraSchedule = field(default_factory=GcraSchedule)
    cap: AimdCap = field(default_factory=AimdCap)
    leases: dict[str, float] = field(default_factory=dict)
    # No lease expires before this: until then a look at the state need not sweep every lease
    # (which it did on each acquire and release, O(calls in flight) each).
    soonest_expiry: float = math.inf


class LocalRateLimiter(RateLimiter):
    """The same algorithm as ``RedisRateLimiter`` for one process: no Redis, the monotonic clock."""

    def __init__(self, limits: Mapping[str, ModelLimits], tuning: LimiterTuning | None = None) -> None:
        super().__init__(limits, tuning)
        self._states: dict[tuple[str, str], _LocalLimit] = {}
        # Lease ids only need to be unique in this limiter: a counter, not uuid4 (whose urandom
        # call was most of an unlimited model's acquire, 3.6% of a worker's busy samples).
        self._lease_numbers = itertools.count(1)

    def _state_of(self, endpoint: str, model: str, now: float) -> _LocalLimit:
        state = self._states.setdefault((endpoint, model), _LocalLimit())
        if state.soonest_expiry <= now:
            state.leases = {lease: expiry for lease, expiry in state.leases.items() if expiry > now}
            state.soonest_expiry = min(state.leases.values(), default=math.inf)
        state.cap.expire(now)
        return state

    async def try_acquire(self, endpoint: str, model: str, *, estimated_tokens: int) -> LimitDecision:
        rpm, tpm, max_in_flight = self._paced_limits(model)
        now = time.monotonic()
        state = self._state_of(endpoint, model, now)
        if not admits(len(state.leases), state.cap.limit(max_in_flight)):
            return LimitDecision(False, self.tuning.poll_seconds)
        granted, wait = state.schedule.try_schedule(
            now,
            rpm=rpm,
            tpm=tpm,
            tokens=clamp_tokens(estimated_tokens, tpm),
            horizon=self.tuning.horizon_seconds,
        )
        if not granted:
            return LimitDecision(False, wait)
        lease_id = f"local-{next(self._lease_numbers)}"
        expiry = state.leases[lease_id] = now + wait + self.tuning.lease_seconds
        state.soonest_expiry = min(state.soonest_expiry, expiry)
        return LimitDecision(True, wait, lease_id)

    async def release(self, slot: Slot, *, outcome: CallOutcome, actual_tokens: int | None = None) -> None:
        _, tpm, max_in_flight = self._paced_limits(slot.model)
        now = time.monotonic()
        state = self._state_of(slot.endpoint, slot.model, now)
        in_flight = len(state.leases)
        state.leases.pop(slot.lease_id, None)
        state.schedule.correct_tokens(now, tpm=tpm, booked=slot.estimated_tokens, used=actual_tokens)
        tuning = self.tuning
        if outcome is CallOutcome.RATE_LIMITED:
            state.cap.on_rate_limited(
                now,
                in_flight=in_flight,
                max_in_flight=max_in_flight,
                factor=tuning.decrease_factor,
                cooldown=tuning.decrease_cooldown_seconds,
                recovery=tuning.recovery_seconds,
            )
        elif outcome is CallOutcome.SUCCEEDED:
            state.cap.on_success(max_in_flight=max_in_flight)
        self._wake(slot.endpoint, slot.model)

    async def state(self, endpoint: str, model: str) -> LimiterState:
        state = self._state_of(endpoint, model, time.monotonic())
        return LimiterState(len(state.leases), state.cap.cap)
