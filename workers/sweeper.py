"""The sweep: find requests no message will run, and dispatch them again.

Each pass also ends the batches whose completion window has passed (``expired``). Completion
webhooks are delivered apart (``workers.webhooks``), so that no receiver can slow a sweep.

A request needs a new message when (see ``workers.dispatch`` for the markers):

* it is queued (and past ``not_before``) and never dispatched, ``grace`` seconds after creation
  (the producer died between commit and publish);
* it is queued, or running under an expired lease, and the marker of its last dispatch is gone
  (the broker was flushed or restarted empty; the chunk finished but handed it back);
* it is running under an expired lease and was last dispatched before that lease ran out (the
  worker holding it was killed: its message was consumed, no other one names it).

After a re-dispatch ``dispatched_at`` is later than the expired lease and the new marker lives,
so the next sweep leaves it alone. A duplicate message is harmless anyway: claims skip what is
finished or leased to a live worker. Sweeps from several ``tokenmill beat`` processes take turns
through a Redis lock.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from redis.exceptions import LockError
from sqlalchemy.engine import Engine

from store import expire_batches, requests_to_redispatch, unsettled_dispatch_ids
from workers.constants import sweep_lock_key
from workers.dispatch import MARKER_PENDING_SECONDS, Dispatcher

__all__ = ["SweepReport", "sweep", "sweep_forever"]

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepReport:
    checked_dispatches: int
    dead_dispatches: int
    redispatched: int
    skipped: bool = False  # another sweeper held the lock
    expired_batches: int = 0


def sweep(
    dispatcher: Dispatcher, *, grace_seconds: int = MARKER_PENDING_SECONDS, limit: int = 20_000
) -> SweepReport:
    """One pass; returns what it found and did."""
    engine: Engine = dispatcher.engine
    lock = dispatcher.redis_client.lock(sweep_lock_key(dispatcher.key_prefix), timeout=120)
    if not lock.acquire(blocking=False):
        return SweepReport(0, 0, 0, skipped=True)
    try:
        now = int(time.time())
        settled_before = now - grace_seconds
        dispatch_ids = unsettled_dispatch_ids(engine, now=now, settled_before=settled_before)
        live = dispatcher.live_dispatches(dispatch_ids)
        dead = [d for d in dispatch_ids if d not in live]
        rows = requests_to_redispatch(
            engine, now=now, settled_before=settled_before, dead_dispatch_ids=dead, limit=limit
        )
        by_batch: dict[str, list[str]] = {}
        for request_id, batch_id in rows:
            by_batch.setdefault(batch_id, []).append(request_id)
        for ids in by_batch.values():
            dispatcher.dispatch(ids)
        if rows:
            _logger.info("sweep: %d dispatch(es) lost, %d request(s) dispatched again", len(dead), len(rows))
        # Batches past their completion window end as expired.
        expired = expire_batches(engine, now=now)
        return SweepReport(len(dispatch_ids), len(dead), len(rows), False, len(expired))
    finally:
        with contextlib.suppress(LockError):
            lock.release()


def sweep_forever(
    dispatcher: Dispatcher,
    interval_seconds: float,
    *,
    grace_seconds: int = MARKER_PENDING_SECONDS,
    should_stop: Callable[[], bool] = lambda: False,
) -> None:
    """``tokenmill beat``: sweep every interval until ``should_stop``; a failed pass is logged and
    the next one tries again (the broker or the database may be restarting)."""
    while not should_stop():
        started = time.monotonic()
        try:
            sweep(dispatcher, grace_seconds=grace_seconds)
        except Exception:
            _logger.exception("sweep failed; retrying in %.1f s", interval_seconds)
        remaining = interval_seconds - (time.monotonic() - started)
        deadline = time.monotonic() + max(0.0, remaining)
        while not should_stop() and time.monotonic() < deadline:
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
