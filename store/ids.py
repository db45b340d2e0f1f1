"""OpenAI-like string ids (the clock: ``store.clock``)."""

from __future__ import annotations

import secrets
import threading
import time

__all__ = ["new_id"]

_RANDOM_BITS = 80
_lock = threading.Lock()
_last = (0, 0)  # (milliseconds, random part) of the last id this process made


def new_id(prefix: str) -> str:
    """``prefix`` + 32 hex digits, e.g. ``new_id("batch_")`` -> ``batch_019a...``: 12 of the
    milliseconds since the epoch, then 80 random bits. Time first, so that lists ordered
    (created_at, id) newest first are right within a second too (two batches created in the same
    second used to list in random order); within one millisecond, a process's ids still increase
    (the random part of the next is above the last one's, as ULIDs do: two batches of a fast
    SQLite ingest listed in random order)."""
    global _last
    with _lock:
        milliseconds = time.time_ns() // 1_000_000
        random_part = secrets.randbits(_RANDOM_BITS)
        last_milliseconds, last_random = _last
        if milliseconds <= last_milliseconds:
            # The same millisecond (or a clock stepped back): after the last id, by a random step.
            milliseconds = last_milliseconds
            random_part = last_random + 1 + (random_part >> 40)
            if random_part >= 1 << _RANDOM_BITS:  # the millisecond is spent: borrow the next
                milliseconds, random_part = milliseconds + 1, random_part & ((1 << 40) - 1)
        _last = (milliseconds, random_part)
    return f"{prefix}{milliseconds:012x}{random_part:020x}"
