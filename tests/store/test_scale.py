"""What must not grow with the ledger: the hot queries read what is left to run (their plans on
PostgreSQL, ANALYZEd), a batch is read from its own row, and exports and enqueues go a page at a
time, holding no connection between pages (bench/million.py and bench/query_plans.py measure
the same at a million lines)."""

from __future__ import annotations

import functools
import json
import tracemalloc
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from sqlalchemy import event
from sqlalchemy.engine import Engine

import store
import store.export
from bench.query_plans import capture, explain, generic_plan_scans
from models.types import RequestUsage
from store.clock import now_seconds
from store.dashboard import page_of_batches
from store.schema import alembic_config
from store.tables import REQUESTS_AUTOVACUUM
from store.webhooks import claim_due_webhooks
from tests.store.conftest import IngestFn, chat_line

UNFINISHED_INDEXES = ("ix_requests_unfinished_batch_id_line_number", "ix_requests_unfinished_dispatch_id")


def answer(request_id: str, *, cached: bool = False, upstream: str | None = None) -> store.ResultRecord:
    usage = RequestUsage(prompt_tokens=12, completion_tokens=30, cached_prompt_tokens=4, reasoning_tokens=2)
    return store.ResultRecord(
        request_id,
        store.RequestStatus.SUCCEEDED,
        {"id": f"chatcmpl-{request_id}", "choices": [{"message": {"content": "answer"}}]},
        upstream_request_id=upstream or f"up-{request_id}",
        model="m1",
        usage=usage,
        cached=cached,
    )


def test_hot_queries_read_only_the_requests_left_to_run(pg_engine: Engine) -> None:
    """A batch mostly done: claims, enqueue pages and progress counts scan the partial indexes
    of unfinished requests, in the plan PostgreSQL picks with the parameters and in the generic
    plan of a prepared statement (psycopg prepares a statement run five times), where a status
    sent as a parameter could not use them."""
    engine = pg_engine
    tenant = store.create_tenant(engine, "acme")
    lines = [chat_line(f"c{i}") for i in range(3000)]
    batch_id = store.ingest_batch(engine, _jsonl(lines), tenant_id=tenant.id).batch_id
    ids = store.pending_request_ids(engine, batch_id)
    store.record_results(engine, [answer(request_id) for request_id in ids[:2900]])
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("VACUUM ANALYZE requests"))
    calls: dict[str, Any] = {
        "claim_queued": lambda: store.claim_queued(engine, [batch_id], "w", 20, 64),
        "pending_request_pages": lambda: next(store.pending_request_pages(engine, batch_id, 64)),
        "batch_progress": lambda: store.batch_progress(engine, batch_id),
    }
    for name, call in calls.items():
        statement, parameters = capture(engine, call, lambda _statement: True)
        custom = explain(engine, statement, parameters).scans
        generic = generic_plan_scans(engine, statement, parameters)
        for plan in (custom, generic):
            assert _reads_only_unfinished(plan), (name, plan)


def _reads_only_unfinished(scans: list[str]) -> bool:
    """Requests found through an index that holds only unfinished ones, or one led by the
    status looked up as 'queued' or 'running'; never through the index of every request of a
    batch (stepping over its finished lines) nor by a sequential scan."""
    indexes = [scan.split(" using ")[1] for scan in scans if " using " in scan]
    return (
        bool(indexes)
        and "ix_requests_batch_id_line_number" not in indexes
        and "Seq Scan on requests" not in scans
    )


def _a_batch_the_statistics_have_not_seen(engine: Engine, lines: int) -> str:
    """A new batch of ``lines`` queued requests, after an ANALYZE that saw only finished ones
    (autovacuum analyzes a big table long after a batch lands); returns its id."""
    tenant = store.create_tenant(engine, "acme")
    ended = store.ingest_batch(engine, _jsonl([chat_line(f"e{i}") for i in range(500)]), tenant_id=tenant.id)
    store.record_results(
        engine, [answer(request_id) for request_id in store.pending_request_ids(engine, ended.batch_id)]
    )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("VACUUM ANALYZE requests"))  # no unfinished request in the statistics
    return store.ingest_batch(
        engine, _jsonl([chat_line(f"c{i}") for i in range(lines)]), tenant_id=tenant.id
    ).batch_id


