"""A cancel or an expiry of a large batch ends its requests a chunk of lines per transaction
(``store.batches.STOP_CHUNK_LINES``, made small here): between its chunks it holds no lock, so a
result of one of the batch's running requests commits meanwhile; the counts, the billing and the
batch's end come out as one transaction would have left them; and a stop whose process died
after its first chunk is finished by the sweep's ``store.finish_stopped_batches``."""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine

import store
import store.batches
from models.types import RequestUsage
from store.batches import EXPIRED_ERROR
from tests.store.conftest import IngestFn, chat_line

CHUNK_LINES = 2
LINES = 7  # four chunks of two lines, less what runs
USAGE = RequestUsage(prompt_tokens=100, completion_tokens=20)
WAIT_SECONDS = 30  # a safety net: a waiting step fails the test rather than hang it
LIVE_LEASE_SECONDS = 3_600


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store.batches, "STOP_CHUNK_LINES", CHUNK_LINES, raising=False)


class Died(Exception):
    """Stands for the process of a stop dying between two of its chunks."""


def _result(request_id: str) -> store.ResultRecord:
    return store.ResultRecord(
        request_id,
        store.RequestStatus.SUCCEEDED,
        response_body={"object": "chat.completion"},
        upstream_request_id=f"chatcmpl-{request_id}",
        model="gpt-4o-mini",
        usage=USAGE,
    )


def _statuses(engine: Engine, batch_id: str) -> dict[str, store.RequestStatus]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(store.Request.id, store.Request.status).where(store.Request.batch_id == batch_id)
        ).all()
    return {row.id: store.RequestStatus(row.status) for row in rows}


def _batch(engine: Engine, batch_id: str) -> store.Batch:
    batch = store.get_batch(engine, batch_id)
    assert batch is not None
    return batch


def _assert_counts_add_up(engine: Engine, batch_id: str) -> dict[store.RequestStatus, int]:
    statuses = list(_statuses(engine, batch_id).values())
    batch = _batch(engine, batch_id)
    counted = {
        store.RequestStatus.SUCCEEDED: batch.completed_count,
        store.RequestStatus.FAILED: batch.failed_count,
        store.RequestStatus.CANCELLED: batch.cancelled_count,
    }
    for status, count in counted.items():
        assert count == statuses.count(status), (status, counted)
    return counted


def _running_batch(engine: Engine, ingest: IngestFn, running: int) -> tuple[str, list[str]]:
    """A batch of ``LINES`` lines whose first ``running`` are claimed under live leases; returns
    its id and the running ones' ids."""
    batch_id = ingest(LINES).batch_id
    first = store.pending_request_ids(engine, batch_id)[:running]
    claimed = store.claim_requests(engine, first, "worker", LIVE_LEASE_SECONDS)
    assert len(claimed) == running
    return batch_id, [request.id for request in claimed]


def test_a_result_commits_while_a_cancel_is_between_its_chunks(pg_engine: Engine) -> None:
    """The cancel is held before a statement of its, at the first one it runs once it has
    committed some of the batch's requests cancelled while others are still queued (between two
    chunks). The result of a running request of that batch then commits without waiting. In one
    transaction the cancel never reached such a point, and a result waited for its commit."""
    tenant = store.create_tenant(pg_engine, "acme")
    ingest = _ingest_on(pg_engine, tenant.id)
    batch_id, [running_id] = _running_batch(pg_engine, ingest, 1)
    between_chunks = threading.Event()
    release = threading.Event()

    def partly_cancelled() -> bool:
        # On a DBAPI connection of its own: no SQLAlchemy event, and it sees what was committed.
        raw = pg_engine.raw_connection()
        try:
            cursor = raw.cursor()
            cursor.execute(
                "SELECT b.status, b.cancelled_count,"
                " (SELECT count(*) FROM requests r WHERE r.batch_id = b.id AND r.status = 'queued')"
                " FROM batches b WHERE b.id = %s",
                (batch_id,),
            )
            status, cancelled, queued = cursor.fetchone()
            return bool(status == "cancelling" and cancelled > 0 and queued > 0)
        finally:
            raw.close()

    def before(_conn: object, _cursor: object, _statement: str, *_: object) -> None:
        if threading.current_thread().name != "cancel" or between_chunks.is_set():
            return
        if partly_cancelled():
            between_chunks.set()
            assert release.wait(WAIT_SECONDS), "the cancel was never released"

    cancel_error: list[BaseException] = []

    def cancel() -> None:
        try:
            store.cancel_batch(pg_engine, batch_id)
        except BaseException as error:  # the test reports it
            cancel_error.append(error)

    event.listen(pg_engine, "before_cursor_execute", before)
    try:
        canceller = threading.Thread(target=cancel, name="cancel", daemon=True)
        canceller.start()
        _wait_until(lambda: between_chunks.is_set() or not canceller.is_alive(), "the cancel pauses or ends")
        assert between_chunks.is_set(), "the cancel never committed part of its work before the rest"
        recorded: list[store.RecordOutcome] = []
        writer = threading.Thread(
            target=lambda: recorded.append(store.record_results(pg_engine, [_result(running_id)])),
            daemon=True,
        )
        writer.start()
        writer.join(WAIT_SECONDS)
        assert recorded, "the result waited for the cancel"
        assert recorded[0].inserted == [running_id]
    finally:
        release.set()
        canceller.join(WAIT_SECONDS)
        event.remove(pg_engine, "before_cursor_execute", before)  # not while the cancel runs
    assert not canceller.is_alive()
    assert cancel_error == []

    batch = _batch(pg_engine, batch_id)
    assert batch.status == store.BatchStatus.CANCELLED
    counts = _assert_counts_add_up(pg_engine, batch_id)
    assert counts[store.RequestStatus.SUCCEEDED] == 1
    assert counts[store.RequestStatus.CANCELLED] == LINES - 1
    assert (batch.billed_prompt_tokens, batch.billed_completion_tokens) == (100, 20)


