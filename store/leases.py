"""Handing requests to workers: dispatch records, claims with leases, release, and what the sweeper
must dispatch again.

A message carries request ids only. A worker *claims* the ids it received: only rows still queued
(or running under an expired lease) are handed out, each with a lease (owner, expiry) the worker
extends while it works. On PostgreSQL the claim locks rows with ``FOR UPDATE SKIP LOCKED``, so two
claimers never wait on each other nor get the same row; on SQLite the claim is one ``UPDATE ...
RETURNING`` in a ``BEGIN IMMEDIATE`` transaction, which writers take one at a time.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Engine

from store.batches import end_requeued_of_stopped_batches, lock_requests_in_id_order
from store.clock import now_seconds
from store.driver import DriverStatement
from store.engine import (
    autocommit_connection,
    flush_with_next_durable_commit,
    is_postgresql,
    no_flush_wait_column,
    write_transaction,
)
from store.tables import (
    Batch,
    BatchStatus,
    Request,
    RequestKind,
    RequestStatus,
    Tenant,
    status_is,
    unfinished_values,
)

__all__ = [
    "ClaimedRequest",
    "TenantQueue",
    "claim_in_order",
    "claim_queued",
    "claim_requests",
    "extend_leases",
    "mark_dispatched",
    "pending_request_ids",
    "pending_request_pages",
    "release_requests",
    "requests_to_redispatch",
    "tenant_queues",
    "unsettled_dispatch_ids",
]


@dataclass(frozen=True, slots=True)
class ClaimedRequest:
    """A request a worker now holds. ``attempts`` includes this claim."""

    id: str
    batch_id: str
    tenant_id: str
    custom_id: str
    kind: RequestKind
    body: dict[str, Any]
    attempts: int
    priority: int
    lease_expires_at: int
    # Upstream attempts of earlier deliveries that handed it back, and when its rate-limit
    # retries stop (epoch seconds; None: no budget started yet).
    handed_back_attempts: int = 0
    retry_deadline: int | None = None
    # Claimed from a lease that had run out (its worker died or froze): a reclaimed lease.
    reclaimed: bool = False


def _claimable(now: int | sa.BindParameter[int]) -> sa.ColumnElement[bool]:
    return sa.or_(
        sa.and_(
            status_is(RequestStatus.QUEUED),
            sa.or_(Request.not_before.is_(None), Request.not_before <= now),
        ),
        sa.and_(status_is(RequestStatus.RUNNING), Request.lease_expires_at < now),
    )


def pending_request_ids(engine: Engine, batch_id: str, limit: int | None = None) -> list[str]:
    """Ids of the batch's queued requests, in input line order."""
    query = (
        sa.select(Request.id)
        .where(Request.batch_id == batch_id, status_is(RequestStatus.QUEUED))
        .order_by(Request.line_number)
        .limit(limit)
    )
    with engine.connect() as conn:
        return list(conn.execute(query).scalars())


def pending_request_pages(engine: Engine, batch_id: str, page: int) -> Iterator[list[str]]:
    """Ids of the batch's queued requests in input line order, ``page`` at a time, each page one
    short read (keyset on the line number): a million-line batch is never a million ids in
    memory, nor one long transaction."""
    after = -1
    while True:
        query = (
            sa.select(Request.id, Request.line_number)
            .where(Request.batch_id == batch_id, status_is(RequestStatus.QUEUED), Request.line_number > after)
            .order_by(Request.line_number)
            .limit(page)
        )
        with engine.connect() as conn:
            rows = conn.execute(query).all()
        if rows:
            yield [row.id for row in rows]
        if len(rows) < page:
            return
        after = rows[-1].line_number


# Every status but queued and running: ``status NOT IN`` these is "unfinished" for each value the
# column takes, in a form no index (of ``status`` or partial on the unfinished rows) can serve.
_FINISHED = tuple(
    status for status in RequestStatus if status not in (RequestStatus.QUEUED, RequestStatus.RUNNING)
)


