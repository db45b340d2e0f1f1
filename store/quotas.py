"""Per-tenant quotas the operator sets, checked before any work of a create is queued.

Three quotas on work, each None (no limit) unless set (``tokenmill tenants set NAME ...``):

- ``max_queued_requests``: requests not yet ended (queued or running) of the tenant;
- ``max_queued_tokens``: their estimated prompt tokens;
- ``daily_budget_usd``: the exact cost billed to the tenant since UTC midnight (results and
  discarded paid answers, as ``/v1/usage`` sums them). New work is refused once it is spent; work
  already queued runs on (its cost is not known before it runs).

And one on storage, ``max_stored_bytes``: the bytes of the tenant's uploaded files (None: the
service's default, ``TOKENMILL_DEFAULT_MAX_STORED_BYTES``, applies). Without it one tenant could
fill the files disk, and every tenant's uploads failed. Only uploads count: a batch's output and
error files are generated from the ledger when read (no bytes on the files disk), and are never
refused, so a tenant at its cap loses no result; its next upload is refused instead. What the
uploads hold is a counter on the tenant's row (``stored_file_bytes``), kept in the transactions
that add (:func:`reserve_stored_bytes`, under the row's lock, checked there) and delete them.

What they read is cheap whatever the tenant has queued: the queued figures come from the counters
each open batch already keeps in the transactions that end its requests (``total_count`` minus
completed, failed and cancelled), one row per open batch (index ``ix_batches_tenant_id_status``),
never from a count over the request rows; a batch's queued tokens are its ``prompt_tokens_estimate``
times the share of its requests still open. The day's spend is one row of ``tenant_daily_spend``,
added to (:func:`add_daily_spend`) in the transactions that write results and discarded answers.

Race: :func:`enforce_tenant_quotas` runs in the transaction that queues the work, after its rows
are written and before it commits, with the tenant's row locked (``FOR NO KEY UPDATE``): two
creates of one tenant check one after the other, and the second sees the first's batch. A tenant
with no quota takes no lock. Running requests of an ``expired`` batch are not counted (its queued
ones were cancelled by the expiry).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from store.clock import now_seconds
from store.engine import dialect_insert, write_transaction
from store.errors import InvalidArgument, NotFound, QuotaExceeded
from store.tables import Batch, BatchStatus, Tenant, TenantDailySpend

__all__ = [
    "DAILY_BUDGET_EXCEEDED",
    "FILE_STORAGE_QUOTA_EXCEEDED",
    "OPEN_BATCH_STATUSES",
    "QUEUED_REQUESTS_QUOTA_EXCEEDED",
    "QUEUED_TOKENS_QUOTA_EXCEEDED",
    "QuotaStatus",
    "StoredBytes",
    "TenantQuotas",
    "add_daily_spend",
    "check_tenant_quotas",
    "enforce_tenant_quotas",
    "estimate_prompt_tokens",
    "get_tenant_quotas",
    "quota_status",
    "release_stored_bytes",
    "reserve_stored_bytes",
    "seconds_to_next_budget_day",
    "set_tenant_quotas",
    "stored_bytes",
    "stored_bytes_exceeded",
]

QUEUED_REQUESTS_QUOTA_EXCEEDED = "queued_requests_quota_exceeded"
QUEUED_TOKENS_QUOTA_EXCEEDED = "queued_tokens_quota_exceeded"
DAILY_BUDGET_EXCEEDED = "daily_budget_exceeded"
FILE_STORAGE_QUOTA_EXCEEDED = "file_storage_quota_exceeded"

# Batches whose requests may still be queued or running.
OPEN_BATCH_STATUSES = (
    BatchStatus.VALIDATING,
    BatchStatus.IN_PROGRESS,
    BatchStatus.FINALIZING,
    BatchStatus.CANCELLING,
)
_SECONDS_PER_DAY = 86_400


def seconds_to_next_budget_day(now: int | None = None) -> int:
    """Seconds until the daily budget's next day (UTC midnight, as ``_SECONDS_PER_DAY`` counts
    days) begins: when a spent budget accepts work again."""
    now = now if now is not None else now_seconds()
    return _SECONDS_PER_DAY - now % _SECONDS_PER_DAY


_CHARS_PER_TOKEN = 4


def estimate_prompt_tokens(body_json: str) -> int:
    """A request's prompt tokens as its body's JSON characters / 4 (OpenAI's rule of thumb, and
    ``models.tokens``' fallback): free at ingest, where a tokenizer would cost more than the rest
    of writing the line. It counts the body's keys and parameters too, so it leans high."""
    return (len(body_json) + _CHARS_PER_TOKEN - 1) // _CHARS_PER_TOKEN


@dataclass(frozen=True, slots=True)
class TenantQuotas:
    max_queued_requests: int | None = None
    max_queued_tokens: int | None = None
    daily_budget_usd: Decimal | None = None
    # The tenant's own cap on stored bytes; None: the service's default applies.
    max_stored_bytes: int | None = None

    @property
    def any(self) -> bool:
        """Whether a quota on work is set (the storage cap is checked by uploads, not creates)."""
        return (
            self.max_queued_requests is not None
            or self.max_queued_tokens is not None
            or self.daily_budget_usd is not None
        )


@dataclass(frozen=True, slots=True)
class QuotaStatus:
    """A tenant's quotas and what they hold now (``spent_today_usd`` exact)."""

    quotas: TenantQuotas
    queued_requests: int
    queued_tokens: int
    spent_today_usd: Decimal
    stored_bytes: int = 0
    default_max_stored_bytes: int | None = None

    @property
    def max_stored_bytes(self) -> int | None:
        """The cap on stored bytes that applies: the tenant's own, else the service's default."""
        own = self.quotas.max_stored_bytes
        return own if own is not None else self.default_max_stored_bytes

    @property
    def remaining_stored_bytes(self) -> int | None:
        limit = self.max_stored_bytes
        return None if limit is None else max(0, limit - self.stored_bytes)

    @property
    def remaining_requests(self) -> int | None:
        limit = self.quotas.max_queued_requests
        return None if limit is None else max(0, limit - self.queued_requests)

    @property
    def remaining_tokens(self) -> int | None:
        limit = self.quotas.max_queued_tokens
        return None if limit is None else max(0, limit - self.queued_tokens)

    @property
    def remaining_budget_usd(self) -> Decimal | None:
        limit = self.quotas.daily_budget_usd
        return None if limit is None else max(Decimal(0), limit - self.spent_today_usd)


_QUOTA_COLUMNS = (
    Tenant.max_queued_requests,
    Tenant.max_queued_tokens,
    Tenant.daily_budget_usd,
    Tenant.max_stored_bytes,
)
_UNSET: Any = object()


def _quotas_of(row: Any) -> TenantQuotas:
    budget = row.daily_budget_usd
    return TenantQuotas(
        max_queued_requests=row.max_queued_requests,
        max_queued_tokens=row.max_queued_tokens,
        daily_budget_usd=None if budget is None else Decimal(budget),
        max_stored_bytes=row.max_stored_bytes,
    )


def _read_quotas(conn: Connection, tenant_id: str, *, lock: bool = False) -> TenantQuotas:
    query = sa.select(*_QUOTA_COLUMNS).where(Tenant.id == tenant_id)
    if lock:
        # NO KEY UPDATE: inserts that reference the tenant (its batches' foreign keys) do not wait.
        query = query.with_for_update(key_share=True)
    row = conn.execute(query).one_or_none()
    if row is None:
        raise NotFound(f"no tenant {tenant_id!r}")
    return _quotas_of(row)


def get_tenant_quotas(engine: Engine, tenant_id: str) -> TenantQuotas:
    with engine.connect() as conn:
        return _read_quotas(conn, tenant_id)


_MAX_COUNT = 2**63 - 1  # BIGINT
_MAX_BUDGET = Decimal(10) ** 12  # NUMERIC(18, 6)


def set_tenant_quotas(
    engine: Engine,
    tenant_id: str,
    *,
    max_queued_requests: int | None = _UNSET,
    max_queued_tokens: int | None = _UNSET,
    daily_budget_usd: Decimal | str | None = _UNSET,
    max_stored_bytes: int | None = _UNSET,
) -> TenantQuotas:
    """Set the quotas given (None clears one: no limit, or for ``max_stored_bytes`` the service's
    default; one not given is kept); returns them all. Raises ``NotFound`` for an unknown tenant,
    ``ValueError`` for a negative quota."""
    values: dict[str, Any] = {}
    counts = (
        ("max_queued_requests", max_queued_requests),
        ("max_queued_tokens", max_queued_tokens),
        ("max_stored_bytes", max_stored_bytes),
    )
    for name, value in counts:
        if value is _UNSET:
            continue
        if value is not None and (not isinstance(value, int) or not 0 <= value <= _MAX_COUNT):
            raise InvalidArgument(
                f"{name} must be a whole number from 0 to {_MAX_COUNT} or None, not {value!r}", name
            )
        values[name] = value
    if daily_budget_usd is not _UNSET:
        budget = None if daily_budget_usd is None else Decimal(daily_budget_usd)
        if budget is not None and (not budget.is_finite() or not 0 <= budget < _MAX_BUDGET):
            # Bounded by the column (NUMERIC(18, 6)): past it the database would refuse the row.
            raise InvalidArgument(
                f"daily_budget_usd must be an amount from 0 to under {_MAX_BUDGET} or None, not {budget}",
                "daily_budget_usd",
            )
        values["daily_budget_usd"] = budget
    with write_transaction(engine) as conn:
        if values:
            updated = conn.execute(sa.update(Tenant).where(Tenant.id == tenant_id).values(**values))
            if updated.rowcount == 0:
                raise NotFound(f"no tenant {tenant_id!r}")
        return _read_quotas(conn, tenant_id)


def _queued(conn: Connection, tenant_id: str, exclude_batch_id: str | None) -> tuple[int, int]:
    """(requests, estimated prompt tokens) not yet ended, from the open batches' counters."""
    open_requests = Batch.total_count - Batch.completed_count - Batch.failed_count - Batch.cancelled_count
    open_tokens = sa.case(
        (Batch.total_count > 0, Batch.prompt_tokens_estimate * open_requests / Batch.total_count), else_=0
    )
    query = sa.select(
        sa.func.coalesce(sa.func.sum(open_requests), 0), sa.func.coalesce(sa.func.sum(open_tokens), 0)
    ).where(Batch.tenant_id == tenant_id, Batch.status.in_(OPEN_BATCH_STATUSES))
    if exclude_batch_id is not None:
        query = query.where(Batch.id != exclude_batch_id)
    requests, tokens = conn.execute(query).one()
    return int(requests), int(tokens)


def _spent_on(conn: Connection, tenant_id: str, day: int) -> Decimal:
    """The exact cost billed to the tenant on UTC ``day`` (results and discarded answers)."""
    spent = conn.execute(
        sa.select(TenantDailySpend.cost_usd).where(
            TenantDailySpend.tenant_id == tenant_id, TenantDailySpend.day == day
        )
    ).scalar_one_or_none()
    return Decimal(spent or 0)


def add_daily_spend(conn: Connection, costs: Iterable[tuple[str, int, Decimal | None]]) -> None:
    """Add ``(tenant_id, created_at, cost_usd)`` of results and discarded answers just written to
    their tenants' days, in the caller's transaction (the rows and their spend commit together).
    Rows are touched in (tenant, day) order, so concurrent writers lock them in the same order."""
    totals: dict[tuple[str, int], Decimal] = {}
    for tenant_id, created_at, cost in costs:
        if cost:
            key = (tenant_id, created_at // _SECONDS_PER_DAY)
            totals[key] = totals.get(key, Decimal(0)) + Decimal(cost)
    if not totals:
        return
    insert = dialect_insert(conn, TenantDailySpend)
    conn.execute(
        insert.on_conflict_do_update(
            index_elements=[TenantDailySpend.tenant_id, TenantDailySpend.day],
            set_={"cost_usd": TenantDailySpend.cost_usd + insert.excluded.cost_usd},
        ),
        [
            {"tenant_id": tenant_id, "day": day, "cost_usd": cost}
            for (tenant_id, day), cost in sorted(totals.items())
        ],
    )


def _check(
    conn: Connection,
    tenant_id: str,
    quotas: TenantQuotas,
    *,
    new_requests: int,
    new_tokens: int,
    exclude_batch_id: str | None,
    now: int,
) -> None:
    if quotas.max_queued_requests is not None or quotas.max_queued_tokens is not None:
        requests, tokens = _queued(conn, tenant_id, exclude_batch_id)
        limit = quotas.max_queued_requests
        if limit is not None and requests + new_requests > limit:
            raise QuotaExceeded(
                f"this would make {requests + new_requests} requests queued or running, over your quota of "
                f"{limit} ({requests} are now); create it once some have ended, or ask your operator",
                code=QUEUED_REQUESTS_QUOTA_EXCEEDED,
            )
        limit = quotas.max_queued_tokens
        if limit is not None and tokens + new_tokens > limit:
            raise QuotaExceeded(
                f"this would make about {tokens + new_tokens} prompt tokens queued or running, over your "
                f"quota of {limit} ({tokens} are now, {new_tokens} in this create)",
                code=QUEUED_TOKENS_QUOTA_EXCEEDED,
            )
    budget = quotas.daily_budget_usd
    if budget is not None:
        spent = _spent_on(conn, tenant_id, now // _SECONDS_PER_DAY)
        if spent >= budget:
            raise QuotaExceeded(
                f"your daily budget of {budget} USD is spent ({spent} USD since 00:00 UTC); new work is "
                "accepted again after midnight UTC or once your operator raises it",
                code=DAILY_BUDGET_EXCEEDED,
            )


def enforce_tenant_quotas(
    conn: Connection,
    tenant_id: str,
    *,
    new_requests: int,
    new_tokens: int,
    exclude_batch_id: str | None = None,
    now: int | None = None,
) -> None:
    """Raise ``QuotaExceeded`` if ``new_requests`` more requests of ``new_tokens`` estimated
    prompt tokens would take the tenant over a quota. Call it inside the transaction that queues
    them, after their rows are written (their batch, ``exclude_batch_id``, is not counted yet):
    with a quota set it locks the tenant's row until that transaction ends, so that concurrent
    creates cannot both pass a quota only one fits."""
    quotas = _read_quotas(conn, tenant_id)
    if not quotas.any:
        return
    quotas = _read_quotas(conn, tenant_id, lock=True)  # as of now that it is locked
    _check(
        conn,
        tenant_id,
        quotas,
        new_requests=new_requests,
        new_tokens=new_tokens,
        exclude_batch_id=exclude_batch_id,
        now=now if now is not None else now_seconds(),
    )


def check_tenant_quotas(
    engine: Engine, tenant_id: str, *, new_requests: int = 0, new_tokens: int = 0
) -> None:
    """The same check without a lock, before any work (reading a file, say) is done: a create that
    cannot fit is refused at once. Not a guarantee: :func:`enforce_tenant_quotas` is."""
    with engine.connect() as conn:
        quotas = _read_quotas(conn, tenant_id)
        if not quotas.any:
            return
        _check(
            conn,
            tenant_id,
            quotas,
            new_requests=new_requests,
            new_tokens=new_tokens,
            exclude_batch_id=None,
            now=now_seconds(),
        )


def quota_status(
    engine: Engine, tenant_id: str, now: int | None = None, *, default_max_stored_bytes: int | None = None
) -> QuotaStatus:
    """The tenant's quotas and what they hold now (``/v1/usage``, ``tokenmill tenants show``);
    ``default_max_stored_bytes``: the service's cap for a tenant with none of its own."""
    now = now if now is not None else now_seconds()
    with engine.connect() as conn:
        quotas = _read_quotas(conn, tenant_id)
        requests, tokens = _queued(conn, tenant_id, None)
        spent = _spent_on(conn, tenant_id, now // _SECONDS_PER_DAY)
        stored = _stored(conn, tenant_id)
    return QuotaStatus(quotas, requests, tokens, spent, stored.stored, default_max_stored_bytes)


@dataclass(frozen=True, slots=True)
class StoredBytes:
    """The bytes a tenant's uploads hold now and the cap that applies (None: no cap)."""

    stored: int
    limit: int | None

    @property
    def left(self) -> int | None:
        return None if self.limit is None else max(0, self.limit - self.stored)


def _stored(
    conn: Connection, tenant_id: str, default_max_stored_bytes: int | None = None, *, lock: bool = False
) -> StoredBytes:
    query = sa.select(Tenant.stored_file_bytes, Tenant.max_stored_bytes).where(Tenant.id == tenant_id)
    if lock:
        query = query.with_for_update(key_share=True)  # as _read_quotas: inserting a file does not wait
    row = conn.execute(query).one_or_none()
    if row is None:
        raise NotFound(f"no tenant {tenant_id!r}")
    own = row.max_stored_bytes
    return StoredBytes(int(row.stored_file_bytes), own if own is not None else default_max_stored_bytes)


def stored_bytes(engine: Engine, tenant_id: str, default_max_stored_bytes: int | None) -> StoredBytes:
    """What the tenant's uploads hold and its cap, unlocked: an upload that cannot fit is refused
    before its body is read, and one is cut where it passes what was left. Not a guarantee:
    :func:`reserve_stored_bytes` is."""
    with engine.connect() as conn:
        return _stored(conn, tenant_id, default_max_stored_bytes)


def stored_bytes_exceeded(room: StoredBytes, size: int | None = None) -> QuotaExceeded:
    """The refusal of an upload of ``size`` bytes (None: not known, it passed what was left)."""
    what = "another file" if size is None else f"this file ({size} bytes)"
    if size is None and room.left:
        what = f"this file (over the {room.left} bytes left)"
    return QuotaExceeded(
        f"your uploaded files may hold at most {room.limit} bytes (your storage limit) and hold "
        f"{room.stored} now: no room for {what}; "
        "delete files you no longer need (DELETE /v1/files/{file_id}) or ask your operator to raise "
        "the limit",
        code=FILE_STORAGE_QUOTA_EXCEEDED,
    )


def reserve_stored_bytes(
    conn: Connection, tenant_id: str, size: int, default_max_stored_bytes: int | None
) -> None:
    """Count an upload of ``size`` bytes in the tenant's stored bytes, in the transaction that adds
    its row; raise ``QuotaExceeded`` (code ``file_storage_quota_exceeded``) if it would take them
    over the cap. The tenant's row stays locked until that transaction ends, so that concurrent
    uploads check one after the other and together never pass the cap."""
    room = _stored(conn, tenant_id, default_max_stored_bytes, lock=True)
    if room.limit is not None and room.stored + size > room.limit:
        raise stored_bytes_exceeded(room, size)
    conn.execute(
        sa.update(Tenant)
        .where(Tenant.id == tenant_id)
        .values(stored_file_bytes=Tenant.stored_file_bytes + size)
    )


def release_stored_bytes(conn: Connection, tenant_id: str, size: int) -> None:
    """Take a deleted upload's ``size`` bytes off the tenant's, in the transaction deleting it."""
    conn.execute(
        sa.update(Tenant)
        .where(Tenant.id == tenant_id)
        .values(stored_file_bytes=Tenant.stored_file_bytes - size)
    )
