"""Faults nobody planned for, against real ``tokenmill worker`` / ``tokenmill beat`` subprocesses, the
Redis broker, PostgreSQL and the simulator over HTTP: a worker frozen (SIGSTOP) past its leases
and thawed, database connections killed under running chunks, the sweeper killed and restarted.
Each checks the promises: every request recorded once, and the ledger bills exactly what the
simulator delivered (kept results plus discarded answers)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa

from config import Settings
from models.cancellation import CancellationToken
from simulator.testing import SimulatorServer
from store import (
    Batch,
    BatchStatus,
    ClaimedRequest,
    DiscardedAnswer,
    Request,
    RequestKind,
    RequestStatus,
    Result,
    ResultRecord,
    batch_progress,
    cancel_batch,
    expire_batches,
    get_batch,
    iter_error_lines,
    iter_output_lines,
    make_engine,
)
from tests.cluster import Cluster, kill_group
from tests.workers.support import Ledger, add_batch, running_leased_by, statuses
from tests.workers.test_celery_workers import assert_recorded_once
from tests.workers.test_runner import make_pipeline, run_ids
from tests.workers.test_worker_faults import logs_of, own_redis_server, request_rows, wait_until
from workers import sweeper
from workers.app import make_celery
from workers.constants import sweep_lock_key
from workers.dispatch import Dispatcher
from workers.pipeline import ModelCallPipeline
from workers.rate_limits import LimiterUnavailable
from workers.runner import ChunkRunner, RunnerConfig, complete_chat

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


def test_database_connections_killed_again_and_again_under_running_chunks(
    cluster: Callable[..., Cluster],
    make_ledger: Callable[[str], Ledger],
    postgres_url: str,
    simulator: SimulatorServer,
) -> None:
    """Every backend of the test database is terminated every ~0.3 s for 15 s while two workers
    and the sweeper run a batch (claims, heartbeats, result writes and sweeps all lose their
    connections, some mid-commit): every request is recorded once, nothing stays leased, and
    the ledger bills exactly what the simulator delivered."""
    simulator.configure(latency_ms=1000)
    c = cluster()
    led = make_ledger(postgres_url)
    batch_id, ids = add_batch(led, [f"killed connections {i}" for i in range(800)])
    c.worker("w1", processes=2, concurrency=16)
    c.worker("w2", concurrency=16)
    c.beat()
    database = sa.make_url(postgres_url).database
    killer = make_engine(postgres_url)
    stop = threading.Event()
    killed: list[int] = []

    def kill_connections() -> None:
        while not stop.wait(0.3):
            try:
                with killer.connect() as conn:
                    terminated = conn.execute(
                        sa.text(
                            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                            "WHERE datname = :db AND pid <> pg_backend_pid()"
                        ),
                        {"db": database},
                    ).scalar_one()
                    killed.append(int(terminated))
            except sa.exc.DBAPIError:
                continue

    c.dispatcher.dispatch(ids)
    thread = threading.Thread(target=kill_connections, daemon=True)
    wait_until(lambda: simulator.stats()["accepted"] > 0, 60, lambda: logs_of(c))
    thread.start()
    assert batch_progress(led.engine, batch_id).finished < len(ids) // 2
    try:
        time.sleep(15)  # the fault's duration, not a wait for a condition
    finally:
        stop.set()
        thread.join()
        killer.dispose()
    assert sum(killed) > 20, killed
    print(f"{sum(killed)} connection(s) killed; {batch_progress(led.engine, batch_id)} when it stopped")
    _all_succeeded_once_billed_as_delivered(c, led, simulator, batch_id, ids, 120)


def test_a_sweeper_killed_mid_sweep_holds_no_other_sweeper_up(
    cluster: Callable[..., Cluster],
    make_ledger: Callable[[str], Ledger],
    postgres_url: str,
    simulator: SimulatorServer,
) -> None:
    """``tokenmill beat`` SIGKILLed in the middle of a sweep (here: blocked on a table lock),
    then a worker killed: a new beat sweeps at once, and the dead worker's requests run again
    within 30 s (the killed beat's sweep lock used to keep every sweeper out for 120 s)."""
    simulator.configure(latency_ms=30_000)  # the victim's calls are still upstream when it dies
    c = cluster()
    c.env["TOKENMILL_UPSTREAM_TIMEOUT_SECONDS"] = "120"
    c.env.pop("TOKENMILL_VISIBILITY_TIMEOUT_SECONDS")  # its redelivery must not stand in for the sweep
    led = make_ledger(postgres_url)
    # One message, taken by the victim: no other message can adopt its requests.
    batch_id, ids = add_batch(led, [f"sweeper killed {i}" for i in range(30)])
    victim = c.worker("victim", concurrency=32)
    c.dispatcher.dispatch(ids)

    def held_by_victim() -> int:
        return running_leased_by(led.engine, batch_id, "victim")

    def sweeps_waiting_on_a_lock() -> int:
        with led.engine.connect() as conn:
            return int(
                conn.execute(
                    sa.text(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                        "AND wait_event_type = 'Lock' AND query ILIKE '%agent_messages%'"
                    )
                ).scalar_one()
            )

    wait_until(lambda: held_by_victim() == len(ids), 60, lambda: logs_of(c))
    # Only the sweep reads agent_messages here: locked, the sweep waits there holding its lock.
    with led.engine.connect() as blocker:
        blocker.execute(sa.text("LOCK TABLE agent_messages IN ACCESS EXCLUSIVE MODE"))
        first_beat = c.beat()
        wait_until(lambda: sweeps_waiting_on_a_lock() > 0, 60, lambda: logs_of(c))
        kill_group(first_beat)
        first_beat.wait(timeout=10)
        blocker.rollback()
    kill_group(victim)
    killed_at = time.monotonic()
    assert held_by_victim() == len(ids)
    simulator.configure(latency_ms=100)
    c.worker("survivor", concurrency=32)
    c.beat()
    wait_until(lambda: held_by_victim() == 0, 60, lambda: f"victim still holds {held_by_victim()}")
    running_again = time.monotonic() - killed_at
    print(f"the dead worker's requests ran again {running_again:.1f} s after it was killed")
    assert running_again <= 30
    wait_until(
        lambda: batch_progress(led.engine, batch_id).finished == len(ids),
        90,
        lambda: f"{batch_progress(led.engine, batch_id)}\n{logs_of(c)}",
    )
    assert_recorded_once(led, batch_id, ids)


def test_a_long_sweep_keeps_its_lock_past_the_lock_timeout(
    cluster: Callable[..., Cluster],
    make_ledger: Callable[[str], Ledger],
    postgres_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The short sweep lock is renewed while a pass runs: a pass held up for several lock
    timeouts (a table lock) still keeps a second sweeper out."""
    monkeypatch.setattr(sweeper, "SWEEP_LOCK_SECONDS", 1.0)
    c = cluster()
    led = make_ledger(postgres_url)
    reports: list[sweeper.SweepReport] = []
    with led.engine.connect() as blocker:
        blocker.execute(sa.text("LOCK TABLE agent_messages IN ACCESS EXCLUSIVE MODE"))
        slow = threading.Thread(target=lambda: reports.append(sweeper.sweep(c.dispatcher)), daemon=True)
        slow.start()
        lock_key = sweep_lock_key(c.settings.key_prefix)
        wait_until(lambda: bool(c.broker.exists(lock_key)), 30, lambda: "the slow sweep never started")
        time.sleep(3)  # three lock timeouts
        assert sweeper.sweep(c.dispatcher).skipped
        blocker.rollback()
    slow.join(timeout=60)
    assert len(reports) == 1
    assert not reports[0].skipped
    assert not c.broker.exists(lock_key)


async def test_a_request_handed_back_after_its_batch_was_cancelled_ends_cancelled(
    make_ledger: Callable[[str], Ledger], database_url: str, simulator: SimulatorServer
) -> None:
    """The batch is cancelled while a request's call is upstream; before the worker sees the
    cancel (it looks every ``cancel_check_interval``) the provider says 429, retry in an hour,
    and the worker hands the request back. It must end cancelled at once with its batch (it
    used to go back in line for an hour, the batch stuck in ``cancelling`` all that time)."""
    led = make_ledger(database_url)
    batch_id, ids = add_batch(led, ["later [[delay 1]] [[status 429 retry_after=3600]]"])
    running = asyncio.create_task(
        run_ids(database_url, simulator, ids, cancel_check_interval=60, hand_back_after=1.0)
    )
    deadline = time.monotonic() + 30
    while (await asyncio.to_thread(simulator.stats))["in_flight"] == 0:
        assert time.monotonic() < deadline, "the call never reached the simulator"
        await asyncio.sleep(0.05)
    assert (await asyncio.to_thread(cancel_batch, led.engine, batch_id)).status == BatchStatus.CANCELLING
    report = await running
    assert report.handed_back == 1  # the race this test is about did happen
    assert statuses(led.engine, batch_id) == {"cancelled": 1}
    batch = get_batch(led.engine, batch_id)
    assert batch is not None
    assert batch.status == BatchStatus.CANCELLED
    assert batch.cancelled_count == 1


def test_a_broker_flushed_after_the_sweeper_has_published(
    cluster: Callable[..., Cluster],
    make_ledger: Callable[[str], Ledger],
    postgres_url: str,
    simulator: SimulatorServer,
) -> None:
    """FLUSHDB of the broker mid-batch, after ``tokenmill beat`` has already sent messages (so
    its connection believes the queue is declared) and with no refilling chunk to adopt work:
    only the sweeper's new messages can finish the batch, and they must reach the queue."""
    simulator.configure(latency_ms=50)
    c = cluster()
    c.env["TOKENMILL_CHUNK_REFILL_SECONDS"] = "0"
    led = make_ledger(postgres_url)
    c.worker("w1", concurrency=8)
    c.beat()
    # Never dispatched: the sweeper sends it, and so has published before the flush.
    first_id, first_ids = add_batch(led, [f"before {i}" for i in range(5)])
    first_done = lambda: batch_progress(led.engine, first_id).finished == len(first_ids)  # noqa: E731
    wait_until(first_done, 60, lambda: logs_of(c))
    batch_id, ids = add_batch(led, [f"flushed {i}" for i in range(400)])
    c.dispatcher.dispatch(ids)
    wait_until(lambda: batch_progress(led.engine, batch_id).finished >= 40, 60, lambda: logs_of(c))
    c.broker.flushdb()  # queue, unacked messages, markers, and kombu's queue bindings
    wait_until(
        lambda: batch_progress(led.engine, batch_id).finished == len(ids),
        90,
        lambda: f"{batch_progress(led.engine, batch_id)}\n{logs_of(c)}",
    )
    assert_recorded_once(led, batch_id, ids)


async def test_every_line_of_a_batch_that_expires_while_leased_is_in_a_file(
    make_ledger: Callable[[str], Ledger], database_url: str, simulator: SimulatorServer
) -> None:
    """The batch's window ends while a worker holds its requests (one upstream, the others
    waiting for a slot): the one upstream finishes into the output file, and each one the
    worker then stops is in the error file as ``batch_expired``, like those the expiry found
    queued (they used to end cancelled with no line anywhere)."""
    led = make_ledger(database_url)
    batch_id, ids = add_batch(led, ["slow [[delay 2]]", "second", "third"])
    running = asyncio.create_task(
        run_ids(database_url, simulator, ids, in_flight=1, cancel_check_interval=0.2)
    )
    deadline = time.monotonic() + 30
    while (await asyncio.to_thread(simulator.stats))["in_flight"] == 0:
        assert time.monotonic() < deadline, "the call never reached the simulator"
        await asyncio.sleep(0.05)
    with led.engine.begin() as conn:
        conn.execute(sa.update(Batch).where(Batch.id == batch_id).values(expires_at=int(time.time()) - 1))
    assert await asyncio.to_thread(expire_batches, led.engine) == [batch_id]
    report = await running
    assert report.cancelled == 2  # stopped by the worker, not by the expiry
    output = [json.loads(line) for line in iter_output_lines(led.engine, batch_id)]
    errors = [json.loads(line) for line in iter_error_lines(led.engine, batch_id)]
    assert [line["custom_id"] for line in output] == ["r0"]
    assert [(line["custom_id"], line["error"]["code"]) for line in errors] == [
        ("r1", "batch_expired"),
        ("r2", "batch_expired"),
    ]


def test_a_cache_redis_frozen_then_killed_mid_batch(
    cluster: Callable[..., Cluster],
    make_ledger: Callable[[str], Ledger],
    postgres_url: str,
    simulator: SimulatorServer,
) -> None:
    """The cache's Redis stops answering for 8 s (SIGSTOP: slow, waited for), then dies (down:
    calls go upstream without it) while a batch with repeated prompts runs: every request is
    recorded once, and the ledger bills exactly what the simulator delivered."""
    simulator.configure(latency_ms=300)
    c = cluster()
    led = make_ledger(postgres_url)
    with own_redis_server() as (cache_server, cache_url):
        c.env["TOKENMILL_CACHE_URL"] = cache_url
        c.worker("w1", processes=2, concurrency=16)
        c.beat()
        batch_id, ids = add_batch(led, [f"cache fault {i % 300}" for i in range(1200)])
        c.dispatcher.dispatch(ids)
        wait_until(lambda: batch_progress(led.engine, batch_id).finished >= 60, 60, lambda: logs_of(c))
        cache_server.send_signal(signal.SIGSTOP)
        time.sleep(8)  # the fault's duration
        cache_server.send_signal(signal.SIGCONT)
        wait_until(
            lambda: batch_progress(led.engine, batch_id).finished >= 400,
            60,
            lambda: f"{batch_progress(led.engine, batch_id)}\n{logs_of(c)}",
        )
        cache_server.kill()
        cache_server.wait()
        assert batch_progress(led.engine, batch_id).finished < len(ids)  # it dies mid-batch
        wait_until(
            lambda: batch_progress(led.engine, batch_id).finished == len(ids),
            120,
            lambda: f"{batch_progress(led.engine, batch_id)}\n{logs_of(c)}",
        )
    results = assert_recorded_once(led, batch_id, ids)
    assert all(r.status == RequestStatus.SUCCEEDED for r in results)
    # This used to fall short in about one run in five, by exactly the answers to an earlier test's
    # requests (60 s latency, its worker gone) that the simulator finished after this test's reset
    # and counted as delivered here: see tests/simulator/test_stats.py, reset across a request.
    wait_until(
        lambda: billed_tokens(led, batch_id) == delivered_tokens(simulator),
        30,
        lambda: f"billed {billed_tokens(led, batch_id)} != delivered {delivered_tokens(simulator)}",
    )


def test_a_broker_frozen_mid_batch_under_a_shared_rate_limit(
    cluster: Callable[..., Cluster],
    make_ledger: Callable[[str], Ledger],
    postgres_url: str,
    simulator: SimulatorServer,
) -> None:
    """The broker's Redis (queue, dispatch markers, sweep lock and the shared rate limiter)
    stops answering for 10 s mid-batch, then comes back: the batch finishes, each request once,
    billed equals delivered."""
    simulator.configure(latency_ms=200)
    led = make_ledger(postgres_url)
    c = cluster(limits={"sim-model": {"rpm": 60_000, "tpm": 10_000_000}})
    with own_redis_server() as (server, broker_url):
        c.env["TOKENMILL_BROKER_URL"] = broker_url
        broker = redis.Redis.from_url(broker_url)
        dispatcher = Dispatcher(
            make_celery(Settings(broker_url=broker_url)), led.engine, broker, c.settings.key_prefix, 50
        )
        try:
            c.worker("w1", processes=2, concurrency=16)
            c.beat()
            batch_id, ids = add_batch(led, [f"broker frozen {i}" for i in range(800)])
            dispatcher.dispatch(ids)
            wait_until(lambda: batch_progress(led.engine, batch_id).finished >= 80, 60, lambda: logs_of(c))
            server.send_signal(signal.SIGSTOP)
            time.sleep(10)  # the fault's duration
            server.send_signal(signal.SIGCONT)
            assert batch_progress(led.engine, batch_id).finished < len(ids)
            wait_until(
                lambda: batch_progress(led.engine, batch_id).finished == len(ids),
                120,
                lambda: (
                    f"{batch_progress(led.engine, batch_id)}\n{request_rows(led, [batch_id])[:3]}\n"
                    f"{logs_of(c)}"
                ),
            )
        finally:
            dispatcher.celery.close()
            broker.close()
    results = assert_recorded_once(led, batch_id, ids)
    assert all(r.status == RequestStatus.SUCCEEDED for r in results)
    assert billed_tokens(led, batch_id) == delivered_tokens(simulator)


async def test_a_request_whose_handler_broke_goes_back_in_line_at_once(
    make_ledger: Callable[[str], Ledger], database_url: str, simulator: SimulatorServer
) -> None:
    """A handler that raises (here: its rate limiter's Redis out of reach) puts its request back
    in line at once, while the chunk still waits for a slow call of another request (it used to
    stay leased, idle, until the chunk ended)."""
    led = make_ledger(database_url)
    _, ids = add_batch(led, ["breaks", "slow [[delay 6]]"])

    async def limiter_gone_for_the_first(
        request: ClaimedRequest, pipeline: ModelCallPipeline, token: CancellationToken
    ) -> ResultRecord:
        if request.id == ids[0]:
            raise LimiterUnavailable("rate limiter Redis failed: Timeout reading")
        return await complete_chat(request, pipeline, token)

    def status_of(request_id: str) -> RequestStatus:
        with led.engine.connect() as conn:
            return RequestStatus(
                conn.execute(sa.select(Request.status).where(Request.id == request_id)).scalar_one()
            )

    engine = make_engine(database_url)
    pipeline = make_pipeline(simulator)
    runner = ChunkRunner(
        engine,
        pipeline,
        RunnerConfig(owner="test-owner"),
        handlers={RequestKind.CHAT_COMPLETION: limiter_gone_for_the_first},
    )
    try:
        running = asyncio.create_task(runner.run(ids))

        async def slow_call_upstream() -> bool:
            return bool((await asyncio.to_thread(simulator.stats))["in_flight"] == 1)

        deadline = time.monotonic() + 30
        while not await slow_call_upstream():
            assert time.monotonic() < deadline, "the slow call never reached the simulator"
            await asyncio.sleep(0.05)
        while await asyncio.to_thread(status_of, ids[0]) != RequestStatus.QUEUED:
            assert await slow_call_upstream(), "the slow call ended first: the broken request waited for it"
            await asyncio.sleep(0.05)
        report = await running
    finally:
        await pipeline.close()
        engine.dispose()
    assert (report.succeeded, report.released) == (1, 1)


def test_a_sweeper_started_long_after_every_worker_died(
    cluster: Callable[..., Cluster],
    make_ledger: Callable[[str], Ledger],
    postgres_url: str,
    simulator: SimulatorServer,
) -> None:
    """No beat runs while the only worker dies holding a batch; its leases have long expired
    (and its message was taken) when a beat and a new worker start: the beat's first passes
    send the requests again, and every one is recorded once."""
    simulator.configure(latency_ms=30_000)  # still upstream when the worker dies
    c = cluster()
    c.env["TOKENMILL_UPSTREAM_TIMEOUT_SECONDS"] = "120"
    c.env.pop("TOKENMILL_VISIBILITY_TIMEOUT_SECONDS")  # its redelivery must not stand in for the sweep
    led = make_ledger(postgres_url)
    batch_id, ids = add_batch(led, [f"no sweeper {i}" for i in range(30)])  # one message
    victim = c.worker("victim", concurrency=32)
    c.dispatcher.dispatch(ids)
    wait_until(lambda: simulator.stats()["in_flight"] == len(ids), 60, lambda: logs_of(c))
    kill_group(victim)

    def leases_expired() -> bool:
        with led.engine.connect() as conn:
            latest = conn.execute(
                sa.select(sa.func.max(Request.lease_expires_at)).where(Request.batch_id == batch_id)
            ).scalar_one()
        return latest is not None and latest < time.time() - 5

    wait_until(leases_expired, 60, lambda: str(request_rows(led, [batch_id])[:2]))
    simulator.configure(latency_ms=100)
    c.worker("late", concurrency=32)
    c.beat()
    started = time.monotonic()
    wait_until(
        lambda: batch_progress(led.engine, batch_id).finished == len(ids),
        60,
        lambda: f"{batch_progress(led.engine, batch_id)}\n{logs_of(c)}",
    )
    print(f"all done {time.monotonic() - started:.1f} s after the beat started")
    assert_recorded_once(led, batch_id, ids)


def test_a_failover_that_left_pooled_connections_read_only_under_running_chunks(
    cluster: Callable[..., Cluster],
    make_ledger: Callable[[str], Ledger],
    postgres_url: str,
    simulator: SimulatorServer,
) -> None:
    """A failover as the workers see it: every session ends, the new ones land on a read-only
    server for a few seconds (the old primary, demoted), then new sessions reach a writable primary
    while the pooled ones stay where they are. Before, each process's pool kept its read-only
    sessions (a ping passes on them) and every claim, heartbeat and result write failed on them
    until the process restarted: the batch never ended. Now the first write refused renews the
    pool: every request is recorded once, succeeded, and billed as delivered."""
    simulator.configure(latency_ms=300)
    c = cluster()
    led = make_ledger(postgres_url)
    batch_id, ids = add_batch(led, [f"failover {i}" for i in range(300)])
    c.worker("w1", processes=2, concurrency=16)
    c.beat()
    database = sa.make_url(postgres_url).database
    admin_url = sa.make_url(postgres_url).set(database="postgres")
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
    c.dispatcher.dispatch(ids)
    wait_until(lambda: simulator.stats()["accepted"] > 0, 60, lambda: logs_of(c))
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'ALTER DATABASE "{database}" SET default_transaction_read_only = on'))
            conn.execute(
                sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = :db AND pid <> pg_backend_pid()"
                ),
                {"db": database},
            )
        time.sleep(5)  # the fault's duration, not a wait for a condition
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'ALTER DATABASE "{database}" RESET default_transaction_read_only'))
        admin.dispose()
    assert batch_progress(led.engine, batch_id).finished < len(ids)
    _all_succeeded_once_billed_as_delivered(c, led, simulator, batch_id, ids, 90)


