"""Latency of one chat completion through tokenmill against the same call made to the upstream directly.

    .venv/bin/python -m bench.sync_latency [--requests 400] [--latency-ms 50] [--processes 2]

The upstream is the simulator answering in --latency-ms; both paths are driven by the official
openai SDK (AsyncOpenAI, distinct prompts, so nothing is a cache hit), measured here and now:

  (1) non-streamed, one call at a time and 16 at once: p50 and p99 of the direct calls and of the
      calls through ``tokenmill api`` + ``tokenmill worker`` (its interactive lane), and what
      tokenmill adds (targets: +5 ms p50 alone; +15 ms p50 and +60 ms p99 at 16), and the CPU
      each call through tokenmill cost its API, its workers and PostgreSQL (the SDK's own CPU in
      this script on either path beside them): on a machine the upstream and its callers share,
      CPU per call is what latency under concurrency is made of;
  (2) streamed, one at a time: time to the first content chunk, direct and through tokenmill
      (target: within 20 ms of the upstream's).

At 16 concurrent it also adds up the CPU each call cost every process on the machine (the SDK,
the simulator, Redis, the API, the workers, PostgreSQL) and sets it against what the machine's
cores allow: the CPU per call at which 16 callers could meet the target's p50 at all.

Needs Redis and PostgreSQL: a redis-server of the bench's own (or TOKENMILL_BENCH_REDIS_URL, whose
CPU is then not measured; every key of a run is under its own prefixes, deleted afterwards) and
TOKENMILL_BENCH_PG_URL (a scratch database is created and dropped). The machine may be shared: run
it more than once.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import openai
import redis
import sqlalchemy as sa
from openai.types.chat import ChatCompletionMessageParam

from bench.throughput import (
    ServiceProcesses,
    own_redis,
    pid_cpu_seconds,
    scratch_database,
    session_cpu_seconds,
)
from simulator.testing import SimulatorServer, free_port
from store import create_api_key, create_tenant, make_engine, upgrade_to_head

ROOT = Path(__file__).resolve().parents[1]
MODEL = "bench-model"
TARGET_ADDED_P50_AT_16 = 0.015
CONCURRENT = 16


class Stack(ServiceProcesses):
    """``tokenmill api`` and ``tokenmill worker`` subprocesses on a scratch database, with key
    prefixes of their own on the bench's Redis."""

    def __init__(
        self, sim: SimulatorServer, database_url: str, processes: int, redis_url: str, redis_pid: int | None
    ) -> None:
        super().__init__()
        self.redis_url = redis_url
        # Processes beside the stack whose CPU a call costs: pid -> name.
        self.servers = {pid: name for pid, name in ((sim.pid, "simulator"), (redis_pid, "redis")) if pid}
        upgrade_to_head(database_url)
        engine = make_engine(database_url)
        try:
            self.api_key = create_api_key(engine, create_tenant(engine, "bench").id, "bench")
        finally:
            engine.dispose()
        self.prefix = f"tmlatency:{uuid.uuid4().hex[:8]}:"
        self.files = tempfile.TemporaryDirectory(prefix="tokenmill-bench-files-")
        # NullPool: looking up the backends keeps none of its own alive.
        self.database = sa.create_engine(database_url, poolclass=sa.NullPool)
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "TOKENMILL_BROKER_URL": redis_url,
            "TOKENMILL_BROKER_KEY_PREFIX": f"{self.prefix}broker:",
            "TOKENMILL_DATABASE_URL": database_url,
            "TOKENMILL_CACHE_URL": redis_url,
            "TOKENMILL_CACHE_PREFIX": f"{self.prefix}cache:",
            "TOKENMILL_KEY_PREFIX": self.prefix,
            "TOKENMILL_FILES_DIR": self.files.name,
            "OPENAI_BASE_URL": sim.base_url,
            "OPENAI_API_KEY": "bench",
        }
        try:
            self._start(env, "worker", f"--processes={processes}", "--loglevel=WARNING")
            port = free_port()
            self._start(env, "api", "--host", "127.0.0.1", "--port", str(port))
            self.base_url = f"http://127.0.0.1:{port}/v1"
            self._wait_for_api(f"http://127.0.0.1:{port}", 60)
        except BaseException:
            self.close()
            raise

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds so far of the API's and the worker's process trees, of the simulator and the
        bench's Redis, and of each PostgreSQL backend serving the scratch database (by pid:
        ``pg-<pid>``)."""
        by_session = session_cpu_seconds(self.sessions.values())
        seconds = {name: by_session[pid] for name, pid in self.sessions.items()}
        for pid, cpu in pid_cpu_seconds(self.servers).items():
            seconds[self.servers[pid]] = cpu
        with self.database.connect() as conn:
            backends = conn.execute(
                sa.text(
                    "SELECT pid FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            ).scalars()
            seconds.update({f"pg-{pid}": cpu for pid, cpu in pid_cpu_seconds(backends).items()})
        return seconds

    def close(self) -> None:
        self._stop()
        self.database.dispose()
        client = redis.Redis.from_url(self.redis_url)
        try:
            keys = list(client.scan_iter(match=f"{self.prefix}*", count=1000))
            for start in range(0, len(keys), 1000):
                client.delete(*keys[start : start + 1000])
        finally:
            client.close()
        for log in self.logs.values():
            log.close()
        self.files.cleanup()


def _prompt() -> list[ChatCompletionMessageParam]:
    return [{"role": "user", "content": f"latency {uuid.uuid4().hex}"}]


async def timed_calls(client: openai.AsyncOpenAI, count: int, concurrency: int) -> list[float]:
    """Seconds per call, ``concurrency`` callers each making calls one after another."""
    latencies: list[float] = []

    async def caller(calls: int) -> None:
        for _ in range(calls):
            started = time.perf_counter()
            await client.chat.completions.create(model=MODEL, messages=_prompt())
            latencies.append(time.perf_counter() - started)

    share = max(1, count // concurrency)
    await asyncio.gather(*(caller(share) for _ in range(concurrency)))
    return latencies


async def time_to_first_token(client: openai.AsyncOpenAI, count: int) -> list[float]:
    """Seconds to the first content chunk of streamed calls, one at a time."""
    firsts: list[float] = []
    for _ in range(count):
        started = time.perf_counter()
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=_prompt(),
            stream=True,
        )
        first: float | None = None
        async for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - started
        assert first is not None
        firsts.append(first)
    return firsts


async def _timed(client: openai.AsyncOpenAI, *, count: int, concurrency: int) -> list[float]:
    return await timed_calls(client, count, concurrency)


def _cpu_per_call(
    before: dict[str, float], after: dict[str, float], calls: int, driver_through: float, driver_direct: float
) -> dict[str, float]:
    """Milliseconds of CPU per call: API, workers, PostgreSQL (backends that started meanwhile
    count whole), the simulator and Redis (when measured), and this script's SDK on each path."""
    spent = {name: seconds - before.get(name, 0.0) for name, seconds in after.items()}
    parts = {
        "api": 1000 * spent["api"] / calls,
        "workers": 1000 * spent["worker"] / calls,
        "postgresql": 1000 * sum(v for k, v in spent.items() if k.startswith("pg-")) / calls,
    }
    parts.update({name: 1000 * spent[name] / calls for name in ("simulator", "redis") if name in spent})
    parts["sdk direct"] = 1000 * driver_direct / calls
    parts["sdk through"] = 1000 * driver_through / calls
    return parts