def mark_dispatched(
    engine: Engine, request_ids: Sequence[str], dispatch_id: str, now: int | None = None
) -> int:
    """Record that these (unfinished) requests were sent in message ``dispatch_id``; returns how many.

    The rows are found by primary key alone, whatever the statistics say. "Unfinished" is spelled
    as "not finished" (``_FINISHED``), which no index can serve: spelled ``status IN ('queued',
    'running')`` it let PostgreSQL drive the update from ``(status, lease_expires_at)`` or from a
    partial index of unfinished requests whenever its statistics had not seen the new batch (a
    batch is dispatched right after its ingest, long before an ANALYZE), reading every unfinished
    request of the ledger to pick out the chunk's few hundred: each chunk cost as much as the
    whole batch, and the dispatch of a batch grew with the square of its lines (the plan is read
    by tests/store/test_scale.py; bench.dispatch times it)."""
    if not request_ids:
        return 0
    now = now if now is not None else now_seconds()
    named = (Request.id.in_(request_ids), Request.status.not_in(_FINISHED))
    with write_transaction(engine) as conn:
        # In id order first, as a cancel, an expiry, a flush of results lock them: the UPDATE alone
        # locks them in its plan's order (a Bitmap Heap Scan at scale: the table's, not the ids'),
        # and a cancel of their batch then deadlocked with it (tests/store/test_lock_order.py).
        lock_requests_in_id_order(conn, *named)
        result = conn.execute(
            sa.update(Request).where(*named).values(dispatch_id=dispatch_id, dispatched_at=now)
        )
        return result.rowcount


def claim_requests(
    engine: Engine,
    request_ids: Sequence[str],
    owner: str,
    lease_seconds: int,
    now: int | None = None,
    *,
    durable: bool = True,
) -> list[ClaimedRequest]:
    """Lease those of ``request_ids`` that are claimable (queued and past ``not_before``, or running
    under an expired lease) to ``owner``; the rest (finished, cancelled, leased by a live worker)
    are left out. Status becomes running and ``attempts`` goes up by one.

    ``durable=False`` commits without waiting for the disk (``flush_with_next_durable_commit``):
    for a claim whose effects nobody hears of before a later durable commit (a single call
    answered only once its result is committed). A claim a crash of PostgreSQL takes back leaves
    the request queued, as if that worker had never taken it."""
    if not request_ids:
        return []
    now = now if now is not None else now_seconds()
    expires = now + lease_seconds
    if is_postgresql(engine):
        # One statement, its own transaction, run on the driver (store.driver): a single call's
        # claim is on the path of every call.
        values = {
            "claim_ids": list(request_ids),
            "claim_now": now,
            "lease_owner": owner,
            "lease_expires": expires,
        }
        return _claimed(_claim_by_id_lease(durable).run(engine, values), expires, None)
    parameters = {"claim_ids": list(request_ids), "claim_now": now}
    return _lease(engine, _claim_by_id(), owner, expires, now, durable=durable, parameters=parameters)


def claim_queued(
    engine: Engine,
    batch_ids: Sequence[str],
    owner: str,
    lease_seconds: int,
    limit: int,
    now: int | None = None,
) -> list[ClaimedRequest]:
    """Lease up to ``limit`` claimable requests of ``batch_ids`` (queued, or running under an
    expired lease: their worker died), in line order, whatever message they were dispatched in: a
    worker whose chunk is draining takes more work of the same batches rather than idle, and
    adopts a dead worker's requests as soon as their leases run out. The message that names them
    later finds them taken and skips them."""
    if not batch_ids or limit <= 0:
        return []
    now = now if now is not None else now_seconds()
    candidates = (
        sa.select(Request.id)
        .where(Request.batch_id.in_(batch_ids), _claimable(now))
        .order_by(Request.batch_id, Request.line_number)
        .limit(limit)
    )
    return _lease(engine, candidates, owner, now + lease_seconds, now)


