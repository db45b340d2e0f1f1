"""A batch's row and its requests' rows are locked in one order, requests first, by every
transaction that takes both: a late result (its request's lease lapsed) and a cancel or an expiry
of its batch, forced into each interleaving, both end (neither is killed as a deadlock), and the
ledger is what one of them running alone first would have left: the request cancelled (its paid
answer kept as discarded) or ended by its one result, the batch's counts adding up, the answer
billed once. Two releases of a stopped batch's requests likewise, and a stop of a batch whose
validation commits its requests meanwhile, and a heartbeat and a flush of the same results.
PostgreSQL only: SQLite writers take turns (``BEGIN IMMEDIATE``)."""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine

import store
from models.types import RequestUsage
from store.interactive import submit_interactive
from store.tables import DiscardedAnswer
from workers.result_writer import record_single_call

CLAIMED_AT = 1_000
LEASE_SECONDS = 20  # lapsed from 1_020 on: whatever the clock below, the result is late
USAGE = RequestUsage(prompt_tokens=1000, completion_tokens=200)
WAIT_SECONDS = 30  # a safety net: a waiting step fails the test rather than hang it


def _jsonl(lines: int) -> io.BytesIO:
    """A batch file of ``lines`` chat completion lines."""
    line = {
        "url": "/v1/chat/completions",
        "method": "POST",
        "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
    }
    return io.BytesIO(
        "".join(json.dumps({"custom_id": f"c{i}", **line}) + "\n" for i in range(lines)).encode()
    )


def _late_result(request_id: str) -> store.ResultRecord:
    return store.ResultRecord(
        request_id,
        store.RequestStatus.SUCCEEDED,
        response_body={"object": "chat.completion"},
        upstream_request_id="chatcmpl-late",
        model="gpt-4o-mini",
        usage=USAGE,
    )


class Step:
    """A store call run on a thread of its own; ``error`` is what it raised."""

    def __init__(self, name: str, call: Callable[[], object]) -> None:
        self.call = call
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.call()
        except BaseException as error:  # the test reports it
            self.error = error

    def done(self) -> bool:
        return not self.thread.is_alive()


@dataclass(frozen=True)
class Pause:
    """``reached``: the paused thread waits before its statement; ``release``: it goes on."""

    reached: threading.Event
    release: threading.Event


