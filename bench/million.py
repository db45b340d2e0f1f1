"""A million-line batch end to end: ingested through the API, run by worker processes against the
simulator (0 ms), exported to disk; throughput and memory per tenth of the batch.

    .venv/bin/python -m bench.million [--lines 1000000] [--processes 2] [--concurrency 128]

The input JSONL is written to a temporary file and uploaded with the openai SDK from the open
file (streamed, never in memory here); the batch is polled every ``--poll`` seconds as a client
would (``GET /v1/batches/{id}``, usage included); the output file is downloaded with the SDK's
streaming response straight to disk and its lines counted.

A ``tokenmill beat`` runs beside them as in a deployment (its sweeps read the ledger every few
seconds; ``--no-beat`` leaves it out).

Prints one row per tenth of the lines (per 100k lines at a million): the lines/s over that tenth;
the CPU per line of tokenmill's processes (API, workers with their pool children, beat) and of
the PostgreSQL backends serving the scratch database (when the server is local); the SQL time per
line, from ``pg_stat_statements`` when the server loads it (``shared_preload_libraries``); the
1-minute load average; the peak RSS over the tenth of the API process and of the worker (every
process of its tree: the Celery parent and its pool children). Then the targets, each against its
own baseline in this run: the last tenth's throughput over the first tenth's (target within 10%:
>= 0.90) and over the second's (the first tenth also carries the dispatch of the whole batch and
the first statistics of a new batch: the steady state starts after it), the same ratios of CPU per
line (what the ledger costs a line, which a busy neighbour on a shared machine does not change as
it changes lines/s), and the RSS growth of the API and of the workers from the end of the first
tenth to the end (target flat). With ``pg_stat_statements``, the statements that took the most
SQL time in the first and the last tenth, per line.

A server whose autovacuum is off (a shared dev machine's) gets a VACUUM (ANALYZE) of the ledger's
tables every ``--vacuum-seconds`` from here, as autovacuum would give a deployment; the run says so.

Needs Redis and PostgreSQL as ``bench.throughput`` (its URLs, its scratch database; set
TOKENMILL_BENCH_REDIS_URL to a logical database no other bench run uses at the same time).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa

from bench.throughput import (
    MODEL,
    Tokenmill,
    own_redis,
    pid_cpu_seconds,
    scratch_database,
    session_cpu_seconds,
)
from simulator.testing import SimulatorServer

MB = 1024 * 1024


def _status(pid: int) -> dict[str, str]:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:  # gone
        return {}
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (0 once it is gone; Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            parent = _status(int(entry.name)).get("PPid")
            if parent is not None:
                children.setdefault(int(parent), []).append(int(entry.name))
    total, pending = 0, [pid]
    while pending:
        current = pending.pop()
        rss = _status(current).get("VmRSS")
        if rss is not None:
            total += int(rss.split()[0]) * 1024  # "1234 kB"
        pending.extend(children.get(current, ()))
    return total


@dataclass
class MemoryWatch:
    """Samples the RSS of the API and worker trees on a thread; ``take_peaks`` returns the peaks
    since the previous call."""

    api_pid: int
    worker_pid: int
    interval: float = 0.25
    _peaks: list[int] = field(default_factory=lambda: [0, 0])
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            api, workers = tree_rss(self.api_pid), tree_rss(self.worker_pid)
            with self._lock:
                self._peaks = [max(self._peaks[0], api), max(self._peaks[1], workers)]

    def take_peaks(self) -> tuple[int, int]:
        api, workers = tree_rss(self.api_pid), tree_rss(self.worker_pid)
        with self._lock:
            peaks = (max(self._peaks[0], api), max(self._peaks[1], workers))
            self._peaks = [0, 0]
        return peaks

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def write_input(path: Path, lines: int) -> int:
    """The batch's JSONL, written line by line; returns its size in bytes."""
    salt = uuid.uuid4().hex[:8]  # fresh prompts: nothing answered from an earlier run's cache
    with path.open("w") as out:
        for i in range(lines):
            line = {
                "custom_id": f"r{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": MODEL, "messages": [{"role": "user", "content": f"m {salt} q {i}"}]},
            }
            out.write(json.dumps(line, separators=(",", ":")) + "\n")
    return path.stat().st_size