@dataclass(frozen=True, slots=True)
class TenantQueue:
    """A tenant with runnable batches: its weight, and its batches in the order their work is
    taken (higher ``priority`` first, then the earliest end of the completion window)."""

    tenant_id: str
    weight: float
    batch_ids: tuple[str, ...]


def tenant_queues(engine: Engine) -> list[TenantQueue]:
    """Every tenant with a batch in progress (one small query on ``batches.status``: a tenant's
    batches may have nothing claimable left, which only a claim tells). Hidden batches (single
    calls: a chat completion on the interactive lane, an agent run) are left out: each has a
    message of its own naming it, and a chunk refilling from them would race the lane that
    answers the waiting caller."""
    query = (
        sa.select(Batch.id, Batch.tenant_id, Tenant.weight)
        .join(Tenant, Tenant.id == Batch.tenant_id)
        .where(Batch.status == BatchStatus.IN_PROGRESS, Batch.hidden.is_(False))
        .order_by(Batch.tenant_id, Batch.priority.desc(), Batch.expires_at, Batch.id)
    )
    queues: dict[str, tuple[float, list[str]]] = {}
    with engine.connect() as conn:
        for row in conn.execute(query):
            queues.setdefault(row.tenant_id, (float(row.weight), []))[1].append(row.id)
    return [TenantQueue(tenant, weight, tuple(ids)) for tenant, (weight, ids) in queues.items()]


def claim_in_order(
    engine: Engine,
    batch_ids: Sequence[str],
    owner: str,
    lease_seconds: int,
    limit: int,
    now: int | None = None,
) -> list[ClaimedRequest]:
    """Lease up to ``limit`` claimable requests of ``batch_ids`` (one tenant's
    ``TenantQueue.batch_ids``): first those whose worker died (running under an expired lease),
    then queued ones, the batches in the order given and each in line order. Every look-up is an
    index range that stops at its limit: the expired leases through ``(status,
    lease_expires_at)``, a batch's queued rows through the partial index of unfinished rows
    (``status_is``), so neither the finished rows of a big batch nor other tenants' queued rows
    are read."""
    if not batch_ids or limit <= 0:
        return []
    now = now if now is not None else now_seconds()
    expires = now + lease_seconds
    with write_transaction(engine) as conn:
        orphans = (
            sa.select(Request.id)
            .where(
                status_is(RequestStatus.RUNNING),
                Request.lease_expires_at < now,
                Request.batch_id.in_(list(batch_ids)),
            )
            .limit(limit)
        )
        claimed = _lease_in(conn, orphans, owner, expires, now)
        for batch_id in batch_ids:
            if len(claimed) >= limit:
                break
            queued = (
                sa.select(Request.id)
                .where(
                    Request.batch_id == batch_id,
                    status_is(RequestStatus.QUEUED),
                    sa.or_(Request.not_before.is_(None), Request.not_before <= now),
                )
                .order_by(Request.line_number)
                .limit(limit - len(claimed))
            )
            claimed += _lease_in(conn, queued, owner, expires, now)
    return claimed


def _lease(
    engine: Engine,
    candidates: sa.Select[Any],
    owner: str,
    expires: int,
    now: int,
    *,
    durable: bool = True,
    parameters: dict[str, Any] | None = None,
) -> list[ClaimedRequest]:
    if is_postgresql(engine):
        # One statement there: a transaction of its own, without BEGIN / COMMIT round trips.
        with autocommit_connection(engine) as conn:
            return _lease_in(conn, candidates, owner, expires, now, durable=durable, parameters=parameters)
    with write_transaction(engine) as conn:
        if not durable:
            flush_with_next_durable_commit(conn)
        return _lease_in(conn, candidates, owner, expires, now, parameters=parameters)


