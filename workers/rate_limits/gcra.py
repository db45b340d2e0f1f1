"""GCRA pacing for requests per minute and tokens per minute, as pure logic on one state.

Each limit is a token bucket kept as a "theoretical arrival time" (TAT): the moment the next call
may leave. A granted call is *scheduled* (told how long to sleep before calling), so successive
calls leave exactly ``60 / rpm`` seconds apart and nobody polls to find out when a slot frees.
Schedules are handed out at most ``horizon`` seconds ahead. Tokens are booked from an estimate and
corrected with the real usage afterwards: an excess is charged at once, a refund never reaches into
the past.

The Redis backend runs the same steps as Lua (``backends/redis.py``); this is the in-process one.
A limit of 0 means "no limit".
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["GcraSchedule", "clamp_tokens"]


def clamp_tokens(tokens: float, tpm: float) -> float:
    """No booking takes more than a minute of the tpm limit (callers clamp too: see
    ``RateLimiter.reservation``); negative estimates book nothing."""
    tokens = max(0.0, tokens)
    return min(tokens, tpm) if tpm else tokens


@dataclass
class GcraSchedule:
    """The two theoretical arrival times of one (endpoint, model), on the caller's clock."""

    tat_requests: float = 0.0
    tat_tokens: float = 0.0

    def try_schedule(
        self, now: float, *, rpm: float, tpm: float, tokens: float, horizon: float
    ) -> tuple[bool, float]:
        """Book one call needing ``tokens`` if it may leave within ``horizon`` seconds.

        Returns ``(True, seconds until it may leave)`` with the call booked, or ``(False, seconds
        until asking again can succeed)`` with nothing booked."""
        start = now
        if rpm:
            start = max(start, self.tat_requests)
        if tpm and tokens:
            start = max(start, self.tat_tokens)
        if start - now > horizon:
            return False, start - now - horizon
        if rpm:
            self.tat_requests = start + 60 / rpm
        if tpm and tokens:
            self.tat_tokens = start + tokens * 60 / tpm
        return True, start - now

    def correct_tokens(self, now: float, *, tpm: float, booked: int, used: int | None) -> None:
        """A call booked ``booked`` tokens and used ``used`` (None: unknown, nothing changes)."""
        if not tpm or used is None or used == booked:
            return
        if used > booked:
            self.tat_tokens = max(self.tat_tokens, now) + (used - booked) * 60 / tpm
        else:
            self.tat_tokens = max(now, self.tat_tokens - (booked - used) * 60 / tpm)
