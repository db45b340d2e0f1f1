"""Faults nobody planned for, against real ``tokenmill worker`` / ``tokenmill beat`` subprocesses, the
Redis broker, PostgreSQL and the simulator over HTTP: a worker frozen (SIGSTOP) past its leases
and thawed, database connections killed under running chunks, the sweeper killed and restarted.
Each checks the promises: every request recorded once, and the ledger bills exactly what the
simulator delivered (kept results plus discarded answers)."""

from __future__ import annotations

import signal
from collections.abc import Callable

import pytest
import sqlalchemy as sa

from simulator.testing import SimulatorServer
from store import DiscardedAnswer, Request, RequestStatus, Result, batch_progress
from tests.cluster import Cluster, kill_group
from tests.workers.support import Ledger, add_batch
from tests.workers.test_celery_workers import assert_recorded_once
from tests.workers.test_worker_faults import logs_of, request_rows, wait_until

pytestmark = pytest.mark.slow


def billed_tokens(led: Ledger, batch_id: str) -> tuple[int, int]:
    """(prompt, completion) tokens the ledger bills for a batch: its results that were not cache
    hits, and its discarded answers."""
    with led.engine.connect() as conn:
        kept = conn.execute(
            sa.select(
                sa.func.coalesce(sa.func.sum(Result.prompt_tokens), 0),
                sa.func.coalesce(sa.func.sum(Result.completion_tokens), 0),
            ).where(Result.batch_id == batch_id, Result.cached.is_(False))
        ).one()
        discarded = conn.execute(
            sa.select(
                sa.func.coalesce(sa.func.sum(DiscardedAnswer.prompt_tokens), 0),
                sa.func.coalesce(sa.func.sum(DiscardedAnswer.completion_tokens), 0),
            ).where(DiscardedAnswer.batch_id == batch_id)
        ).one()
    return int(kept[0]) + int(discarded[0]), int(kept[1]) + int(discarded[1])


def delivered_tokens(simulator: SimulatorServer) -> tuple[int, int]:
    stats = simulator.stats()
    return int(stats["prompt_tokens"]), int(stats["completion_tokens"])


def test_a_frozen_worker_thawed_after_its_leases_bills_its_late_answers_once(
    cluster: Callable[..., Cluster],
    make_ledger: Callable[[str], Ledger],
    postgres_url: str,
    simulator: SimulatorServer,
) -> None:
    """A worker SIGSTOPped while its calls are upstream, for longer than its leases: another
    worker redoes the requests (one result row each). Thawed, the first worker reads the answers
    the provider sent it meanwhile (and billed): each is a discarded answer, billed once, so the
    ledger's tokens equal the simulator's."""
    simulator.configure(latency_ms=3000)
    c = cluster()
    led = make_ledger(postgres_url)
    batch_id, ids = add_batch(led, [f"frozen {i}" for i in range(20)])
    sleeper = c.worker("sleeper", concurrency=32)
    c.dispatcher.dispatch(ids)
    wait_until(lambda: simulator.stats()["in_flight"] == len(ids), 60, lambda: logs_of(c))
    kill_group(sleeper, signal.SIGSTOP)
    try:
        c.worker("awake", concurrency=32)
        c.beat()
        wait_until(
            lambda: batch_progress(led.engine, batch_id).finished == len(ids),
            90,
            lambda: f"{request_rows(led, [batch_id])}\n{logs_of(c)}",
        )
        # Every frozen call was answered (and so billed by the provider) while its caller slept.
        wait_until(lambda: simulator.stats()["accepted"] == 2 * len(ids), 30, lambda: str(simulator.stats()))
    finally:
        kill_group(sleeper, signal.SIGCONT)
    wait_until(
        lambda: billed_tokens(led, batch_id) == delivered_tokens(simulator),
        60,
        lambda: (
            f"billed {billed_tokens(led, batch_id)} != delivered {delivered_tokens(simulator)}\n{logs_of(c)}"
        ),
    )
    results = assert_recorded_once(led, batch_id, ids)
    assert all(r.status == RequestStatus.SUCCEEDED for r in results)
    with led.engine.connect() as conn:
        discarded = conn.execute(
            sa.select(DiscardedAnswer.request_id).where(DiscardedAnswer.batch_id == batch_id)
        ).scalars()
        assert sorted(discarded) == sorted(ids)
        leased = sa.select(sa.func.count()).where(
            Request.batch_id == batch_id, Request.lease_owner.is_not(None)
        )
        assert conn.execute(leased).scalar_one() == 0
