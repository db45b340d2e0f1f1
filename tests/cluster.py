"""A cluster of real ``tokenmill worker`` / ``tokenmill beat`` subprocesses for tests: a Redis broker
on a logical database of its own (``services.private_database_url``, flushed before and after),
the test's own PostgreSQL database and cache prefix, and the simulator as the upstream. The
``cluster`` fixture is registered for every test in ``tests/conftest.py``; ``c.env`` may be
extended before starting processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from config import Settings
from simulator.testing import SimulatorServer
from tests import services
from workers.app import make_celery
from workers.dispatch import Dispatcher

__all__ = ["CLI", "ROOT", "Cluster", "cluster", "kill_group", "run_cli"]

ROOT = Path(__file__).resolve().parents[1]
# ``tokenmill ARGS`` as a subprocess of the venv that runs the tests.
CLI = [sys.executable, "-c", "from cli.main import main; main()"]


def run_cli(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``tokenmill ARGS`` to the end, output captured."""
    return subprocess.run([*CLI, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


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
            [*CLI, *args],
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
        broker_url = services.private_database_url(redis_url, "cluster")
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