def _lease_in(
    conn: sa.Connection,
    candidates: sa.Select[Any],
    owner: str,
    expires: int,
    now: int,
    *,
    durable: bool = True,
    parameters: dict[str, Any] | None = None,
) -> list[ClaimedRequest]:
    """Lease the rows ``candidates`` selects (its bound ``parameters``, if any): one statement on
    PostgreSQL (``_postgresql_lease``). ``durable=False`` (PostgreSQL) sets the statement's own
    transaction to commit without waiting for the disk (``flush_with_next_durable_commit``), from
    within the statement: nothing to set when no row is claimed, and nothing to write then."""
    values = {**(parameters or {}), "lease_owner": owner, "lease_expires": expires}
    running: set[str] | None = None  # on PostgreSQL, told by each row's previous status instead
    if is_postgresql(conn):
        statement = _postgresql_lease(candidates, durable=durable)
    else:
        chosen = Request.id.in_(candidates.scalar_subquery())  # SQLite writers are serialized
        # Read in this transaction, before the update: writers take turns, so it still holds.
        running = set(
            conn.execute(
                sa.select(Request.id).where(chosen, Request.status == RequestStatus.RUNNING), values
            ).scalars()
        )
        statement = _leased(chosen, _claimable(now), sa.literal(None))
    return _claimed(conn.execute(statement, values).all(), expires, running)


def _claimed(rows: Sequence[Any], expires: int, running: set[str] | None) -> list[ClaimedRequest]:
    """The claimed requests of the lease statement's ``rows``, in line order; ``running``: the
    ids that were running before (None: each row says so in ``previous_status``)."""
    return [
        ClaimedRequest(
            id=row.id,
            batch_id=row.batch_id,
            tenant_id=row.tenant_id,
            custom_id=row.custom_id,
            kind=RequestKind(row.kind),
            body=row.body,
            attempts=row.attempts,
            priority=row.priority,
            lease_expires_at=expires,
            handed_back_attempts=row.handed_back_attempts,
            retry_deadline=row.retry_deadline,
            reclaimed=row.previous_status == RequestStatus.RUNNING if running is None else row.id in running,
        )
        for row in sorted(rows, key=lambda row: row.line_number)
    ]


def _postgresql_lease(candidates: sa.Select[Any], *, durable: bool) -> sa.Update:
    """The claim of the rows ``candidates`` selects as one PostgreSQL statement."""
    # Rows another claimer holds are skipped, not waited for. A materialized CTE, because
    # PostgreSQL may evaluate an IN (... LIMIT n FOR UPDATE SKIP LOCKED) subquery more than
    # once during the UPDATE and so lease more than n rows. It keeps each row's status
    # before the claim: running means its lease ran out (reclaimed).
    locked = (
        candidates.add_columns(Request.status.label("previous_status"))
        .with_for_update(skip_locked=True)
        .cte("claimed")
        .prefix_with("MATERIALIZED")
    )
    # The locked rows are found again by primary key, and by nothing else: their
    # claimability was rechecked on their newest versions as they were locked, and the
    # ids as one array (an index condition on the key) keep the planner from either walking
    # the partial index of unfinished requests (every line of a new batch, while its
    # statistics still say that index is empty: 2 s a claim at 50k lines) or scanning the
    # table to join it to the locked rows.
    chosen: sa.ColumnElement[bool] = sa.and_(
        Request.id
        == sa.any_(
            sa.cast(sa.select(sa.func.array_agg(locked.c.id)).scalar_subquery(), postgresql.ARRAY(sa.String))
        ),
        Request.id == locked.c.id,
    )
    no_flush_wait: list[sa.ColumnElement[Any]] = []
    if not durable:
        no_flush_wait = [no_flush_wait_column().label("no_flush_wait")]
    return _leased(chosen, sa.true(), locked.c.previous_status, *no_flush_wait)