def test_a_claim_updates_the_rows_it_locked_by_id_while_the_statistics_lag(pg_engine: Engine) -> None:
    """A new batch's lines are in the partial index of unfinished requests before any ANALYZE
    has seen them (autovacuum analyzes a big table long after a batch lands): a claim's UPDATE
    must still find the rows its CTE locked through the primary key, not by walking that index
    (every line of the batch, each joined to the locked rows: 2 s a claim at 50k lines), in the
    custom and in the generic plan."""
    engine = pg_engine
    batch_id = _a_batch_the_statistics_have_not_seen(engine, 3000)
    now = 1_000_000
    # Leases already run out: the refill's first look-up (expired leases) finds rows to claim.
    store.claim_in_order(engine, [batch_id], "dead-worker", 20, 64, now=now - 100)
    queued = store.pending_request_ids(engine, batch_id, 512)
    calls: dict[str, tuple[Any, Any]] = {
        "claim_in_order: expired leases": (
            lambda: store.claim_in_order(engine, [batch_id], "w", 20, 64, now=now),
            lambda statement: "lease_expires_at <" in statement,
        ),
        "claim_in_order: queued": (
            lambda: store.claim_in_order(engine, [batch_id], "w", 20, 64, now=now),
            lambda statement: "line_number" in statement,
        ),
        "claim_queued": (lambda: store.claim_queued(engine, [batch_id], "w", 20, 64, now=now), _any),
        "claim_requests": (lambda: store.claim_requests(engine, queued, "w", 20, now=now), _any),
    }
    for name, (call, match) in calls.items():
        statement, parameters = capture(engine, call, match)
        custom = explain(engine, statement, parameters).outer_scans
        generic = generic_plan_scans(engine, statement, parameters, outside_ctes=True)
        for plan in (custom, generic):
            requests_scans = [scan for scan in plan if "Scan on requests" in scan]
            assert requests_scans, (name, plan)
            assert all(scan.endswith("using requests_pkey") for scan in requests_scans), (name, plan)


def test_a_claim_by_id_locks_its_rows_through_the_key_while_the_statistics_lag(pg_engine: Engine) -> None:
    """``claim_requests``' lock of the rows it names (its CTE, which the test above leaves out)
    goes through the primary key too: with the statistics not yet showing a new batch, testing
    claimability with literal statuses let the planner walk the partial index of unfinished
    requests instead, filtering every one of them by the ids (a single call's claim read the
    whole new batch), and the UPDATE then joined the locked rows to the key's look-up of all the
    ids once per locked row (a chunk's 512 ids read 134k rows), in the custom and the generic
    plan."""
    engine = pg_engine
    batch_id = _a_batch_the_statistics_have_not_seen(engine, 3000)
    now = 1_000_000
    queued = store.pending_request_ids(engine, batch_id, 512)
    with engine.connect() as conn:
        rows = conn.execute(sa.select(sa.func.count()).select_from(store.Request)).scalar_one()

    def claim(ids: list[str]) -> list[store.ClaimedRequest]:
        return store.claim_requests(engine, ids, "w", 20, now=now)

    for ids in (queued[:1], queued[:64], queued):
        statement, parameters = capture(engine, functools.partial(claim, ids), _any)
        plan = explain(engine, statement, parameters)
        generic = generic_plan_scans(engine, statement, parameters)
        # A single call's: the key's look-ups (its row to lock, then to update). Many ids: those,
        # or (the planner's choice in a table of a few thousand rows) one pass over the table;
        # never the key's look-up of every id once per locked row, nor the unfinished rows
        # through their index.
        bound = 2 * len(ids) if len(ids) == 1 else rows + 2 * len(ids)
        assert plan.rows_read <= bound, (len(ids), plan)
        for scans in (plan.scans, generic):
            assert not any("unfinished" in scan for scan in scans), (len(ids), scans)
        assert all("requests_pkey" in scan for scan in generic if " using " in scan), (len(ids), generic)


