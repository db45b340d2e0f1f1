from __future__ import annotations

import json
import threading
from decimal import Decimal

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

import store
from models.types import RequestUsage
from tests.store.conftest import IngestFn

USAGE = RequestUsage(prompt_tokens=1000, completion_tokens=200, cached_prompt_tokens=400, reasoning_tokens=50)


def success(request_id: str, model: str = "gpt-4o-mini", cached: bool = False) -> store.ResultRecord:
    return store.ResultRecord(
        request_id,
        store.RequestStatus.SUCCEEDED,
        response_body={"object": "chat.completion", "model": model},
        model=model,
        usage=USAGE,
        cached=cached,
        finish_reason="stop",
        latency_ms=12.5,
    )


def result_rows(engine: Engine) -> list[store.Result]:
    from sqlalchemy.orm import Session

    with Session(engine) as session:
        return list(session.scalars(sa.select(store.Result).order_by(store.Result.request_id)))


def test_duplicate_write_is_a_no_op_and_usage_is_counted_once(
    engine: Engine, ingest: IngestFn, tenant: store.Tenant
) -> None:
    batch = ingest(3)
    ids = store.pending_request_ids(engine, batch.batch_id)
    first = store.record_results(engine, [success(ids[0]), success(ids[1])])
    assert first.inserted == sorted(ids[:2])
    usage_before = store.usage_report(engine, tenant.id, group_by=("model",))
    # a redelivered chunk writes the same results again, with different numbers: ignored
    again = store.record_results(
        engine, [success(ids[0], model="gpt-4o"), success(ids[1]), success(ids[1], model="o3")]
    )
    assert (again.inserted, sorted(again.duplicates)) == ([], sorted(ids[:2]))
    assert store.usage_report(engine, tenant.id, group_by=("model",)) == usage_before
    assert usage_before[0].billed_prompt_tokens == 2 * USAGE.prompt_tokens
    progress = store.batch_progress(engine, batch.batch_id)
    assert (progress.succeeded, progress.queued) == (2, 1)
    got = store.get_batch(engine, batch.batch_id)
    assert got is not None
    assert (got.completed_count, got.failed_count, got.status) == (2, 0, store.BatchStatus.IN_PROGRESS)