def _leased(
    chosen: sa.ColumnElement[bool],
    recheck: sa.ColumnElement[bool],
    previous: sa.ColumnElement[Any],
    *extra: sa.ColumnElement[Any],
) -> sa.Update:
    """The UPDATE that leases the ``chosen`` rows to ``lease_owner`` until ``lease_expires``
    (parameters), returning what a worker needs of each."""
    return (
        sa.update(Request)
        .where(chosen, recheck)
        .values(
            status=RequestStatus.RUNNING,
            lease_owner=sa.bindparam("lease_owner", type_=Request.lease_owner.type),
            lease_expires_at=sa.bindparam("lease_expires", type_=Request.lease_expires_at.type),
            attempts=Request.attempts + 1,
            not_before=None,
        )
        .returning(
            Request.id,
            Request.batch_id,
            Request.tenant_id,
            Request.custom_id,
            Request.kind,
            Request.body,
            Request.attempts,
            Request.priority,
            Request.line_number,
            Request.handed_back_attempts,
            Request.retry_deadline,
            previous.label("previous_status"),
            *extra,
        )
    )


@functools.cache
def _claim_by_id() -> sa.Select[Any]:
    """``claim_requests``' candidates on SQLite (parameters ``claim_ids``, ``claim_now``)."""
    return sa.select(Request.id).where(
        Request.id.in_(sa.bindparam("claim_ids", expanding=True)),
        _claimable(sa.bindparam("claim_now", type_=sa.BigInteger)),
    )


@functools.cache
def _claim_by_id_lease(durable: bool) -> DriverStatement:
    """``claim_requests``' statement on PostgreSQL (parameters ``claim_ids``, an array, one
    statement whatever their number; ``claim_now``, ``lease_owner``, ``lease_expires``), built and
    compiled once: building, hashing and executing it through SQLAlchemy cost a worker more CPU
    than PostgreSQL spends on the claim of a single call (py-spy, bench/sync_latency.py). Other
    claims' statements carry their values and are built each time."""
    now = sa.bindparam("claim_now", type_=sa.BigInteger)
    # ``_claimable`` as a CASE, which PostgreSQL cannot prove implies the partial indexes'
    # predicates: the rows are looked up by their ids alone. Spelled with literal statuses, it let
    # the planner, its statistics not yet showing a new batch's lines, walk the index of every
    # unfinished request filtering each by the ids (a single call's claim read the whole batch),
    # then look up all the ids again for each row it locked (a chunk's 512: 134k rows read).
    claimable = sa.case(
        (status_is(RequestStatus.QUEUED), sa.or_(Request.not_before.is_(None), Request.not_before <= now)),
        (status_is(RequestStatus.RUNNING), Request.lease_expires_at < now),
        else_=sa.false(),
    )
    candidates = sa.select(Request.id).where(
        Request.id == sa.any_(sa.bindparam("claim_ids", type_=postgresql.ARRAY(sa.String))), claimable
    )
    return DriverStatement(_postgresql_lease(candidates, durable=durable))


def extend_leases(
    engine: Engine, request_ids: Sequence[str], owner: str, lease_seconds: int, now: int | None = None
) -> list[str]:
    """Push the lease expiry of requests ``owner`` still holds; returns those ids (a missing id
    means the lease was lost: another worker may be running it, so stop and do not record)."""
    if not request_ids:
        return []
    now = now if now is not None else now_seconds()
    held = (
        Request.id.in_(request_ids),
        Request.lease_owner == owner,
        Request.status == RequestStatus.RUNNING,
    )
    with write_transaction(engine) as conn:
        # A flush of their results locks them too (ChunkRunner.leased names the unwritten ones).
        lock_requests_in_id_order(conn, *held)
        extended = sa.update(Request).where(*held).values(lease_expires_at=now + lease_seconds)
        return list(conn.execute(extended.returning(Request.id)).scalars())


