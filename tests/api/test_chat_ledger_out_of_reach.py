"""PostgreSQL lost (a restart, a failover, an operator's ``pg_terminate_backend``) while the API
waits for a single call that is with the provider: a call slower than a wait slice has the API
read the ledger, and that read failing answered the caller 5xx at once, unbound, so its
Idempotency-Key was freed and its retry paid the provider again, while the first call went on and
was billed too. The read now goes once more on a fresh connection, and a ledger still out of
reach is waited out like a call still running: the caller gets the answer paid for, once."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import psycopg
import pytest
from sqlalchemy import event
from sqlalchemy.engine import Engine

import store
from api.errors import ServiceUnavailable
from api.routes.chat import _ended
from simulator.testing import SimulatorServer, free_port
from store.interactive import InteractiveRequest
from tests.api.in_process import InProcess, in_process_api

# What the API's read of a call's outcome says (store.interactive.interactive_outcome).
OUTCOME_READ = "AS request_status"
OUTAGE_SECONDS = 1.5


@pytest.fixture
async def in_process(
    postgres_url: str, redis_url: str, redis_prefix: str, simulator: SimulatorServer
) -> AsyncIterator[InProcess]:
    async with in_process_api(postgres_url, redis_url, redis_prefix, simulator, "ledger-lost-lane") as api:
        yield api


def _dsn(postgres_url: str) -> str:
    return postgres_url.replace("postgresql+psycopg://", "postgresql://")


def _end_backends(killer: psycopg.Connection[Any], where: str, *args: Any) -> None:
    """End the backends ``where`` says, and wait until the server says they are gone."""
    killer.execute(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE {where}", args)
    while killer.execute(f"SELECT 1 FROM pg_stat_activity WHERE {where}", args).fetchone():
        killer.execute("SELECT pg_sleep(0.01)")


@pytest.fixture
def outcome_read_loses_its_backend(postgres_url: str) -> Iterator[list[int]]:
    """The API's first read of an outcome finds its backend terminated just before it runs."""
    ended: list[int] = []

    def before(_conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        if ended or OUTCOME_READ not in statement:
            return
        pid = cursor.connection.info.backend_pid
        ended.append(pid)
        with psycopg.connect(_dsn(postgres_url), autocommit=True) as killer:
            _end_backends(killer, "pid = %s", pid)

    event.listen(Engine, "before_cursor_execute", before)
    try:
        yield ended
    finally:
        event.remove(Engine, "before_cursor_execute", before)


@pytest.fixture
def outcome_read_meets_an_outage(postgres_url: str) -> Iterator[list[str]]:
    """At the API's first read of an outcome, the database ends every session and refuses new
    ones for ``OUTAGE_SECONDS`` (a restart), then takes connections again."""
    began: list[str] = []
    name = postgres_url.rsplit("/", 1)[1]
    admin_dsn = _dsn(postgres_url).rsplit("/", 1)[0] + "/postgres"

    def allow(value: str) -> None:
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {value}')

    def before(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if began or OUTCOME_READ not in statement:
            return
        began.append(statement)
        allow("false")
        with psycopg.connect(admin_dsn, autocommit=True) as killer:
            _end_backends(killer, "datname = %s AND pid <> pg_backend_pid()", name)
        threading.Timer(OUTAGE_SECONDS, allow, args=("true",)).start()

    event.listen(Engine, "before_cursor_execute", before)
    try:
        yield began
    finally:
        event.remove(Engine, "before_cursor_execute", before)
        allow("true")


async def _call(in_process: InProcess, content: str) -> Any:
    # A guard against a hang only.
    return await asyncio.wait_for(
        in_process.client.post(
            "/v1/chat/completions",
            json={"model": "sim-model", "messages": [{"role": "user", "content": content}]},
            headers={"Authorization": f"Bearer {in_process.key}", "Idempotency-Key": uuid.uuid4().hex},
        ),
        timeout=60,
    )


async def _answered_and_paid_once(
    in_process: InProcess, simulator: SimulatorServer, delay_seconds: int, ledger_reads: list[Any]
) -> None:
    """A call the provider answers in ``delay_seconds`` (past a wait slice, so the API reads the
    ledger: ``ledger_reads`` records it) is answered 200, and the provider was paid once."""
    before = simulator.stats()["completions"]
    answer = await _call(in_process, f"slow {uuid.uuid4().hex} [[delay {delay_seconds}]]")
    assert ledger_reads, "the API never read the ledger"
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"]
    assert simulator.stats()["completions"] - before == 1


async def test_a_slow_calls_outcome_read_whose_connection_died_goes_again(
    in_process: InProcess, simulator: SimulatorServer, outcome_read_loses_its_backend: list[int]
) -> None:
    await _answered_and_paid_once(in_process, simulator, 2, outcome_read_loses_its_backend)


async def test_a_slow_call_outlives_a_ledger_restart_while_the_api_waits(
    in_process: InProcess, simulator: SimulatorServer, outcome_read_meets_an_outage: list[str]
) -> None:
    await _answered_and_paid_once(in_process, simulator, 4, outcome_read_meets_an_outage)


async def test_a_stream_whose_ended_outcome_the_ledger_cannot_give_is_answered_bound_to_it() -> None:
    # A stream's end entry saying "read the ledger" (the call ended, and was billed) met a ledger
    # out of reach: the read's error answered an unbound 503, which freed the Idempotency-Key, and
    # a retry paid the provider again. It is a 503 bound to the call now.
    engine = store.make_engine(
        f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/gone", connect_args={"connect_timeout": 2}
    )
    try:
        with pytest.raises(ServiceUnavailable) as refused:
            await _ended(engine, InteractiveRequest("batch_req_ended", "batch_ended"), {"ledger": True})
    finally:
        engine.dispose()
    assert refused.value.code == "database_unavailable"
    assert refused.value.bound_to == "batch_ended"