def test_a_dispatch_marks_its_chunk_by_id_while_the_statistics_lag(pg_engine: Engine) -> None:
    """A batch is dispatched right after its ingest, before any ANALYZE has seen its lines: the
    UPDATE that names a chunk's message must find the chunk's rows through the primary key, not
    walk every unfinished request through an index of ``status`` to pick out the chunk's few
    hundred (each chunk then cost the whole batch: the dispatch of a batch grew with the square
    of its lines), in the custom and in the generic plan. It still skips finished requests."""
    engine = pg_engine
    batch_id = _a_batch_the_statistics_have_not_seen(engine, 20_000)
    # A chunk small beside the batch, as 512 ids are at a million lines (a sequential scan would
    # be the cheapest plan of a bigger chunk of a table this small).
    chunk = store.pending_request_ids(engine, batch_id, 64)

    statement, parameters = capture(
        engine,
        lambda: store.mark_dispatched(engine, chunk, "dsp_1", now=1_000_000),
        lambda statement: statement.startswith("UPDATE requests"),
    )
    plan = explain(engine, statement, parameters)
    generic = generic_plan_scans(engine, statement, parameters)

    assert plan.rows_read <= 2 * len(chunk), plan
    for scans in (plan.scans, generic):
        indexes = [scan.split(" using ")[1] for scan in scans if " using " in scan]
        assert indexes == ["requests_pkey"], scans
        assert "Seq Scan on requests" not in scans, scans
    store.record_results(engine, [answer(chunk[0])])
    assert store.mark_dispatched(engine, chunk, "dsp_1", now=1_000_000) == len(chunk) - 1


def test_a_refill_finds_run_out_leases_without_reading_a_new_batch(pg_engine: Engine) -> None:
    """Right after a big batch lands, before ANALYZE has seen it: a refill's first look-up (the
    requests running under a lease that ran out, in the tenant's batches) reads the running
    requests only, not every line of the batch through the index of unfinished requests."""
    engine = pg_engine
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("ALTER TABLE requests SET (autovacuum_enabled = false)"))  # never analyzed
    tenant = store.create_tenant(engine, "acme")
    batch_id = store.ingest_batch(
        engine, _jsonl([chat_line(f"c{i}") for i in range(3000)]), tenant_id=tenant.id
    ).batch_id
    now = 1_000_000
    store.claim_in_order(engine, [batch_id], "live-worker", 3600, 64, now=now)

    statement, parameters = capture(
        engine,
        lambda: store.claim_in_order(engine, [batch_id], "w", 20, 64, now=now),
        lambda statement: "lease_expires_at <" in statement,
    )
    plan = explain(engine, statement, parameters)
    generic = generic_plan_scans(engine, statement, parameters)

    assert plan.rows_read <= 64, plan
    for scans in (plan.scans, generic):
        assert "ix_requests_unfinished_batch_id_line_number" not in " ".join(scans), scans


def test_the_sweeper_reads_open_dispatches_not_every_queued_request(pg_engine: Engine) -> None:
    """A batch dispatched long ago and still queued: the sweeper's look for dispatches that still
    name work (every pass, every few seconds) reads a few rows per open dispatch, not every queued
    request (a million at the start of a million-line batch); and it still finds each of them,
    and no dispatch whose requests all ended or run under live leases."""
    engine = pg_engine
    tenant = store.create_tenant(engine, "acme")
    batch_id = store.ingest_batch(
        engine, _jsonl([chat_line(f"c{i}") for i in range(3000)]), tenant_id=tenant.id
    ).batch_id
    ids = store.pending_request_ids(engine, batch_id)
    now = 1_000_000
    chunks = [ids[start : start + 100] for start in range(0, len(ids), 100)]
    for number, chunk in enumerate(chunks):
        store.mark_dispatched(engine, chunk, f"dsp_{number:03}", now=now - 600)
    store.record_results(engine, [answer(request_id) for request_id in chunks[0]])  # dsp_000 ended
    store.claim_requests(engine, chunks[1], "live-worker", 3600, now=now)  # dsp_001 in flight
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("VACUUM ANALYZE requests"))

    found = store.unsettled_dispatch_ids(engine, now=now, settled_before=now - 60)

    assert sorted(found) == [f"dsp_{number:03}" for number in range(2, len(chunks))]
    statement, parameters = capture(
        engine, lambda: store.unsettled_dispatch_ids(engine, now=now, settled_before=now - 60), _any
    )
    plan = explain(engine, statement, parameters)
    # Per dispatch: the step to it, and the first of its rows that needs work (dsp_001's hundred
    # running rows are all looked at: none does).
    assert plan.rows_read <= 3 * len(chunks) + 100, plan


