"""Batches: reading, paging, progress, cancelling and expiring.

Their statuses change only through ``store.batch_lifecycle``; a batch is finalized there, in the
same transaction that ends its last request. Its output and error files are then rows in ``files``
whose content ``store.export`` generates from the results.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session

from store.batch_lifecycle import (
    ALLOWED_TRANSITIONS,
    attach_result_files,
    finalize_batches,
    may_move_to,
    move_batches,
)
from store.clock import now_seconds
from store.engine import autocommit_connection, is_postgresql, write_transaction
from store.errors import BatchNotFound
from store.tables import Batch, BatchStatus, Request, RequestStatus, status_is, unfinished_values

__all__ = [
    "EXPIRED_ERROR",
    "BatchPage",
    "BatchProgress",
    "batch_progress",
    "batch_statuses",
    "cancel_batch",
    "cancel_claimed",
    "expire_batches",
    "finish_stopped_batches",
    "get_batch",
    "list_batches",
]


@dataclass(frozen=True, slots=True)
class BatchProgress:
    """Request counts by status, from one query over the batch's requests."""

    batch_id: str
    status: BatchStatus
    total: int
    queued: int
    running: int
    succeeded: int
    failed: int
    cancelled: int

    @property
    def finished(self) -> int:
        return self.succeeded + self.failed + self.cancelled


@dataclass(frozen=True, slots=True)
class BatchPage:
    data: list[Batch]
    has_more: bool

    @property
    def first_id(self) -> str | None:
        return self.data[0].id if self.data else None

    @property
    def last_id(self) -> str | None:
        return self.data[-1].id if self.data else None


def get_batch(engine: Engine, batch_id: str, tenant_id: str | None = None) -> Batch | None:
    """The batch, or None when absent or owned by another tenant."""
    with Session(engine, expire_on_commit=False) as session:
        batch = session.get(Batch, batch_id)
    if batch is None or (tenant_id is not None and batch.tenant_id != tenant_id):
        return None
    return batch


def list_batches(
    engine: Engine, tenant_id: str, after: str | None = None, limit: int = 20, *, include_hidden: bool = False
) -> BatchPage:
    """Newest first, as OpenAI pages them; ``after`` is the last id of the previous page. Hidden
    batches (single synchronous requests) are left out unless asked for."""
    query = sa.select(Batch).where(Batch.tenant_id == tenant_id)
    if not include_hidden:
        query = query.where(Batch.hidden.is_(False))
    if after is not None:
        # Among the tenant's own batches: another tenant's id pages like an unknown one.
        cursor = (
            sa.select(Batch.created_at)
            .where(Batch.id == after, Batch.tenant_id == tenant_id)
            .scalar_subquery()
        )
        query = query.where(sa.tuple_(Batch.created_at, Batch.id) < sa.tuple_(cursor, after))
    query = query.order_by(Batch.created_at.desc(), Batch.id.desc()).limit(limit + 1)
    with Session(engine, expire_on_commit=False) as session:
        rows = list(session.scalars(query))
    return BatchPage(rows[:limit], len(rows) > limit)


def batch_progress(engine: Engine, batch_id: str) -> BatchProgress:
    """Counts by request status. Raises BatchNotFound.

    Those that ended come from the batch's counters (moved in the transactions that end
    requests), those still to run from the partial index on unfinished requests: the query
    costs what is left to run, not what the batch already did."""

    def count(status: RequestStatus) -> sa.ScalarSelect[int]:
        return (
            sa.select(sa.func.count())
            .where(Request.batch_id == batch_id, status_is(status))
            .scalar_subquery()
        )

    query = sa.select(
        Batch.status,
        Batch.total_count,
        Batch.completed_count,
        Batch.failed_count,
        Batch.cancelled_count,
        count(RequestStatus.QUEUED),
        count(RequestStatus.RUNNING),
    ).where(Batch.id == batch_id)
    with engine.connect() as conn:
        row = conn.execute(query).first()
    if row is None:
        raise BatchNotFound(f"no batch {batch_id!r}")
    status, total, succeeded, failed, cancelled, queued, running = row
    return BatchProgress(
        batch_id,
        BatchStatus(status),
        total,
        queued=int(queued),
        running=int(running),
        succeeded=int(succeeded),
        failed=int(failed),
        cancelled=int(cancelled),
    )


