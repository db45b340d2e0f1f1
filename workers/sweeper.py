"""The sweep: find requests no message will run, and dispatch them again.

Each pass also ends the batches whose completion window has passed (``expired``), ends what a
cancel or an expiry that died between its chunks left (``store.finish_stopped_batches``), and
fails the batches left ``validating`` by an API process that died while reading their file (their
lease, renewed by a live API, ran out: ``store.fail_abandoned_validations``). Completion
webhooks are delivered apart (``workers.webhooks``), so that no receiver can slow a sweep.

A request needs a new message when (see ``workers.dispatch`` for the markers):

* it is queued (and past ``not_before``) and never dispatched, ``grace`` seconds after creation
  (the producer died between commit and publish);
* it is queued, or running under an expired lease, and the marker of its last dispatch is gone
  (the broker was flushed or restarted empty; the chunk claimed it, then handed it back or failed;
  a sent marker not renewed because its message was taken but never claimed expired);
* it is running under an expired lease and was last dispatched before that lease ran out (the
  worker holding it was killed: its message was consumed, no other one names it).

After a re-dispatch ``dispatched_at`` is later than the expired lease and the new marker lives,
so the next sweep leaves it alone. With the default 20 s leases (extended 4 times a lease by a
live worker) and a sweep every 5 s, a killed worker's requests run again about 25 s after it died.

Agent messages of the distributed runtime are brought back the same way: one unanswered under an
expired lease (its worker died mid-handler) is sent again, and held for ``MARKER_SENT_SECONDS``
so that the following sweeps do not send it again while it waits in the queue.

A duplicate message is harmless anyway: claims skip what is finished or leased to a live worker
(an answered agent message is answered from SQL). Sweeps from several ``tokenmill beat`` processes take turns
through a Redis lock, renewed while a pass runs, so that one of a sweeper killed mid-pass lapses
within ``SWEEP_LOCK_SECONDS``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from redis.exceptions import LockError, RedisError
from redis.lock import Lock
from sqlalchemy.engine import Engine

from store import (
    agent_messages_to_resend,
    expire_batches,
    fail_abandoned_validations,
    finish_stopped_batches,
    hold_for_resend,
    requests_to_redispatch,
    unsettled_dispatch_ids,
)
from store.clock import now_seconds
from workers.constants import AGENT_MESSAGE_TASK, sweep_lock_key
from workers.dispatch import MARKER_PENDING_SECONDS, MARKER_SENT_SECONDS, Dispatcher

__all__ = ["SweepReport", "resend_agent_messages", "sweep", "sweep_forever"]

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepReport:
    checked_dispatches: int
    dead_dispatches: int
    redispatched: int
    skipped: bool = False  # another sweeper held the lock
    expired_batches: int = 0
    agent_messages_resent: int = 0
    abandoned_validations: int = 0
    stopped_batches_finished: int = 0  # cancelled / expired batches whose leftovers it ended


def sweep(
    dispatcher: Dispatcher, *, grace_seconds: int = MARKER_PENDING_SECONDS, limit: int = 20_000
) -> SweepReport:
    """One pass; returns what it found and did."""
    engine: Engine = dispatcher.engine
    # Not thread-local: the keeper renews it from its own thread.
    lock = dispatcher.redis_client.lock(
        sweep_lock_key(dispatcher.key_prefix), timeout=SWEEP_LOCK_SECONDS, thread_local=False
    )
    if not lock.acquire(blocking=False):
        return SweepReport(0, 0, 0, skipped=True)
    keeper = _SweepLockKeeper(lock)
    try:
        now = now_seconds()  # the ledger's clock, as the leases it compares (store.clock)
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
        resent = resend_agent_messages(dispatcher, now=now, limit=limit)
        # Batches past their completion window end as expired.
        expired = expire_batches(engine, now=now)
        # What a cancel or an expiry that died between its chunks left (store.batches).
        finished = finish_stopped_batches(engine, now=now)
        if finished:
            _logger.info("sweep: %d stopped batch(es) had requests left, now ended", len(finished))
        abandoned = fail_abandoned_validations(engine, now=now)
        if abandoned:
            _logger.warning("sweep: %d batch(es) failed, their validation was abandoned", len(abandoned))
        return SweepReport(
            len(dispatch_ids),
            len(dead),
            len(rows),
            False,
            len(expired),
            resent,
            len(abandoned),
            len(finished),
        )
    finally:
        keeper.stop()
        with contextlib.suppress(LockError):
            lock.release()


# The sweep lock lives this long unless renewed: a sweeper killed mid-pass keeps the others out
# at most this long (a dead worker's requests wait for the next sweep). A live pass renews it
# every third of it, however long the pass takes.
SWEEP_LOCK_SECONDS = 10.0


class _SweepLockKeeper:
    """Renews a held sweep lock from a thread of its own until stopped. A renewal that fails (the
    lock lapsed while this process was frozen) is logged: another sweeper may then pass at the
    same time, which only sends messages twice (claims make that harmless)."""

    def __init__(self, lock: Lock) -> None:
        self._lock = lock
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sweep lock", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped.wait(SWEEP_LOCK_SECONDS / 3):
            try:
                self._lock.reacquire()
            except (LockError, RedisError):
                _logger.warning("the sweep lock could not be renewed", exc_info=True)

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()


def resend_agent_messages(dispatcher: Dispatcher, *, now: int, limit: int) -> int:
    """Send again the agent messages whose worker died mid-handler; returns how many."""
    sent = 0
    for message in agent_messages_to_resend(dispatcher.engine, now=now, limit=limit):
        # Ledger first: held in SQL before the Celery message that names it.
        if not hold_for_resend(dispatcher.engine, message, MARKER_SENT_SECONDS, now=now):
            continue  # answered or claimed meanwhile
        dispatcher.celery.send_task(
            AGENT_MESSAGE_TASK,
            kwargs={
                "agent_type": message.agent_type,
                "agent_key": message.agent_key,
                "tenant_id": message.tenant_id,
                "message_id": message.id,
            },
            queue=dispatcher.queue,
            ignore_result=True,
        )
        sent += 1
    if sent:
        _logger.info("sweep: %d agent message(s) sent again", sent)
    return sent


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
