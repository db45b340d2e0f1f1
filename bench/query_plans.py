"""The plans of the ledger's hot queries on PostgreSQL with millions of rows in ``requests``.

    .venv/bin/python -m bench.query_plans [--rows 10000000] [--keep] [--database NAME]

Builds a scratch database at the schema's head (the migrations), fills it with ``INSERT ...
SELECT generate_series`` in a realistic shape (many ended batches, a few running: part done,
part leased, the rest queued), ANALYZEs it, then runs the real store functions with each hot
statement captured as it is sent (the exact SQL and parameters the code sends, not a copy) and
prints ``EXPLAIN (ANALYZE, BUFFERS)`` of it: the top node, every scan and its index, the time,
and a flag on any sequential scan of ``requests`` or ``results`` (the tables that grow with the
ledger). Exits 1 if one was flagged.

``--keep`` keeps the database (its name is printed) and ``--database NAME`` reuses one kept
before, so that the plans can be looked at again without filling it again (``--database`` runs
the migrations first, so a kept database gets new indexes). URL of the server from
TOKENMILL_BENCH_PG_URL (as bench.throughput).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg.sql
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine

import store

PG_ADMIN_URL = os.environ.get(
    "TOKENMILL_BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
# The tables that grow with every line ever run: a sequential scan of either is a defect.
# batches too: every single call (chat completion, agent run) is a hidden batch of its own.
GROWING_TABLES = ("requests", "results", "discarded_answers", "batches")
NOW = int(time.time())
TENANTS = 20
ENDED_BATCH_LINES = 5_000
RUNNING_BATCHES = 4
RUNNING_BATCH_LINES = 100_000


class _Captured(Exception):
    """Raised from the statement hook once the statement of interest is captured: it never runs."""


@contextmanager
def captured_statement(engine: Engine, match: Callable[[str], bool]) -> Iterator[list[tuple[str, Any]]]:
    """Statements before the first one ``match`` accepts run; that one is recorded, not run."""
    found: list[tuple[str, Any]] = []

    def hook(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
        if not found and match(statement):
            found.append((statement, parameters))
            raise _Captured

    event.listen(engine, "before_cursor_execute", hook)
    try:
        yield found
    except _Captured:
        pass
    finally:
        event.remove(engine, "before_cursor_execute", hook)


def capture(engine: Engine, call: Callable[[], Any], match: Callable[[str], bool]) -> tuple[str, Any]:
    with captured_statement(engine, match) as found:
        result = call()
        if isinstance(result, Iterator):  # a generator (the export) sends its query when first read
            next(result, None)
    if not found:
        raise RuntimeError("the call sent no statement that matched")
    return found[0]


@dataclass(frozen=True)
class Plan:
    top: str
    scans: list[str]
    outer_scans: list[str]  # outside the statement's CTEs
    rows_read: int  # rows the scans of the growing tables returned, over all their loops
    seq_scans: list[str]
    execution_ms: float
    planning_ms: float
    shared_hit: int
    shared_read: int


def explain(engine: Engine, statement: str, parameters: Any) -> Plan:
    """EXPLAIN (ANALYZE, BUFFERS) of the statement with its parameters, rolled back."""
    with engine.connect() as conn:
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            cursor.execute(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {statement}", parameters)
            [[document]] = cursor.fetchall()
        finally:
            cursor.close()
            conn.rollback()
    document = json.loads(document) if isinstance(document, str) else document
    root = document[0]
    scans = plan_scans(root["Plan"])
    seq_scans = [scan.removeprefix("Seq Scan on ") for scan in scans if scan.startswith("Seq Scan on ")]
    seq_scans = [relation for relation in seq_scans if relation in GROWING_TABLES]
    top = root["Plan"]
    return Plan(
        top=f"{top['Node Type']} (rows {top.get('Actual Rows')}, loops {top.get('Actual Loops')})",
        scans=scans,
        outer_scans=plan_scans(root["Plan"], outside_ctes=True),
        rows_read=rows_read(root["Plan"]),
        seq_scans=seq_scans,
        execution_ms=float(root["Execution Time"]),
        planning_ms=float(root["Planning Time"]),
        shared_hit=int(top.get("Shared Hit Blocks", 0)),
        shared_read=int(top.get("Shared Read Blocks", 0)),
    )


def generic_plan_scans(
    engine: Engine, statement: str, parameters: Any, *, outside_ctes: bool = False
) -> list[str]:
    """The scans of the generic plan of the statement prepared (parameters as unknowns): what a
    statement psycopg prepares (one run five times on a connection) may run with."""
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        if match.group(1) not in names:
            names.append(match.group(1))
        return f"${names.index(match.group(1)) + 1}"

    text = re.sub(r"%\((\w+)\)s", number, statement).replace("%%", "%")
    with engine.connect() as conn:
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            cursor.execute(f"PREPARE tokenmill_generic AS {text}")
            cursor.execute("SET LOCAL plan_cache_mode = force_generic_plan")
            # Literals, untyped as a parameter's value is: each takes the type PREPARE inferred.
            arguments = psycopg.sql.SQL(", ").join(psycopg.sql.Literal(parameters[name]) for name in names)
            query = psycopg.sql.SQL("EXPLAIN (FORMAT JSON) EXECUTE tokenmill_generic({})").format(arguments)
            cursor.execute(query)
            [[document]] = cursor.fetchall()
        finally:
            cursor.close()
            conn.invalidate()  # the prepared statement goes with the connection
    document = json.loads(document) if isinstance(document, str) else document
    return plan_scans(document[0]["Plan"], outside_ctes=outside_ctes)


def plan_scans(node: dict[str, Any], *, outside_ctes: bool = False) -> list[str]:
    """Every scan of a plan (EXPLAIN's JSON), as "<node> on <table> using <index>"; a bitmap
    index scan names its index only (its heap scan, the node above it, names the table).
    ``outside_ctes``: leave out the scans of the plan's CTEs (a claim's UPDATE, not the rows it
    locked first)."""
    scans: list[str] = []
    if outside_ctes and str(node.get("Subplan Name", "")).startswith("CTE "):
        return scans
    relation, index = node.get("Relation Name"), node.get("Index Name")
    if relation is not None or index is not None:
        where = f" on {relation}" if relation is not None else ""
        scans.append(f"{node['Node Type']}{where}" + (f" using {index}" if index else ""))
    for child in node.get("Plans", ()):
        scans.extend(plan_scans(child, outside_ctes=outside_ctes))
    return scans


def rows_read(node: dict[str, Any]) -> int:
    """Rows the scans of ``GROWING_TABLES`` read in an EXPLAIN ANALYZE, those a filter then
    dropped included (EXPLAIN gives each per loop: times the loops): what a query costs in the
    ledger's rows, whatever the machine's speed."""
    own = 0
    if node.get("Relation Name") in GROWING_TABLES and "Scan" in node["Node Type"]:
        per_loop = sum(
            int(node.get(key, 0))
            for key in ("Actual Rows", "Rows Removed by Filter", "Rows Removed by Index Recheck")
        )
        own = per_loop * int(node.get("Actual Loops", 1))
    return own + sum(rows_read(child) for child in node.get("Plans", ()))


# ---- filling the scratch database ---------------------------------------------------------

_BODY = """json_build_object('model', 'gpt-4o-mini', 'messages',
    json_build_array(json_build_object('role', 'user', 'content', 'question ' || g)))"""
_ANSWER = """json_build_object('id', 'chatcmpl-' || g, 'object', 'chat.completion', 'model', 'gpt-4o-mini',
    'choices', json_build_array(json_build_object('index', 0, 'finish_reason', 'stop',
      'message', json_build_object('role', 'assistant', 'content', 'answer ' || g))),
    'usage', json_build_object('prompt_tokens', 12, 'completion_tokens', 30, 'total_tokens', 42))"""


def _secondary_indexes(conn: sa.Connection, tables: tuple[str, ...]) -> list[tuple[str, str]]:
    rows = conn.execute(
        sa.text(
            "SELECT i.indexname, i.indexdef FROM pg_indexes i WHERE i.tablename = ANY(:tables) "
            "AND i.schemaname = 'public' AND NOT EXISTS (SELECT 1 FROM pg_constraint c "
            "WHERE c.conname = i.indexname)"
        ),
        {"tables": list(tables)},
    ).all()
    return [(row.indexname, row.indexdef) for row in rows]


def fill(engine: Engine, rows: int) -> dict[str, Any]:
    """``rows`` requests: ended batches of ENDED_BATCH_LINES lines (98% succeeded, 2% failed,
    with their results; created over the last 30 days) and RUNNING_BATCHES running batches of
    RUNNING_BATCH_LINES (60% done, 1% leased, 1% leased with an expired lease, the rest
    queued and dispatched in chunks of 512). Returns the ids the hot queries are run with."""
    running_lines = RUNNING_BATCHES * RUNNING_BATCH_LINES
    ended_batches = max(1, (rows - running_lines) // ENDED_BATCH_LINES)
    ended_lines = ended_batches * ENDED_BATCH_LINES
    month = 30 * 86_400
    with engine.begin() as conn:
        # Loads skip foreign-key triggers and build the secondary indexes once at the end.
        conn.execute(sa.text("SET session_replication_role = replica"))
        conn.execute(sa.text("SET maintenance_work_mem = '256MB'"))
        indexes = _secondary_indexes(conn, ("requests", "results", "discarded_answers"))
        for name, _ in indexes:
            conn.execute(sa.text(f'DROP INDEX "{name}"'))
        conn.execute(
            sa.text(
                "INSERT INTO tenants (id, name, created_at) "
                "SELECT 'tenant_' || t, 'tenant ' || t, :now - :month FROM generate_series(0, :n - 1) t"
            ),
            {"now": NOW, "month": month, "n": TENANTS},
        )
        # Ended batches: batch b created at now - month + b * month / count.
        conn.execute(
            sa.text(
                "INSERT INTO batches (id, tenant_id, endpoint, kind, completion_window, status, "
                "error_count, priority, hidden, webhook_attempts, total_count, completed_count, "
                "failed_count, cancelled_count, created_at, expires_at, in_progress_at, "
                "finalizing_at, completed_at, output_file_id, error_file_id) "
                "SELECT 'batch_e' || b, 'tenant_' || (b % :tenants), '/v1/chat/completions', "
                "'chat_completion', '24h', 'completed', 0, 0, false, 0, :size, :size * 98 / 100, "
                ":size - :size * 98 / 100, 0, c, c + 86400, c, c + 600, c + 600, "
                "'file-out-e' || b, 'file-err-e' || b "
                "FROM generate_series(0, :n - 1) b, "
                "LATERAL (SELECT :now - :month + b::bigint * :month / :n AS c) t"
            ),
            {"tenants": TENANTS, "size": ENDED_BATCH_LINES, "n": ended_batches, "now": NOW, "month": month},
        )
        conn.execute(
            sa.text(
                "INSERT INTO batches (id, tenant_id, endpoint, kind, completion_window, status, "
                "error_count, priority, hidden, webhook_attempts, total_count, completed_count, "
                "failed_count, cancelled_count, created_at, expires_at, in_progress_at) "
                "SELECT 'batch_r' || b, 'tenant_' || (b % :tenants), '/v1/chat/completions', "
                "'chat_completion', '24h', 'in_progress', 0, 0, false, 0, :size, :size * 6 / 10, 0, 0, "
                ":now - 3600, :now + 82800, :now - 3600 FROM generate_series(0, :n - 1) b"
            ),
            {"tenants": TENANTS, "size": RUNNING_BATCH_LINES, "n": RUNNING_BATCHES, "now": NOW},
        )
        # Ended requests: g = b * size + line; random-looking ids (md5) as new_id's are.
        conn.execute(
            sa.text(
                "INSERT INTO requests (id, batch_id, tenant_id, custom_id, line_number, kind, body, "
                "status, priority, attempts, handed_back_attempts, dispatch_id, dispatched_at, cache_key, "
                "created_at, finished_at) "
                "SELECT 'req_' || md5(g::text), 'batch_e' || (g / :size), "
                "'tenant_' || ((g / :size) % :tenants), 'c' || (g % :size), (g % :size)::int, "
                f"'chat_completion', {_BODY}, "
                "CASE WHEN g % 50 = 7 THEN 'failed' ELSE 'succeeded' END, 0, 1, 0, "
                "'dsp_e' || (g / 512), c, 'ck' || md5(g::text), c, c + 300 "
                "FROM generate_series(0, :n - 1) g, "
                "LATERAL (SELECT :now - :month + (g / :size)::bigint * :month / :batches AS c) t"
            ),
            {
                "size": ENDED_BATCH_LINES,
                "tenants": TENANTS,
                "n": ended_lines,
                "now": NOW,
                "month": month,
                "batches": ended_batches,
            },
        )
        # Running requests: line < 60% done; then 1% leased live, 1% leased but expired; the rest queued.
        conn.execute(
            sa.text(
                "INSERT INTO requests (id, batch_id, tenant_id, custom_id, line_number, kind, body, "
                "status, priority, attempts, handed_back_attempts, lease_owner, lease_expires_at, "
                "dispatch_id, dispatched_at, created_at, finished_at) "
                "SELECT 'req_r' || md5(g::text), 'batch_r' || (g / :size), "
                "'tenant_' || ((g / :size) % :tenants), 'c' || l, l, "
                f"'chat_completion', {_BODY}, "
                "CASE WHEN l < :size * 60 / 100 THEN 'succeeded' "
                "WHEN l < :size * 62 / 100 THEN 'running' ELSE 'queued' END, 0, "
                "CASE WHEN l < :size * 62 / 100 THEN 1 ELSE 0 END, 0, "
                "CASE WHEN l >= :size * 60 / 100 AND l < :size * 62 / 100 THEN 'worker-' || (l % 4) END, "
                "CASE WHEN l >= :size * 60 / 100 AND l < :size * 61 / 100 THEN :now + 20 "
                "WHEN l >= :size * 61 / 100 AND l < :size * 62 / 100 THEN :now - 30 END, "
                "'dsp_r' || (g / 512), :now - 3600, :now - 3600, "
                "CASE WHEN l < :size * 60 / 100 THEN :now - 60 END "
                "FROM generate_series(0, :n - 1) g, LATERAL (SELECT (g % :size)::int AS l) t"
            ),
            {"size": RUNNING_BATCH_LINES, "tenants": TENANTS, "n": running_lines, "now": NOW},
        )
        conn.execute(
            sa.text(
                "INSERT INTO results (request_id, batch_id, tenant_id, status, status_code, "
                "response_body, upstream_request_id, error_code, error_message, finish_reason, model, "
                "prompt_tokens, completion_tokens, cached_prompt_tokens, reasoning_tokens, cached, "
                "cost_usd, latency_ms, attempts, cache_key, created_at) "
                "SELECT r.id, r.batch_id, r.tenant_id, r.status, "
                "CASE WHEN r.status = 'succeeded' THEN 200 ELSE 400 END, "
                f"CASE WHEN r.status = 'succeeded' THEN {_ANSWER} END, 'chatcmpl-' || g, "
                "CASE WHEN r.status = 'failed' THEN 'invalid_request' END, "
                "CASE WHEN r.status = 'failed' THEN 'refused' END, 'stop', 'gpt-4o-mini', 12, 30, 0, 0, "
                "g % 10 = 3, CASE WHEN g % 10 = 3 THEN 0 ELSE 0.0000198 END, 120.0, 1, r.cache_key, "
                "r.finished_at FROM (SELECT r.*, row_number() OVER () AS g FROM requests r "
                "WHERE r.status IN ('succeeded', 'failed')) r"
            )
        )
        # A paid answer no result kept, for one result in a thousand (a duplicate delivery's).
        conn.execute(
            sa.text(
                "INSERT INTO discarded_answers (request_id, batch_id, tenant_id, reason, "
                "upstream_request_id, model, prompt_tokens, completion_tokens, cached_prompt_tokens, "
                "reasoning_tokens, cost_usd, created_at) "
                "SELECT request_id, batch_id, tenant_id, 'duplicate', 'chatcmpl-dup-' || request_id, "
                "model, 12, 30, 0, 0, 0.0000198, created_at FROM results "
                "WHERE upstream_request_id LIKE '%000'"
            )
        )
        for _, definition in indexes:
            conn.execute(sa.text(definition))
        conn.execute(sa.text("SET session_replication_role = DEFAULT"))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("VACUUM ANALYZE"))
    return sample_ids(engine)


def sample_ids(engine: Engine) -> dict[str, Any]:
    with engine.connect() as conn:
        running = conn.execute(
            sa.text("SELECT id, tenant_id FROM batches WHERE status = 'in_progress' ORDER BY id LIMIT 1")
        ).one()
        ended = conn.execute(
            sa.text("SELECT id FROM batches WHERE status = 'completed' ORDER BY created_at DESC LIMIT 1")
        ).scalar_one()
        queued = list(
            conn.execute(
                sa.text(
                    "SELECT id FROM requests WHERE batch_id = :b AND status = 'queued' "
                    "ORDER BY line_number DESC LIMIT 512"
                ),
                {"b": running.id},
            ).scalars()
        )
        dead_dispatches = list(
            conn.execute(
                sa.text(
                    "SELECT DISTINCT dispatch_id FROM requests WHERE batch_id = :b AND status = 'queued' "
                    "LIMIT 20"
                ),
                {"b": running.id},
            ).scalars()
        )
    return {
        "running_batch": running.id,
        "tenant": running.tenant_id,
        "ended_batch": ended,
        "queued_ids": queued,
        "dead_dispatches": dead_dispatches,
    }


# ---- the hot queries ----------------------------------------------------------------------


def hot_queries(
    engine: Engine, ids: dict[str, Any]
) -> list[tuple[str, Callable[[], Any], Callable[[str], bool]]]:
    """(name, the store call, which of its statements to explain)."""

    def first(_statement: str) -> bool:
        return True

    def starting(word: str) -> Callable[[str], bool]:
        return lambda statement: statement.lstrip().upper().startswith(word)

    running, ended = ids["running_batch"], ids["ended_batch"]
    settled_before = NOW - 60
    return [
        (
            "claim_queued (refill: next 64 of a running batch)",
            lambda: store.claim_queued(engine, [running], "bench", 20, 64, now=NOW),
            first,
        ),
        (
            "claim_in_order (fair refill: leases run out in a tenant's batches)",
            lambda: store.claim_in_order(engine, [running], "bench", 20, 64, now=NOW),
            lambda statement: "lease_expires_at <" in statement,
        ),
        (
            "claim_in_order (fair refill: a batch's next 64 queued)",
            lambda: store.claim_in_order(engine, [running], "bench", 20, 64, now=NOW),
            lambda statement: "line_number" in statement,
        ),
        (
            "claim_requests (a message's 512 ids)",
            lambda: store.claim_requests(engine, ids["queued_ids"], "bench", 20, now=NOW),
            first,
        ),
        (
            "pending_request_ids (enqueue: first page)",
            lambda: store.pending_request_ids(engine, running, 512),
            first,
        ),
        ("batch_progress (counts of a running batch)", lambda: store.batch_progress(engine, running), first),
        (
            "sweeper: unsettled_dispatch_ids",
            lambda: store.unsettled_dispatch_ids(engine, now=NOW, settled_before=settled_before),
            first,
        ),
        (
            "sweeper: requests_to_redispatch",
            lambda: store.requests_to_redispatch(
                engine,
                now=NOW,
                settled_before=settled_before,
                dead_dispatch_ids=ids["dead_dispatches"],
                limit=20_000,
            ),
            first,
        ),
        ("sweeper: expire_batches", lambda: store.expire_batches(engine, now=NOW), first),
        ("list_batches (a tenant's first page)", lambda: store.list_batches(engine, ids["tenant"]), first),
        (
            "usage of a running batch (GET /v1/batches/{id})",
            lambda: store.usage_report(engine, tenant_id=ids["tenant"], group_by=(), batch_id=running),
            first,
        ),
        (
            "usage of an ended batch",
            lambda: store.usage_report(
                engine,
                tenant_id=f"tenant_{int(ended.removeprefix('batch_e')) % TENANTS}",
                group_by=(),
                batch_id=ended,
            ),
            first,
        ),
        (
            "usage rollup: a tenant, by model and day, last 7 days",
            lambda: store.usage_report(engine, tenant_id=ids["tenant"], since=NOW - 7 * 86_400),
            first,
        ),
        (
            "export: output lines of an ended batch (first page)",
            lambda: store.iter_output_lines(engine, ended),
            starting("SELECT"),
        ),
        (
            "export: output lines of the running batch (first page)",
            lambda: store.iter_output_lines(engine, running),
            starting("SELECT"),
        ),
        (
            "export: error lines of an ended batch (first page)",
            lambda: store.iter_error_lines(engine, ended),
            starting("SELECT"),
        ),
    ]


def report(engine: Engine, ids: dict[str, Any]) -> int:
    flagged = 0
    with engine.connect() as conn:
        counts = conn.execute(
            sa.text("SELECT (SELECT count(*) FROM requests), (SELECT count(*) FROM results)")
        ).one()
    print(f"requests: {counts[0]:,} rows; results: {counts[1]:,} rows")
    for name, call, match in hot_queries(engine, ids):
        statement, parameters = capture(engine, call, match)
        plan = explain(engine, statement, parameters)
        flag = f"  SEQ SCAN of {', '.join(plan.seq_scans)}" if plan.seq_scans else ""
        flagged += bool(plan.seq_scans)
        print(
            f"\n{name}: {plan.execution_ms:,.1f} ms (planning {plan.planning_ms:.1f} ms), "
            f"buffers hit {plan.shared_hit:,} read {plan.shared_read:,}, {plan.rows_read:,} rows read{flag}\n"
            f"    top: {plan.top}\n" + "".join(f"    {scan}\n" for scan in plan.scans).rstrip("\n")
        )
    print(f"\n{flagged} hot quer{'y' if flagged == 1 else 'ies'} with a sequential scan of a growing table")
    return flagged


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=10_000_000, help="requests rows to generate")
    parser.add_argument("--keep", action="store_true", help="keep the scratch database")
    parser.add_argument("--database", help="a database kept by an earlier --keep run: reuse it")
    args = parser.parse_args()
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = args.database or f"tm_plans_{uuid.uuid4().hex[:10]}"
    url = sa.make_url(PG_ADMIN_URL).set(database=name)
    if args.database is None:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    engine = store.make_engine(url)
    try:
        store.upgrade_to_head(engine)
        if args.database is None:
            started = time.perf_counter()
            ids = fill(engine, args.rows)
            print(f"filled {name} in {time.perf_counter() - started:,.0f} s")
        else:
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.execute(sa.text("ANALYZE"))
            ids = sample_ids(engine)
        flagged = report(engine, ids)
    finally:
        engine.dispose()
        if args.keep or args.database:
            print(f"kept database {name}: --database {name}")
        else:
            with admin.connect() as conn:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
    sys.exit(1 if flagged else 0)


if __name__ == "__main__":
    main()
