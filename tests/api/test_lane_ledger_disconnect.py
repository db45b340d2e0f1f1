"""PostgreSQL ending the lane's connection (a restart, a failover, an operator's
``pg_terminate_backend``) just before a single call's claim or its result's write: the statement
goes again on a fresh connection, and the caller gets the answer the provider was paid for, once.

A connection handed back less than ``store.engine.IDLE_PING_SECONDS`` ago is not pinged before use,
so under steady traffic a claim runs on the connection the last result was written on, and a call
that answers within a second writes its result on the connection its claim used. Before, a claim
that failed so left its caller waiting for the sweeper; a result write that failed so released the
request, to be paid for again when the sweeper sent it (the cache off), the first answer never
billed nor kept."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import psycopg
import pytest
from sqlalchemy import event
from sqlalchemy.engine import Engine

from simulator.testing import SimulatorServer
from tests.api.in_process import InProcess, in_process_api


@pytest.fixture
async def in_process(
    postgres_url: str, redis_url: str, redis_prefix: str, simulator: SimulatorServer
) -> AsyncIterator[InProcess]:
    async with in_process_api(postgres_url, redis_url, redis_prefix, simulator, "disconnect-lane") as api:
        yield api


# What the statement says, of the single call's claim and of its result's write.
STATEMENTS = {"claim": "WITH claimed AS MATERIALIZED", "result": "INSERT INTO results"}


@pytest.fixture(params=sorted(STATEMENTS))
def statement_loses_its_backend(request: pytest.FixtureRequest, postgres_url: str) -> Iterator[list[int]]:
    """The first statement of any engine that says ``STATEMENTS[param]`` finds its backend
    terminated (and gone from ``pg_stat_activity``) just before it runs; yields the pids so ended."""
    ended: list[int] = []
    dsn = postgres_url.replace("postgresql+psycopg://", "postgresql://")
    marker = STATEMENTS[request.param]

    def before(_conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        if ended or marker not in statement:
            return
        pid = cursor.connection.info.backend_pid
        ended.append(pid)
        with psycopg.connect(dsn, autocommit=True) as killer:
            killer.execute("SELECT pg_terminate_backend(%s)", (pid,))
            while killer.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone():
                killer.execute("SELECT pg_sleep(0.01)")  # until the backend is gone

    event.listen(Engine, "before_cursor_execute", before)
    try:
        yield ended
    finally:
        event.remove(Engine, "before_cursor_execute", before)


async def test_a_lane_statement_whose_connection_died_goes_again_and_the_call_is_paid_once(
    in_process: InProcess, simulator: SimulatorServer, statement_loses_its_backend: list[int]
) -> None:
    before = simulator.stats()["completions"]
    # A guard against a hang only: the call answers in well under a second when the write holds.
    answer = await asyncio.wait_for(
        in_process.client.post(
            "/v1/chat/completions",
            json={"model": "sim-model", "messages": [{"role": "user", "content": f"hi {uuid.uuid4().hex}"}]},
            headers={"Authorization": f"Bearer {in_process.key}"},
        ),
        timeout=45,
    )
    assert statement_loses_its_backend, "the statement never ran"
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"]
    assert simulator.stats()["completions"] - before == 1