def test_counts_add_up_after_a_chunked_cancel_with_results_between_its_chunks(
    engine: Engine, ingest: IngestFn
) -> None:
    """Between the cancel's chunks one running request records its result, another is handed
    back (it ends cancelled: its batch is cancelling); the third still runs when the cancel ends,
    and its result then ends the batch."""
    batch_id, running = _running_batch(engine, ingest, 3)
    between: dict[int, Callable[[], object]] = {
        1: lambda: store.record_results(engine, [_result(running[0])]),
        2: lambda: store.release_requests(engine, [running[1]], "worker"),
    }

    def after_chunk(chunk: int) -> None:
        if chunk in between:
            between[chunk]()

    cancelled = store.cancel_batch(engine, batch_id, after_chunk=after_chunk)
    assert cancelled.status == store.BatchStatus.CANCELLING  # running[2] runs on
    assert _statuses(engine, batch_id)[running[1]] == store.RequestStatus.CANCELLED
    _assert_counts_add_up(engine, batch_id)

    outcome = store.record_results(engine, [_result(running[2])])
    assert outcome.finalized_batches == [batch_id]
    batch = _batch(engine, batch_id)
    assert batch.status == store.BatchStatus.CANCELLED
    counts = _assert_counts_add_up(engine, batch_id)
    assert counts == {
        store.RequestStatus.SUCCEEDED: 2,
        store.RequestStatus.FAILED: 0,
        store.RequestStatus.CANCELLED: LINES - 2,
    }
    assert (batch.billed_prompt_tokens, batch.billed_completion_tokens) == (200, 40)
    assert batch.output_file_id is not None  # ended as any cancelled batch: its files exist


def _die_after_first_chunk(chunk: int) -> None:
    if chunk == 1:
        raise Died


def test_a_cancel_that_died_after_its_first_chunk_is_finished_by_the_sweep(
    engine: Engine, ingest: IngestFn
) -> None:
    batch_id = ingest(LINES).batch_id
    with pytest.raises(Died):
        store.cancel_batch(engine, batch_id, error="caller_gone", after_chunk=_die_after_first_chunk)
    statuses = list(_statuses(engine, batch_id).values())
    assert statuses.count(store.RequestStatus.CANCELLED) == CHUNK_LINES
    assert _batch(engine, batch_id).status == store.BatchStatus.CANCELLING
    _assert_counts_add_up(engine, batch_id)

    # A pass is bounded: one chunk, then the next pass goes on.
    assert store.finish_stopped_batches(engine, max_chunks=1) == []
    assert list(_statuses(engine, batch_id).values()).count(store.RequestStatus.CANCELLED) == 2 * CHUNK_LINES
    assert store.finish_stopped_batches(engine) == [batch_id]

    assert set(_statuses(engine, batch_id).values()) == {store.RequestStatus.CANCELLED}
    batch = _batch(engine, batch_id)
    assert (batch.status, batch.cancelled_count) == (store.BatchStatus.CANCELLED, LINES)
    assert store.finish_stopped_batches(engine) == []  # nothing left: found no more


def test_a_cancel_sent_again_ends_what_the_first_left(engine: Engine, ingest: IngestFn) -> None:
    batch_id = ingest(LINES).batch_id
    with pytest.raises(Died):
        store.cancel_batch(engine, batch_id, after_chunk=_die_after_first_chunk)
    again = store.cancel_batch(engine, batch_id)
    assert (again.status, again.cancelled_count) == (store.BatchStatus.CANCELLED, LINES)


def test_an_expiry_that_died_after_its_first_chunk_is_finished_by_the_sweep(
    engine: Engine, ingest: IngestFn
) -> None:
    batch_id, [running_id] = _running_batch(engine, ingest, 1)
    past_window = _batch(engine, batch_id).expires_at + 1
    with pytest.raises(Died):
        store.expire_batches(engine, past_window, after_chunk=_die_after_first_chunk)
    assert _batch(engine, batch_id).status == store.BatchStatus.EXPIRED
    assert store.expire_batches(engine, past_window) == []  # expired already: the sweep's to finish

    # The running request's lease lapsed by now: it ends too, as an expiry ends it.
    assert store.finish_stopped_batches(engine, now=past_window + LIVE_LEASE_SECONDS) == [batch_id]
    batch = _batch(engine, batch_id)
    assert (batch.status, batch.cancelled_count) == (store.BatchStatus.EXPIRED, LINES)
    with engine.connect() as conn:
        errors = set(
            conn.execute(
                sa.select(store.Request.last_error).where(store.Request.batch_id == batch_id)
            ).scalars()
        )
    assert errors == {EXPIRED_ERROR}
    assert running_id in _statuses(engine, batch_id)