def test_a_worker_whose_clock_is_minutes_behind_keeps_its_requests(
    cluster: Callable[..., Cluster],
    make_ledger: Callable[[str], Ledger],
    postgres_url: str,
    simulator: SimulatorServer,
    tmp_path: Path,
) -> None:
    """One worker's host clock is two minutes behind (a VM resumed, NTP not running): its leases,
    written by its own clock, had lapsed by the other worker's before they were written, so the
    other took its requests while it was calling the provider (measured: 16 of 200 claimed twice;
    the per-tenant single-flight made the thief wait for the first call's answer rather than pay
    again, but every theft spends one of a request's ``max_deliveries``, and without a shared
    answer it is a second call). Leases now follow PostgreSQL's clock: no request is claimed twice,
    and each line is paid for once."""
    simulator.configure(latency_ms=1000)
    c = cluster()
    led = make_ledger(postgres_url)
    batch_id, ids = add_batch(led, [f"clock behind {i}" for i in range(200)])
    # The worker's Python reads a clock two minutes behind (time.time only: monotonic timers and
    # the ledger are as they are).
    skewed = tmp_path / "clock_behind"
    skewed.mkdir()
    (skewed / "sitecustomize.py").write_text(
        "import time\n_true_time = time.time\ntime.time = lambda: _true_time() - 120\n"
    )
    env = dict(c.env)
    c.env["PYTHONPATH"] = f"{skewed}{os.pathsep}{env['PYTHONPATH']}"
    behind = c.worker("behind", concurrency=16)
    c.env = env
    c.dispatcher.dispatch(ids)
    wait_until(lambda: running_leased_by(led.engine, batch_id, "behind") > 0, 60, lambda: logs_of(c))
    c.worker("on-time", concurrency=16)
    c.beat()
    # The same ids sent again, as an at-least-once broker may (and as harmless: a claim skips what
    # a live worker holds): the on-time worker is handed the requests the other one runs.
    c.dispatcher.dispatch(ids)
    wait_until(
        lambda: batch_progress(led.engine, batch_id).finished == len(ids),
        120,
        lambda: f"{batch_progress(led.engine, batch_id)}\n{logs_of(c)}",
    )
    assert behind.poll() is None
    results = assert_recorded_once(led, batch_id, ids)
    assert all(r.status == RequestStatus.SUCCEEDED for r in results)
    with led.engine.connect() as conn:
        claims = conn.execute(sa.select(sa.func.sum(Request.attempts)).where(Request.batch_id == batch_id))
        assert claims.scalar_one() == len(ids)
    assert simulator.stats()["completions"] == len(ids)
    assert billed_tokens(led, batch_id) == delivered_tokens(simulator)


def _all_succeeded_once_billed_as_delivered(
    c: Cluster, led: Ledger, simulator: SimulatorServer, batch_id: str, ids: list[str], seconds: float
) -> None:
    """Within ``seconds`` every line of the batch succeeded, each recorded once, and the ledger
    bills what the simulator delivered."""
    wait_until(
        lambda: batch_progress(led.engine, batch_id).finished == len(ids),
        seconds,
        lambda: f"{batch_progress(led.engine, batch_id)}\n{logs_of(c)}",
    )
    results = assert_recorded_once(led, batch_id, ids)
    assert all(r.status == RequestStatus.SUCCEEDED for r in results), [
        (r.error_code, r.error_message) for r in results if r.status != RequestStatus.SUCCEEDED
    ][:5]
    wait_until(
        lambda: billed_tokens(led, batch_id) == delivered_tokens(simulator),
        60,
        lambda: f"billed {billed_tokens(led, batch_id)} != delivered {delivered_tokens(simulator)}",
    )
