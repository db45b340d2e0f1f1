"""A single call's result in one statement (``store.results.record_single_call_result``): the
ledger it leaves is the one ``record_results`` leaves (result, request, batch, its end, the
tenant's day and usage), in one round trip and no BEGIN / COMMIT; what it does not apply to
(duplicates, cancelled requests, batch requests) it leaves untouched for ``record_results``."""

from __future__ import annotations

import io
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine

import store
from models.types import RequestUsage
from store.interactive import submit_interactive
from store.results import record_single_call_result
from store.tables import TenantDailySpend
from workers.result_writer import record_single_call

MODEL = "priced-model"
NOW = 1_800_000_000


def _call(engine: Engine, tenant_id: str) -> tuple[str, str]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    # One clock for every step: the two calls' rows compare to the second.
    submitted = submit_interactive(engine, tenant_id, body, endpoint="/v1/chat/completions", now=NOW)
    assert store.claim_requests(engine, [submitted.request_id], "lane", 60, NOW)
    return submitted.request_id, submitted.batch_id


def _record(request_id: str, **changes: Any) -> store.ResultRecord:
    fields: dict[str, Any] = {
        "status": store.RequestStatus.SUCCEEDED,
        "response_body": {"id": "chatcmpl-1", "choices": [{"message": {"content": "hello"}}]},
        "status_code": 200,
        "upstream_request_id": "chatcmpl-1",
        "finish_reason": "stop",
        "model": MODEL,
        "usage": RequestUsage(prompt_tokens=1000, completion_tokens=500, cached_prompt_tokens=200),
        "latency_ms": 51.5,
        "cache_key": "key-1",
        **changes,
    }
    return store.ResultRecord(request_id, **fields)


_VOLATILE = {"id", "request_id", "batch_id", "tenant_id", "custom_id", "dispatch_id", "lease_owner"}


def _ledger(engine: Engine, request_id: str, batch_id: str) -> dict[str, Any]:
    """What the ledger keeps of one call, ids aside (two calls compare)."""
    with engine.connect() as conn:
        rows = {
            "result": conn.execute(
                sa.select(store.Result.__table__).where(store.Result.request_id == request_id)
            ).one_or_none(),
            "request": conn.execute(
                sa.select(store.Request.__table__).where(store.Request.id == request_id)
            ).one(),
            "batch": conn.execute(sa.select(store.Batch.__table__).where(store.Batch.id == batch_id)).one(),
        }
    return {
        name: None
        if row is None
        else {key: value for key, value in row._asdict().items() if key not in _VOLATILE}
        for name, row in rows.items()
    }


def _spent_today(engine: Engine, tenant_id: str) -> Any:
    with engine.connect() as conn:
        return conn.execute(
            sa.select(TenantDailySpend.cost_usd).where(
                TenantDailySpend.tenant_id == tenant_id, TenantDailySpend.day == NOW // 86_400
            )
        ).scalar_one_or_none()


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"cached": True},
        {
            "status": store.RequestStatus.FAILED,
            "response_body": {"error": {"message": "bad"}},
            "status_code": 400,
            "error_code": "invalid_request_error",
            "error_message": "bad",
            "usage": RequestUsage(),
        },
        {"model": f"{MODEL}-2024-07-18"},
        {"model": "unpriced-model"},
        {"status": store.RequestStatus.FAILED, "model": None, "usage": RequestUsage(), "response_body": None},
    ],
    ids=["succeeded", "cache-hit", "failed", "priced-by-prefix", "unpriced", "no-model"],
)
def test_the_one_statement_leaves_the_ledger_record_results_leaves(
    pg_engine: Engine, changes: dict[str, Any]
) -> None:
    store.set_price(pg_engine, MODEL, "2", "1", "8")
    store.set_price(pg_engine, "priced", "100", "100", "100")  # a shorter prefix: not this model's
    store.set_price(pg_engine, f"{MODEL}-2024", "3", "3", "3")  # the longest prefix of the dated name
    general_tenant = store.create_tenant(pg_engine, "general")
    fast_tenant = store.create_tenant(pg_engine, "fast")
    general_call = _call(pg_engine, general_tenant.id)
    fast_call = _call(pg_engine, fast_tenant.id)

    general = store.record_results(pg_engine, [_record(general_call[0], **changes)], now=NOW)
    fast = record_single_call_result(pg_engine, _record(fast_call[0], **changes), now=NOW)

    assert fast is not None
    assert (fast.inserted, fast.duplicates, fast.skipped) == ([fast_call[0]], [], [])
    assert fast.finalized_batches == [fast_call[1]]
    assert list(fast.costs.items()) == [(fast_call[0], cost) for cost in general.costs.values()]
    assert general.finalized_batches == [general_call[1]]
    assert _ledger(pg_engine, *fast_call) == _ledger(pg_engine, *general_call)
    assert _spent_today(pg_engine, fast_tenant.id) == _spent_today(pg_engine, general_tenant.id)
    assert store.get_batch(pg_engine, fast_call[1]).status == store.BatchStatus.COMPLETED  # type: ignore[union-attr]


