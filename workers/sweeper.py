"""The sweep: find requests no message will run, and dispatch them again.

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

import sqlalchemy as sa
from redis.exceptions import LockError
from sqlalchemy.engine import Engine

from store import Request, RequestStatus
from workers.dispatch import MARKER_PENDING_SECONDS, Dispatcher

__all__ = ["SweepReport", "sweep", "sweep_forever"]

_logger = logging.getLogger(__name__)

_SWEEP_LOCK = "sweep:lock"


@dataclass(frozen=True)
class SweepReport:
    checked_dispatches: int
    dead_dispatches: int
    redispatched: int
    skipped: bool = False  # another sweeper held the lock


def _candidates(now: int) -> sa.ColumnElement[bool]:
    queued = sa.and_(
        Request.status == RequestStatus.QUEUED,
        sa.or_(Request.not_before.is_(None), Request.not_before <= now),
    )
    expired = sa.and_(Request.status == RequestStatus.RUNNING, Request.lease_expires_at < now)
    return sa.or_(queued, expired)


def sweep(
    dispatcher: Dispatcher, *, grace_seconds: int = MARKER_PENDING_SECONDS, limit: int = 20_000
) -> SweepReport:
    """One pass; returns what it found and did."""
    engine: Engine = dispatcher.engine
    lock = dispatcher.redis_client.lock(f"{dispatcher.key_prefix}{_SWEEP_LOCK}", timeout=120)
    if not lock.acquire(blocking=False):
        return SweepReport(0, 0, 0, skipped=True)
    try:
        now = int(time.time())
        settled_before = now - grace_seconds
        with engine.connect() as conn:
            dispatch_ids = list(
                conn.execute(
                    sa.select(Request.dispatch_id)
                    .where(
                        _candidates(now),
                        Request.dispatch_id.is_not(None),
                        Request.dispatched_at < settled_before,
                    )
                    .group_by(Request.dispatch_id)
                ).scalars()
            )
        live = dispatcher.live_dispatches([d for d in dispatch_ids if d is not None])
        dead = [d for d in dispatch_ids if d is not None and d not in live]
        conditions: list[sa.ColumnElement[bool]] = [
            sa.and_(Request.dispatch_id.is_(None), Request.created_at < settled_before),
            sa.and_(
                Request.status == RequestStatus.RUNNING,
                sa.or_(Request.dispatched_at.is_(None), Request.dispatched_at <= Request.lease_expires_at),
            ),
        ]
        if dead:
            conditions.append(Request.dispatch_id.in_(dead))
        with engine.connect() as conn:
            rows = conn.execute(
                sa.select(Request.id, Request.batch_id)
                .where(_candidates(now), sa.or_(*conditions))
                .order_by(Request.priority.desc(), Request.batch_id, Request.line_number)
                .limit(limit)
            ).all()
        by_batch: dict[str, list[str]] = {}
        for row in rows:
            by_batch.setdefault(row.batch_id, []).append(row.id)
        for ids in by_batch.values():
            dispatcher.dispatch(ids)
        if rows:
            _logger.info("sweep: %d dispatch(es) lost, %d request(s) dispatched again", len(dead), len(rows))
        return SweepReport(len(dispatch_ids), len(dead), len(rows))
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
