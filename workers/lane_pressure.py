"""Batch work gives way to single calls.

A worker process's chunks and its interactive lane share the process (the GIL, its CPU) and the
machine's cores with the other processes, PostgreSQL and Redis. A full batch window keeps them all
busy, and a single call then waits its turn at each of them: tenant A's chat p99 was 4x its p99
alone while tenant B's 20,000-line batch ran (``bench/fairness.py``). So every call sent to the
lane marks ``lane:busy`` for ``LANE_BUSY_MS`` (in the same round trip as the call,
``workers.lane_transport``), and while the mark lives every chunk runner keeps no more than
``LaneBusy.window(in_flight)`` of its requests running, nothing claimed ahead (``workers.runner``): the batch
goes on, slower, until single calls stop coming. Any tenant's single calls slow every tenant's
batches this way, so the share kept is the operator's (``Settings.lane_busy_batch_share``; 1 turns
it off).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis
from redis.exceptions import RedisError

from workers.constants import lane_busy_key

__all__ = ["LANE_BUSY_MS", "READ_TIMEOUT_SECONDS", "LaneBusy"]

_logger = logging.getLogger(__name__)

# How long after a single call is sent batch work keeps giving way: longer than such a call takes
# (tens to hundreds of ms), so that a caller sending one after another keeps the lane clear.
LANE_BUSY_MS = 2000
# How often a process reads the mark: a chunk's refill asks every poll (50 ms).
_READ_EVERY_SECONDS = 0.1
# The longest one read may hold the chunk's event loop, and how long a failed read is not retried.
READ_TIMEOUT_SECONDS = 0.25
_RETRY_AFTER_FAILURE_SECONDS = 5.0


class LaneBusy:
    """Whether single calls were sent lately, read from the broker at most every
    ``_READ_EVERY_SECONDS``; a broker out of reach reads as not busy. While busy, a chunk's window
    is cut to ``batch_share`` of itself.

    The read is a synchronous command on the chunk's event loop (one small reply, every 100 ms at
    most), so its client is its own, with short socket timeouts: a broker that accepts and never
    answers blocks the loop for ``READ_TIMEOUT_SECONDS`` once, then is not asked again for
    ``_RETRY_AFTER_FAILURE_SECONDS``, instead of freezing every upstream call of the chunk while
    its leases, kept by another thread, stay alive."""

    def __init__(self, client: Any, key_prefix: str, batch_share: float) -> None:
        self.client = client
        self.batch_share = batch_share
        self._key = lane_busy_key(key_prefix)
        self._busy = False
        self._read_at = -_READ_EVERY_SECONDS
        self._next_read_at = 0.0

    @classmethod
    def from_url(cls, broker_url: str, key_prefix: str, batch_share: float) -> LaneBusy:
        client = redis.Redis.from_url(
            broker_url, socket_timeout=READ_TIMEOUT_SECONDS, socket_connect_timeout=READ_TIMEOUT_SECONDS
        )
        return cls(client, key_prefix, batch_share)

    def __call__(self) -> bool:
        now = time.monotonic()
        if now >= self._next_read_at:
            self._next_read_at = now + _READ_EVERY_SECONDS
            try:
                self._busy = bool(self.client.exists(self._key))
            except (RedisError, OSError):
                _logger.warning("could not read whether the lane is busy", exc_info=True)
                self._busy = False
                self._next_read_at = time.monotonic() + _RETRY_AFTER_FAILURE_SECONDS
        return self._busy

    def window(self, in_flight: int) -> int:
        """The window a chunk keeps now: all of ``in_flight``, or its share while the lane is busy."""
        if self():
            return max(1, int(in_flight * self.batch_share))
        return in_flight