class VacuumStandIn:
    """When the server's autovacuum is off (as on a shared dev machine), VACUUM (ANALYZE) the
    ledger's tables every ``interval`` seconds on a thread, as autovacuum would in a deployment:
    otherwise every request's dead row versions stay in the tables and indexes, and the planner
    never learns the tables grew. Does nothing when autovacuum is on."""

    def __init__(self, database_url: str, interval: float) -> None:
        self.engine = sa.create_engine(database_url, isolation_level="AUTOCOMMIT")
        with self.engine.connect() as conn:
            self.active = conn.execute(sa.text("SHOW autovacuum")).scalar_one() == "off"
        self.passes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        if self.active:
            self._thread.start()

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            with self.engine.connect() as conn:
                conn.execute(sa.text("VACUUM (ANALYZE) requests, results, batches, discarded_answers"))
            self.passes += 1

    def stop(self) -> None:
        self._stop.set()
        if self.active:
            self._thread.join()
        self.engine.dispose()


@dataclass(frozen=True)
class Costs:
    """Running totals at one moment: CPU seconds of tokenmill's processes and of the scratch
    database's backends, and per statement (query id) its SQL milliseconds and text."""

    tokenmill_cpu: float
    database_cpu: float
    statements: dict[int, tuple[float, str]]

    @property
    def sql_ms(self) -> float:
        return sum(ms for ms, _ in self.statements.values())