def cancel_batch(
    engine: Engine,
    batch_id: str,
    now: int | None = None,
    *,
    error: str | None = None,
    max_chunks: int | None = None,
    after_chunk: Callable[[int], None] | None = None,
) -> Batch:
    """Cancel: queued requests (and running ones whose lease has expired) become cancelled at once;
    the batch becomes ``cancelling``, and ``cancelled`` as soon as nothing is running (possibly
    right here). Cancelling an ended batch changes nothing; cancelling one that is cancelling
    already ends what its first cancel left (its process died between chunks). ``error``: why,
    kept as the cancelled requests' ``last_error``. Raises BatchNotFound.

    In chunks (``_end_in_chunks``): the first moves the batch, each transaction holds a chunk's
    requests and the batch row for as long as that chunk takes, not the whole batch's. A batch of
    at most a chunk is one transaction, as before. ``max_chunks``: at most that many, the batch
    ``cancelling`` after them with requests still queued, which the sweep ends
    (``finish_stopped_batches``). ``after_chunk(n)`` is called after the n-th chunk committed
    (tests: pause or stop a cancel there)."""
    now = now if now is not None else now_seconds()
    with engine.connect() as conn:
        status = conn.execute(sa.select(Batch.status).where(Batch.id == batch_id)).scalar_one_or_none()
    if status is None:
        raise BatchNotFound(f"no batch {batch_id!r}")
    movable = BatchStatus.CANCELLING in ALLOWED_TRANSITIONS[BatchStatus(status)]
    if movable or status == BatchStatus.CANCELLING:  # a cancel sent again ends what is left

        def move(conn: Connection) -> bool:
            return bool(move_batches(conn, BatchStatus.CANCELLING, now, Batch.id == batch_id))

        _end_in_chunks(
            engine,
            batch_id,
            now,
            error,
            move=move if movable else None,
            finalize=True,
            after_chunk=after_chunk,
            max_chunks=max_chunks,
        )
    batch = get_batch(engine, batch_id)
    assert batch is not None
    return batch


# A stop (cancel, expiry) ends its batch's requests this many lines per transaction: each holds
# their rows and then its batch's row for ~0.1 s on a loaded machine, where one transaction for
# the whole batch held them all for seconds (9 s at 200,000 lines), every result of the batch's
# running requests (and of other batches written with them) waiting for it. Read at each call.
STOP_CHUNK_LINES = 5_000


@dataclass(frozen=True, slots=True)
class _ChunkedStop:
    """How ``_end_in_chunks`` went: ``moved``, the batch (when it was to move it); ``chunks``
    committed; ``done``, no unfinished request was left after the last."""

    moved: bool
    chunks: int
    done: bool


