"""Throughput of tokenmill end to end against a raw asyncio + openai loop, on the same simulator.

    .venv/bin/python -m bench.throughput [--requests 10000] [--concurrency 128] [--processes 2]

Prints, each measured here and now:
  (1) zero latency: requests/s of (a) the baseline a user would write (one asyncio loop, the openai
      SDK as it comes, a semaphore of --concurrency) and (b) tokenmill as a user drives it (the
      openai SDK uploads the JSONL to ``tokenmill api`` and creates a batch, Celery worker
      subprocesses run it, the SDK polls until the batch is completed with every result in SQL),
      and the ratio b/a (target >= 1.0);
      also the same loop on the SDK's aiohttp transport, which tokenmill's clients use, so the part
      of the ratio that transport buys is in plain sight;
  (2) 500 ms latency: tokenmill's requests/s over the concurrency bound (in flight / latency),
      target >= 0.9, and the raw loop's at the same latency, since the client's own per-request
      cost keeps even the raw loop under the bound on a small machine;
  (3) a 600 requests/minute limit: the peak upstream rate over any 10 s window (must not exceed 10/s).

Needs Redis (logical database 14 is flushed) and PostgreSQL (a scratch database is created and
dropped); URLs from TOKENMILL_BENCH_REDIS_URL / TOKENMILL_BENCH_PG_URL.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

import httpx
import openai
import redis
import sqlalchemy as sa

from simulator.testing import SimulatorServer, free_port, peak_count
from store import create_api_key, create_tenant, make_engine, upgrade_to_head

ROOT = Path(__file__).resolve().parents[1]
REDIS_URL = os.environ.get("TOKENMILL_BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
PG_ADMIN_URL = os.environ.get(
    "TOKENMILL_BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
MODEL = "bench-model"


@contextmanager
def scratch_database() -> Iterator[str]:
    name = f"tm_bench_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        yield sa.make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


def prompts(count: int) -> list[str]:
    salt = uuid.uuid4().hex[:8]  # fresh prompts: no run is answered from an earlier run's cache
    return [f"bench {salt} question {i}" for i in range(count)]


async def baseline(base_url: str, count: int, concurrency: int, *, aiohttp: bool = False) -> float:
    """The loop a user would write: requests per second. ``aiohttp``: on the SDK's aiohttp transport."""
    client = openai.AsyncOpenAI(
        base_url=base_url,
        api_key="bench",
        max_retries=0,
        http_client=openai.DefaultAioHttpClient() if aiohttp else None,
    )
    gate = asyncio.Semaphore(concurrency)

    async def one(prompt: str) -> None:
        async with gate:
            await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}])

    started = time.perf_counter()
    await asyncio.gather(*(one(p) for p in prompts(count)))
    elapsed = time.perf_counter() - started
    await client.close()
    return count / elapsed


