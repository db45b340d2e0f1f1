"""Real ``tokenmill worker`` and ``tokenmill beat`` subprocesses, a real Redis broker, PostgreSQL and
the simulator over HTTP: the issue's "done when" list.

The broker is Redis logical database ``BROKER_DB`` (flushed by the FLUSHALL test, and after each
test), so nothing here touches database 0 but the cache keys under the test's own prefix.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa

from simulator.testing import SimulatorServer, peak_count
from store import Batch, RequestStatus, Result, batch_progress
from tests import services
from tests.workers.support import Ledger, add_batch
from workers.app import make_celery
from workers.dispatch import Dispatcher
from workers.settings import Settings

pytestmark = pytest.mark.slow

BROKER_DB = 11
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Cluster:
    """Everything a test needs to start workers and send them work."""

    env: dict[str, str]
    settings: Settings
    dispatcher: Dispatcher
    broker: redis.Redis  # type: ignore[type-arg, unused-ignore]
    processes: list[subprocess.Popen[bytes]]
    logs: Path

    def start(self, *args: str, name: str) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("wb")
        process = subprocess.Popen(
            [sys.executable, "-c", "from api.cli import main; main()", *args],
            env=self.env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: a kill reaches the pool children
        )
        log.close()
        self.processes.append(process)
        return process

    def worker(self, name: str, processes: int = 1, concurrency: int = 16) -> subprocess.Popen[bytes]:
        return self.start(
            "worker",
            f"--processes={processes}",
            f"--concurrency={concurrency}",
            "--loglevel=WARNING",
            f"--hostname={name}@%h",
            name=name,
        )

    def beat(self) -> subprocess.Popen[bytes]:
        return self.start("beat", name="beat")


def kill_group(process: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        return


@pytest.fixture
def cluster(
    redis_url: str, redis_prefix: str, postgres_url: str, simulator: SimulatorServer, tmp_path: Path
) -> Iterator[Callable[..., Cluster]]:
    made: list[Cluster] = []

    def make(limits: dict[str, dict[str, int]] | None = None) -> Cluster:
        broker_url = services.redis_db_url(redis_url, BROKER_DB)
        broker = redis.Redis.from_url(broker_url)
        broker.flushdb()
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "TOKENMILL_BROKER_URL": broker_url,
            "TOKENMILL_DATABASE_URL": postgres_url,
            "TOKENMILL_CACHE_URL": redis_url,
            "TOKENMILL_CACHE_PREFIX": f"{redis_prefix}cache:",
            "TOKENMILL_KEY_PREFIX": redis_prefix,
            "TOKENMILL_LEASE_SECONDS": "5",
            "TOKENMILL_VISIBILITY_TIMEOUT_SECONDS": "30",
            "TOKENMILL_UNACKED_RESTORE_INTERVAL_SECONDS": "1",
            "TOKENMILL_SWEEP_INTERVAL_SECONDS": "1",
            "TOKENMILL_SWEEP_GRACE_SECONDS": "1",
            "TOKENMILL_CHUNK_SIZE": "50",
            "TOKENMILL_LIMITS": json.dumps(limits or {}),
            "TOKENMILL_UPSTREAM_TIMEOUT_SECONDS": "20",
            "OPENAI_BASE_URL": simulator.base_url,
            "OPENAI_API_KEY": "sim",
        }
        settings = Settings(
            broker_url=broker_url,
            database_url=postgres_url,
            key_prefix=redis_prefix,
            chunk_size=50,
            visibility_timeout_seconds=30,
        )
        from store import make_engine

        logs = tmp_path / "logs"
        logs.mkdir(exist_ok=True)
        engine = make_engine(postgres_url)
        dispatcher = Dispatcher(
            celery=make_celery(settings),
            engine=engine,
            redis_client=broker,
            key_prefix=redis_prefix,
            chunk_size=50,
        )
        made.append(Cluster(env, settings, dispatcher, broker, [], logs))
        return made[-1]

    yield make
    for cluster in made:
        for process in cluster.processes:
            kill_group(process)
        for process in cluster.processes:
            process.wait(timeout=10)
        cluster.broker.flushdb()
        cluster.broker.close()
        cluster.dispatcher.engine.dispose()
        cluster.dispatcher.celery.close()


def wait_finished(led: Ledger, batch_id: str, timeout: float, logs: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        progress = batch_progress(led.engine, batch_id)
        if progress.finished == progress.total:
            return
        time.sleep(0.2)
    tails = {p.name: p.read_text(errors="replace")[-3000:] for p in logs.glob("*.log")}
    raise AssertionError(
        f"batch not finished in {timeout} s: {batch_progress(led.engine, batch_id)}; logs: {tails}"
    )


def wait_done_fraction(led: Ledger, batch_id: str, fraction: float, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        progress = batch_progress(led.engine, batch_id)
        if progress.finished >= progress.total * fraction:
            return
        time.sleep(0.05)
    raise AssertionError(f"batch did not reach {fraction:.0%}: {batch_progress(led.engine, batch_id)}")


def assert_recorded_once(led: Ledger, batch_id: str, ids: list[str]) -> list[Result]:
    with led.engine.connect() as conn:
        results = list(conn.execute(sa.select(Result).where(Result.batch_id == batch_id)).all())
        batch = conn.execute(sa.select(Batch).where(Batch.id == batch_id)).one()
    assert sorted(r.request_id for r in results) == sorted(ids)
    # The batch's counters were moved once per request, by the one result row each.
    assert batch.completed_count + batch.failed_count == len(ids)
    return results  # type: ignore[return-value]


def test_two_thousand_requests_across_two_processes(
    cluster: Callable[..., Cluster], make_ledger: Callable[[str], Ledger], postgres_url: str
) -> None:
    c = cluster()
    led = make_ledger(postgres_url)
    batch_id, ids = add_batch(led, [f"question {i}" for i in range(2000)])
    c.worker("w1", processes=2, concurrency=64)
    c.dispatcher.dispatch(ids)
    wait_finished(led, batch_id, 90, c.logs)
    results = assert_recorded_once(led, batch_id, ids)
    assert all(r.status == RequestStatus.SUCCEEDED for r in results)
    # Nothing left in flight: every chunk's marker was removed when it finished.
    assert not list(c.broker.scan_iter(match=f"{c.settings.key_prefix}dispatch:*"))


def test_kill_9_of_a_worker_mid_batch(
    cluster: Callable[..., Cluster],
    make_ledger: Callable[[str], Ledger],
    postgres_url: str,
    simulator: SimulatorServer,
) -> None:
    simulator.configure(latency_ms=100)
    c = cluster()
    led = make_ledger(postgres_url)
    batch_id, ids = add_batch(led, [f"question {i}" for i in range(400)])
    victim = c.worker("victim", concurrency=8)
    c.worker("survivor", concurrency=8)
    c.beat()
    c.dispatcher.dispatch(ids)
    wait_done_fraction(led, batch_id, 0.25)
    kill_group(victim)
    wait_finished(led, batch_id, 60, c.logs)
    results = assert_recorded_once(led, batch_id, ids)
    assert all(r.status == RequestStatus.SUCCEEDED for r in results)
    billed = [r for r in results if not r.cached]
    # Usage counted once: the batch's billed tokens are those of one result per request, and
    # every billed result was an upstream answer.
    assert len(billed) <= simulator.stats()["accepted"]
    assert sum(r.prompt_tokens for r in results) > 0


def test_broker_flushed_mid_batch(
    cluster: Callable[..., Cluster],
    make_ledger: Callable[[str], Ledger],
    postgres_url: str,
    simulator: SimulatorServer,
) -> None:
    simulator.configure(latency_ms=50)
    c = cluster()
    led = make_ledger(postgres_url)
    batch_id, ids = add_batch(led, [f"question {i}" for i in range(400)])
    c.worker("w1", concurrency=8)
    c.beat()
    c.dispatcher.dispatch(ids)
    wait_done_fraction(led, batch_id, 0.2)
    c.broker.flushdb()  # the broker's whole database: queue, unacked messages, markers
    wait_finished(led, batch_id, 60, c.logs)
    results = assert_recorded_once(led, batch_id, ids)
    assert all(r.status == RequestStatus.SUCCEEDED for r in results)


def test_429s_and_400s_under_a_global_rate_limit(
    cluster: Callable[..., Cluster],
    make_ledger: Callable[[str], Ledger],
    postgres_url: str,
    simulator: SimulatorServer,
) -> None:
    rpm = 1200
    simulator.configure(rate_429=0.3, retry_after_s=0.2)
    c = cluster(limits={"sim-model": {"rpm": rpm}})
    led = make_ledger(postgres_url)
    prompts = [f"question {i}" for i in range(100)] + [f"broken {i} [[status 400]]" for i in range(5)]
    batch_id, ids = add_batch(led, prompts)
    c.worker("w1", concurrency=32)
    c.worker("w2", concurrency=32)
    c.dispatcher.dispatch(ids)
    wait_finished(led, batch_id, 90, c.logs)
    results = assert_recorded_once(led, batch_id, ids)
    failed = [r for r in results if r.status == RequestStatus.FAILED]
    assert len(failed) == 5
    assert all(r.status_code == 400 and r.error_message for r in failed)
    stats = simulator.stats()
    assert stats["by_status"].get("429", 0) > 0
    # Every upstream attempt, refused ones included, went through the shared limiter: at most
    # rpm/60 a second over any 2 s window (+1: GCRA lets the first call of an idle bucket go at once).
    assert peak_count(stats["request_times"], 2.0) <= rpm / 60 * 2 + 1