def test_requests_are_vacuumed_after_a_fixed_number_of_changes(pg_engine: Engine) -> None:
    """``requests`` is vacuumed and analyzed after a fixed number of changed rows, not after a
    fraction of the table (PostgreSQL's default: 20%, 2M dead row versions on a 10M-row ledger
    before claims stop stepping over them)."""
    with pg_engine.connect() as conn:
        options = conn.execute(
            sa.text("SELECT reloptions FROM pg_class WHERE relname = 'requests' AND relkind = 'r'")
        ).scalar_one()
    assert dict(option.split("=", 1) for option in options or []) == REQUESTS_AUTOVACUUM


def _any(_statement: str) -> bool:
    return True


def _single_call_batches(engine: Engine, tenant_id: str, count: int, first_created_at: int) -> None:
    """``count`` hidden one-request batches (what each chat completion and agent run leaves), as
    a busy tenant's months of single calls leave them, created a second apart."""
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO batches (id, tenant_id, endpoint, kind, completion_window, status, "
                "error_count, priority, hidden, webhook_attempts, total_count, completed_count, "
                "failed_count, cancelled_count, created_at, expires_at) "
                "SELECT 'batch_sc' || :first || '_' || b, :tenant, '/v1/chat/completions', "
                "'chat_completion', '24h', 'completed', 0, 0, true, 0, 1, 1, 0, 0, :first + b, "
                ":first + b + 86400 FROM generate_series(0, :count - 1) b"
            ),
            {"tenant": tenant_id, "count": count, "first": first_created_at},
        )


def test_listings_and_webhook_claims_step_over_no_single_call_batches(pg_engine: Engine) -> None:
    """Every chat completion is a hidden batch row, kept for good. Listing a tenant's batches
    (the API's and the dashboard's pages), the operator's page of every tenant's, and the beat's
    look for due webhooks (every sweep) walked the batches by time and dropped the hidden ones one
    by one: with a million single calls, 250-500 ms of PostgreSQL per list and 230-320 ms per
    sweep, growing with every call anyone ever made. They read the batches they show (or the
    batches with a webhook to send) alone."""
    engine = pg_engine
    tenant = store.create_tenant(engine, "busy")
    now = now_seconds()
    _single_call_batches(engine, tenant.id, 10_000, first_created_at=now - 100_000)  # older
    shown = [
        store.ingest_batch(engine, _jsonl([chat_line(f"b{i}")]), tenant_id=tenant.id).batch_id
        for i in range(3)
    ]
    _single_call_batches(engine, tenant.id, 10_000, first_created_at=now + 10)  # newer
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("VACUUM ANALYZE batches"))
    assert [batch.id for batch in store.list_batches(engine, tenant.id).data] == shown[::-1]
    calls: dict[str, Any] = {
        "list_batches": lambda: store.list_batches(engine, tenant.id),
        "list_batches after": lambda: store.list_batches(engine, tenant.id, after=shown[-1]),
        "a tenant's dashboard page": lambda: page_of_batches(engine, tenant.id),
        "the operator's dashboard page": lambda: page_of_batches(engine, None),
        "due webhooks": lambda: claim_due_webhooks(engine, max_attempts=8, claim_seconds=30),
    }
    for name, call in calls.items():
        statement, parameters = capture(engine, call, lambda statement: "FROM batches" in statement)
        plan = explain(engine, statement, parameters)
        # Before: 10,003 to 20,003 batch rows read.
        assert plan.rows_read <= 100, (name, plan)