def test_a_stopped_batch_whose_requests_all_run_is_not_touched_by_the_sweep(
    engine: Engine, ingest: IngestFn
) -> None:
    batch_id, running = _running_batch(engine, ingest, LINES)
    assert store.cancel_batch(engine, batch_id).status == store.BatchStatus.CANCELLING
    assert store.finish_stopped_batches(engine) == []
    assert set(_statuses(engine, batch_id).values()) == {store.RequestStatus.RUNNING}
    store.record_results(engine, [_result(request_id) for request_id in running])
    assert _batch(engine, batch_id).status == store.BatchStatus.CANCELLED


def _ingest_on(engine: Engine, tenant_id: str) -> IngestFn:
    from tests.store.conftest import chat_line, jsonl

    def run(lines: Any, **kwargs: Any) -> store.IngestReport:
        return store.ingest_batch(
            engine, jsonl([chat_line(f"c{i}") for i in range(lines)]), tenant_id=tenant_id
        )

    return run


def _wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_an_expiry_pass_is_bounded_and_the_sweep_ends_the_rest(engine: Engine, ingest: IngestFn) -> None:
    """An expiry pass moves every due batch (its first chunk), then ends at most
    ``EXPIRY_CHUNKS_PER_SWEEP`` chunks in all: it ran every due batch to its end, 200 chunks for
    a batch of a million lines, as many times that as such batches were due together, the rest
    of the sweep waiting. ``finish_stopped_batches`` ends what it left, as an expiry would."""
    batch_ids = sorted(ingest(LINES).batch_id for _ in range(2))
    past_window = max(_batch(engine, batch_id).expires_at for batch_id in batch_ids) + 1
    chunks: list[int] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(store.batches, "EXPIRY_CHUNKS_PER_SWEEP", 2, raising=False)
        assert store.expire_batches(engine, past_window, after_chunk=chunks.append) == batch_ids
    # The first batch two chunks (the budget), the second its first: both expired.
    assert chunks == [1, 2, 1]
    for batch_id in batch_ids:
        assert _batch(engine, batch_id).status == store.BatchStatus.EXPIRED
        assert store.RequestStatus.QUEUED in _statuses(engine, batch_id).values()
        _assert_counts_add_up(engine, batch_id)

    assert store.finish_stopped_batches(engine, now=past_window) == batch_ids
    for batch_id in batch_ids:
        assert set(_statuses(engine, batch_id).values()) == {store.RequestStatus.CANCELLED}
        assert _batch(engine, batch_id).cancelled_count == LINES


def _cancelled_count(engine: Engine, batch_id: str) -> int:
    return list(_statuses(engine, batch_id).values()).count(store.RequestStatus.CANCELLED)


def test_the_sweep_shares_its_chunks_among_tenants(engine: Engine, ingest: IngestFn) -> None:
    """A cancel ends one chunk in its request and leaves the rest to the sweep, whose pass ends a
    bounded number of chunks: taken in batch order, a tenant that cancelled many large batches
    first had every chunk of the passes to come, and another tenant's cancel, sent later, stayed
    ``cancelling`` until all of them were ended. Each tenant gets a chunk of a pass in turn."""
    hoarder_batches = [ingest(LINES).batch_id for _ in range(3)]
    other = store.create_tenant(engine, "other")
    rows = "".join(json.dumps(chat_line(f"c{i}")) + "\n" for i in range(LINES)).encode()
    other_batch = store.ingest_batch(engine, io.BytesIO(rows), tenant_id=other.id).batch_id
    for batch_id in [*hoarder_batches, other_batch]:
        store.cancel_batch(engine, batch_id, max_chunks=1)
        assert _cancelled_count(engine, batch_id) == CHUNK_LINES

    assert store.finish_stopped_batches(engine, max_chunks=2) == []
    # One chunk each: the hoarder's oldest batch, and the other tenant's.
    assert _cancelled_count(engine, hoarder_batches[0]) == 2 * CHUNK_LINES
    assert _cancelled_count(engine, other_batch) == 2 * CHUNK_LINES

    # Two turns each: both batches ended, the hoarder's others not touched.
    assert store.finish_stopped_batches(engine, max_chunks=4) == sorted([hoarder_batches[0], other_batch])
    batch = _batch(engine, other_batch)
    assert (batch.status, batch.cancelled_count) == (store.BatchStatus.CANCELLED, LINES)
    assert [_cancelled_count(engine, batch_id) for batch_id in hoarder_batches[1:]] == [CHUNK_LINES] * 2

    assert store.finish_stopped_batches(engine) == sorted(hoarder_batches[1:])
