"""Fair scheduling between tenants, end to end through the public API.

    .venv/bin/python -m bench.fairness [--lines 5000] [--big 20000] [--calls 100] [--processes 2]
                                       [--only-chat]

Prints, each measured here and now against a baseline measured in the same run (``tokenmill api``
and ``tokenmill worker`` subprocesses on a scratch database, the simulator answering in
``--latency-ms``, everything driven through the official openai SDK):

  (a) one tenant's ``--lines``-line batch alone: its finish time (the baseline); then two
      equal-weight tenants' ``--lines``-line batches created together: each one's finish time, and
      the ratio of the later to the earlier (target <= 1.10), next to twice the baseline (the
      finish time of both if they share the workers evenly);
  (b) tenant A's ``POST /v1/chat/completions`` p50/p99 over ``--calls`` sequential calls alone,
      then while tenant B's ``--big``-line batch runs, and the ratio of the p99s (target <= 2);
      B's batch is cancelled once A's calls are done (``--only-chat``: (b) alone).

A ``tokenmill beat`` runs beside them, as in a deployment. Needs Redis and PostgreSQL as
``bench.throughput`` does (its own redis-server, or TOKENMILL_BENCH_REDIS_URL, whose logical
database is flushed; TOKENMILL_BENCH_PG_URL).
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Sequence

import openai

from bench.throughput import MODEL, Tokenmill, own_redis, scratch_database
from simulator.testing import SimulatorServer
from store import create_api_key, create_tenant, make_engine

ENDED = ("completed", "failed", "expired", "cancelled")


def batch_file(count: int, tag: str) -> bytes:
    salt = uuid.uuid4().hex[:8]  # fresh prompts: nothing is answered from an earlier run's cache
    return "\n".join(
        json.dumps(
            {
                "custom_id": f"r{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": MODEL, "messages": [{"role": "user", "content": f"{tag} {salt} {i}"}]},
            }
        )
        for i in range(count)
    ).encode()


def create_batches(clients: Sequence[openai.OpenAI], count: int) -> tuple[float, list[str]]:
    """Upload one file per client, then create the batches at the same moment (one thread each);
    returns that moment (perf_counter) and the batch ids."""
    uploads = [
        client.files.create(file=(f"t{n}.jsonl", batch_file(count, f"t{n}")), purpose="batch")
        for n, client in enumerate(clients)
    ]
    ids: list[str] = [""] * len(clients)
    go = threading.Barrier(len(clients) + 1)

    def create(n: int) -> None:
        go.wait()
        ids[n] = (
            clients[n]
            .batches.create(
                input_file_id=uploads[n].id, endpoint="/v1/chat/completions", completion_window="24h"
            )
            .id
        )

    threads = [threading.Thread(target=create, args=(n,)) for n in range(len(clients))]
    for thread in threads:
        thread.start()
    go.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    return started, ids


def finish_times(
    mill: Tokenmill, clients: Sequence[openai.OpenAI], ids: Sequence[str], started: float, count: int
) -> list[float]:
    """Seconds from ``started`` until each batch was seen completed (polled every 50 ms)."""
    done: dict[int, float] = {}
    deadline = time.monotonic() + 1800
    while len(done) < len(ids):
        for n, (client, batch_id) in enumerate(zip(clients, ids, strict=True)):
            if n in done:
                continue
            batch = client.batches.retrieve(batch_id)
            if batch.status in ENDED:
                counts = batch.request_counts
                if batch.status != "completed" or counts is None or counts.completed != count:
                    raise RuntimeError(f"batch {n} ended {batch.status} with {counts}")
                done[n] = time.perf_counter() - started
        if time.monotonic() > deadline or any(p.poll() is not None for p in mill.processes):
            raise RuntimeError(f"batches stuck; finished: {done}")
        time.sleep(0.05)
    return [done[n] for n in range(len(ids))]


def chat_latencies(client: openai.OpenAI, calls: int, *, until: threading.Event | None = None) -> list[float]:
    """Seconds of each of ``calls`` sequential chat completions (distinct prompts); stops early
    once ``until`` is set (the other tenant's batch ended: the rest would not be under load)."""
    salt = uuid.uuid4().hex[:8]
    latencies = []
    for i in range(calls):
        if until is not None and until.is_set():
            break
        started = time.perf_counter()
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"chat {salt} {i}"}]
        )
        latencies.append(time.perf_counter() - started)
    return latencies