def test_a_batch_being_cancelled_ends_cancelled_as_record_results_ends_it(pg_engine: Engine) -> None:
    general_tenant = store.create_tenant(pg_engine, "general")
    fast_tenant = store.create_tenant(pg_engine, "fast")
    general_call = _call(pg_engine, general_tenant.id)
    fast_call = _call(pg_engine, fast_tenant.id)
    for _, batch_id in (general_call, fast_call):  # running: the batch waits in cancelling
        assert store.cancel_batch(pg_engine, batch_id, NOW).status == store.BatchStatus.CANCELLING

    general = store.record_results(pg_engine, [_record(general_call[0])], now=NOW)
    fast = record_single_call_result(pg_engine, _record(fast_call[0]), now=NOW)

    assert fast is not None
    assert fast.finalized_batches == [fast_call[1]]
    assert general.finalized_batches == [general_call[1]]
    assert _ledger(pg_engine, *fast_call) == _ledger(pg_engine, *general_call)
    assert _ledger(pg_engine, *fast_call)["batch"]["status"] == store.BatchStatus.CANCELLED


def test_a_single_calls_result_is_one_statement_and_no_transaction_around_it(pg_engine: Engine) -> None:
    """One statement, its own transaction (committed durably, as any autocommit statement is): no
    prices read apart, no BEGIN, no COMMIT, nothing told not to wait for the disk."""
    tenant = store.create_tenant(pg_engine, "acme")
    request_id, batch_id = _call(pg_engine, tenant.id)
    sent: list[str] = []
    begun: list[object] = []

    def began(conn: sa.Connection) -> None:
        # SQLAlchemy marks a begin on an autocommit connection too; psycopg sends a BEGIN only
        # when the driver connection is not in autocommit.
        if not conn.connection.driver_connection.autocommit:  # type: ignore[union-attr]
            begun.append(conn)

    def statement(_conn: object, _cursor: object, text: str, *_: object) -> None:
        sent.append(" ".join(text.split()))

    event.listen(pg_engine, "before_cursor_execute", statement)
    event.listen(pg_engine, "begin", began)
    try:
        outcome, replaced = record_single_call(pg_engine, _record(request_id))
    finally:
        event.remove(pg_engine, "before_cursor_execute", statement)
        event.remove(pg_engine, "begin", began)
    assert (outcome.inserted, outcome.finalized_batches, replaced) == ([request_id], [batch_id], [])
    assert len(sent) == 1, sent
    assert not begun
    assert not any("synchronous_commit" in text for text in sent)


def test_what_it_does_not_apply_to_it_leaves_untouched_and_the_general_way_decides(pg_engine: Engine) -> None:
    tenant = store.create_tenant(pg_engine, "acme")
    # Already recorded: a duplicate, whose paid answer the general way keeps as discarded.
    request_id, batch_id = _call(pg_engine, tenant.id)
    assert record_single_call_result(pg_engine, _record(request_id), now=NOW) is not None
    before = _ledger(pg_engine, request_id, batch_id)
    second = _record(request_id, upstream_request_id="chatcmpl-2")
    assert record_single_call_result(pg_engine, second, now=NOW) is None
    assert _ledger(pg_engine, request_id, batch_id) == before
    outcome, _ = record_single_call(pg_engine, second)
    assert (outcome.inserted, outcome.duplicates, outcome.discarded) == ([], [request_id], [request_id])

    # A request of a batch the tenant made: not a single call's.
    report = store.ingest_batch(
        pg_engine,
        io.BytesIO(
            b'{"custom_id": "c0", "method": "POST", "url": "/v1/chat/completions", '
            b'"body": {"model": "priced-model", "messages": [{"role": "user", "content": "hi"}]}}\n'
        ),
        tenant_id=tenant.id,
    )
    with pg_engine.connect() as conn:
        batch_request = conn.execute(
            sa.select(store.Request.id).where(store.Request.batch_id == report.batch_id)
        ).scalar_one()
    assert record_single_call_result(pg_engine, _record(batch_request), now=NOW) is None
    with pg_engine.connect() as conn:
        assert (
            conn.execute(
                sa.select(sa.func.count()).where(store.Result.request_id == batch_request)
            ).scalar_one()
            == 0
        )
