"""The dashboard's queries: figures equal to the ledger's own sums, tenants apart, and cheap on a
large ledger (PostgreSQL can answer each through an index, never by reading a whole table)."""

from __future__ import annotations

import re

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

import store
from models.types import RequestUsage
from store import dashboard
from store.dashboard_sessions import (
    MAX_SESSIONS_PER_KEY,
    close_dashboard_session,
    dashboard_session,
    open_dashboard_session,
)
from tests.store.conftest import IngestFn, chat_line, jsonl

NOW = 1_800_000_000  # a fixed clock: buckets and windows are then known
BUCKET = 60


def result(
    request_id: str,
    model: str = "gpt-4o-mini",
    *,
    cached: bool = False,
    failed: bool = False,
    prompt: int = 100,
    completion: int = 20,
) -> store.ResultRecord:
    if failed:
        return store.ResultRecord(
            request_id,
            store.RequestStatus.FAILED,
            status_code=400,
            error_code="invalid_request",
            error_message="<script>alert('provider')</script> bad request",
            model=model,
        )
    return store.ResultRecord(
        request_id,
        store.RequestStatus.SUCCEEDED,
        response_body={"object": "chat.completion", "model": model},
        model=model,
        usage=RequestUsage(prompt_tokens=prompt, completion_tokens=completion),
        cached=cached,
        finish_reason="stop",
    )


def other_tenant_batch(engine: Engine, n: int = 3) -> tuple[store.Tenant, str, list[str]]:
    other = store.create_tenant(engine, "globex")
    report = store.ingest_batch(engine, jsonl([chat_line(f"o{i}") for i in range(n)]), tenant_id=other.id)
    return other, report.batch_id, store.pending_request_ids(engine, report.batch_id)


def test_activity_per_model_and_bucket_adds_up_to_the_usage_report(
    engine: Engine, ingest: IngestFn, tenant: store.Tenant
) -> None:
    lines = [chat_line(f"a{i}", model="gpt-4o-mini") for i in range(5)]
    lines += [chat_line(f"b{i}", model="gpt-4o") for i in range(3)]
    ids = store.pending_request_ids(engine, ingest(lines).batch_id)
    mini, big = ids[:5], ids[5:]
    this_bucket = NOW // BUCKET * BUCKET
    # Two minutes ago: two billed mini answers; this minute: one billed, one cache hit, one
    # failed mini, and the three gpt-4o. One mini result an hour and more ago is outside the window.
    store.record_results(engine, [result(mini[0]), result(mini[1])], now=this_bucket - 2 * BUCKET + 5)
    store.record_results(
        engine, [result(mini[2]), result(mini[3], cached=True), result(mini[4], failed=True)], now=NOW
    )
    store.record_results(engine, [result(i, "gpt-4o", prompt=1000) for i in big[:2]], now=NOW)
    store.record_results(engine, [result(big[2], "gpt-4o")], now=this_bucket - 61 * BUCKET)
    _, _, foreign = other_tenant_batch(engine)
    store.record_results(engine, [result(i) for i in foreign], now=NOW)

    activity = dashboard.activity_by_model(engine, tenant.id, until=NOW, bucket_seconds=BUCKET, buckets=60)
    assert (activity.since, activity.until) == (this_bucket - 59 * BUCKET, this_bucket + BUCKET)
    assert len(activity.bucket_starts) == 60
    assert activity.models == ["gpt-4o-mini", "gpt-4o"]  # the busiest first
    mini_series = activity.series("gpt-4o-mini")
    assert sorted(mini_series) == [this_bucket - 2 * BUCKET, this_bucket]
    now_point = mini_series[this_bucket]
    assert (now_point.requests, now_point.failed, now_point.cache_hits) == (3, 1, 1)
    assert now_point.billed_tokens == 120  # the billed answer; the hit and the failure bill nothing
    assert activity.model_total("requests", "gpt-4o") == 2
    assert activity.total("requests") == 7
    assert activity.cache_hit_rate == pytest.approx(1 / 7)

    # The same window through store.usage: every figure agrees.
    usage = store.usage_report(
        engine, tenant.id, group_by=("model",), since=activity.since, until=activity.until
    )
    by_model = {row.model: row for row in usage}
    for model in ("gpt-4o-mini", "gpt-4o"):
        row = by_model[model]
        assert activity.model_total("requests", model) == row.requests
        assert activity.model_total("cache_hits", model) == row.cache_hits
        assert activity.model_total("cost_usd", model) == row.cost_usd
        assert activity.model_total("billed_tokens", model) == (
            row.billed_prompt_tokens + row.billed_completion_tokens
        )
    assert activity.total("cost_usd") > 0

    everyone = dashboard.activity_by_model(engine, None, until=NOW, bucket_seconds=BUCKET, buckets=60)
    assert everyone.total("requests") == 7 + len(foreign)


