"""A million-line batch end to end: ingested through the API, run by worker processes against the
simulator (0 ms), exported to disk; throughput and memory per tenth of the batch.

    .venv/bin/python -m bench.million [--lines 1000000] [--processes 2] [--concurrency 128]

The input JSONL is written to a temporary file and uploaded with the openai SDK from the open
file (streamed, never in memory here); the batch is polled every ``--poll`` seconds as a client
would (``GET /v1/batches/{id}``, usage included); the output file is downloaded with the SDK's
streaming response straight to disk and its lines counted.

Prints one row per tenth of the lines (per 100k lines at a million): the lines/s over that tenth,
and the peak RSS over it of the API process and of the worker (every process of its tree: the
Celery parent and its pool children). Then the two targets, each against its own baseline in this
run: the last tenth's throughput over the first tenth's (target within 10%: >= 0.90), and the RSS
growth of the API and of the workers from the end of the first tenth to the end (target flat).

A server whose autovacuum is off (a shared dev machine's) gets a VACUUM (ANALYZE) of the ledger's
tables every ``--vacuum-seconds`` from here, as autovacuum would give a deployment; the run says so.

Needs Redis and PostgreSQL as ``bench.throughput`` (its URLs, its scratch database; set
TOKENMILL_BENCH_REDIS_URL to a logical database no other bench run uses at the same time).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa

from bench.throughput import MODEL, Tokenmill, own_redis, scratch_database
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


@dataclass
class Row:
    done: int
    rate: float
    api_rss: int
    worker_rss: int


def run(lines: int, processes: int, concurrency: int, poll: float, vacuum_seconds: float) -> None:
    per_process = max(1, concurrency // processes)
    with tempfile.TemporaryDirectory(prefix="tokenmill-million-") as scratch:
        source = Path(scratch) / "input.jsonl"
        size = write_input(source, lines)
        print(f"{lines:,} lines, {size / MB:,.0f} MB of JSONL; {processes} worker processes x {per_process}")
        with own_redis() as (redis_url, _), SimulatorServer() as sim, scratch_database() as url:
            mill = Tokenmill(sim, url, processes, per_process, "{}", redis_url=redis_url)
            watch = MemoryWatch(api_pid=mill.processes[1].pid, worker_pid=mill.processes[0].pid)
            vacuum = VacuumStandIn(url, vacuum_seconds)
            if vacuum.active:
                print(f"autovacuum is off on this server: VACUUM (ANALYZE) every {vacuum_seconds:.0f} s here")
            try:
                baseline_api, baseline_workers = watch.take_peaks()
                print(
                    f"after warm-up: API {baseline_api / MB:,.0f} MB, workers {baseline_workers / MB:,.0f} MB"
                )
                rows, output_lines = drive(mill, watch, source, lines, poll, Path(scratch) / "output.jsonl")
            finally:
                vacuum.stop()
                watch.stop()
                mill.close()
    report(rows, lines, output_lines)


def drive(
    mill: Tokenmill, watch: MemoryWatch, source: Path, lines: int, poll: float, output: Path
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
    mark_done, mark_time = 0, validated
    print(f"\n{'lines done':>12} {'lines/s':>9} {'API RSS MB':>11} {'workers RSS MB':>15} {'poll ms':>8}")
    deadline = time.monotonic() + 24 * 3600
    while True:
        polled = time.perf_counter()
        batch = client.batches.retrieve(batch.id)
        poll_ms = (time.perf_counter() - polled) * 1000
        counts = batch.request_counts
        done = (counts.completed + counts.failed) if counts is not None else 0
        now = time.perf_counter()
        if done >= mark_done + step or (done == lines and done > mark_done):
            api_rss, worker_rss = watch.take_peaks()
            row = Row(done, (done - mark_done) / max(1e-9, now - mark_time), api_rss, worker_rss)
            rows.append(row)
            print(
                f"{done:>12,} {row.rate:>9,.0f} {api_rss / MB:>11,.0f} {worker_rss / MB:>15,.0f} "
                f"{poll_ms:>8,.0f}",
                flush=True,
            )
            mark_done, mark_time = done, now
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


def report(rows: list[Row], lines: int, output_lines: int) -> None:
    if output_lines != lines:
        print(f"OUTPUT INCOMPLETE: {output_lines:,} lines of {lines:,}")
    if len(rows) < 2:
        print("too few rows for the targets")
        return
    first, last = rows[0], rows[-1]
    ratio = last.rate / first.rate
    print(
        f"\nthroughput, last tenth / first tenth: {last.rate:,.0f} / {first.rate:,.0f} = {ratio:.2f} "
        f"(target >= 0.90: {'met' if ratio >= 0.9 else 'NOT MET'})"
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
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    run(args.lines, args.processes, args.concurrency, args.poll, args.vacuum_seconds)


if __name__ == "__main__":
    main()
