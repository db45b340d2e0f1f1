"""The dispatch of a whole batch (``workers.enqueue.enqueue_batch``) alone, before and after the
fix of issue #13, in one run.

    .venv/bin/python -m bench.dispatch [--lines 150000] [--history 20000]

For each variant: a scratch database at the schema's head holding an ended batch of
``--history`` lines (its requests succeeded, then VACUUM ANALYZE: the statistics of a ledger
that has run batches before), then a new batch of ``--lines`` lines ingested as the API does and
not analyzed since (a batch is dispatched right after its ingest); then ``enqueue_batch`` on it
with a real ``Dispatcher`` (a Celery producer and the dispatch markers on a Redis of the bench's
own, as ``bench.throughput``), nothing consuming the messages. Prints per dispatched line: the
wall time, the CPU of the database's backends (when the server is local) and the time of the
``mark_dispatched`` UPDATEs as the client saw them; and the after/before ratios.

``before`` is ``mark_dispatched`` as it was (``status IN ('queued', 'running')``: PostgreSQL
walked every unfinished request through an index of ``status`` for each chunk while its
statistics had not seen the batch); ``after`` is ``store.mark_dispatched`` as it is now.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import redis
import sqlalchemy as sa
from celery import Celery
from sqlalchemy.engine import Engine

import store
import workers.dispatch
from bench.throughput import own_redis, pid_cpu_seconds, scratch_database
from store.clock import now_seconds
from store.engine import write_transaction
from store.tables import Request, RequestStatus
from workers.dispatch import Dispatcher
from workers.enqueue import enqueue_batch

MarkDispatched = Callable[..., int]


def mark_dispatched_before(
    engine: Engine, request_ids: Sequence[str], dispatch_id: str, now: int | None = None
) -> int:
    """``store.mark_dispatched`` before the fix (the baseline)."""
    if not request_ids:
        return 0
    now = now if now is not None else now_seconds()
    with write_transaction(engine) as conn:
        result = conn.execute(
            sa.update(Request)
            .where(
                Request.id.in_(request_ids),
                Request.status.in_((RequestStatus.QUEUED, RequestStatus.RUNNING)),
            )
            .values(dispatch_id=dispatch_id, dispatched_at=now)
        )
        return result.rowcount


VARIANTS: dict[str, MarkDispatched] = {
    "before": mark_dispatched_before,
    "after": store.mark_dispatched,
}


def _lines(count: int, prefix: str) -> Iterator[bytes]:
    for number in range(count):
        line = {
            "custom_id": f"{prefix}{number}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "bench-model", "messages": [{"role": "user", "content": f"question {number}"}]},
        }
        yield (json.dumps(line) + "\n").encode()


def _ingest(engine: Engine, tenant_id: str, count: int, prefix: str) -> str:
    source = io.BytesIO(b"".join(_lines(count, prefix)))
    return store.ingest_batch(engine, source, tenant_id=tenant_id).batch_id


@dataclass
class Measure:
    lines: int
    dispatched: int
    wall_s: float
    database_cpu_s: float
    update_s: float
    updates: int

    def per_line_ms(self, seconds: float) -> float:
        return 1000 * seconds / max(self.dispatched, 1)


def _backend_cpu(engine: Engine) -> float:
    with engine.connect() as conn:
        pids = conn.execute(
            sa.text("SELECT pid FROM pg_stat_activity WHERE datname = current_database()")
        ).scalars()
        return sum(pid_cpu_seconds(list(pids)).values())


def measure(variant: str, lines: int, history: int, redis_url: str) -> Measure:
    with scratch_database() as url:
        store.upgrade_to_head(url)
        # One connection, held by the pool through the run: its backend's CPU is the dispatch's.
        engine = store.make_engine(url, pool_size=1, max_overflow=0)
        try:
            tenant = store.create_tenant(engine, "bench")
            if history:
                ended = _ingest(engine, tenant.id, history, "h")
                with engine.begin() as conn:
                    conn.execute(
                        sa.text("UPDATE requests SET status = 'succeeded' WHERE batch_id = :batch"),
                        {"batch": ended},
                    )
                with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                    conn.execute(sa.text("VACUUM ANALYZE requests"))
            batch_id = _ingest(engine, tenant.id, lines, "c")
            client = redis.Redis.from_url(redis_url)
            client.flushdb()
            celery = Celery("bench-dispatch", broker=redis_url)
            dispatcher = Dispatcher(
                celery=celery,
                engine=engine,
                redis_client=client,
                key_prefix="bench-dispatch:",
                chunk_size=512,
            )
            spent = [0.0, 0.0]
            started: list[float] = []

            def before(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
                if statement.startswith("UPDATE requests"):
                    started.append(time.perf_counter())

            def after(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
                if statement.startswith("UPDATE requests") and started:
                    spent[0] += time.perf_counter() - started.pop()
                    spent[1] += 1

            sa.event.listen(engine, "before_cursor_execute", before)
            sa.event.listen(engine, "after_cursor_execute", after)
            # The name the dispatcher calls (workers.dispatch imports it from store).
            original = getattr(workers.dispatch, "mark_dispatched")  # noqa: B009
            setattr(workers.dispatch, "mark_dispatched", VARIANTS[variant])  # noqa: B010
            try:
                cpu = _backend_cpu(engine)
                wall = time.perf_counter()
                enqueue_batch(dispatcher, batch_id)
                wall = time.perf_counter() - wall
                cpu = _backend_cpu(engine) - cpu
            finally:
                setattr(workers.dispatch, "mark_dispatched", original)  # noqa: B010
                sa.event.remove(engine, "before_cursor_execute", before)
                sa.event.remove(engine, "after_cursor_execute", after)
            with engine.connect() as conn:
                dispatched = conn.execute(
                    sa.text(
                        "SELECT count(*) FROM requests WHERE batch_id = :batch AND dispatch_id IS NOT NULL"
                    ),
                    {"batch": batch_id},
                ).scalar_one()
            client.close()
            return Measure(lines, int(dispatched), wall, cpu, spent[0], int(spent[1]))
        finally:
            engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lines", type=int, default=150_000)
    parser.add_argument("--history", type=int, default=20_000, help="lines of an ended batch before it")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    results: dict[str, Measure] = {}
    with own_redis() as (redis_url, _pid):
        for variant in args.variants.split(","):
            results[variant] = found = measure(variant, args.lines, args.history, redis_url)
            print(
                f"{variant:>8}: {found.dispatched}/{found.lines} lines dispatched in {found.wall_s:.2f} s"
                f" | per line: wall {found.per_line_ms(found.wall_s):.3f} ms,"
                f" PostgreSQL CPU {found.per_line_ms(found.database_cpu_s):.3f} ms,"
                f" UPDATE {found.per_line_ms(found.update_s):.3f} ms ({found.updates} UPDATEs)"
                f" | load {os.getloadavg()[0]:.2f}",
                flush=True,
            )
    if "before" in results:
        base = results["before"]
        for variant, found in results.items():
            if variant == "before":
                continue
            print(
                f"{variant} / before: wall {found.wall_s / base.wall_s:.3f},"
                f" PostgreSQL CPU {found.database_cpu_s / max(base.database_cpu_s, 1e-9):.3f},"
                f" UPDATE {found.update_s / max(base.update_s, 1e-9):.3f}"
            )


if __name__ == "__main__":
    main()
