"""What a quota check costs for a tenant with many requests queued, against counting its rows.

A tenant gets ``--queued`` queued requests in ``--batches`` batches and ``--results`` results of
today (rows written by SQL, not ingested: the bench is about reading them). Printed, each the
median of ``--repeat`` runs: ``enforce_tenant_quotas`` with all three quotas set (the open
batches' counters, then the day's spend row) and its two parts, and the SUM over today's results
the spend row replaces; the baseline, the ``COUNT`` of the
tenant's queued and running request rows a naive check would run (no index serves it), and that
count again with a partial index on ``requests (tenant_id) WHERE status IN ('queued','running')``.

    .venv/bin/python -m bench.quota_checks --queued 1000000 --batches 20 --results 200000

Without ``--database-url`` it uses a scratch PostgreSQL database (``bench.ingest.database``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from decimal import Decimal

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

import store
from bench.ingest import database
from store.quotas import _queued, _spent_on, add_daily_spend, enforce_tenant_quotas


def fill(engine: Engine, tenant_id: str, queued: int, batches: int, results: int) -> None:
    now = int(time.time())
    per_batch = queued // batches
    with engine.begin() as conn:
        for index in range(batches):
            spec = store.prepare_batch(tenant_id=tenant_id)
            batch_id = spec.batch_id
            conn.execute(
                sa.insert(store.Batch),
                {
                    **spec.row,
                    "status": store.BatchStatus.IN_PROGRESS,
                    "total_count": per_batch,
                    "prompt_tokens_estimate": per_batch * 20,
                },
            )
            conn.execute(
                sa.text(
                    "INSERT INTO requests (id, batch_id, tenant_id, custom_id, line_number, kind, body, "
                    "status, priority, attempts, created_at, handed_back_attempts) "
                    "SELECT :batch || '-' || n, :batch, :tenant, 'c' || n, n, 'chat_completion', "
                    '\'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}\', '
                    "CASE WHEN n % 10 = 0 THEN 'running' ELSE 'queued' END, 0, 0, :now, 0 "
                    "FROM generate_series(1, :count) AS n"
                ),
                {"batch": batch_id, "tenant": tenant_id, "count": per_batch, "now": now},
            )
            written = min(per_batch, results - index * per_batch)
            if written > 0:  # results of requests of the first batches (a result names its request)
                conn.execute(
                    sa.text(
                        "INSERT INTO results (request_id, batch_id, tenant_id, status, prompt_tokens, "
                        "completion_tokens, cached_prompt_tokens, reasoning_tokens, cached, cost_usd, "
                        "attempts, created_at) SELECT :batch || '-' || n, :batch, :tenant, 'succeeded', "
                        "10, 5, 0, 0, false, 0.000001, 1, :now FROM generate_series(1, :count) AS n"
                    ),
                    {"batch": batch_id, "tenant": tenant_id, "count": written, "now": now},
                )
                # What record_results adds to the tenant's day as it writes results.
                add_daily_spend(conn, [(tenant_id, now, Decimal("0.000001") * written)])
        conn.execute(sa.text("ANALYZE"))


def median_ms(run: Callable[[Connection], object], engine: Engine, repeat: int) -> float:
    timings = []
    for _ in range(repeat):
        with engine.connect() as conn, conn.begin():
            started = time.perf_counter()
            run(conn)
            timings.append((time.perf_counter() - started) * 1000)
    return statistics.median(timings)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--queued", type=int, default=1_000_000)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--results", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--database-url")
    args = parser.parse_args()
    with database(args.database_url) as url:
        store.upgrade_to_head(url)
        engine = store.make_engine(url)
        tenant = store.create_tenant(engine, "bench-quota")
        started = time.perf_counter()
        fill(engine, tenant.id, args.queued, args.batches, args.results)
        print(
            f"filled {args.queued:,} queued requests in {args.batches} batches and {args.results:,} results "
            f"in {time.perf_counter() - started:.1f} s"
        )
        store.set_tenant_quotas(
            engine,
            tenant.id,
            max_queued_requests=10 * args.queued,
            max_queued_tokens=10**12,
            daily_budget_usd=Decimal(10**6),
        )
        midnight = int(time.time()) // 86_400 * 86_400
        sum_sql = sa.text("SELECT sum(cost_usd) FROM results WHERE tenant_id = :t AND created_at >= :since")
        count_sql = sa.text(
            "SELECT count(*) FROM requests WHERE tenant_id = :t AND status IN ('queued', 'running')"
        )

        def enforce(conn: Connection) -> None:
            enforce_tenant_quotas(conn, tenant.id, new_requests=1, new_tokens=1)

        def queued(conn: Connection) -> None:
            _queued(conn, tenant.id, None)

        def spent(conn: Connection) -> None:
            _spent_on(conn, tenant.id, midnight // 86_400)

        def sum_results(conn: Connection) -> None:
            conn.execute(sum_sql, {"t": tenant.id, "since": midnight}).scalar_one()

        def count_rows(conn: Connection) -> None:
            conn.execute(count_sql, {"t": tenant.id}).scalar_one()

        figures = {
            "enforce_tenant_quotas (all three quotas)": median_ms(enforce, engine, args.repeat),
            "  queued requests+tokens (open batches' counters)": median_ms(queued, engine, args.repeat),
            "  spent today (the tenant's day row)": median_ms(spent, engine, args.repeat),
            "  for comparison: SUM over today's results": median_ms(sum_results, engine, args.repeat),
            "baseline: COUNT of queued/running request rows": median_ms(count_rows, engine, args.repeat),
        }
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "CREATE INDEX bench_requests_open ON requests (tenant_id) "
                    "WHERE status IN ('queued', 'running')"
                )
            )
            conn.execute(sa.text("ANALYZE requests"))
        figures["baseline with a partial index on open rows"] = median_ms(count_rows, engine, args.repeat)
        baseline = figures["baseline: COUNT of queued/running request rows"]
        for name, value in figures.items():
            print(f"{name:<52} {value:9.2f} ms  ({value / baseline:6.3f} of the baseline)")
        engine.dispose()


if __name__ == "__main__":
    main()