def test_models_beyond_the_busiest_are_summed_as_other(
    engine: Engine, ingest: IngestFn, tenant: store.Tenant
) -> None:
    names = ["m-a"] * 3 + ["m-b"] * 2 + ["m-c", "m-d"]
    ids = store.pending_request_ids(
        engine, ingest([chat_line(f"c{i}", model=m) for i, m in enumerate(names)]).batch_id
    )
    store.record_results(engine, [result(i, m) for i, m in zip(ids, names, strict=True)], now=NOW)
    activity = dashboard.activity_by_model(
        engine, tenant.id, until=NOW, bucket_seconds=BUCKET, buckets=5, top_models=2
    )
    assert activity.models == ["m-a", "m-b", None]
    assert activity.model_total("requests", None) == 2
    assert activity.total("requests") == len(names)


def test_a_window_is_bounded(engine: Engine, tenant: store.Tenant) -> None:
    with pytest.raises(store.InvalidArgument, match="window"):
        dashboard.activity_by_model(engine, tenant.id, until=NOW, bucket_seconds=86_400, buckets=400)
    with pytest.raises(store.InvalidArgument, match="window"):
        dashboard.activity_by_model(engine, tenant.id, until=NOW, bucket_seconds=1, buckets=10_000)


def test_pages_of_batches_newest_first_and_a_tenant_sees_its_own(
    engine: Engine, ingest: IngestFn, tenant: store.Tenant
) -> None:
    mine = [ingest(1, metadata={"n": str(i)}).batch_id for i in range(5)]
    _, theirs, _ = other_tenant_batch(engine)
    first = dashboard.page_of_batches(engine, tenant.id, limit=2)
    assert [b.id for b in first.data] == mine[::-1][:2]
    assert first.has_more
    rest = dashboard.page_of_batches(engine, tenant.id, after=first.data[-1].id, limit=10)
    assert [b.id for b in rest.data] == mine[::-1][2:]
    assert not rest.has_more
    assert rest.data[0].metadata == {"n": "2"}
    # Another tenant's id as a cursor pages like an unknown id: nothing.
    assert dashboard.page_of_batches(engine, tenant.id, after=theirs).data == []
    everyone = dashboard.page_of_batches(engine, None, limit=10)
    assert [b.id for b in everyone.data] == [theirs, *mine[::-1]]
    assert dashboard.batch_summaries(engine, [theirs, mine[0]], tenant.id)[0].id == mine[0]
    assert len(dashboard.batch_summaries(engine, [theirs, mine[0]], tenant.id)) == 1
    assert [b.id for b in dashboard.batch_summaries(engine, [theirs, mine[0]], None)] == [theirs, mine[0]]
    with pytest.raises(store.InvalidArgument):
        dashboard.page_of_batches(engine, tenant.id, limit=dashboard.MAX_PAGE + 1)


def test_progress_counters_follow_the_results(engine: Engine, ingest: IngestFn, tenant: store.Tenant) -> None:
    batch_id = ingest(4).batch_id
    ids = store.pending_request_ids(engine, batch_id)
    store.record_results(engine, [result(ids[0]), result(ids[1], failed=True)], now=NOW)
    (summary,) = dashboard.batch_summaries(engine, [batch_id], tenant.id)
    progress = store.batch_progress(engine, batch_id)
    assert (summary.total, summary.completed, summary.failed, summary.finished) == (4, 1, 1, 2)
    assert (summary.completed, summary.failed) == (progress.succeeded, progress.failed)


