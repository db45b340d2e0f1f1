"""The ledger's clock: one clock for every host that writes times into the ledger.

Leases, not-befores, retry deadlines and the sweeper's "lapsed" all compare times that different
hosts wrote: a worker's lease expiry against the beat host's now. Each host's own clock made a
worker running 30 s behind the beat host write leases that looked lapsed at once, so its running
requests were sent again and paid twice; one running ahead kept a dead worker's requests waiting
longer. Every process now reads PostgreSQL's clock as its own plus an offset, measured on each new
connection and again on a checkout at most every ``RECHECK_SECONDS`` (an NTP step on the host
since): one round trip then, nothing per statement. A process's first read of the clock, before
any connection, opens one to measure: a worker's first claim computes its lease before its
statement connects (16 of its first leases were written by its own clock otherwise). SQLite is a
file on this host: its offset is 0.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import weakref
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine

__all__ = ["RECHECK_SECONDS", "ledger_time", "now_seconds", "track_database_clock"]

RECHECK_SECONDS = 60.0
# A first measurement that failed (the database out of reach) is tried again after this.
_RETRY_FIRST_SECONDS = 5.0

_logger = logging.getLogger(__name__)

_offset = 0.0  # seconds to add to this host's clock to read the database server's
_checked_at: float | None = None  # time.monotonic() of the last measurement
_tracked: weakref.WeakSet[Engine] = weakref.WeakSet()  # engines whose server's clock is the ledger's
_first_lock = threading.Lock()
_first_tried_at: float | None = None


def ledger_time() -> float:
    """Seconds since the epoch by the database server's clock (this host's while it cannot be read)."""
    if _checked_at is None and _tracked:
        _measure_first()
    return time.time() + _offset


def now_seconds() -> int:
    return int(ledger_time())


def track_database_clock(engine: Engine) -> None:
    """Measure the offset of ``engine``'s PostgreSQL server's clock on each new connection, and on
    a checkout once ``RECHECK_SECONDS`` passed since the last measurement."""
    _tracked.add(engine)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        _measure(dbapi_connection)

    @event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        if _checked_at is not None and time.monotonic() - _checked_at < RECHECK_SECONDS:
            return
        dbapi_error: type[Exception] = engine.dialect.loaded_dbapi.Error
        try:
            _measure(dbapi_connection)
        except dbapi_error as error:
            if engine.dialect.is_disconnect(error, dbapi_connection, None):  # type: ignore[arg-type]
                # The pool discards this connection and checks out (or opens) another.
                raise sa.exc.DisconnectionError("a pooled connection is gone") from error
            # The caller's statement is not failed over a clock check: the last offset stands.
            _logger.warning("could not read the database server's clock", exc_info=True)


def _measure_first() -> None:
    """Connect a tracked engine, which measures; once at a time, and not again for
    ``_RETRY_FIRST_SECONDS`` after a failure (each read would otherwise wait on a connect)."""
    global _first_tried_at
    with _first_lock:
        if _checked_at is not None:
            return
        if _first_tried_at is not None and time.monotonic() - _first_tried_at < _RETRY_FIRST_SECONDS:
            return
        _first_tried_at = time.monotonic()
        for engine in list(_tracked):
            try:
                # A connection of its own, closed at once: the engine may be one its owner
                # disposed of, whose pool would keep it open until it is collected.
                connection = engine.raw_connection()  # its connect (or checkout) event measured
                connection.detach()
                connection.close()
            except Exception:
                _logger.warning("could not read the database server's clock", exc_info=True)
                continue
            if _checked_at is not None:
                return


def _measure(dbapi_connection: Any) -> None:
    """The server's clock against this host's, read halfway through the round trip."""
    global _offset, _checked_at
    cursor = dbapi_connection.cursor()
    try:
        before = time.time()
        cursor.execute("SELECT extract(epoch FROM clock_timestamp())::float8")
        (server,) = cursor.fetchone()
        after = time.time()
    finally:
        cursor.close()
        # The SELECT opened a transaction (not autocommit): the next user of the connection must
        # not find it open, with now() frozen at this moment.
        with contextlib.suppress(Exception):
            dbapi_connection.rollback()
    _offset = float(server) - (before + after) / 2
    _checked_at = time.monotonic()
