"""How throughput grows with worker processes, and what each request costs the shared services.

    .venv/bin/python -m bench.scaleout [--requests 4000] [--processes 1,2,4] [--latencies 0,50]

For each upstream latency (the simulator's) and each count of worker processes (64 requests in
flight each), a batch of ``--requests`` lines goes end to end as in ``bench.throughput`` (the
openai SDK uploads it to ``tokenmill api``, ``tokenmill worker --processes N`` runs it, the SDK
polls it to completed). Printed per run: requests/s and its ratio to one process's (the curve),
and what the shared services did per request: Redis commands (broker, cache and limiter share
one server here), PostgreSQL transactions and rows written, and those per second, which say when
the broker, the cache or the ledger becomes the limit (see the report's README text).

Redis is ``bench.throughput``'s own ``redis-server`` (so that other clients of the machine's
Redis do not count); PostgreSQL is the one of ``bench.throughput`` (a scratch database per run;
its ``pg_stat_database`` row is read before and after).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from dataclasses import dataclass

import redis
import sqlalchemy as sa

from bench.throughput import Tokenmill, own_redis, scratch_database
from simulator.testing import SimulatorServer


@dataclass(frozen=True)
class Counters:
    redis_commands: int
    pg_transactions: int
    pg_rows_written: int

    def minus(self, before: Counters) -> Counters:
        return Counters(
            self.redis_commands - before.redis_commands,
            self.pg_transactions - before.pg_transactions,
            self.pg_rows_written - before.pg_rows_written,
        )


def counters(redis_url: str, database_url: str) -> Counters:
    commands = int(redis.Redis.from_url(redis_url).info("stats")["total_commands_processed"])
    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as conn:
            # Backends report their counters at most once a second, and when idle.
            conn.execute(sa.text("SELECT pg_sleep(1.1)"))
            row = conn.execute(
                sa.text(
                    "SELECT xact_commit, tup_inserted + tup_updated + tup_deleted AS written "
                    "FROM pg_stat_database WHERE datname = current_database()"
                )
            ).one()
    finally:
        engine.dispose()
    return Counters(commands, int(row.xact_commit), int(row.written))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--processes", default="1,2,4", help="worker process counts, comma separated")
    parser.add_argument("--latencies", default="0,50", help="upstream latencies in ms, comma separated")
    parser.add_argument("--per-process", type=int, default=64, help="requests in flight per process")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    process_counts = [int(n) for n in args.processes.split(",")]
    latencies = [float(ms) for ms in args.latencies.split(",")]
    with own_redis() as (redis_url, _):
        print(
            f"{args.requests:,} requests per run, {args.per_process} in flight per process; "
            f"{os.cpu_count()} CPUs (shared: only ratios within this run mean much)"
        )
        header = (
            f"{'latency':>8} {'procs':>5} {'req/s':>7} {'x 1 proc':>8} {'redis cmd/req':>13} "
            f"{'redis cmd/s':>11} {'pg xact/req':>11} {'pg rows/req':>11} {'pg rows/s':>9}"
        )
        with SimulatorServer() as sim:
            for latency in latencies:
                print(f"\n{header}")
                single: float | None = None
                for processes in process_counts:
                    sim.configure(latency_ms=latency)
                    with scratch_database() as url:
                        mill = Tokenmill(sim, url, processes, args.per_process, "{}", redis_url=redis_url)
                        try:
                            before = counters(redis_url, url)
                            started = time.perf_counter()
                            rate = mill.run(args.requests).per_second
                            elapsed = time.perf_counter() - started
                            spent = counters(redis_url, url).minus(before)
                        finally:
                            mill.close()
                    single = single or rate
                    n = args.requests
                    print(
                        f"{latency:>6.0f}ms {processes:>5} {rate:>7,.0f} {rate / single:>8.2f} "
                        f"{spent.redis_commands / n:>13.1f} {spent.redis_commands / elapsed:>11,.0f} "
                        f"{spent.pg_transactions / n:>11.2f} {spent.pg_rows_written / n:>11.2f} "
                        f"{spent.pg_rows_written / elapsed:>9,.0f}",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
