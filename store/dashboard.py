"""What the dashboard (``/ui``) reads from the ledger: pages of batches and their progress, a
batch's first errors, activity per model in time buckets, queue depth and the workers' leases.

Every query is bounded whatever the ledger holds: batch pages walk an index on
``(tenant_id, created_at, id)`` or ``(created_at, id)`` and stop after a page; activity reads only
results and discarded answers inside one window (at most ``MAX_WINDOW_SECONDS``) through an index
on ``created_at`` (with ``tenant_id`` first for a tenant) and groups them in SQL, never more than
``top_models`` models plus "other"; queue depth sums the counters of the active batches (index on
``status``) and counts running requests (an index of the running ones), which are
bounded by the workers' capacity, not by the ledger. ``tenant_id=None`` means every tenant: the
caller decides who may ask for that (an operator).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from store.errors import InvalidArgument
from store.input_checks import bounded_text
from store.tables import Batch, BatchStatus, DiscardedAnswer, Request, RequestStatus, Result

__all__ = [
    "ACTIVE_BATCH_STATUSES",
    "MAX_BUCKETS",
    "MAX_WINDOW_SECONDS",
    "Activity",
    "ActivityPoint",
    "BatchError",
    "BatchSummary",
    "BatchSummaryPage",
    "QueueDepth",
    "WorkerLeases",
    "activity_by_model",
    "batch_summaries",
    "first_errors",
    "page_of_batches",
    "queue_depth",
    "worker_leases",
]

MAX_WINDOW_SECONDS = 31 * 86_400
MAX_BUCKETS = 500
MAX_PAGE = 200
MAX_ERROR_CHARS = 1000
# Batches whose requests may still be waiting or running.
ACTIVE_BATCH_STATUSES = (BatchStatus.IN_PROGRESS, BatchStatus.FINALIZING, BatchStatus.CANCELLING)


@dataclass(frozen=True, slots=True)
class BatchSummary:
    """A batch as a row of the dashboard: its counters come from the batch row, which the result
    writes keep current (``store.results``), so reading progress costs one row per batch."""

    id: str
    tenant_id: str
    status: BatchStatus
    endpoint: str
    created_at: int
    total: int
    completed: int
    failed: int
    cancelled: int
    error_count: int
    metadata: dict[str, Any] | None

    @property
    def finished(self) -> int:
        return self.completed + self.failed + self.cancelled


@dataclass(frozen=True, slots=True)
class BatchSummaryPage:
    data: list[BatchSummary]
    has_more: bool


_SUMMARY_COLUMNS = (
    Batch.id,
    Batch.tenant_id,
    Batch.status,
    Batch.endpoint,
    Batch.created_at,
    Batch.total_count,
    Batch.completed_count,
    Batch.failed_count,
    Batch.cancelled_count,
    Batch.error_count,
    Batch.batch_metadata,
)


def _summary(row: sa.Row[Any]) -> BatchSummary:
    return BatchSummary(
        id=row.id,
        tenant_id=row.tenant_id,
        status=BatchStatus(row.status),
        endpoint=row.endpoint,
        created_at=int(row.created_at),
        total=int(row.total_count or 0),
        completed=int(row.completed_count or 0),
        failed=int(row.failed_count or 0),
        cancelled=int(row.cancelled_count or 0),
        error_count=int(row.error_count or 0),
        metadata=row.metadata,
    )


def page_of_batches(
    engine: Engine, tenant_id: str | None, after: str | None = None, limit: int = 25
) -> BatchSummaryPage:
    """Batches newest first (hidden one-request batches left out), ``limit`` of them after the
    batch ``after`` (the last id of the previous page; an id not among those listed gives an
    empty page, as for an unknown one)."""
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidArgument(f"a page holds 1 to {MAX_PAGE} batches, not {limit}")
    query = sa.select(*_SUMMARY_COLUMNS).where(Batch.hidden.is_(False))
    cursor = sa.select(Batch.created_at).where(Batch.id == after)
    if tenant_id is not None:
        query = query.where(Batch.tenant_id == tenant_id)
        cursor = cursor.where(Batch.tenant_id == tenant_id)
    if after is not None:
        query = query.where(
            sa.tuple_(Batch.created_at, Batch.id) < sa.tuple_(cursor.scalar_subquery(), after)
        )
    query = query.order_by(Batch.created_at.desc(), Batch.id.desc()).limit(limit + 1)
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    return BatchSummaryPage([_summary(row) for row in rows[:limit]], len(rows) > limit)


def batch_summaries(engine: Engine, batch_ids: Sequence[str], tenant_id: str | None) -> list[BatchSummary]:
    """The named batches (those of ``tenant_id`` only, unless None), in the order named: what the
    progress bars poll. At most ``MAX_PAGE`` ids."""
    if len(batch_ids) > MAX_PAGE:
        raise InvalidArgument(f"at most {MAX_PAGE} batches at once, not {len(batch_ids)}")
    if not batch_ids:
        return []
    # Hidden batches (single calls) are never shown, as the API never lists nor retrieves them.
    query = sa.select(*_SUMMARY_COLUMNS).where(Batch.id.in_(list(batch_ids)), Batch.hidden.is_(False))
    if tenant_id is not None:
        query = query.where(Batch.tenant_id == tenant_id)
    with engine.connect() as conn:
        found = {row.id: _summary(row) for row in conn.execute(query)}
    return [found[batch_id] for batch_id in dict.fromkeys(batch_ids) if batch_id in found]


@dataclass(frozen=True, slots=True)
class BatchError:
    """A line that failed: at validation (``line`` of the input file, from the batch row) or when
    it ran (its request's result). ``message`` is the tenant's or the provider's words, at most
    ``MAX_ERROR_CHARS`` characters: show it escaped."""

    line: int | None
    custom_id: str | None
    code: str | None
    message: str


def first_errors(engine: Engine, batch_id: str, limit: int = 20) -> list[BatchError]:
    """The batch's first ``limit`` errors: validation errors first, then failed requests in input
    line order (the index on ``(batch_id, line_number)``, stopping at ``limit``). The caller checks
    the batch is the viewer's."""
    with engine.connect() as conn:
        stored = conn.execute(sa.select(Batch.errors).where(Batch.id == batch_id)).scalar_one_or_none()
        errors = [
            BatchError(
                line=item.get("line") if isinstance(item.get("line"), int) else None,
                custom_id=None,
                code=str(item["code"]) if item.get("code") is not None else None,
                message=bounded_text(str(item.get("message", "")), MAX_ERROR_CHARS),
            )
            for item in (stored or [])[:limit]
            if isinstance(item, dict)
        ]
        if len(errors) < limit:
            failed = conn.execute(
                sa.select(Request.line_number, Request.custom_id, Result.error_code, Result.error_message)
                .join(Result, Result.request_id == Request.id)
                .where(Request.batch_id == batch_id, Request.status == RequestStatus.FAILED)
                .order_by(Request.line_number)
                .limit(limit - len(errors))
            ).all()
            errors += [
                BatchError(
                    line=row.line_number,
                    custom_id=row.custom_id,
                    code=row.error_code,
                    message=bounded_text(row.error_message or "", MAX_ERROR_CHARS),
                )
                for row in failed
            ]
    return errors


@dataclass(frozen=True, slots=True)
class ActivityPoint:
    """One model's results in one time bucket ``[start, start + bucket_seconds)``. ``model`` None
    stands for every model beyond the busiest ones (and results with no model). Billed figures
    count calls that went to the provider (kept or discarded, as ``store.usage`` bills them);
    ``cache_hits`` count results served from the cache (free)."""

    model: str | None
    start: int
    requests: int
    failed: int
    cache_hits: int
    billed_tokens: int
    cost_usd: Decimal
    discarded_answers: int


@dataclass(frozen=True, slots=True)
class Activity:
    since: int
    until: int
    bucket_seconds: int
    models: list[str | None]  # busiest first; None (other models) last when present
    points: list[ActivityPoint] = field(default_factory=list)

    @property
    def bucket_starts(self) -> list[int]:
        return list(range(self.since, self.until, self.bucket_seconds))

    def series(self, model: str | None) -> dict[int, ActivityPoint]:
        return {point.start: point for point in self.points if point.model == model}

    def total(self, attribute: str) -> Any:
        """The sum of ``attribute`` over every bucket and model."""
        return _sum(attribute, self.points)

    def model_total(self, attribute: str, model: str | None) -> Any:
        """The sum of ``attribute`` over one model's buckets (None: the other models)."""
        return _sum(attribute, [point for point in self.points if point.model == model])

    @property
    def cache_hit_rate(self) -> float | None:
        """Cache hits among the results of the window; None when there were none."""
        requests = self.total("requests")
        return self.total("cache_hits") / requests if requests else None


def _sum(attribute: str, points: Sequence[ActivityPoint]) -> Any:
    return sum((getattr(point, attribute) for point in points), Decimal(0) if attribute == "cost_usd" else 0)


def _spend_in(since: int, until: int, tenant_id: str | None) -> sa.Subquery:
    """Results and discarded paid answers of ``[since, until)``, in one shape (``kept`` tells them
    apart); each part filtered on its own time index before the union."""
    results = sa.select(
        Result.model,
        Result.created_at,
        sa.literal(True, sa.Boolean).label("kept"),
        Result.cached,
        (Result.status == RequestStatus.FAILED).label("failed"),
        (Result.prompt_tokens + Result.completion_tokens).label("tokens"),
        Result.cost_usd,
    ).where(Result.created_at >= since, Result.created_at < until)
    discarded = sa.select(
        DiscardedAnswer.model,
        DiscardedAnswer.created_at,
        sa.literal(False, sa.Boolean).label("kept"),
        sa.literal(False, sa.Boolean).label("cached"),
        sa.literal(False, sa.Boolean).label("failed"),
        (DiscardedAnswer.prompt_tokens + DiscardedAnswer.completion_tokens).label("tokens"),
        DiscardedAnswer.cost_usd,
    ).where(DiscardedAnswer.created_at >= since, DiscardedAnswer.created_at < until)
    if tenant_id is not None:
        results = results.where(Result.tenant_id == tenant_id)
        discarded = discarded.where(DiscardedAnswer.tenant_id == tenant_id)
    return sa.union_all(results, discarded).subquery("spend")


def activity_by_model(
    engine: Engine,
    tenant_id: str | None,
    *,
    until: int,
    bucket_seconds: int,
    buckets: int,
    top_models: int = 8,
) -> Activity:
    """Results per model per time bucket over the ``buckets`` buckets ending with the one that
    holds ``until`` (buckets start at multiples of ``bucket_seconds``, so successive calls agree):
    the ``top_models`` busiest models by name, every other one summed as ``model=None``."""
    if not 1 <= buckets <= MAX_BUCKETS or bucket_seconds < 1 or buckets * bucket_seconds > MAX_WINDOW_SECONDS:
        raise InvalidArgument(
            f"a window is 1 to {MAX_BUCKETS} buckets and at most {MAX_WINDOW_SECONDS} seconds, "
            f"not {buckets} of {bucket_seconds} s"
        )
    end = (until // bucket_seconds + 1) * bucket_seconds
    since = end - buckets * bucket_seconds
    spend = _spend_in(since, end, tenant_id).c
    with engine.connect() as conn:
        busiest = [
            row.model
            for row in conn.execute(
                sa.select(spend.model, sa.func.count().label("n"))
                .where(spend.model.is_not(None))
                .group_by(spend.model)
                .order_by(sa.desc("n"), spend.model)
                .limit(top_models)
            )
        ]
        # No busiest model (no named one in the window): everything is "other", one group per bucket.
        model_key = sa.case((spend.model.in_(busiest), spend.model), else_=sa.null()) if busiest else None
        bucket = (spend.created_at // bucket_seconds * bucket_seconds).label("start")
        billed = sa.not_(spend.cached)

        def count_of(condition: sa.ColumnElement[bool]) -> sa.ColumnElement[Any]:
            return sa.func.coalesce(sa.func.sum(sa.case((condition, 1), else_=0)), 0)

        grouped = sa.select(
            (model_key if model_key is not None else sa.null()).label("model"),
            bucket,
            count_of(spend.kept).label("requests"),
            count_of(sa.and_(spend.kept, spend.failed)).label("failed"),
            count_of(spend.cached).label("cache_hits"),
            sa.func.coalesce(sa.func.sum(sa.case((billed, spend.tokens), else_=0)), 0).label("tokens"),
            sa.func.coalesce(sa.func.sum(sa.case((billed, spend.cost_usd), else_=0)), 0).label("cost"),
            count_of(sa.not_(spend.kept)).label("discarded"),
        ).group_by(*(key for key in (model_key, bucket) if key is not None))
        rows = conn.execute(grouped).all()
    points = sorted(
        (
            ActivityPoint(
                model=row.model,
                start=int(row.start),
                requests=int(row.requests),
                failed=int(row.failed),
                cache_hits=int(row.cache_hits),
                billed_tokens=int(row.tokens),
                cost_usd=Decimal(row.cost),
                discarded_answers=int(row.discarded),
            )
            for row in rows
        ),
        key=lambda point: (point.model is None, point.model or "", point.start),
    )
    models: list[str | None] = list(busiest)
    if any(point.model is None for point in points):
        models.append(None)
    return Activity(since=since, until=end, bucket_seconds=bucket_seconds, models=models, points=points)


@dataclass(frozen=True, slots=True)
class QueueDepth:
    """One tenant's unfinished work. ``waiting`` is queued or handed back, ``running`` leased to
    a worker; ``stale`` are running under a lease that expired (their worker died or froze: the
    sweeper sends them again)."""

    tenant_id: str
    active_batches: int
    unfinished: int
    running: int
    stale: int

    @property
    def waiting(self) -> int:
        return max(0, self.unfinished - self.running)


def queue_depth(engine: Engine, tenant_id: str | None, now: int) -> list[QueueDepth]:
    """Unfinished requests per tenant (one row for a tenant's own view), the deepest first."""
    active = sa.select(
        Batch.tenant_id,
        sa.func.count().label("batches"),
        sa.func.coalesce(
            sa.func.sum(
                Batch.total_count - Batch.completed_count - Batch.failed_count - Batch.cancelled_count
            ),
            0,
        ).label("unfinished"),
    ).where(Batch.status.in_(ACTIVE_BATCH_STATUSES))
    running = sa.select(
        Request.tenant_id,
        sa.func.count().label("running"),
        sa.func.coalesce(sa.func.sum(sa.case((Request.lease_expires_at < now, 1), else_=0)), 0).label(
            "stale"
        ),
    ).where(Request.status == RequestStatus.RUNNING)
    if tenant_id is not None:
        active = active.where(Batch.tenant_id == tenant_id)
        running = running.where(Request.tenant_id == tenant_id)
    with engine.connect() as conn:
        by_tenant = {row.tenant_id: row for row in conn.execute(active.group_by(Batch.tenant_id))}
        leased = {row.tenant_id: row for row in conn.execute(running.group_by(Request.tenant_id))}
    tenants = set(by_tenant) | set(leased)
    if tenant_id is not None:
        tenants.add(tenant_id)
    depths = [
        QueueDepth(
            tenant_id=tenant,
            active_batches=int(by_tenant[tenant].batches) if tenant in by_tenant else 0,
            unfinished=int(by_tenant[tenant].unfinished) if tenant in by_tenant else 0,
            running=int(leased[tenant].running) if tenant in leased else 0,
            stale=int(leased[tenant].stale) if tenant in leased else 0,
        )
        for tenant in tenants
    ]
    return sorted(depths, key=lambda depth: (-depth.unfinished, -depth.running, depth.tenant_id))


@dataclass(frozen=True, slots=True)
class WorkerLeases:
    """A worker process as the ledger sees it through the leases it holds (``host/pid``, from the
    lease owner ``host/pid/delivery``). A live worker extends its leases four times per lease, so
    ``live`` leases mean it heartbeats; a worker whose leases all expired has died or frozen.
    An idle worker holds no lease and is not listed (Flower lists every worker)."""

    worker: str
    running: int
    live: int
    lease_expires_at: int  # the latest of its leases

    @property
    def healthy(self) -> bool:
        return self.live > 0


def worker_leases(engine: Engine, now: int) -> list[WorkerLeases]:
    """Every worker process holding running requests, stalled ones first."""
    query = (
        sa.select(
            Request.lease_owner,
            sa.func.count().label("running"),
            sa.func.coalesce(sa.func.sum(sa.case((Request.lease_expires_at >= now, 1), else_=0)), 0).label(
                "live"
            ),
            sa.func.max(Request.lease_expires_at).label("expires"),
        )
        .where(Request.status == RequestStatus.RUNNING, Request.lease_owner.is_not(None))
        .group_by(Request.lease_owner)
    )
    workers: dict[str, list[int]] = {}
    with engine.connect() as conn:
        for row in conn.execute(query):
            worker = str(row.lease_owner).rsplit("/", 1)[0]
            counts = workers.setdefault(worker, [0, 0, 0])
            counts[0] += int(row.running)
            counts[1] += int(row.live)
            counts[2] = max(counts[2], int(row.expires or 0))
    found = [
        WorkerLeases(worker, running, live, expires) for worker, (running, live, expires) in workers.items()
    ]
    return sorted(found, key=lambda w: (w.healthy, w.worker))
