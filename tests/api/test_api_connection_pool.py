"""The API's ledger connections are kept for the next burst: a burst of concurrent requests'
statements (each request's key look-up and submit run on the threadpool) opens connections once,
and the same burst again opens none (with the default pool of 5, a burst of 12 opened and closed 7
overflow connections each time: a PostgreSQL backend started and torn down per request)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import sqlalchemy as sa
from sqlalchemy import event

import store
from api.app import create_app
from config import Settings

BURST = 12  # within the default pool's 5 + 10 overflow, so that the old pool is measured, not starved


def _burst(engine: sa.Engine) -> None:
    """``BURST`` threads each holding a connection at the same moment, as concurrent requests'
    statements do."""
    all_in = threading.Barrier(BURST, timeout=60)  # a safety net: it breaks only if one never comes

    def statement() -> None:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
            all_in.wait()

    with ThreadPoolExecutor(BURST) as pool:
        for future in [pool.submit(statement) for _ in range(BURST)]:
            future.result()


def test_a_burst_of_concurrent_requests_opens_no_connection_the_last_one_opened(postgres_url: str) -> None:
    store.upgrade_to_head(postgres_url)
    app = create_app(Settings(database_url=postgres_url), dispatch=lambda engine, batch_id: None)
    engine: sa.Engine = app.state.engine
    opened: list[object] = []

    def connected(dbapi_connection: object, _record: object) -> None:
        opened.append(dbapi_connection)

    event.listen(engine, "connect", connected)
    try:
        _burst(engine)
        assert len(opened) <= BURST
        opened.clear()
        _burst(engine)
        assert opened == []
    finally:
        event.remove(engine, "connect", connected)
        engine.dispose()