def release_requests(
    engine: Engine,
    request_ids: Sequence[str],
    owner: str,
    error: str | None = None,
    not_before: int | None = None,
    *,
    handed_back: bool = False,
    upstream_attempts: int = 0,
    retry_deadline: int | None = None,
) -> int:
    """Give requests back (status queued, lease cleared) so they run again, not before
    ``not_before`` if given; ``error`` is kept as ``last_error``. Returns how many were released.

    ``handed_back``: the worker chose to put them back in line (the provider or the rate limit
    said "later"); that delivery ended cleanly, so it does not count towards the deliveries after
    which a request is taken for poison (``attempts``). Its ``upstream_attempts`` are added to
    ``handed_back_attempts``; ``retry_deadline`` is set unless one was set before (the budget runs
    from the first hand-back). A request whose batch was cancelled or expired meanwhile ends
    cancelled instead (``end_requeued_of_stopped_batches``)."""
    if not request_ids:
        return 0
    values: dict[str, Any] = {
        "status": RequestStatus.QUEUED,
        "lease_owner": None,
        "lease_expires_at": None,
        "not_before": not_before,
    }
    if error is not None:
        values["last_error"] = error
    if handed_back:
        values["attempts"] = Request.attempts - 1
        values["handed_back_attempts"] = Request.handed_back_attempts + upstream_attempts
        if retry_deadline is not None:
            values["retry_deadline"] = sa.func.coalesce(Request.retry_deadline, retry_deadline)
    now = now_seconds()
    held = (
        Request.id.in_(request_ids),
        Request.lease_owner == owner,
        Request.status == RequestStatus.RUNNING,
    )
    with write_transaction(engine) as conn:
        lock_requests_in_id_order(conn, *held)
        released = [
            (row.id, row.batch_id)
            for row in conn.execute(
                sa.update(Request).where(*held).values(values).returning(Request.id, Request.batch_id)
            )
        ]
        end_requeued_of_stopped_batches(conn, released, now)
        return len(released)


def unsettled_dispatch_ids(engine: Engine, *, now: int, settled_before: int) -> list[str]:
    """Dispatches (sent before ``settled_before``) that still name a request needing work: queued,
    or running under an expired lease. The sweeper asks the broker which of them are alive.

    Read one dispatch at a time (a loose index scan: each step the next dispatch id after the
    last in the partial index of unfinished requests, then whether one of its rows needs work),
    so that a pass costs the dispatches still open, a few index probes each, not a read of every
    request still queued (a freshly dispatched million-line batch is 2,000 messages but a million
    rows, and the sweeper passes every few seconds)."""
    dispatches = unfinished_values(Request.dispatch_id, "open_dispatches")
    needs_work = (
        sa.select(Request.id)
        .where(
            Request.dispatch_id == dispatches.c.value,
            _claimable(now),
            Request.dispatched_at < settled_before,
        )
        .exists()
    )
    query = sa.select(dispatches.c.value).where(dispatches.c.value.is_not(None), needs_work)
    with engine.connect() as conn:
        return [dispatch_id for dispatch_id in conn.execute(query).scalars() if dispatch_id is not None]


def requests_to_redispatch(
    engine: Engine, *, now: int, settled_before: int, dead_dispatch_ids: Sequence[str], limit: int
) -> list[tuple[str, str]]:
    """(request id, batch id) of what no message will run, highest priority first: never
    dispatched (the producer died between commit and publish), running under a lease that expired
    after its last dispatch (its worker was killed), or named only by a dead dispatch."""
    conditions: list[sa.ColumnElement[bool]] = [
        sa.and_(Request.dispatch_id.is_(None), Request.created_at < settled_before),
        sa.and_(
            Request.status == RequestStatus.RUNNING,
            sa.or_(Request.dispatched_at.is_(None), Request.dispatched_at <= Request.lease_expires_at),
        ),
    ]
    if dead_dispatch_ids:
        conditions.append(Request.dispatch_id.in_(list(dead_dispatch_ids)))
    query = (
        sa.select(Request.id, Request.batch_id)
        .where(_claimable(now), sa.or_(*conditions))
        .order_by(Request.priority.desc(), Request.batch_id, Request.line_number)
        .limit(limit)
    )
    with engine.connect() as conn:
        return [(row.id, row.batch_id) for row in conn.execute(query)]