def print_cpu_budget(parts: dict[str, float], direct_p50: float, ours_p50: float) -> None:
    """The CPU a call through tokenmill cost every process on the machine at ``CONCURRENT``
    callers, against the most it may cost for them to meet the target's p50 at all: with ``cores``
    busy all the time, ``cores / cpu`` calls a second, so ``CONCURRENT`` callers wait at least
    ``CONCURRENT * cpu / cores`` a call."""
    cores = os.cpu_count() or 1
    spent = sum(ms for name, ms in parts.items() if name != "sdk direct") / 1000
    target = direct_p50 + TARGET_ADDED_P50_AT_16
    print(
        f"CPU per call at {CONCURRENT} through tokenmill, every process on the machine: "
        f"{spent * 1000:.2f} ms; {cores} cores then serve at most {cores / spent:.0f} calls/s, "
        f"so {CONCURRENT} callers wait at least {_ms(CONCURRENT * spent / cores).strip()} a call "
        f"(measured p50 {_ms(ours_p50).strip()})"
    )
    print(
        f"  the target (p50 {_ms(target).strip()} at {CONCURRENT}) needs at most "
        f"{target * cores / CONCURRENT * 1000:.2f} ms of CPU per call in all, the SDK's and the "
        f"simulator's included ({parts['sdk through'] + parts.get('simulator', 0.0):.2f} ms here)"
    )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:7.1f} ms"