def _end_in_chunks(
    engine: Engine,
    batch_id: str,
    now: int,
    error: str | None,
    *,
    move: Callable[[Connection], bool] | None = None,
    finalize: bool,
    after_chunk: Callable[[int], None] | None = None,
    max_chunks: int | None = None,
) -> _ChunkedStop:
    """End the batch's unfinished requests (``_unfinished``), ``STOP_CHUNK_LINES`` lines at a
    time in line order, one transaction per chunk: its requests locked in id order, then counted
    on the batch (and the batch finalized if ``finalize``: a cancel's). ``move``, run in the first
    chunk's transaction after its requests are locked, moves the batch; when it moves nothing
    (another stop came first) nothing is ended. At most ``max_chunks`` chunks.

    A chunk's bounds are line numbers (read first, unlocked: the next ``STOP_CHUNK_LINES``
    unfinished lines after the last chunk's), so that no id leaves PostgreSQL but a chunk's, and
    each chunk reads its own lines from the partial index of unfinished requests, not the lines
    ended before it. A request left behind (claimed meanwhile, and handed back after its chunk)
    ends by its release (``end_requeued_of_stopped_batches``), its worker's ``cancel_claimed``,
    its result, or the sweep (``finish_stopped_batches``), which also ends what a stop that died
    between chunks left."""
    chunk_lines = max(1, STOP_CHUNK_LINES)
    after = -1
    chunks = 0
    while True:
        with write_transaction(engine) as conn:
            bound = _chunk_bound(conn, batch_id, now, after, chunk_lines)
            lines = _lines_between(after, bound)
            locked = _lock_unfinished(conn, [batch_id], now, lines)
            if move is not None and chunks == 0:
                if not move(conn):
                    return _ChunkedStop(moved=False, chunks=0, done=False)
                if bound is None:
                    # A chunk without end: a validation may have committed every line of its
                    # file meanwhile. A chunk's of them, as any chunk; the next chunks the rest.
                    bound = _chunk_bound(conn, batch_id, now, after, chunk_lines)
                    lines = _lines_between(after, bound)
                # And the chunk's requests committed since that lock (a validation that ended).
                locked = _lock_unfinished(conn, [batch_id], now, lines, since_the_move=True)
            _cancel_unfinished(conn, [batch_id], now, error, among=locked, within=lines)
            if finalize:
                finalize_batches(conn, [batch_id], now)
        chunks += 1
        if after_chunk is not None:
            after_chunk(chunks)
        if bound is None or (max_chunks is not None and chunks >= max_chunks):
            return _ChunkedStop(moved=True, chunks=chunks, done=bound is None)
        after = bound


def _chunk_bound(conn: Connection, batch_id: str, now: int, after: int, size: int) -> int | None:
    """The line number of the ``size``-th unfinished request after line ``after``: the last line
    of the chunk; None when fewer are left (the chunk is all of them)."""
    return conn.execute(
        sa.select(Request.line_number)
        .where(_unfinished([batch_id], now), Request.line_number > after)
        .order_by(Request.line_number)
        .offset(size - 1)
        .limit(1)
    ).scalar_one_or_none()


def _lines_between(after: int, bound: int | None) -> sa.ColumnElement[bool]:
    """Requests whose line number is after ``after`` and at most ``bound`` (None: no end)."""
    if bound is None:
        return Request.line_number > after
    return sa.and_(Request.line_number > after, Request.line_number <= bound)


EXPIRED_ERROR = "batch_expired"


def _unfinished(batch_ids: Sequence[str], now: int) -> sa.ColumnElement[bool]:
    """Requests of ``batch_ids`` that a cancel or an expiry ends: queued, or running under a
    lease that lapsed (their worker is gone; a late result of theirs is kept as discarded)."""
    return sa.and_(Request.batch_id.in_(batch_ids), _unfinished_of_a_batch(now))


def _unfinished_of_a_batch(now: int) -> sa.ColumnElement[bool]:
    """``_unfinished`` but for the batch: queued, or running under a lapsed lease."""
    return sa.or_(
        status_is(RequestStatus.QUEUED),
        sa.and_(status_is(RequestStatus.RUNNING), Request.lease_expires_at < now),
    )


def _lock_unfinished(
    conn: Connection,
    batch_ids: Sequence[str],
    now: int,
    within: sa.ColumnElement[bool],
    *,
    since_the_move: bool = False,
) -> list[str] | None:
    """Lock (``lock_requests_in_id_order``) the requests of ``batch_ids`` that
    ``_cancel_unfinished`` would end, among those ``within`` selects (a chunk's lines), before
    their batches' rows are locked; returns their ids (None on SQLite).

    Requests before their batch, as every transaction that takes both: a result ends its request,
    then counts it on the batch (``store.results``). A stop that moved its batch first, then
    waited for a request a late result had just ended, deadlocked with that result waiting for
    the batch: PostgreSQL killed one of them after a second (tests/store/test_lock_order.py).

    ``since_the_move``: again once the batches are moved, waiting for none (SKIP LOCKED), for the
    requests committed since the first lock (a validation of the batch's file that ended
    meanwhile, a request put back in line); returns every one the stop now holds. One another
    transaction holds is ended by it (a result), or by the worker that claims it and finds its
    batch stopped."""
    return lock_requests_in_id_order(conn, _unfinished(batch_ids, now), within, skip_locked=since_the_move)


