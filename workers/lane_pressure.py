"""Batch work gives way to single calls.

A worker process's chunks and its interactive lane share the process (the GIL, its CPU) and the
machine's cores with the other processes, PostgreSQL and Redis. A full batch window keeps them all
busy, and a single call then waits its turn at each of them: tenant A's chat p99 was 4x its p99
alone while tenant B's 20,000-line batch ran (``bench/fairness.py``). So every call sent to the
lane marks ``lane:busy`` for ``LANE_BUSY_MS`` (in the same round trip as the call,
``workers.lane_transport``), and while the mark lives every chunk runner keeps no more than
``busy_window(in_flight)`` of its requests claimed or running (``workers.runner``): the batch
goes on, slower, until single calls stop coming.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from redis.exceptions import RedisError

from workers.constants import lane_busy_key

__all__ = ["LANE_BUSY_MS", "LaneBusy", "busy_window"]

_logger = logging.getLogger(__name__)

# How long after a single call is sent batch work keeps giving way: longer than such a call takes
# (tens to hundreds of ms), so that a caller sending one after another keeps the lane clear.
LANE_BUSY_MS = 2000
# How often a process reads the mark: a chunk's refill asks every poll (50 ms).
_READ_EVERY_SECONDS = 0.1
# While the lane is busy a chunk keeps 1/this of its window going.
BUSY_WINDOW_DIVISOR = 8


def busy_window(in_flight: int) -> int:
    return max(1, in_flight // BUSY_WINDOW_DIVISOR)


class LaneBusy:
    """Whether single calls were sent lately, read from ``client`` (a sync Redis client of the
    broker) at most every ``_READ_EVERY_SECONDS``; a broker out of reach reads as not busy."""

    def __init__(self, client: Any, key_prefix: str) -> None:
        self.client = client
        self._key = lane_busy_key(key_prefix)
        self._busy = False
        self._read_at = -_READ_EVERY_SECONDS

    def __call__(self) -> bool:
        now = time.monotonic()
        if now - self._read_at >= _READ_EVERY_SECONDS:
            self._read_at = now
            try:
                self._busy = bool(self.client.exists(self._key))
            except (RedisError, OSError):
                _logger.warning("could not read whether the lane is busy", exc_info=True)
                self._busy = False
        return self._busy