def test_first_errors_are_validation_errors_then_failures_in_line_order(
    engine: Engine, ingest: IngestFn
) -> None:
    lines: list[object] = [chat_line(f"c{i}") for i in range(6)]
    lines.insert(1, '{"custom_id": "<b>broken</b>", "body": ')
    report = ingest(lines, skip_invalid=True)
    ids = store.pending_request_ids(engine, report.batch_id)
    store.record_results(engine, [result(ids[4], failed=True), result(ids[2], failed=True)], now=NOW)
    errors = dashboard.first_errors(engine, report.batch_id)
    assert [e.line for e in errors] == [2, 4, 6]  # input lines, 1-based; the broken line first
    assert errors[0].custom_id is None
    assert [e.custom_id for e in errors[1:]] == ["c2", "c4"]
    assert errors[1].code == "invalid_request"
    assert "<script>" in errors[1].message  # kept as written: the page escapes it
    assert len(dashboard.first_errors(engine, report.batch_id, limit=2)) == 2


def test_queue_depth_and_worker_leases(engine: Engine, ingest: IngestFn, tenant: store.Tenant) -> None:
    batch_id = ingest(10).batch_id
    ids = store.pending_request_ids(engine, batch_id)
    store.claim_requests(engine, ids[:3], "w1@host/101/aaa", lease_seconds=20, now=NOW)
    store.claim_requests(engine, ids[3:4], "w1@host/101/bbb", lease_seconds=20, now=NOW)
    store.claim_requests(engine, ids[4:6], "w2@host/202/ccc", lease_seconds=20, now=NOW - 60)
    store.record_results(engine, [result(ids[9])], now=NOW)
    other, _, foreign = other_tenant_batch(engine, 2)

    (mine,) = dashboard.queue_depth(engine, tenant.id, now=NOW)
    assert (mine.active_batches, mine.unfinished, mine.running, mine.stale, mine.waiting) == (1, 9, 6, 2, 3)
    everyone = {d.tenant_id: d for d in dashboard.queue_depth(engine, None, now=NOW)}
    assert set(everyone) == {tenant.id, other.id}
    assert (everyone[other.id].unfinished, everyone[other.id].running) == (len(foreign), 0)

    workers = dashboard.worker_leases(engine, now=NOW)
    assert [(w.worker, w.running, w.live, w.healthy) for w in workers] == [
        ("w2@host/202", 2, 0, False),  # its leases lapsed: dead or frozen, listed first
        ("w1@host/101", 4, 4, True),
    ]


# The running requests are read through either index that leads with them: the partial index of
# running requests alone, or (status, lease_expires_at).
_RUNNING_REQUESTS = ("ix_requests_status_lease_expires_at", "ix_requests_running_batch_id_lease_expires_at")


def test_dashboard_queries_read_through_their_indexes_on_postgresql(postgres_url: str) -> None:
    """With sequential scans priced out, PostgreSQL answers each query through the index made for
    it: a bounded time range or the top of an ordered index, never a whole table or a whole index
    (a scan of ``(tenant_id, created_at)`` for every tenant's window would read all of it)."""
    store.upgrade_to_head(postgres_url)
    engine = store.make_engine(postgres_url)
    try:
        tenant = store.create_tenant(engine, "acme")
        expected = {
            "a tenant's page": (
                lambda: dashboard.page_of_batches(engine, tenant.id, limit=25),
                ["ix_batches_listed_tenant_id_created_at_id"],
            ),
            "every tenant's page": (
                lambda: dashboard.page_of_batches(engine, None, limit=25),
                ["ix_batches_listed_created_at_id"],
            ),
            "a tenant's activity": (
                lambda: dashboard.activity_by_model(
                    engine, tenant.id, until=NOW, bucket_seconds=60, buckets=60
                ),
                [
                    ("ix_results_tenant_id_created_at", "ix_results_created_at"),
                    ("ix_discarded_answers_tenant_id_created_at", "ix_discarded_answers_created_at"),
                ],
            ),
            "every tenant's activity": (
                lambda: dashboard.activity_by_model(engine, None, until=NOW, bucket_seconds=60, buckets=60),
                ["ix_results_created_at", "ix_discarded_answers_created_at"],
            ),
            "queue depth": (
                lambda: dashboard.queue_depth(engine, None, now=NOW),
                ["ix_batches_status", _RUNNING_REQUESTS],
            ),
            "workers": (
                lambda: dashboard.worker_leases(engine, now=NOW),
                [_RUNNING_REQUESTS],
            ),
        }
        for name, (run, indexes) in expected.items():
            sqls = _compiled(engine, run)
            with engine.connect() as conn:
                conn.exec_driver_sql("SET enable_seqscan = off")
                plan = "\n".join(
                    line for sql in sqls for line in conn.exec_driver_sql("EXPLAIN " + sql).scalars()
                )
            assert "Seq Scan" not in plan, f"{name}:\n{plan}"
            for choices in indexes:
                # An empty table's plan may take either of two range scans of the same rows.
                names = (choices,) if isinstance(choices, str) else choices
                assert any(re.search(rf"(using|Scan on) {index}\b", plan) for index in names), (
                    f"{name}: not {names}:\n{plan}"
                )
    finally:
        engine.dispose()