def lock_requests_in_id_order(
    conn: Connection, *where: sa.ColumnElement[bool], skip_locked: bool = False
) -> list[str] | None:
    """Lock (NO KEY UPDATE, as an UPDATE of them takes) the requests matching ``where`` in id
    order, before the UPDATE that changes them; returns their ids. An UPDATE alone locks them in
    its plan's order (the running requests' index: by lease expiry; a bitmap scan's: the table's),
    while a flush of their results locks them in id order (``store.results``), and two
    transactions locking the same rows in two orders deadlock (tests/store/test_lock_order.py).
    ``skip_locked``: those another transaction holds are left out, not waited for. Nothing (None)
    on SQLite, whose writers take turns."""
    if not is_postgresql(conn):
        return None
    query = sa.select(Request.id).where(*where).order_by(Request.id)
    return list(conn.execute(query.with_for_update(key_share=True, skip_locked=skip_locked)).scalars())


def _cancel_unfinished(
    conn: Connection,
    batch_ids: Sequence[str],
    now: int,
    error: str | None = None,
    *,
    among: list[str] | None = None,
    within: sa.ColumnElement[bool] | None = None,
) -> None:
    """End the requests of ``batch_ids`` that are unfinished (``_unfinished``) and that ``within``
    selects (a chunk's lines), only those of ``among`` if given: rows the transaction holds
    already (``_lock_unfinished``; a release's UPDATE), so that it waits for no other request (one
    another transaction holds is left to it, or to the worker that claims it and finds its batch
    stopped, as one queued after this commit is)."""
    chosen = [_unfinished(batch_ids, now)]
    if within is not None:
        chosen.append(within)
    if among is not None:
        chosen.append(
            Request.id == sa.any_(sa.bindparam("among", among, type_=postgresql.ARRAY(sa.String)))
            if is_postgresql(conn)
            else Request.id.in_(among)
        )
    cancelled = conn.execute(
        sa.update(Request)
        .where(*chosen)
        .values(
            status=RequestStatus.CANCELLED,
            finished_at=now,
            lease_owner=None,
            lease_expires_at=None,
            last_error=error if error is not None else Request.last_error,
        )
        .returning(Request.batch_id)
    ).scalars()
    _count_cancelled(conn, cancelled)


def end_requeued_of_stopped_batches(conn: Connection, requeued: Sequence[tuple[str, str]], now: int) -> None:
    """Requests just put back in line (a hand-back, a release: their (id, batch id)) whose batch
    was cancelled or expired meanwhile end now, as that cancel or expiry ended its other queued
    requests: otherwise they would wait out their ``not_before`` (an hour's Retry-After, say) and
    the batch would sit in ``cancelling`` that long. Runs inside the caller's transaction.

    Only those requests, which the caller's UPDATE holds: ending the batch's other unfinished ones
    too waited, holding these, for those another release held, and that release waited for these
    (two workers handing back at once: a deadlock, tests/store/test_lock_order.py). Each of those
    others ends by its own release, its worker's ``cancel_claimed`` or its late result."""
    ids = sorted({batch_id for _, batch_id in requeued})
    if not ids:
        return
    stopped = conn.execute(
        sa.select(Batch.id, Batch.status).where(
            Batch.id.in_(ids), Batch.status.in_((BatchStatus.CANCELLING, BatchStatus.EXPIRED))
        )
    ).all()
    cancelling = [row.id for row in stopped if row.status == BatchStatus.CANCELLING]
    expired = [row.id for row in stopped if row.status == BatchStatus.EXPIRED]
    held = sorted(request_id for request_id, _ in requeued)
    if cancelling:
        _cancel_unfinished(conn, cancelling, now, among=held)
        finalize_batches(conn, cancelling, now)
    if expired:
        _cancel_unfinished(conn, expired, now, EXPIRED_ERROR, among=held)