@contextmanager
def _paused(engine: Engine, thread_name: str, statement_start: str) -> Iterator[Pause]:
    """Hold the thread named ``thread_name`` before its first statement starting with
    ``statement_start`` (its transaction open, holding what it locked so far) until released."""
    pause = Pause(threading.Event(), threading.Event())

    def before(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        if threading.current_thread().name != thread_name or pause.reached.is_set():
            return
        if not " ".join(statement.split()).startswith(statement_start):
            return
        pause.reached.set()
        if not pause.release.wait(WAIT_SECONDS):
            raise TimeoutError(f"{thread_name} was never released")

    event.listen(engine, "before_cursor_execute", before)
    try:
        yield pause
    finally:
        pause.release.set()
        event.remove(engine, "before_cursor_execute", before)


def _waits_on_a_lock(engine: Engine) -> bool:
    """A session of the test's database waits for a lock (the other step, blocked: the paused one
    is idle in its transaction)."""
    query = sa.text(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    with engine.connect() as conn:
        return bool(conn.execute(query).scalar_one())


def _wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def _interleave(
    engine: Engine,
    first: tuple[str, Callable[[], object], str],
    second: tuple[str, Callable[[], object]],
) -> list[Step]:
    """Run ``first`` (name, call, statement it pauses before) up to that statement, then
    ``second`` until it finishes or waits for a lock, then let ``first`` go on; returns both
    steps, ended."""
    first_name, first_call, pause_before = first
    with _paused(engine, first_name, pause_before) as pause:
        paused = Step(first_name, first_call)
        _wait_until(lambda: pause.reached.is_set() or paused.done(), f"{first_name} reaches {pause_before!r}")
        assert pause.reached.is_set(), f"{first_name} ended before {pause_before!r}: {paused.error!r}"
        other = Step(*second)
        _wait_until(lambda: other.done() or _waits_on_a_lock(engine), f"{second[0]} ends or waits")
        pause.release.set()
        for step in (paused, other):
            step.thread.join(WAIT_SECONDS)
            assert step.done(), f"{step.thread.name} still runs"
    return [paused, other]


def _ledger(engine: Engine, batch_id: str) -> dict[str, Any]:
    with engine.connect() as conn:
        requests = conn.execute(
            sa.select(store.Request.id, store.Request.status).where(store.Request.batch_id == batch_id)
        ).all()
        results = set(
            conn.execute(
                sa.select(store.Result.request_id).where(store.Result.batch_id == batch_id)
            ).scalars()
        )
        discarded = list(
            conn.execute(
                sa.select(DiscardedAnswer.request_id).where(DiscardedAnswer.batch_id == batch_id)
            ).scalars()
        )
        batch = conn.execute(sa.select(store.Batch.__table__).where(store.Batch.id == batch_id)).one()
    return {"requests": dict(requests), "results": results, "discarded": discarded, "batch": batch}


def _assert_one_outcome(engine: Engine, batch_id: str, late_id: str, steps: list[Step]) -> None:
    """Both steps ended without error, and the late request is cancelled (its answer discarded)
    or succeeded (its one result), with counts and billing to match."""
    assert [step.error for step in steps] == [None, None]
    ledger = _ledger(engine, batch_id)
    statuses = ledger["requests"]
    batch = ledger["batch"]
    if statuses[late_id] == store.RequestStatus.SUCCEEDED:
        assert (ledger["results"], ledger["discarded"]) == ({late_id}, [])
    else:
        assert statuses[late_id] == store.RequestStatus.CANCELLED
        assert (ledger["results"], ledger["discarded"]) == (set(), [late_id])
    assert all(status == store.RequestStatus.CANCELLED for rid, status in statuses.items() if rid != late_id)
    counted = {
        store.RequestStatus.SUCCEEDED: batch.completed_count,
        store.RequestStatus.CANCELLED: batch.cancelled_count,
        store.RequestStatus.FAILED: batch.failed_count,
    }
    for status, count in counted.items():
        assert count == sum(1 for s in statuses.values() if s == status), (status, batch)
    assert batch.billed_prompt_tokens == USAGE.prompt_tokens  # the answer billed once
    assert batch.billed_completion_tokens == USAGE.completion_tokens


@dataclass(frozen=True)
class LateBatch:
    batch_id: str
    late_id: str  # claimed, its lease lapsed; the other requests are queued
    expires_at: int


def _late_batch(engine: Engine) -> LateBatch:
    tenant = store.create_tenant(engine, "acme")
    source = _jsonl(2)
    report = store.ingest_batch(
        engine,
        source,
        tenant_id=tenant.id,
        now=CLAIMED_AT,
    )
    first = store.pending_request_ids(engine, report.batch_id)[0]
    assert store.claim_requests(engine, [first], "lapsed-worker", LEASE_SECONDS, CLAIMED_AT)
    batch = store.get_batch(engine, report.batch_id)
    assert batch is not None
    assert batch.status == store.BatchStatus.IN_PROGRESS
    return LateBatch(report.batch_id, first, batch.expires_at)


RESULT = "result"
STOP = "stop"
# (who runs first and the statement it pauses before, holding what it locked before it)
ORDERS = {
    # the result has ended its request and is about to count it on the batch
    "result-ended-its-request-then-stop": (RESULT, "UPDATE batches"),
    # the result has read its request (not cancelled) and is about to write its row
    "result-read-its-request-then-stop": (RESULT, "INSERT INTO results"),
    # the stop has moved the batch and is about to end its requests
    "stop-moved-the-batch-then-result": (STOP, "UPDATE requests"),
}


@pytest.mark.parametrize("stop", ["cancel", "expire"])
@pytest.mark.parametrize("order", list(ORDERS))
def test_a_late_result_and_a_stop_of_its_batch_both_end_in_either_order(
    pg_engine: Engine, order: str, stop: str
) -> None:
    late = _late_batch(pg_engine)
    stopped_at = late.expires_at + 1  # past the lease and the batch's window both

    def record() -> None:
        store.record_results(pg_engine, [_late_result(late.late_id)], now=stopped_at)

    def stop_batch() -> None:
        if stop == "cancel":
            store.cancel_batch(pg_engine, late.batch_id, stopped_at)
        else:
            assert store.expire_batches(pg_engine, stopped_at) == [late.batch_id]

    calls = {RESULT: record, STOP: stop_batch}
    first, pause_before = ORDERS[order]
    second = STOP if first == RESULT else RESULT
    steps = _interleave(pg_engine, (first, calls[first], pause_before), (second, calls[second]))

    _assert_one_outcome(pg_engine, late.batch_id, late.late_id, steps)
    expected = store.BatchStatus.CANCELLED if stop == "cancel" else store.BatchStatus.EXPIRED
    assert _ledger(pg_engine, late.batch_id)["batch"].status == expected


def test_a_late_single_call_result_and_a_cancel_of_its_call_both_end(pg_engine: Engine) -> None:
    """The single call's one statement locks its request, then its batch: the cancel (a caller
    who went away) has moved the batch and is about to end the request."""
    tenant = store.create_tenant(pg_engine, "acme")
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    call = submit_interactive(pg_engine, tenant.id, body, endpoint="/v1/chat/completions", now=CLAIMED_AT)
    assert store.claim_requests(pg_engine, [call.request_id], "lane", LEASE_SECONDS, CLAIMED_AT)
    cancelled_at = CLAIMED_AT + 100

    steps = _interleave(
        pg_engine,
        (STOP, lambda: store.cancel_batch(pg_engine, call.batch_id, cancelled_at), "UPDATE requests"),
        (RESULT, lambda: record_single_call(pg_engine, _late_result(call.request_id))),
    )

    _assert_one_outcome(pg_engine, call.batch_id, call.request_id, steps)
    assert _ledger(pg_engine, call.batch_id)["batch"].status == store.BatchStatus.CANCELLED


def test_two_workers_handing_back_requests_of_a_cancelled_batch_both_end(pg_engine: Engine) -> None:
    """Two workers whose leases lapsed after the cancel hand their requests back at once: each
    release ends its own request (its batch is cancelling) and must not wait for the other's,
    which that other holds and, the other way round, waits on."""
    late = _late_batch(pg_engine)
    other_id = next(rid for rid in _ledger(pg_engine, late.batch_id)["requests"] if rid != late.late_id)
    assert store.claim_requests(pg_engine, [other_id], "second-worker", LEASE_SECONDS, CLAIMED_AT)
    # Both leases live at the cancel: the batch waits for them in cancelling.
    cancelled = store.cancel_batch(pg_engine, late.batch_id, CLAIMED_AT + 1)
    assert cancelled.status == store.BatchStatus.CANCELLING

    steps = _interleave(
        pg_engine,
        (
            "first",
            lambda: store.release_requests(pg_engine, [late.late_id], "lapsed-worker"),
            "SELECT batches",
        ),
        ("second", lambda: store.release_requests(pg_engine, [other_id], "second-worker")),
    )

    assert [step.error for step in steps] == [None, None]
    ledger = _ledger(pg_engine, late.batch_id)
    assert set(ledger["requests"].values()) == {store.RequestStatus.CANCELLED}
    assert ledger["batch"].cancelled_count == 2
    assert ledger["batch"].status == store.BatchStatus.CANCELLED


# The stop has locked the requests it ends and is about to move the batch, when the validation of
# the batch's file commits its requests.
STOPS_BEFORE_THE_BATCH = {"cancel": "UPDATE batches", "expire": "UPDATE batches"}


@pytest.mark.parametrize("stop", list(STOPS_BEFORE_THE_BATCH))
def test_a_stop_of_a_validating_batch_ends_the_requests_its_validation_just_committed(
    pg_engine: Engine, stop: str
) -> None:
    """A cancel or an expiry of a batch still validating, as its file's validation commits: the
    requests committed between the stop's lock of the requests it ends and its move of the batch
    end with the batch (cancelled), as they did when the stop ended them after the move. They
    were left queued in a stopped batch: the batch never ended (cancelling), and the workers ran,
    and billed, the requests of a batch its owner had cancelled."""
    tenant = store.create_tenant(pg_engine, "acme")
    spec = store.prepare_batch(tenant_id=tenant.id, now=CLAIMED_AT)
    opened = store.open_batch(pg_engine, spec)
    source = _jsonl(2)
    batch = store.get_batch(pg_engine, opened.batch_id)
    assert batch is not None
    stopped_at = batch.expires_at + 1

    def stop_batch() -> None:
        if stop == "cancel":
            store.cancel_batch(pg_engine, opened.batch_id, stopped_at)
        else:
            assert store.expire_batches(pg_engine, stopped_at) == [opened.batch_id]

    def validate() -> None:
        assert store.fill_batch(pg_engine, opened, source).status == store.BatchStatus.IN_PROGRESS

    steps = _interleave(pg_engine, (STOP, stop_batch, STOPS_BEFORE_THE_BATCH[stop]), ("validate", validate))

    assert [step.error for step in steps] == [None, None]
    ledger = _ledger(pg_engine, opened.batch_id)
    assert list(ledger["requests"].values()) == [store.RequestStatus.CANCELLED] * 2
    expected = store.BatchStatus.CANCELLED if stop == "cancel" else store.BatchStatus.EXPIRED
    assert ledger["batch"].status == expected
    assert ledger["batch"].cancelled_count == 2


def test_a_heartbeat_and_a_flush_of_the_same_requests_both_end(pg_engine: Engine) -> None:
    """A chunk's lease keeper extends the leases of the results its writer is recording
    (``ChunkRunner.leased``: the unwritten ones too). The flush locks its requests in id order;
    the heartbeat locked them in its plan's order (the running requests' index: by lease expiry),
    so two requests whose leases ran the other way round deadlocked the two when both waited on a
    third holder: PostgreSQL killed one after a second."""
    tenant = store.create_tenant(pg_engine, "acme")
    source = _jsonl(2)
    report = store.ingest_batch(
        pg_engine,
        source,
        tenant_id=tenant.id,
        now=CLAIMED_AT,
    )
    first, second = sorted(store.pending_request_ids(pg_engine, report.batch_id))
    assert store.claim_requests(pg_engine, [first, second], "worker", LEASE_SECONDS, CLAIMED_AT)
    # The lower id's lease now ends last: the running requests' index holds it second.
    assert store.extend_leases(pg_engine, [first], "worker", LEASE_SECONDS, CLAIMED_AT + 5) == [first]

    with pg_engine.connect() as holder, holder.begin():
        # A third transaction holds the lower id: both steps queue behind it, each holding what it
        # locked before.
        holder.execute(
            sa.select(store.Request.id).where(store.Request.id == first).with_for_update(key_share=True)
        )
        flush = Step(
            "flush",
            lambda: store.record_results(
                pg_engine, [_late_result(first), _late_result(second)], now=CLAIMED_AT
            ),
        )
        _wait_until(lambda: _waiting_sessions(pg_engine) == 1, "the flush waits for the lower id")
        beat = Step(
            "heartbeat",
            lambda: store.extend_leases(pg_engine, [first, second], "worker", LEASE_SECONDS, CLAIMED_AT + 6),
        )
        _wait_until(lambda: _waiting_sessions(pg_engine) == 2 or beat.done(), "the heartbeat ends or waits")
    for step in (flush, beat):
        step.thread.join(WAIT_SECONDS)
        assert step.done(), f"{step.thread.name} still runs"
    assert [flush.error, beat.error] == [None, None]
    statuses = set(_ledger(pg_engine, report.batch_id)["requests"].values())
    assert statuses == {store.RequestStatus.SUCCEEDED}


@pytest.mark.parametrize("hand_back", ["release", "cancel_claimed"])
def test_a_heartbeat_and_a_hand_back_of_the_same_requests_both_end(pg_engine: Engine, hand_back: str) -> None:
    """A worker releases (winding down) or cancels (its batch stopped) requests its lease keeper
    is extending: both lock them in id order, so neither is killed as a deadlock."""
    tenant = store.create_tenant(pg_engine, "acme")
    source = _jsonl(2)
    report = store.ingest_batch(
        pg_engine,
        source,
        tenant_id=tenant.id,
        now=CLAIMED_AT,
    )
    first, second = sorted(store.pending_request_ids(pg_engine, report.batch_id))
    assert store.claim_requests(pg_engine, [first, second], "worker", LEASE_SECONDS, CLAIMED_AT)
    assert store.extend_leases(pg_engine, [first], "worker", LEASE_SECONDS, CLAIMED_AT + 5) == [first]

    def hand_them_back() -> None:
        if hand_back == "release":
            assert store.release_requests(pg_engine, [first, second], "worker") == 2
        else:
            assert store.cancel_claimed(pg_engine, [first, second], "worker", CLAIMED_AT + 6) == 2

    with pg_engine.connect() as holder, holder.begin():
        holder.execute(
            sa.select(store.Request.id).where(store.Request.id == first).with_for_update(key_share=True)
        )
        beat = Step(
            "heartbeat",
            lambda: store.extend_leases(pg_engine, [first, second], "worker", LEASE_SECONDS, CLAIMED_AT + 6),
        )
        _wait_until(lambda: _waiting_sessions(pg_engine) == 1, "the heartbeat waits for the lower id")
        handing = Step(hand_back, hand_them_back)
        _wait_until(lambda: _waiting_sessions(pg_engine) == 2 or handing.done(), f"{hand_back} ends or waits")
    for step in (beat, handing):
        step.thread.join(WAIT_SECONDS)
        assert step.done(), f"{step.thread.name} still runs"
    assert [beat.error, handing.error] == [None, None]


def _waiting_sessions(engine: Engine) -> int:
    query = sa.text(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    with engine.connect() as conn:
        return int(conn.execute(query).scalar_one())


def _a_batch_whose_rows_lie_out_of_id_order(engine: Engine, tenant_id: str) -> tuple[str, list[str], str]:
    """A batch, its request ids in the table's physical order, and one of them, claimed, with
    requests before it whose ids are all above one after it (a batch whose rows did not move so
    is replaced)."""

    def physical_order(batch_id: str) -> list[str]:
        with engine.connect() as conn:
            query = sa.text("SELECT id FROM requests WHERE batch_id = :batch_id ORDER BY ctid")
            return list(conn.execute(query, {"batch_id": batch_id}).scalars())

    for _ in range(50):
        batch_id = store.ingest_batch(engine, _jsonl(8), tenant_id=tenant_id).batch_id
        # Each write puts a new version of its row after the others: the claimed one, then the
        # lowest id (claimed and handed back, queued again) after it.
        lowest = min(physical_order(batch_id))
        claimed = max(physical_order(batch_id))
        assert store.claim_requests(engine, [claimed], "worker", 3_600)
        assert store.claim_requests(engine, [lowest], "worker", 3_600)
        assert store.release_requests(engine, [lowest], "worker") == 1
        physical = physical_order(batch_id)
        position = physical.index(claimed)
        if 0 < position < len(physical) - 1 and min(physical[position + 1 :]) < min(physical[:position]):
            return batch_id, physical, claimed
    raise AssertionError("no batch had its rows out of id order around a claimed one")


def test_a_dispatch_and_a_cancel_of_the_same_requests_both_end(pg_engine: Engine) -> None:
    """A dispatch names its chunk's message on the chunk's rows (``mark_dispatched``) while a
    cancel of their batch locks them in id order. The dispatch's UPDATE locked them in its plan's
    order: a Bitmap Heap Scan of the primary key (the plan PostgreSQL picks for a chunk of 512 ids
    among 200,000 rows), so the table's physical order, which random ids do not follow. Both
    queued behind a third holder of one row, each holding what it locked before it, and
    PostgreSQL killed one of them as a deadlock after a second."""
    tenant = store.create_tenant(pg_engine, "acme")
    batch_id, physical, claimed = _a_batch_whose_rows_lie_out_of_id_order(pg_engine, tenant.id)

    def in_physical_order(_conn: object, cursor: Any, statement: str, *_: object) -> None:
        # The plan of a chunk among many rows, which a table this small would not get.
        if threading.current_thread().name == "dispatch" and statement.startswith("UPDATE requests"):
            cursor.execute("SET LOCAL enable_indexscan = off")

    event.listen(pg_engine, "before_cursor_execute", in_physical_order)
    try:
        with pg_engine.connect() as holder, holder.begin():
            # A third transaction (the claimer's heartbeat) holds the claimed request: the dispatch
            # waits for it holding the rows before it.
            holder.execute(
                sa.select(store.Request.id).where(store.Request.id == claimed).with_for_update(key_share=True)
            )
            dispatch = Step("dispatch", lambda: store.mark_dispatched(pg_engine, physical, "dsp_1"))
            _wait_until(
                lambda: _waiting_sessions(pg_engine) == 1, "the dispatch waits for the claimed request"
            )
            cancel = Step("cancel", lambda: store.cancel_batch(pg_engine, batch_id))
            _wait_until(
                lambda: _waiting_sessions(pg_engine) == 2 or cancel.done(), "the cancel ends or waits"
            )
        for step in (dispatch, cancel):
            step.thread.join(WAIT_SECONDS)
            assert step.done(), f"{step.thread.name} still runs"
    finally:
        event.remove(pg_engine, "before_cursor_execute", in_physical_order)
    assert [dispatch.error, cancel.error] == [None, None]
    statuses = _ledger(pg_engine, batch_id)["requests"]
    assert statuses.pop(claimed) == store.RequestStatus.RUNNING
    assert set(statuses.values()) == {store.RequestStatus.CANCELLED}


@pytest.mark.parametrize("stop", list(STOPS_BEFORE_THE_BATCH))
def test_the_requests_a_validation_commits_under_a_stop_end_a_chunk_at_a_time(
    pg_engine: Engine, stop: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stop of a batch whose validation commits its requests between the stop's first lock
    (nothing to lock yet: its chunk had no end) and its move of the batch: the requests it then
    takes are a chunk's, not every line the validation wrote (a million lines in one transaction,
    the very wait the chunks are there to avoid); the others end in the next chunks."""
    chunk_lines = 2
    monkeypatch.setattr(store.batches, "STOP_CHUNK_LINES", chunk_lines)
    tenant = store.create_tenant(pg_engine, "acme")
    opened = store.open_batch(pg_engine, store.prepare_batch(tenant_id=tenant.id, now=CLAIMED_AT))
    source = _jsonl(5)
    batch = store.get_batch(pg_engine, opened.batch_id)
    assert batch is not None
    stopped_at = batch.expires_at + 1
    cancelled_after_each_chunk: list[int] = []

    def count_cancelled(_chunk: int) -> None:
        ended = store.get_batch(pg_engine, opened.batch_id)
        assert ended is not None
        cancelled_after_each_chunk.append(ended.cancelled_count)

    def stop_batch() -> None:
        if stop == "cancel":
            store.cancel_batch(pg_engine, opened.batch_id, stopped_at, after_chunk=count_cancelled)
        else:
            assert store.expire_batches(pg_engine, stopped_at, after_chunk=count_cancelled) == [
                opened.batch_id
            ]

    def validate() -> None:
        assert store.fill_batch(pg_engine, opened, source).status == store.BatchStatus.IN_PROGRESS

    steps = _interleave(pg_engine, (STOP, stop_batch, STOPS_BEFORE_THE_BATCH[stop]), ("validate", validate))

    assert [step.error for step in steps] == [None, None]
    assert cancelled_after_each_chunk == [2, 4, 5]
    ledger = _ledger(pg_engine, opened.batch_id)
    assert list(ledger["requests"].values()) == [store.RequestStatus.CANCELLED] * 5
    assert ledger["batch"].cancelled_count == 5