def _compiled(engine: Engine, run: object) -> list[str]:
    """The SQL statements ``run()`` sends, with their parameters inlined (for EXPLAIN)."""
    sent: list[str] = []

    def capture(conn: object, cursor: object, statement: str, parameters: object, *_: object) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            sent.append(_inline(statement, parameters))

    sa.event.listen(engine, "before_cursor_execute", capture)
    try:
        run()  # type: ignore[operator]
    finally:
        sa.event.remove(engine, "before_cursor_execute", capture)
    assert sent
    return sent


def _inline(statement: str, parameters: object) -> str:
    """psycopg's ``%(name)s`` parameters replaced by SQL literals."""
    assert isinstance(parameters, dict)
    for name, value in sorted(parameters.items(), key=lambda item: -len(item[0])):
        if isinstance(value, str):
            literal = "'" + value.replace("'", "''") + "'"
        elif isinstance(value, (list, tuple)):
            literal = "(" + ", ".join("'" + str(v).replace("'", "''") + "'" for v in value) + ")"
        else:
            literal = str(value)
        statement = statement.replace(f"%({name})s", literal)
    return statement


def test_sessions_open_end_and_die_with_their_key(engine: Engine, tenant: store.Tenant) -> None:
    key = store.create_api_key(engine, tenant.id)
    assert open_dashboard_session(engine, "tm-not-a-key", 3600) is None
    opened = open_dashboard_session(engine, key, 3600, now=NOW)
    assert opened is not None
    assert key not in opened.token
    login = dashboard_session(engine, opened.token, now=NOW + 10)
    assert login is not None
    assert (login.tenant_id, login.tenant_name) == (tenant.id, "acme")
    assert login.csrf_token == opened.login.csrf_token
    assert dashboard_session(engine, opened.token, now=NOW + 3600) is None  # expired
    with engine.connect() as conn:
        stored = conn.execute(sa.select(store.DashboardSession.token_hash)).scalars().all()
    assert opened.token not in stored  # only its hash is kept

    again = open_dashboard_session(engine, key, 3600)
    assert again is not None
    assert dashboard_session(engine, again.token) is not None
    assert close_dashboard_session(engine, again.token)
    assert dashboard_session(engine, again.token) is None
    assert not close_dashboard_session(engine, again.token)

    third = open_dashboard_session(engine, key, 3600)
    assert third is not None
    assert store.revoke_api_key(engine, key)
    assert dashboard_session(engine, third.token) is None


def test_logging_in_in_a_loop_keeps_a_bounded_number_of_sessions(
    engine: Engine, tenant: store.Tenant
) -> None:
    key = store.create_api_key(engine, tenant.id)
    tokens = []
    for i in range(MAX_SESSIONS_PER_KEY + 5):
        opened = open_dashboard_session(engine, key, 3600, now=NOW + i)
        assert opened is not None
        tokens.append(opened.token)
    with engine.connect() as conn:
        count = conn.execute(sa.select(sa.func.count()).select_from(store.DashboardSession)).scalar_one()
    assert count == MAX_SESSIONS_PER_KEY
    assert dashboard_session(engine, tokens[0], now=NOW + 30) is None  # the oldest went first
    assert dashboard_session(engine, tokens[-1], now=NOW + 30) is not None


def test_a_single_calls_hidden_batch_is_not_shown(engine: Engine, tenant: store.Tenant) -> None:
    """A chat completion's batch exists only because every request has one: the dashboard's
    progress view shows it no more than the API does (found in review)."""
    from store.interactive import submit_interactive

    call = submit_interactive(
        engine,
        tenant.id,
        {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
        endpoint="/v1/chat/completions",
    )
    assert dashboard.batch_summaries(engine, [call.batch_id], tenant.id) == []
    assert dashboard.batch_summaries(engine, [call.batch_id], None) == []
    assert call.batch_id not in [b.id for b in dashboard.page_of_batches(engine, None, limit=10).data]