def _count_cancelled(conn: Connection, batch_ids: Iterable[str]) -> list[str]:
    """Add each request just cancelled (one batch id per request) to its batch's count; returns
    the batches touched."""
    per_batch = Counter(batch_ids)
    for batch_id, count in sorted(per_batch.items()):
        conn.execute(
            sa.update(Batch).where(Batch.id == batch_id).values(cancelled_count=Batch.cancelled_count + count)
        )
    return list(per_batch)


# An expiry pass ends each due batch's first chunk (the one that moves it), then at most this many
# chunks in all; the sweep's ``finish_stopped_batches`` ends the rest at its next passes. Unbounded,
# a pass ran every due batch to its end: 200 chunks (~30 s) for one batch of a million lines, and
# as many times that as such batches were due together, the rest of the sweep waiting.
EXPIRY_CHUNKS_PER_SWEEP = 20


def expire_batches(
    engine: Engine,
    now: int | None = None,
    *,
    max_chunks: int | None = None,
    after_chunk: Callable[[int], None] | None = None,
) -> list[str]:
    """Batches past ``expires_at`` that are still running become ``expired``: their queued requests
    are cancelled with ``last_error`` ``batch_expired`` (they appear in the error file, as OpenAI
    lists them); requests already running may still record results. Returns the expired ids.

    Each batch in chunks (``_end_in_chunks``), the first of which moves it (and writes its file
    rows) once its requests are locked: the batches as they were found due, one found due only
    after this read expires at the next pass. ``max_chunks`` (default ``EXPIRY_CHUNKS_PER_SWEEP``,
    read at each call): chunks in all beyond each batch's first, which is always run (a due batch
    expires at this pass). ``after_chunk``: as ``cancel_batch``'s."""
    now = now if now is not None else now_seconds()
    due = (Batch.expires_at <= now, may_move_to(BatchStatus.EXPIRED))
    with engine.connect() as conn:
        due_ids = list(conn.execute(sa.select(Batch.id).where(*due).order_by(Batch.id)).scalars())
    expired: list[str] = []
    chunks_left = max_chunks if max_chunks is not None else EXPIRY_CHUNKS_PER_SWEEP
    for batch_id in due_ids:

        def move(conn: Connection, batch_id: str = batch_id) -> bool:
            moved = move_batches(conn, BatchStatus.EXPIRED, now, Batch.id == batch_id, *due)
            attach_result_files(conn, moved, now)
            return bool(moved)

        stop = _end_in_chunks(
            engine,
            batch_id,
            now,
            EXPIRED_ERROR,
            move=move,
            finalize=False,
            after_chunk=after_chunk,
            max_chunks=max(1, chunks_left),
        )
        chunks_left -= stop.chunks
        if stop.moved:
            expired.append(batch_id)
    return expired


# A sweep ends at most this many chunks of stopped batches' leftovers (``finish_stopped_batches``):
# a pass is not held for minutes by a million-line batch; the next passes go on with it.
FINISH_CHUNKS_PER_SWEEP = 20