def run(
    make: Callable[[], openai.AsyncOpenAI], job: Callable[[openai.AsyncOpenAI], Awaitable[list[float]]]
) -> list[float]:
    async def go() -> list[float]:
        client = make()
        try:
            return await job(client)
        finally:
            await client.close()

    return asyncio.run(go())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=400, help="calls per measurement")
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--processes", type=int, default=2, help="worker processes")
    parser.add_argument("--stream-requests", type=int, default=60)
    parser.add_argument("--chunk-delay-ms", type=float, default=20.0, help="between streamed chunks")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    with (
        own_redis() as (redis_url, redis_pid),
        SimulatorServer(latency_ms=args.latency_ms) as sim,
        scratch_database() as url,
    ):
        stack = Stack(sim, url, args.processes, redis_url, redis_pid)
        try:

            def direct() -> openai.AsyncOpenAI:
                return openai.AsyncOpenAI(base_url=sim.base_url, api_key="bench", max_retries=0)

            def through() -> openai.AsyncOpenAI:
                return openai.AsyncOpenAI(
                    base_url=stack.base_url, api_key=stack.api_key, max_retries=0, timeout=60
                )

            # Warm both paths up: connections, worker processes, the lane.
            run(direct, lambda c: timed_calls(c, 20, 4))
            run(through, lambda c: timed_calls(c, 40, 8))
            cpu_per_call: dict[int, dict[str, float]] = {}
            p50s: dict[int, tuple[float, float]] = {}
            print(
                f"upstream: simulator at {args.latency_ms:.0f} ms; {args.requests} calls per row; "
                f"{args.processes} worker processes"
            )
            print(f"{'':28}{'p50':>10} {'p99':>10}   {'added p50':>10} {'added p99':>10}")
            for concurrency in (1, CONCURRENT):
                job = functools.partial(_timed, count=args.requests, concurrency=concurrency)
                driver_started = time.process_time()
                base = run(direct, job)
                driver_direct = time.process_time() - driver_started
                cpu_before, driver_started = stack.cpu_seconds(), time.process_time()
                ours = run(through, job)
                cpu_per_call[concurrency] = _cpu_per_call(
                    cpu_before,
                    stack.cpu_seconds(),
                    len(ours),
                    time.process_time() - driver_started,
                    driver_direct,
                )
                b50, b99 = percentile(base, 50), percentile(base, 99)
                o50, o99 = percentile(ours, 50), percentile(ours, 99)
                p50s[concurrency] = (b50, o50)
                print(f"direct,      concurrency {concurrency:2}  {_ms(b50)} {_ms(b99)}")
                print(
                    f"tokenmill,   concurrency {concurrency:2}  {_ms(o50)} {_ms(o99)}   "
                    f"{_ms(o50 - b50)} {_ms(o99 - b99)}"
                )
            print("targets: added p50 <= 5 ms alone; added p50 <= 15 ms and p99 <= 60 ms at 16")
            print("CPU per call through tokenmill (the SDK in this script: direct / through):")
            for concurrency, parts in cpu_per_call.items():
                print(
                    f"  concurrency {concurrency:2}  "
                    + ", ".join(f"{k} {v:.2f} ms" for k, v in parts.items())
                )
            print_cpu_budget(cpu_per_call[CONCURRENT], *p50s[CONCURRENT])

            sim.configure(stream_chunk_delay_ms=args.chunk_delay_ms)
            base = run(direct, lambda c: time_to_first_token(c, args.stream_requests))
            ours = run(through, lambda c: time_to_first_token(c, args.stream_requests))
            print(
                f"time to first token, streamed, one at a time ({args.stream_requests} calls, "
                f"{args.chunk_delay_ms:.0f} ms between chunks):"
            )
            print(f"direct                      {_ms(percentile(base, 50))} {_ms(percentile(base, 99))}")
            print(
                f"tokenmill                   {_ms(percentile(ours, 50))} {_ms(percentile(ours, 99))}   "
                f"{_ms(statistics.median(ours) - statistics.median(base))}"
                "  (target: within 20 ms)"
            )
        finally:
            stack.close()


if __name__ == "__main__":
    main()
