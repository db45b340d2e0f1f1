"""One limiter from two: configured models share the global one, the others stay in process."""

from __future__ import annotations

from workers.rate_limits.limiter import CallOutcome, LimitDecision, LimiterState, RateLimiter, Slot

__all__ = ["SplitRateLimiter"]


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