def test_reading_a_batch_sums_nothing(engine: Engine, ingest: IngestFn) -> None:
    """GET /v1/batches/{id} (its usage included) reads the batch's row, not its results: a poll
    of a million-line batch cost a sum over a million rows."""
    batch_id = ingest(3).batch_id
    ids = store.pending_request_ids(engine, batch_id)
    store.record_results(engine, [answer(ids[0]), answer(ids[1], cached=True)])
    batch = store.get_batch(engine, batch_id)
    assert batch is not None
    sent: list[str] = []

    def hook(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        sent.append(statement)

    event.listen(engine, "before_cursor_execute", hook)
    try:
        usage = store.batch_object(engine, batch)["usage"]
    finally:
        event.remove(engine, "before_cursor_execute", hook)
    assert [s for s in sent if "results" in s or "discarded_answers" in s] == []
    assert (usage["input_tokens"], usage["cache_hits"]) == (12, 1)


def test_a_batch_counts_what_the_usage_report_sums(engine: Engine, ingest: IngestFn) -> None:
    """Results billed and served from the cache, failures, a duplicate delivery with another
    answer, spend of cancelled and handed-back requests: the batch's counters equal the rollup."""
    store.set_price(engine, "m1", 1.0, 0.5, 2.0)
    batch_id = ingest(6).batch_id
    ids = store.pending_request_ids(engine, batch_id)
    store.record_results(engine, [answer(ids[0]), answer(ids[1], cached=True)])
    failed = store.ResultRecord(ids[2], store.RequestStatus.FAILED, error_code="x", model="m1")
    store.record_results(engine, [failed, answer(ids[0], upstream="second-answer")])  # a duplicate
    store.record_results(engine, [answer(ids[0], upstream="second-answer")])  # written again: once
    store.record_handed_back_spend(engine, [answer(ids[3], upstream="before-hand-back")])
    claimed = store.claim_requests(engine, [ids[4]], "w", 30)
    assert claimed
    assert store.cancel_claimed(engine, [ids[4]], "w") == 1
    store.record_cancelled_spend(engine, [answer(ids[4], upstream="before-cancel")])
    batch = store.get_batch(engine, batch_id)
    assert batch is not None
    usage = store.batch_object(engine, batch)["usage"]
    [row] = store.usage_report(engine, group_by=(), batch_id=batch_id)
    assert row.discarded_answers == 3
    assert usage == {
        "input_tokens": row.billed_prompt_tokens,
        "input_tokens_details": {"cached_tokens": row.billed_cached_prompt_tokens},
        "output_tokens": row.billed_completion_tokens,
        "output_tokens_details": {"reasoning_tokens": row.billed_reasoning_tokens},
        "total_tokens": row.billed_prompt_tokens + row.billed_completion_tokens,
        "cache_hits": row.cache_hits,
        "cost_usd": float(row.cost_usd),
    }


def test_the_migration_fills_the_counters_of_batches_written_before_it(database_url: str) -> None:
    engine = store.make_engine(database_url)
    try:
        command.upgrade(alembic_config(engine), "0013")
        with engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO tenants (id, name, created_at) VALUES ('t', 't', 0)"))
            conn.execute(
                sa.text(
                    "INSERT INTO batches (id, tenant_id, endpoint, kind, completion_window, status, "
                    "priority, total_count, completed_count, failed_count, cancelled_count, created_at, "
                    "expires_at) VALUES ('b', 't', '/v1/chat/completions', 'chat_completion', '24h', "
                    "'in_progress', 0, 3, 2, 0, 0, 0, 86400)"
                )
            )
            for i in range(3):
                conn.execute(
                    sa.text(
                        "INSERT INTO requests (id, batch_id, tenant_id, custom_id, line_number, kind, "
                        "body, status, priority, attempts, created_at) VALUES (:id, 'b', 't', :id, :n, "
                        "'chat_completion', '{}', 'succeeded', 0, 1, 0)"
                    ),
                    {"id": f"r{i}", "n": i},
                )
            for i, cached in ((0, False), (1, True)):
                conn.execute(
                    sa.text(
                        "INSERT INTO results (request_id, batch_id, tenant_id, status, model, "
                        "prompt_tokens, completion_tokens, cached_prompt_tokens, reasoning_tokens, "
                        "cached, cost_usd, attempts, created_at) VALUES (:id, 'b', 't', 'succeeded', 'm', "
                        "10, 20, 3, 1, :cached, :cost, 1, 0)"
                    ),
                    {"id": f"r{i}", "cached": cached, "cost": 0 if cached else "0.000123"},
                )
            conn.execute(
                sa.text(
                    "INSERT INTO discarded_answers (request_id, batch_id, tenant_id, reason, "
                    "upstream_request_id, model, prompt_tokens, completion_tokens, cached_prompt_tokens, "
                    "reasoning_tokens, cost_usd, created_at) VALUES ('r0', 'b', 't', 'duplicate', 'x', 'm', "
                    "5, 6, 0, 0, '0.000007', 0)"
                )
            )
        store.upgrade_to_head(engine)
        batch = store.get_batch(engine, "b")
        assert batch is not None
        usage = store.batch_object(engine, batch)["usage"]
        [row] = store.usage_report(engine, group_by=(), batch_id="b")
        assert (usage["input_tokens"], usage["output_tokens"], usage["cache_hits"]) == (15, 26, 1)
        assert (row.billed_prompt_tokens, row.billed_completion_tokens, row.cache_hits) == (15, 26, 1)
        assert usage["cost_usd"] == float(row.cost_usd) == 0.00013
        assert batch.discarded_answer_count == 1
    finally:
        engine.dispose()


def _jsonl(lines: list[dict[str, Any]]) -> Any:
    from tests.store.conftest import jsonl

    return jsonl(lines)


def test_an_export_holds_no_connection_between_pages_and_a_page_of_memory(
    engine: Engine, ingest: IngestFn, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The output file is read a page at a time, each page a short read: a slow download held
    one connection and one transaction for its whole length. Memory is a page, not the file."""
    monkeypatch.setattr(store.export, "PAGE_LINES", 20)
    lines = [chat_line(f"c{i}", content="x" * 2000) for i in range(400)]
    batch_id = ingest(lines).batch_id
    ids = store.pending_request_ids(engine, batch_id)
    big = {"choices": [{"message": {"content": "y" * 4000}}]}
    records = [store.ResultRecord(i, store.RequestStatus.SUCCEEDED, big) for i in ids]
    store.record_results(engine, records)

    exported = store.iter_output_lines(engine, batch_id)
    first = next(exported)
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    rest = list(exported)
    assert [json.loads(line)["custom_id"] for line in [first, *rest]] == [f"c{i}" for i in range(400)]

    def peak_of_export(count: int) -> int:
        tracemalloc.start()
        try:
            written = sum(
                len(line)
                for line, _ in zip(store.iter_output_lines(engine, batch_id), range(count), strict=False)
            )
            assert written > 0
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    small, large = peak_of_export(40), peak_of_export(400)
    file_bytes = sum(len(line) for line in [first, *rest])
    assert large < 2 * small < file_bytes, (small, large, file_bytes)


def test_enqueue_pages_cover_every_queued_request_once_in_line_order(
    engine: Engine, ingest: IngestFn
) -> None:
    batch_id = ingest(250).batch_id
    ids = store.pending_request_ids(engine, batch_id)
    store.claim_requests(engine, ids[100:110], "w", 30)  # running: not queued, not paged
    pages = []
    for page in store.pending_request_pages(engine, batch_id, 64):
        assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
        pages.append(page)
    assert all(len(page) <= 64 for page in pages)
    assert [i for page in pages for i in page] == ids[:100] + ids[110:]
