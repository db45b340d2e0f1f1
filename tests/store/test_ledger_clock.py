"""The ledger's clock (``store.clock``): a host whose clock is off writes times by PostgreSQL's.

A host's clock cannot be set for one test, so the skewed host is this process with ``time.time``
running off by a fixed amount; PostgreSQL's clock (``clock_timestamp()``) is the true one. Before,
a worker 40 s behind wrote a 30 s lease that the beat host saw lapsed 10 s ago at once: the sweep
sent its running request again and it was paid twice.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Iterator

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

import store
import store.clock
from tests.store.conftest import chat_line, jsonl

_REAL_TIME = time.time


@pytest.fixture
def skew(monkeypatch: pytest.MonkeyPatch, postgres_url: str) -> Iterator[Callable[[float], None]]:
    """``skew(seconds)``: this process's clock runs ``seconds`` off from now on. Afterwards the
    clock is true again and re-measured, so that no later test inherits the offset."""

    def set_skew(seconds: float) -> None:
        monkeypatch.setattr(time, "time", lambda: _REAL_TIME() + seconds)

    yield set_skew
    monkeypatch.undo()
    engine = store.make_engine(postgres_url, poolclass=sa.NullPool)
    try:
        with engine.connect():
            pass  # a new connection measures the offset again
    finally:
        engine.dispose()
    assert abs(store.clock.ledger_time() - _REAL_TIME()) < 1


def _server_now(engine: Engine) -> float:
    with engine.connect() as conn:
        return float(conn.execute(sa.text("SELECT extract(epoch FROM clock_timestamp())")).scalar_one())


def _queued_request(engine: Engine) -> str:
    tenant = store.create_tenant(engine, "acme")
    batch = store.ingest_batch(engine, jsonl([chat_line("c0")]), tenant_id=tenant.id)
    (request_id,) = store.pending_request_ids(engine, batch.batch_id)
    return request_id


def test_a_lease_written_by_a_host_running_behind_is_not_lapsed_at_once(
    postgres_url: str, skew: Callable[[float], None]
) -> None:
    store.upgrade_to_head(postgres_url)
    skew(-40.0)
    engine = store.make_engine(postgres_url)
    try:
        request_id = _queued_request(engine)
        (claimed,) = store.claim_requests(engine, [request_id], "behind", lease_seconds=30)
        server_now = _server_now(engine)
        # By the true clock the lease has its 30 s (less the test's own moments), not -10 s.
        assert claimed.lease_expires_at >= server_now + 25
        # What the beat host (a true clock) sees: a live lease, nothing to send again.
        due = store.requests_to_redispatch(
            engine, now=int(server_now), settled_before=int(server_now), dead_dispatch_ids=[], limit=10
        )
        assert due == []
    finally:
        engine.dispose()


def test_the_first_read_before_any_connection_is_by_the_servers_clock(
    postgres_url: str, skew: Callable[[float], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A worker's first claim computes its lease before its statement connects: that read must not
    # be this host's clock (16 first leases of a worker two minutes behind were, end to end).
    store.upgrade_to_head(postgres_url)
    monkeypatch.setattr(store.clock, "_checked_at", None)
    monkeypatch.setattr(store.clock, "_first_tried_at", None)
    skew(-40.0)
    engine = store.make_engine(postgres_url)
    try:
        assert abs(store.clock.now_seconds() - _server_now(engine)) <= 1
    finally:
        engine.dispose()


def test_a_clock_stepped_since_is_measured_again(
    postgres_url: str, skew: Callable[[float], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    store.upgrade_to_head(postgres_url)
    engine = store.make_engine(postgres_url)
    try:
        with engine.connect():
            pass
        assert abs(store.clock.now_seconds() - _server_now(engine)) <= 1
        # An NTP step on the host, on a pooled connection (no new connection to measure on).
        monkeypatch.setattr(store.clock, "RECHECK_SECONDS", 0.0)
        skew(+100.0)
        with engine.connect():
            pass  # a checkout once RECHECK_SECONDS passed measures again
        assert abs(store.clock.now_seconds() - _server_now(engine)) <= 1
    finally:
        engine.dispose()


def test_measuring_leaves_no_transaction_open(pg_engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    # The measuring SELECT is rolled back: a transaction left open would be the next user's, with
    # now() frozen at the moment of the measurement.
    monkeypatch.setattr(store.clock, "RECHECK_SECONDS", 0.0)  # measured at this checkout too
    with pg_engine.connect() as conn:
        dbapi_connection = conn.connection.dbapi_connection
        assert dbapi_connection is not None
        assert dbapi_connection.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


def test_the_first_read_leaves_no_connection_open_in_an_engine_disposed_of(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first read connects a tracked engine to measure; one its owner had disposed of kept that
    # connection pooled until the engine was collected, then psycopg warned of a connection deleted
    # while open (an error of whichever test ran then, in CI).
    engine = store.make_engine(postgres_url)
    with engine.connect():
        pass
    engine.dispose()
    tracked: weakref.WeakSet[Engine] = weakref.WeakSet([engine])
    monkeypatch.setattr(store.clock, "_tracked", tracked)
    monkeypatch.setattr(store.clock, "_checked_at", None)
    monkeypatch.setattr(store.clock, "_first_tried_at", None)
    store.clock.now_seconds()
    assert store.clock._checked_at is not None
    others = store.make_engine(postgres_url, poolclass=sa.NullPool)
    try:
        with others.connect() as conn:
            held = conn.execute(
                sa.text(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            ).scalar_one()
    finally:
        others.dispose()
    assert held == 0, "the disposed engine's pool holds the connection the first read opened"
