"""AIMD cap on calls in flight, as pure logic on one state.

The cap starts unset (only the configured ``max_in_flight``, if any, applies). A 429 multiplies it
by ``factor``, at most once per ``cooldown`` seconds since one overload answers many calls at once;
an unset cap starts from the number of calls then in flight. Every success adds ``1 / cap`` (one
slot per cap's worth of successes, as TCP does); reaching ``max_in_flight`` drops the cap, and so
does ``recovery`` seconds without a 429.

The Redis backend runs the same steps as Lua (``backends/redis.py``); this is the in-process one.
A ``max_in_flight`` of 0 means "none configured".
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["AimdCap", "admits"]


def admits(in_flight: int, limit: float | None) -> bool:
    """Whether one more call fits under ``limit`` (always at least one call)."""
    return limit is None or in_flight < max(1, int(limit))


@dataclass
class AimdCap:
    """The lowered cap of one (endpoint, model), on the caller's clock."""

    cap: float | None = None
    cap_until: float = 0.0
    decreased_at: float = float("-inf")

    def expire(self, now: float) -> None:
        """Drop a cap whose recovery time has passed."""
        if self.cap is not None and now >= self.cap_until:
            self._drop()

    def limit(self, max_in_flight: int) -> float | None:
        """The calls allowed in flight: the lower of the configured limit and the cap."""
        limit: float | None = max_in_flight or None
        if self.cap is not None and (limit is None or self.cap < limit):
            limit = self.cap
        return limit

    def on_rate_limited(
        self,
        now: float,
        *,
        in_flight: int,
        max_in_flight: int,
        factor: float,
        cooldown: float,
        recovery: float,
    ) -> None:
        if now - self.decreased_at < cooldown:
            return
        cap = self.cap
        if cap is None:
            cap = float(max(1, in_flight))
            if max_in_flight and max_in_flight < cap:
                cap = float(max_in_flight)
        self.cap = max(1.0, cap * factor)
        self.cap_until = now + recovery
        self.decreased_at = now

    def on_success(self, *, max_in_flight: int) -> None:
        if self.cap is None:
            return
        self.cap += 1 / self.cap
        if max_in_flight and self.cap >= max_in_flight:
            self._drop()

    def _drop(self) -> None:
        self.cap = None
        self.decreased_at = float("-inf")