class Tokenmill:
    """``tokenmill api`` and ``tokenmill worker`` subprocesses on a scratch database and broker,
    driven through the official openai SDK."""

    def __init__(
        self, sim: SimulatorServer, database_url: str, processes: int, concurrency: int, limits: str
    ) -> None:
        self.broker = redis.Redis.from_url(REDIS_URL)
        self.broker.flushdb()
        upgrade_to_head(database_url)
        engine = make_engine(database_url)
        try:
            api_key = create_api_key(engine, create_tenant(engine, "bench").id, "bench")
        finally:
            engine.dispose()
        prefix = f"tmbench:{uuid.uuid4().hex[:8]}:"
        self.files = tempfile.TemporaryDirectory(prefix="tokenmill-bench-files-")
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "TOKENMILL_BROKER_URL": REDIS_URL,
            "TOKENMILL_DATABASE_URL": database_url,
            "TOKENMILL_CACHE_URL": REDIS_URL,
            "TOKENMILL_CACHE_PREFIX": f"{prefix}cache:",
            "TOKENMILL_KEY_PREFIX": prefix,
            "TOKENMILL_LIMITS": limits,
            "TOKENMILL_FILES_DIR": self.files.name,
            "OPENAI_BASE_URL": sim.base_url,
            "OPENAI_API_KEY": "bench",
        }
        # Each process's output, shown if the bench fails.
        self.logs: dict[str, IO[bytes]] = {}
        self.processes: list[subprocess.Popen[bytes]] = []
        # Whatever happens to this script, its subprocesses go with it.
        atexit.register(self._kill)
        try:
            self._start(
                env,
                "worker",
                f"--processes={processes}",
                f"--concurrency={concurrency}",
                "--loglevel=WARNING",
            )
            port = free_port()
            self._start(env, "api", "--host", "127.0.0.1", "--port", str(port))
            self.root = f"http://127.0.0.1:{port}"
            self.client = openai.OpenAI(base_url=f"{self.root}/v1", api_key=api_key, max_retries=0)
            self._wait_for_api()
            self.warm_up()
        except BaseException:
            self.close()
            raise

    def _start(self, env: dict[str, str], command: str, *args: str) -> None:
        log = self.logs[command] = tempfile.TemporaryFile(prefix=f"tokenmill-bench-{command}-")  # noqa: SIM115
        self.processes.append(
            subprocess.Popen(
                [sys.executable, "-c", "from cli.main import main; main()", command, *args],
                env=env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )

    def _kill(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)

    def _failed(self, what: str) -> RuntimeError:
        tails = []
        for name, log in self.logs.items():
            log.seek(0)
            tails.append(f"--- {name} log:\n{log.read()[-4000:].decode(errors='replace')}")
        return RuntimeError("\n".join([what, *tails]))

    def _wait_for_api(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.root}/readyz", timeout=1).status_code == 200:
                    return
            time.sleep(0.1)
        raise self._failed("tokenmill api did not answer within 30 s")

    def run(self, count: int) -> float:
        """Upload, create the batch, poll until it is completed: requests per second."""
        body = "\n".join(
            json.dumps(
                {
                    "custom_id": f"r{i}",
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": {"model": MODEL, "messages": [{"role": "user", "content": prompt}]},
                }
            )
            for i, prompt in enumerate(prompts(count))
        ).encode()
        started = time.perf_counter()
        upload = self.client.files.create(file=("bench.jsonl", body), purpose="batch")
        batch = self.client.batches.create(
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        deadline = time.monotonic() + 600
        while batch.status not in ("completed", "failed", "expired", "cancelled"):
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.processes):
                raise self._failed(f"batch stuck at {batch.status} {batch.request_counts}")
            time.sleep(0.05)
            batch = self.client.batches.retrieve(batch.id)
        elapsed = time.perf_counter() - started
        counts = batch.request_counts
        if batch.status != "completed" or counts is None or counts.completed != count:
            raise self._failed(f"batch ended {batch.status} with {counts}")
        return count / elapsed

    def warm_up(self) -> None:
        """Processes booted and one small batch through, so boot time is not measured."""
        self.run(20)

    def close(self) -> None:
        atexit.unregister(self._kill)
        for process in self.processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self.broker.flushdb()
        self.broker.close()
        for log in self.logs.values():
            log.close()
        self.files.cleanup()


def _only_one_bench() -> None:
    """Two runs at once would flush each other's broker (database 14): refuse the second. The
    mark lives in database 0, which no run flushes, and expires if its run is killed."""
    marks = redis.Redis.from_url(redis_url_with_db(REDIS_URL, 0))
    mark = f"tokenmill-bench:running:{REDIS_URL}"
    if not marks.set(mark, os.getpid(), nx=True, ex=3600):
        sys.exit(
            f"another bench.throughput (pid {marks.get(mark)!r}) is using {REDIS_URL}; delete {mark} if not"
        )
    atexit.register(marks.delete, mark)


def redis_url_with_db(url: str, db: int) -> str:
    parts = urlsplit(url)
    return parts._replace(path=f"/{db}").geturl()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=128, help="requests in flight in total")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--latency-requests", type=int, default=10_000)
    parser.add_argument("--limited-requests", type=int, default=400)
    args = parser.parse_args()
    # `timeout` and Ctrl-C end the script through SystemExit, so atexit reaps the workers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    _only_one_bench()
    per_process = max(1, args.concurrency // args.processes)
    total_in_flight = per_process * args.processes

    with SimulatorServer() as sim:
        base = asyncio.run(baseline(sim.base_url, args.requests, total_in_flight))
        print(
            f"(a) baseline asyncio+openai, {args.requests} requests, "
            f"{total_in_flight} in flight: {base:,.0f} req/s"
        )
        base_aiohttp = asyncio.run(baseline(sim.base_url, args.requests, total_in_flight, aiohttp=True))
        print(f"    the same loop on the SDK's aiohttp transport: {base_aiohttp:,.0f} req/s")
        with scratch_database() as url:
            mill = Tokenmill(sim, url, args.processes, per_process, "{}")
            try:
                ours = mill.run(args.requests)
                print(
                    f"(b) tokenmill end to end, {args.processes} processes x {per_process}: {ours:,.0f} req/s"
                )
                print(
                    f"    ratio b/a = {ours / base:.2f}  (target >= 1.0); "
                    f"over the aiohttp loop: {ours / base_aiohttp:.2f}"
                )

                sim.configure(latency_ms=500)
                bound = total_in_flight / 0.5
                achieved = mill.run(args.latency_requests)
                print(
                    f"(2) 500 ms latency, {args.latency_requests} requests: {achieved:,.0f} req/s of a "
                    f"{bound:,.0f} req/s bound = {achieved / bound:.2f}  (target >= 0.9)"
                )
                # What this machine allows at all: the raw loop, same latency and concurrency.
                raw = asyncio.run(baseline(sim.base_url, args.latency_requests, total_in_flight))
                print(
                    f"    the raw asyncio+openai loop at 500 ms: {raw:,.0f} req/s = {raw / bound:.2f} "
                    f"of the bound; tokenmill / raw = {achieved / raw:.2f}"
                )
            finally:
                mill.close()
        sim.reset()
        with scratch_database() as url:
            limited = Tokenmill(sim, url, args.processes, per_process, json.dumps({MODEL: {"rpm": 600}}))
            try:
                sim.reset()
                limited.run(args.limited_requests)
                stats = sim.stats()
                peak = peak_count(stats["request_times"], 10.0)
                print(
                    f"(3) rpm limit 600, {args.limited_requests} requests: peak {peak} upstream requests "
                    f"in a 10 s window = {peak * 6} /min  "
                    f"(limit 600 /min: {'ok' if peak <= 100 else 'EXCEEDED'})"
                )
            finally:
                limited.close()


if __name__ == "__main__":
    main()
