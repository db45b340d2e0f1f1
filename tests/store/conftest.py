"""Store fixtures: an engine on a migrated, empty database (SQLite and PostgreSQL), and a tenant."""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

import store


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    store.upgrade_to_head(database_url)
    engine = store.make_engine(database_url)
    try:
        yield engine
    finally:
        engine.dispose()


@pytest.fixture
def tenant(engine: Engine) -> store.Tenant:
    return store.create_tenant(engine, "acme")


def chat_line(custom_id: str, content: str = "hello", model: str = "gpt-4o-mini") -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": content}]},
    }


def jsonl(lines: list[Any]) -> io.BytesIO:
    """Lines that are str are written as they are; anything else as JSON."""
    return io.BytesIO(
        "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines).encode()
    )


IngestFn = Callable[..., store.IngestReport]


@pytest.fixture
def ingest(engine: Engine, tenant: store.Tenant) -> IngestFn:
    """Ingest ``n`` OpenAI-form chat lines (custom ids c0..c{n-1}) or the given lines."""

    def run(lines: list[Any] | int, **kwargs: Any) -> store.IngestReport:
        rows = [chat_line(f"c{i}") for i in range(lines)] if isinstance(lines, int) else lines
        return store.ingest_batch(engine, jsonl(rows), tenant_id=tenant.id, **kwargs)

    return run


@pytest.fixture
def pg_engine(postgres_url: str) -> Iterator[Engine]:
    """An engine on a PostgreSQL database of the test's own, at the head revision (for what only
    PostgreSQL shows: plans, commit settings)."""
    store.upgrade_to_head(postgres_url)
    engine = store.make_engine(postgres_url)
    try:
        yield engine
    finally:
        engine.dispose()


def wait_for_a_lock_wait(engine: Engine, thread: threading.Thread, what: str, outcome: list[Any]) -> None:
    """Until a session on ``engine``'s database waits for a lock (``pg_stat_activity``): ``thread``,
    running the second ``what``, blocked behind the test's open transaction."""
    with engine.connect() as watcher:
        deadline = time.monotonic() + 30
        while not watcher.execute(
            sa.text(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND datname = current_database()"
            )
        ).scalar_one():
            assert time.monotonic() < deadline, f"the second {what} never waited for the first"
            assert thread.is_alive(), f"the second {what} finished without waiting: {outcome}"
            watcher.rollback()