class LedgerWatch:
    """Reads the costs that say whether a line costs more as the ledger grows, whatever else the
    machine runs: CPU seconds of tokenmill's sessions and of the PostgreSQL backends serving the
    scratch database (readable in /proc when the server is local; a backend that ended between
    two readings is missed), and ``pg_stat_statements`` of that database when the server loads it."""

    def __init__(self, mill: Tokenmill, database_url: str) -> None:
        self.mill = mill
        self.engine = sa.create_engine(database_url, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
        self.statements = False
        with self.engine.connect() as conn:
            preloaded = conn.execute(sa.text("SHOW shared_preload_libraries")).scalar_one()
            if "pg_stat_statements" in preloaded:
                conn.execute(sa.text("CREATE EXTENSION IF NOT EXISTS pg_stat_statements"))
                self.statements = True
        self._backend_cpu: dict[int, float] = {}

    def read(self) -> Costs:
        tokenmill = sum(session_cpu_seconds(self.mill.sessions.values()).values())
        with self.engine.connect() as conn:
            backends = list(
                conn.execute(
                    sa.text(
                        "SELECT pid FROM pg_stat_activity"
                        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                    )
                ).scalars()
            )
            statements: dict[int, tuple[float, str]] = {}
            if self.statements:
                rows = conn.execute(
                    sa.text(
                        "SELECT queryid, total_exec_time, left(regexp_replace(query, '\\s+', ' ', 'g'), 110)"
                        " FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database"
                        " WHERE datname = current_database()) AND queryid IS NOT NULL"
                        " AND query NOT LIKE '%pg_stat_%'"  # this watch's own reads
                    )
                ).all()
                statements = {int(row[0]): (float(row[1]), str(row[2])) for row in rows}
        # Each backend's CPU as last read: one that ended keeps what it had (its tail is missed),
        # one that began is counted whole.
        self._backend_cpu.update(pid_cpu_seconds(backends))
        database = sum(self._backend_cpu.values())
        return Costs(tokenmill, database, statements)

    def close(self) -> None:
        self.engine.dispose()


@dataclass
class Row:
    done: int
    rate: float
    api_rss: int
    worker_rss: int
    lines: int = 0
    tokenmill_cpu_ms: float = 0.0  # per line
    database_cpu_ms: float = 0.0  # per line
    sql_ms: float | None = None  # per line, from pg_stat_statements
    load: float = 0.0
    top: list[tuple[float, str]] = field(default_factory=list)  # SQL ms per line, statement


def run(
    lines: int, processes: int, concurrency: int, poll: float, vacuum_seconds: float, *, beat: bool = True
) -> None:
    per_process = max(1, concurrency // processes)
    with tempfile.TemporaryDirectory(prefix="tokenmill-million-") as scratch:
        source = Path(scratch) / "input.jsonl"
        size = write_input(source, lines)
        print(f"{lines:,} lines, {size / MB:,.0f} MB of JSONL; {processes} worker processes x {per_process}")
        with own_redis() as (redis_url, _), SimulatorServer() as sim, scratch_database() as url:
            mill = Tokenmill(sim, url, processes, per_process, "{}", redis_url=redis_url)
            if beat:
                mill._start(mill.env, "beat")  # the sweeper, as a deployment runs it
            watch = MemoryWatch(api_pid=mill.processes[1].pid, worker_pid=mill.processes[0].pid)
            vacuum = VacuumStandIn(url, vacuum_seconds)
            ledger = LedgerWatch(mill, url)
            if vacuum.active:
                print(f"autovacuum is off on this server: VACUUM (ANALYZE) every {vacuum_seconds:.0f} s here")
            if not ledger.statements:
                print("pg_stat_statements is not loaded on this server: no SQL time per line")
            try:
                baseline_api, baseline_workers = watch.take_peaks()
                print(
                    f"after warm-up: API {baseline_api / MB:,.0f} MB, workers {baseline_workers / MB:,.0f} MB"
                    f"{'; beat running' if beat else ''}"
                )
                rows, output_lines = drive(
                    mill, watch, ledger, source, lines, poll, Path(scratch) / "output.jsonl"
                )
            finally:
                ledger.close()
                vacuum.stop()
                watch.stop()
                mill.close()
    report(rows, lines, output_lines)


def tenth_row(
    done: int, lines: int, seconds: float, peaks: tuple[int, int], before: Costs, after: Costs
) -> Row:
    per_line = 1000 / max(1, lines)
    top: list[tuple[float, str]] = []
    sql_ms = None
    if after.statements:
        spent = {
            query: ms - before.statements.get(query, (0.0, ""))[0]
            for query, (ms, _) in after.statements.items()
        }
        sql_ms = sum(spent.values()) / max(1, lines)
        top = sorted(
            ((ms / max(1, lines), after.statements[query][1]) for query, ms in spent.items() if ms > 0),
            reverse=True,
        )[:6]
    return Row(
        done,
        lines / max(1e-9, seconds),
        peaks[0],
        peaks[1],
        lines=lines,
        tokenmill_cpu_ms=(after.tokenmill_cpu - before.tokenmill_cpu) * per_line,
        database_cpu_ms=(after.database_cpu - before.database_cpu) * per_line,
        sql_ms=sql_ms,
        load=os.getloadavg()[0],
        top=top,
    )


def drive(
    mill: Tokenmill,
    watch: MemoryWatch,
    ledger: LedgerWatch,
    source: Path,
    lines: int,
    poll: float,
    output: Path,
) -> tuple[list[Row], int]:
    client = mill.client
    started = time.perf_counter()
    with source.open("rb") as stream:
        upload = client.files.create(file=("input.jsonl", stream), purpose="batch")
    uploaded = time.perf_counter()
    batch = client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    while batch.status == "validating":
        time.sleep(poll)
        batch = client.batches.retrieve(batch.id)
    validated = time.perf_counter()
    api_peak, worker_peak = watch.take_peaks()
    print(
        f"ingest: upload {uploaded - started:,.1f} s, validation {validated - uploaded:,.1f} s = "
        f"{lines / (validated - started):,.0f} lines/s; peak RSS API {api_peak / MB:,.0f} MB, "
        f"workers {worker_peak / MB:,.0f} MB"
    )
    step = max(1, lines // 10)
    rows: list[Row] = []
    mark_done, mark_time, mark_costs = 0, validated, ledger.read()
    print(
        f"\n{'lines done':>12} {'lines/s':>8} {'CPU ms/line':>11} {'PG CPU ms':>9} {'SQL ms':>7} {'load':>5} "
        f"{'API RSS MB':>10} {'workers RSS MB':>14} {'poll ms':>7}"
    )
    deadline = time.monotonic() + 24 * 3600
    while True:
        polled = time.perf_counter()
        batch = client.batches.retrieve(batch.id)
        poll_ms = (time.perf_counter() - polled) * 1000
        counts = batch.request_counts
        done = (counts.completed + counts.failed) if counts is not None else 0
        now = time.perf_counter()
        if done >= mark_done + step or (done == lines and done > mark_done):
            costs = ledger.read()
            row = tenth_row(done, done - mark_done, now - mark_time, watch.take_peaks(), mark_costs, costs)
            rows.append(row)
            sql = "-" if row.sql_ms is None else f"{row.sql_ms:.2f}"
            print(
                f"{done:>12,} {row.rate:>8,.0f} {row.tokenmill_cpu_ms:>11.2f} {row.database_cpu_ms:>9.2f} "
                f"{sql:>7} {row.load:>5.1f} {row.api_rss / MB:>10,.0f} {row.worker_rss / MB:>14,.0f} "
                f"{poll_ms:>7,.0f}",
                flush=True,
            )
            mark_done, mark_time, mark_costs = done, now, costs
        if batch.status not in ("in_progress", "finalizing", "validating"):
            break
        if time.monotonic() > deadline or any(p.poll() is not None for p in mill.processes):
            raise RuntimeError(f"batch stuck at {batch.status} {counts}")
        time.sleep(poll)
    finished = time.perf_counter()
    if batch.status != "completed" or batch.output_file_id is None:
        raise RuntimeError(f"batch ended {batch.status} with {batch.request_counts}")
    print(f"run: {lines / (finished - validated):,.0f} lines/s over the whole batch")
    watch.take_peaks()
    written = 0
    with (
        client.files.with_streaming_response.content(batch.output_file_id) as response,
        output.open("wb") as out,
    ):
        for block in response.iter_bytes(1024 * 1024):
            out.write(block)
            written += block.count(b"\n")
    exported = time.perf_counter()
    api_peak, _ = watch.take_peaks()
    print(
        f"export: {written:,} lines, {output.stat().st_size / MB:,.0f} MB in {exported - finished:,.1f} s = "
        f"{written / max(1e-9, exported - finished):,.0f} lines/s; peak API RSS {api_peak / MB:,.0f} MB"
    )
    return rows, written


TARGET_LINES = 1_000_000
CORES = os.cpu_count() or 1


def _verdict(ratio: float) -> str:
    return "met" if ratio >= 0.9 else "NOT MET"


def report(rows: list[Row], lines: int, output_lines: int) -> None:
    if output_lines != lines:
        print(f"OUTPUT INCOMPLETE: {output_lines:,} lines of {lines:,}")
    if len(rows) < 3:
        print("too few rows for the targets")
        return
    first, second, last = rows[0], rows[1], rows[-1]
    if lines < TARGET_LINES:
        print(
            f"\n{lines:,} lines, not the {TARGET_LINES:,} of the target: the ratios below say how a "
            f"line's cost moves over a batch this size, not at a million"
        )
    print(
        "\nthe last tenth against the first and the second (target >= 0.90): lines/s last over earlier,"
        " CPU per line earlier over last"
    )
    figures = (
        ("throughput", tuple(row.rate for row in (first, second, last)), True),
        ("tokenmill CPU per line", tuple(row.tokenmill_cpu_ms for row in (first, second, last)), False),
        ("PostgreSQL CPU per line", tuple(row.database_cpu_ms for row in (first, second, last)), False),
    )
    for name, (at_first, at_second, at_last), higher_is_better in figures:
        ratios = [
            (at_last / max(1e-9, earlier)) if higher_is_better else (earlier / max(1e-9, at_last))
            for earlier in (at_first, at_second)
        ]
        print(
            f"  {name:<24} {at_first:8.2f} {at_second:8.2f} -> {at_last:8.2f}: "
            f"against the first {ratios[0]:.2f} ({_verdict(ratios[0])}), "
            f"against the second {ratios[1]:.2f} ({_verdict(ratios[1])})"
        )
    loads = [row.load for row in rows]
    if max(loads) > CORES:
        print(
            f"  the 1-minute load average went from {min(loads):.1f} to {max(loads):.1f} on {CORES} cores: "
            f"lines/s followed the neighbours as much as the ledger; CPU per line is the figure to judge"
        )
    for name, start, end in (
        ("API", first.api_rss, last.api_rss),
        ("workers", first.worker_rss, last.worker_rss),
    ):
        growth = end - start
        print(
            f"{name} RSS from the first tenth to the last: {start / MB:,.0f} -> {end / MB:,.0f} MB "
            f"({growth / MB:+,.0f} MB, {growth / max(1, start):+.0%})"
        )
    for name, row in (("first", first), ("second", second), ("last", last)):
        if row.top:
            total = row.sql_ms or 0.0
            print(f"\nSQL time per line in the {name} tenth ({total:.2f} ms in all), the most costly:")
            for ms, statement in row.top:
                print(f"  {ms:7.3f} ms  {statement}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=128, help="requests in flight in total")
    parser.add_argument("--poll", type=float, default=1.0, help="seconds between batch polls")
    parser.add_argument(
        "--vacuum-seconds", type=float, default=30.0, help="VACUUM interval when autovacuum is off"
    )
    parser.add_argument("--no-beat", action="store_true", help="run no sweeper beside the workers")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    run(args.lines, args.processes, args.concurrency, args.poll, args.vacuum_seconds, beat=not args.no_beat)


if __name__ == "__main__":
    main()