def finish_stopped_batches(
    engine: Engine, now: int | None = None, *, max_chunks: int = FINISH_CHUNKS_PER_SWEEP
) -> list[str]:
    """End what a stop left: requests still queued (or running under a lapsed lease) in a batch
    that is ``cancelling`` or ``expired``, as that cancel or expiry would have (a cancel ends only
    its first chunk; a process may die between chunks, ``_end_in_chunks``); a cancelling batch
    ends ``cancelled`` once nothing of it runs. At most ``max_chunks`` chunks, one at a time to
    each tenant in turn (its oldest batch with leftovers); returns the ids of the batches whose
    leftovers are all ended, in id order. The sweep's, each pass.

    In turns, because taken in batch order a tenant that cancelled many large batches had every
    chunk of the passes to come, and another tenant's cancel, sent later, stayed ``cancelling``
    until all of them were ended.

    Found as ``store.unsettled_dispatch_ids`` finds open dispatches: one batch at a time through
    the partial index of unfinished requests (each step the next batch id in it), so that a pass
    costs the batches with requests left, not every batch that ever expired."""
    now = now if now is not None else now_seconds()
    open_batches = unfinished_values(Request.batch_id, "open_batches")
    leftovers = (
        sa.select(Request.id).where(Request.batch_id == Batch.id, _unfinished_of_a_batch(now)).exists()
    )
    query = (
        sa.select(Batch.id, Batch.tenant_id, Batch.status)
        .join(open_batches, open_batches.c.value == Batch.id)
        .where(Batch.status.in_((BatchStatus.CANCELLING, BatchStatus.EXPIRED)), leftovers)
    )
    with engine.connect() as conn:
        stopped = sorted(conn.execute(query).all())
    cancelling = {batch_id for batch_id, _, status in stopped if status == BatchStatus.CANCELLING}
    turns: dict[str, deque[str]] = {}  # each tenant's batches with leftovers, in id order
    for batch_id, tenant_id, _ in stopped:
        turns.setdefault(tenant_id, deque()).append(batch_id)
    finished: list[str] = []
    chunks_left = max_chunks
    while turns and chunks_left > 0:
        for tenant_id, batch_ids in list(turns.items()):
            if chunks_left <= 0:
                break
            batch_id = batch_ids[0]
            error = None if batch_id in cancelling else EXPIRED_ERROR
            stop = _end_in_chunks(engine, batch_id, now, error, finalize=batch_id in cancelling, max_chunks=1)
            chunks_left -= stop.chunks
            if stop.done:
                finished.append(batch_id)
                batch_ids.popleft()
                if not batch_ids:
                    del turns[tenant_id]
    return sorted(finished)


def batch_statuses(engine: Engine, batch_ids: Collection[str]) -> dict[str, BatchStatus]:
    if not batch_ids:
        return {}
    # Autocommit: the lane reads this every half second while calls run, and a pooled read's
    # rollback would drop the statements psycopg prepared on the connection (claims, results).
    with autocommit_connection(engine) as conn:
        rows = conn.execute(sa.select(Batch.id, Batch.status).where(Batch.id.in_(sorted(batch_ids)))).all()
    return {row.id: BatchStatus(row.status) for row in rows}


def cancel_claimed(engine: Engine, request_ids: Sequence[str], owner: str, now: int | None = None) -> int:
    """Cancel those of ``request_ids`` that ``owner`` still holds; returns how many. One of an
    expired batch is marked ``batch_expired``, as the expiry marks those it found queued, so that
    it is in the batch's error file."""
    if not request_ids:
        return 0
    now = now if now is not None else now_seconds()
    batch_status = sa.select(Batch.status).where(Batch.id == Request.batch_id).scalar_subquery()
    held = (
        Request.id.in_(sorted(request_ids)),
        Request.lease_owner == owner,
        Request.status == RequestStatus.RUNNING,
    )
    with write_transaction(engine) as conn:
        lock_requests_in_id_order(conn, *held)
        batch_ids = list(
            conn.execute(
                sa.update(Request)
                .where(*held)
                .values(
                    status=RequestStatus.CANCELLED,
                    finished_at=now,
                    lease_owner=None,
                    lease_expires_at=None,
                    last_error=sa.case(
                        (batch_status == BatchStatus.EXPIRED, EXPIRED_ERROR), else_=Request.last_error
                    ),
                )
                .returning(Request.batch_id)
            ).scalars()
        )
        finalize_batches(conn, _count_cancelled(conn, batch_ids), now)
    return len(batch_ids)