def p99(values: Sequence[float]) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[98] if len(values) > 1 else values[0]


def shares(mill: Tokenmill, client_a: openai.OpenAI, client_b: openai.OpenAI, lines: int) -> None:
    """Part (a)."""
    started, ids = create_batches([client_a], lines)
    (alone,) = finish_times(mill, [client_a], ids, started, lines)
    print(f"(a) one tenant's {lines}-line batch alone: {alone:.1f} s (baseline)")
    started, ids = create_batches([client_a, client_b], lines)
    a_time, b_time = finish_times(mill, [client_a, client_b], ids, started, lines)
    ratio = max(a_time, b_time) / min(a_time, b_time)
    print(
        f"    two equal-weight tenants' {lines}-line batches together: A {a_time:.1f} s, "
        f"B {b_time:.1f} s; later/earlier = {ratio:.3f} (target <= 1.10); 2 x baseline = {2 * alone:.1f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lines", type=int, default=5000)
    parser.add_argument("--big", type=int, default=20_000)
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=128, help="requests in flight in total")
    parser.add_argument("--latency-ms", type=float, default=50)
    parser.add_argument("--only-chat", action="store_true", help="part (b) only")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    per_process = max(1, args.concurrency // args.processes)

    with (
        own_redis() as (redis_url, _),
        SimulatorServer(latency_ms=args.latency_ms) as sim,
        scratch_database() as url,
    ):
        mill = Tokenmill(sim, url, args.processes, per_process, "{}", redis_url=redis_url)
        try:
            # The sweeper, as a deployment runs it: a cancel ends the first chunk of a batch's
            # queued lines in its request and leaves the rest to the sweep (B's batch below).
            mill._start(mill.env, "beat")
            engine = make_engine(url)
            try:
                key_b = create_api_key(engine, create_tenant(engine, "tenant-b").id, "bench")
            finally:
                engine.dispose()
            client_a = mill.client
            client_b = openai.OpenAI(base_url=f"{mill.root}/v1", api_key=key_b, max_retries=0)
            print(
                f"{args.processes} worker processes x {per_process} in flight, "
                f"upstream {args.latency_ms:g} ms"
            )

            if not args.only_chat:
                shares(mill, client_a, client_b, args.lines)

            quiet = chat_latencies(client_a, args.calls)
            print(
                f"(b) tenant A's chat completion alone, {len(quiet)} calls: "
                f"p50 {statistics.median(quiet) * 1000:.0f} ms, p99 {p99(quiet) * 1000:.0f} ms"
            )
            _, (big_id,) = create_batches([client_b], args.big)
            ended = threading.Event()

            def watch() -> None:
                while client_b.batches.retrieve(big_id).status not in ENDED:
                    time.sleep(0.2)
                ended.set()

            threading.Thread(target=watch, daemon=True).start()
            loaded = chat_latencies(client_a, args.calls, until=ended)
            progress = client_b.batches.retrieve(big_id).request_counts
            done = progress.completed if progress is not None else 0
            print(
                f"    while tenant B's {args.big}-line batch runs ({done} of its lines done by the last "
                f"call), {len(loaded)} calls: p50 {statistics.median(loaded) * 1000:.0f} ms, "
                f"p99 {p99(loaded) * 1000:.0f} ms; p99 loaded/alone = {p99(loaded) / p99(quiet):.2f} "
                "(target <= 2)"
            )
            if not ended.is_set():  # what was to be measured is measured
                client_b.batches.cancel(big_id)
            ended.wait(1800)
        finally:
            mill.close()


if __name__ == "__main__":
    main()