def test_concurrent_duplicate_writers_count_once(engine: Engine, ingest: IngestFn) -> None:
    ids = store.pending_request_ids(engine, ingest(100).batch_id)
    start = threading.Barrier(2)
    outcomes: list[store.RecordOutcome] = []

    def writer(order: list[str]) -> None:
        start.wait()
        for offset in range(0, len(order), 10):
            outcomes.append(store.record_results(engine, [success(i) for i in order[offset : offset + 10]]))

    threads = [threading.Thread(target=writer, args=(o,)) for o in (ids, ids[::-1])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    inserted = [i for outcome in outcomes for i in outcome.inserted]
    assert sorted(inserted) == sorted(ids)
    assert len(result_rows(engine)) == 100
    finalized = [b for outcome in outcomes for b in outcome.finalized_batches]
    assert len(finalized) == 1
    got = store.get_batch(engine, finalized[0])
    assert got is not None
    assert (got.completed_count, got.status) == (100, store.BatchStatus.COMPLETED)


def test_cost_from_price_table_and_cache_hits_are_free(engine: Engine, ingest: IngestFn) -> None:
    ids = store.pending_request_ids(engine, ingest(4).batch_id)
    store.set_price(engine, "priced-model", 2.0, 1.0, 8.0)
    store.record_results(
        engine,
        [
            success(ids[0], model="priced-model"),
            success(ids[1], model="priced-model-2025-01-01"),  # dated snapshot: priced as its base
            success(ids[2], model="priced-model", cached=True),
            success(ids[3], model="nobody-prices-me"),
        ],
    )
    costs = {row.request_id: row.cost_usd for row in result_rows(engine)}
    expected = Decimal((1000 - 400) * 2 + 400 * 1 + 200 * 8) / 1_000_000
    assert costs[ids[0]] == expected
    assert costs[ids[1]] == expected
    assert costs[ids[2]] == 0
    assert costs[ids[3]] is None


def test_last_result_finalizes_the_batch_with_its_files(engine: Engine, ingest: IngestFn) -> None:
    batch = ingest(2)
    ids = store.pending_request_ids(engine, batch.batch_id)
    assert store.record_results(engine, [success(ids[0])], now=5000).finalized_batches == []
    failed = store.ResultRecord(
        ids[1], store.RequestStatus.FAILED, error_code="invalid_request", error_message="no"
    )
    assert store.record_results(engine, [failed], now=5001).finalized_batches == [batch.batch_id]
    got = store.get_batch(engine, batch.batch_id)
    assert got is not None
    assert (got.status, got.completed_count, got.failed_count) == (store.BatchStatus.COMPLETED, 1, 1)
    assert (got.finalizing_at, got.completed_at) == (5001, 5001)
    assert (got.output_file_id, got.error_file_id) == store.batch_file_ids(batch.batch_id)
    output = store.get_file(engine, got.output_file_id or "")
    assert output is not None
    assert (output.kind, output.batch_id, output.storage_path) == (
        store.FileKind.BATCH_OUTPUT,
        batch.batch_id,
        None,
    )


def test_results_for_unknown_or_cancelled_requests_are_skipped(engine: Engine, ingest: IngestFn) -> None:
    batch = ingest(2)
    ids = store.pending_request_ids(engine, batch.batch_id)
    store.cancel_batch(engine, batch.batch_id)
    outcome = store.record_results(engine, [success(ids[0]), success("batch_req_nope")])
    assert sorted(outcome.skipped) == sorted([ids[0], "batch_req_nope"])
    assert result_rows(engine) == []


def test_a_result_needs_an_end_status(engine: Engine, ingest: IngestFn) -> None:
    ids = store.pending_request_ids(engine, ingest(1).batch_id)
    with pytest.raises(ValueError, match="succeeded or failed"):
        store.record_results(engine, [store.ResultRecord(ids[0], store.RequestStatus.RUNNING)])


def test_cancel_ends_queued_work_at_once_and_running_work_when_it_ends(
    engine: Engine, ingest: IngestFn
) -> None:
    batch = ingest(3)
    ids = store.pending_request_ids(engine, batch.batch_id)
    store.claim_requests(engine, ids[:1], "w1", 600)
    cancelled = store.cancel_batch(engine, batch.batch_id)
    assert cancelled.status == store.BatchStatus.CANCELLING
    assert cancelled.cancelling_at is not None
    progress = store.batch_progress(engine, batch.batch_id)
    assert (progress.running, progress.cancelled, progress.queued) == (1, 2, 0)
    assert store.claim_requests(engine, ids, "w2", 60) == []
    assert store.record_results(engine, [success(ids[0])]).finalized_batches == [batch.batch_id]
    got = store.get_batch(engine, batch.batch_id)
    assert got is not None
    assert (got.status, got.completed_count, got.cancelled_count) == (store.BatchStatus.CANCELLED, 1, 2)
    assert got.cancelled_at is not None
    # cancelling an ended batch changes nothing
    assert store.cancel_batch(engine, batch.batch_id).status == store.BatchStatus.CANCELLED


def test_cancel_with_nothing_running_is_cancelled_at_once(engine: Engine, ingest: IngestFn) -> None:
    batch = ingest(2)
    assert store.cancel_batch(engine, batch.batch_id).status == store.BatchStatus.CANCELLED
    with pytest.raises(store.BatchNotFound):
        store.cancel_batch(engine, "batch_missing")


def test_expired_batches_cancel_their_queued_requests(engine: Engine, ingest: IngestFn) -> None:
    batch = ingest(3, now=1000, completion_window="1h")
    ids = store.pending_request_ids(engine, batch.batch_id)
    store.record_results(engine, [success(ids[0])], now=1500)
    assert store.expire_batches(engine, now=4599) == []
    assert store.expire_batches(engine, now=4600) == [batch.batch_id]
    got = store.get_batch(engine, batch.batch_id)
    assert got is not None
    assert (got.status, got.expired_at, got.cancelled_count) == (store.BatchStatus.EXPIRED, 4600, 2)
    assert got.output_file_id is not None


def test_each_result_keeps_its_own_body_text_and_a_missing_body_stays_null(
    engine: Engine, ingest: IngestFn
) -> None:
    """The bodies of a write travel together (one JSON array, not an array parameter): each row
    still gets its own body, byte for byte as serialized (quotes, backslashes, non-ASCII, nested
    JSON in a string), and a failure without a body is NULL on PostgreSQL, not a JSON null."""
    ids = store.pending_request_ids(engine, ingest(4).batch_id)
    bodies: list[dict[str, object] | None] = [
        {"id": "a", "content": 'say "hi" \\ back', "nested": '{"k": ["v"]}'},
        None,
        {"id": "c", "content": "héllo ✓ \u2028 \x01", "n": [1, 2.5, None, True]},
        {"id": "d", "content": ""},
    ]
    records = [
        store.ResultRecord(
            request_id,
            store.RequestStatus.SUCCEEDED if body is not None else store.RequestStatus.FAILED,
            response_body=body,
            error_code=None if body is not None else "boom",
            error_message=None if body is not None else 'it "broke"',
        )
        for request_id, body in zip(ids, bodies, strict=True)
    ]
    assert store.record_results(engine, records).inserted == sorted(ids)
    with engine.connect() as conn:
        stored = dict(
            conn.execute(
                sa.select(store.Result.request_id, sa.cast(store.Result.response_body, sa.Text))
            ).all()
        )
    expected = {request_id: body for request_id, body in zip(ids, bodies, strict=True)}
    if engine.dialect.name == "postgresql":  # SQLite's JSON column writes None as a JSON null
        assert stored[ids[1]] is None
    for request_id, body in expected.items():
        if body is not None:
            assert json.loads(stored[request_id]) == body
    rows = {row.request_id: row for row in result_rows(engine)}
    assert rows[ids[1]].response_body is None
    assert rows[ids[1]].error_message == 'it "broke"'


def test_a_write_that_ends_no_batch_sends_no_update_to_end_one(engine: Engine, ingest: IngestFn) -> None:
    """Mid-batch (most writes), no batch has all its requests done: the write reads that once and
    sends no UPDATE to move batches to finalizing, completed or cancelled (statements per window of
    results saved); the batch's last write still completes it."""
    batch_id = ingest(2).batch_id
    ids = store.pending_request_ids(engine, batch_id)
    statements: list[str] = []

    def seen(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        statements.append(statement)

    def ending(sent: list[str]) -> list[str]:
        stamps = ("finalizing_at", "completed_at", "cancelled_at")
        return [s for s in sent if s.lstrip().upper().startswith("UPDATE") and any(t in s for t in stamps)]

    sa.event.listen(engine, "before_cursor_execute", seen)
    try:
        store.record_results(engine, [success(ids[0])])
        mid_batch = list(statements)
        statements.clear()
        store.record_results(engine, [success(ids[1])])
    finally:
        sa.event.remove(engine, "before_cursor_execute", seen)
    assert ending(mid_batch) == [], "no batch was done: nothing to move"
    assert ending(statements), "the last write moves its batch to finalizing and completed"
    batch = store.get_batch(engine, batch_id)
    assert batch is not None
    assert batch.status == store.BatchStatus.COMPLETED
