"""Single calls (``POST /v1/chat/completions``) in the ledger: one row each, written lean.

A single call is a request like any batch line (leases, the sweeper, results, usage and cost are
the same), under a batch of its own that exists only because every request has one: ``hidden``
(never listed, never retrievable through the Batch API) and never given output or error files.
Both rows are written in one transaction of two inserts, not through a batch ingest ("ledger
first": this commit comes before any message names the request); through the API, in the same
statement as the key's look-up when the tenant has no quota (``submit_interactive_for_key``).

The row names its dispatch (``dispatch_id``) at once: the interactive lane's marker in the broker
says whether a message for it is still in flight (``workers.lane_transport``), so the sweeper
sends it again only when that marker is gone.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from store.clock import now_seconds
from store.driver import DriverStatement
from store.engine import (
    autocommit_connection,
    flush_with_next_durable_commit,
    is_postgresql,
    no_flush_wait_column,
    write_transaction,
)
from store.errors import InvalidArgument
from store.ids import new_id
from store.quotas import enforce_tenant_quotas, estimate_prompt_tokens
from store.request_kinds import REQUEST_KINDS, BadLine
from store.results import retry_after_of
from store.tables import Batch, BatchStatus, Request, RequestStatus, Result, Tenant
from store.tenants import api_key_hash, authenticate_api_key, live_key_owner

__all__ = [
    "INTERACTIVE_PRIORITY",
    "InteractiveOutcome",
    "InteractiveRequest",
    "KeyedSubmission",
    "interactive_outcome",
    "lease_lapsed",
    "submit_interactive",
    "submit_interactive_for_key",
]

# The highest a batch may have too (the sweeper re-sends higher priorities first).
INTERACTIVE_PRIORITY = 9
# A single call's batch window: the sweeper expires what is still waiting after it.
_WINDOW_SECONDS = 24 * 3600


@dataclass(frozen=True, slots=True)
class InteractiveRequest:
    request_id: str
    batch_id: str


def submit_interactive(
    engine: Engine,
    tenant_id: str,
    body: dict[str, Any],
    *,
    endpoint: str,
    dispatch_id: str | None = None,
    metadata: Mapping[str, str] | None = None,
    request_id: str | None = None,
    now: int | None = None,
) -> InteractiveRequest:
    """Check ``body`` as ingest checks a line of ``endpoint`` (raises ``InvalidArgument`` with the
    line check's code and param) and commit it as a queued request of a hidden batch of its own,
    unless it takes the tenant over a quota (raises ``QuotaExceeded``; nothing is written).
    ``dispatch_id`` is the message that will carry it (``dispatched_at`` is now)."""
    return _commit(engine, _CallRows.of(tenant_id, body, endpoint, dispatch_id, metadata, request_id, now))


def _commit(engine: Engine, rows: _CallRows) -> InteractiveRequest:
    """``submit_interactive``'s transaction: ``rows`` written, the owner's quotas enforced."""
    tenant_id = rows.batch["tenant_id"]
    with write_transaction(engine) as conn:
        # Committed for every session to see before any message names it ("ledger first"), but
        # not waited onto the disk: the caller hears of the call only through a durable commit
        # after this one (its result's; a streamed call's claim, before its first chunk), which
        # flushes this one too. A crash of PostgreSQL in between loses a call nobody was told of.
        if is_postgresql(conn):
            quotas_set = _insert_in_one_statement(conn, tenant_id, rows.batch, rows.request)
        else:
            flush_with_next_durable_commit(conn)
            conn.execute(sa.insert(Batch), rows.batch)
            conn.execute(sa.insert(Request), rows.request)
            quotas_set = True  # enforce_tenant_quotas reads them
        if quotas_set:
            # Over a quota: raises QuotaExceeded and the two rows roll back (nothing queued).
            enforce_tenant_quotas(
                conn,
                tenant_id,
                new_requests=1,
                new_tokens=rows.prompt_tokens,
                exclude_batch_id=rows.batch["id"],
                now=rows.now,
            )
    return InteractiveRequest(rows.request["id"], rows.batch["id"])


@dataclass(frozen=True, slots=True)
class KeyedSubmission:
    """What ``submit_interactive_for_key`` did: the key's tenant (its id and lane weight) and
    the call it queued."""

    tenant_id: str
    weight: float
    submitted: InteractiveRequest


def submit_interactive_for_key(
    engine: Engine,
    key: str,
    body: dict[str, Any],
    *,
    endpoint: str,
    dispatch_id: str | None = None,
    metadata: Mapping[str, str] | None = None,
    request_id: str | None = None,
) -> KeyedSubmission | None:
    """The owner of API key ``key`` and ``submit_interactive`` for it; None, having written
    nothing, when the key is unknown or revoked (whatever the body: a bad key hears so before
    anything about its body). Raises as ``submit_interactive`` does.

    On PostgreSQL, for a tenant with no quota (most), the key's look-up and both rows are one
    statement that is its own transaction: one round trip where a look-up, then BEGIN, the rows
    and COMMIT were four. A tenant with a quota finds its rows left out by that statement and goes
    through ``submit_interactive`` (its quotas are checked under the tenant's lock there); a quota
    set while the statement runs applies from the next call, as if this one came first."""
    try:
        rows = _CallRows.of(_OWNER, body, endpoint, dispatch_id, metadata, request_id, None)
    except InvalidArgument:
        if authenticate_api_key(engine, key) is None:
            return None
        raise
    if not is_postgresql(engine):
        tenant = authenticate_api_key(engine, key)
        if tenant is None:
            return None
        return KeyedSubmission(tenant.id, tenant.weight, _commit(engine, rows.owned_by(tenant.id)))
    batch_row, request_row = _with_defaults(Batch, rows.batch), _with_defaults(Request, rows.request)
    # Both rows' tenant_id is the owner the statement finds.
    parameters = {"key_hash": api_key_hash(key), **_row_parameters(batch_row, request_row, skip="tenant_id")}
    found = _keyed_insert_statement(tuple(batch_row), tuple(request_row)).run(engine, parameters)
    owner = found[0] if found else None
    if owner is None:
        return None
    if owner.quota_set:  # nothing written: the quotas' way
        submitted = _commit(engine, rows.owned_by(owner.tenant_id))
    else:
        submitted = InteractiveRequest(rows.request["id"], rows.batch["id"])
    return KeyedSubmission(owner.tenant_id, float(owner.weight), submitted)


# The tenant id of rows whose owner the statement itself finds (``_keyed_insert_statement``).
_OWNER = ""


@dataclass(frozen=True, slots=True)
class _CallRows:
    """A single call's two rows (its hidden batch's and its request's), as inserted."""

    batch: dict[str, Any]
    request: dict[str, Any]
    prompt_tokens: int
    now: int

    @classmethod
    def of(
        cls,
        tenant_id: str,
        body: dict[str, Any],
        endpoint: str,
        dispatch_id: str | None,
        metadata: Mapping[str, str] | None,
        request_id: str | None,
        now: int | None,
    ) -> _CallRows:
        """Raises ``InvalidArgument`` for a body ingest would refuse as a line of ``endpoint``."""
        kind_spec = REQUEST_KINDS.get(endpoint)
        if kind_spec is None:
            raise InvalidArgument(f"unknown endpoint {endpoint!r}", "endpoint")
        try:
            kind_spec.check_body(body, "")
        except BadLine as e:
            raise InvalidArgument(str(e), e.param, code=e.code) from e
        now = now if now is not None else now_seconds()
        # Encoded as ingest encodes a batch line's body, so both lanes count a quota alike.
        prompt_tokens = estimate_prompt_tokens(json.dumps(body, separators=(",", ":"), ensure_ascii=False))
        batch_id = new_id("batch_")
        batch = {
            "id": batch_id,
            "tenant_id": tenant_id,
            "endpoint": endpoint,
            "kind": kind_spec.kind,
            "completion_window": "24h",
            "status": BatchStatus.IN_PROGRESS,
            "metadata": dict(metadata) if metadata else None,
            "priority": INTERACTIVE_PRIORITY,
            "hidden": True,
            "total_count": 1,
            "prompt_tokens_estimate": prompt_tokens,
            "completed_count": 0,
            "failed_count": 0,
            "cancelled_count": 0,
            "created_at": now,
            "in_progress_at": now,
            "expires_at": now + _WINDOW_SECONDS,
        }
        request = {
            "id": request_id or new_id("batch_req_"),
            "batch_id": batch_id,
            "tenant_id": tenant_id,
            "custom_id": "request",
            "line_number": 1,
            "kind": kind_spec.kind,
            "body": body,
            "status": RequestStatus.QUEUED,
            "priority": INTERACTIVE_PRIORITY,
            "attempts": 0,
            "dispatch_id": dispatch_id,
            "dispatched_at": now if dispatch_id is not None else None,
            "created_at": now,
        }
        return cls(batch, request, prompt_tokens, now)

    def owned_by(self, tenant_id: str) -> _CallRows:
        """These rows, their owner ``tenant_id``."""
        batch, request = {**self.batch, "tenant_id": tenant_id}, {**self.request, "tenant_id": tenant_id}
        return dataclasses.replace(self, batch=batch, request=request)


def _with_defaults(table: Any, row: dict[str, Any]) -> dict[str, Any]:
    """``row`` with the columns' Python-side scalar defaults filled in: an INSERT inside a WITH
    is rendered with their parameters but given no values for them."""
    return {**_scalar_defaults(table), **row}


@functools.cache
def _scalar_defaults(table: Any) -> dict[str, Any]:
    """``table``'s columns' Python-side scalar defaults, by column key (read once: every single
    call's rows are filled with them)."""
    return {
        column.key: column.default.arg
        for column in table.__table__.columns
        if column.default is not None and column.default.is_scalar
    }


def _insert_in_one_statement(
    conn: Connection, tenant_id: str, batch_row: dict[str, Any], request_row: dict[str, Any]
) -> bool:
    """PostgreSQL: both rows, the commit told not to wait for the disk, and whether the tenant has
    a quota to enforce, in one round trip (the request row's foreign key to its batch is checked
    at the end of the statement, once both are in). A tenant with no quota takes no lock."""
    batch_row, request_row = _with_defaults(Batch, batch_row), _with_defaults(Request, request_row)
    query = _insert_statement(tuple(batch_row), tuple(request_row))
    parameters = {"tenant_id": tenant_id, **_row_parameters(batch_row, request_row)}
    return bool(conn.execute(query, parameters).one().quota_set)


def _row_parameters(
    batch_row: dict[str, Any], request_row: dict[str, Any], skip: str | None = None
) -> dict[str, Any]:
    """The rows' values as the one-statement inserts name them (``batch_<column>``,
    ``request_<column>``; ``_typed_parameters``), but column ``skip``."""
    return {
        **{f"batch_{name}": value for name, value in batch_row.items() if name != skip},
        **{f"request_{name}": value for name, value in request_row.items() if name != skip},
    }


@functools.cache
def _insert_statement(batch_columns: tuple[str, ...], request_columns: tuple[str, ...]) -> sa.Select[Any]:
    """``_insert_in_one_statement``'s statement, its values as parameters (``batch_<column>``,
    ``request_<column>``, ``tenant_id``): built once, since building and hashing it cost more
    CPU than PostgreSQL spends running it (py-spy, bench/sync_latency.py)."""

    new_batch = sa.insert(Batch).values(_typed_parameters(Batch, "batch_", batch_columns)).returning(Batch.id)
    new_request = (
        sa.insert(Request)
        .values(_typed_parameters(Request, "request_", request_columns))
        .returning(Request.id)
    )
    quota_set, no_flush_wait = _quota_set(), no_flush_wait_column()
    return (
        sa.select(quota_set.label("quota_set"), no_flush_wait.label("no_flush_wait"))
        .where(Tenant.id == sa.bindparam("tenant_id"))
        .add_cte(new_batch.cte("new_batch"))
        .add_cte(new_request.cte("new_request"))
    )


def _typed_parameters(table: Any, prefix: str, columns: tuple[str, ...]) -> dict[str, Any]:
    return {name: sa.bindparam(f"{prefix}{name}", type_=table.__table__.c[name].type) for name in columns}


def _quota_set() -> sa.ColumnElement[bool]:
    return sa.or_(
        Tenant.max_queued_requests.is_not(None),
        Tenant.max_queued_tokens.is_not(None),
        Tenant.daily_budget_usd.is_not(None),
    )


@functools.cache
def _keyed_insert_statement(
    batch_columns: tuple[str, ...], request_columns: tuple[str, ...]
) -> DriverStatement:
    """``submit_interactive_for_key``'s statement: the live key's owner (parameter ``key_hash``)
    with its weight and whether it has a quota, both rows inserted for it when it has none
    (``batch_<column>``, ``request_<column>``; their ``tenant_id`` is the owner's), the commit
    told not to wait for the disk (as ``_insert_in_one_statement``'s). No owner: no row."""
    owner = live_key_owner(Tenant.id.label("tenant_id"), Tenant.weight, _quota_set().label("quota_set")).cte(
        "owner"
    )

    def for_owner(table: Any, prefix: str, columns: tuple[str, ...]) -> Any:
        values = _typed_parameters(table, prefix, columns)
        values["tenant_id"] = owner.c.tenant_id
        chosen = sa.select(*(values[name] for name in columns)).where(sa.not_(owner.c.quota_set))
        return sa.insert(table).from_select(list(columns), chosen).returning(table.id)

    return DriverStatement(
        sa.select(
            owner.c.tenant_id,
            owner.c.weight,
            owner.c.quota_set,
            no_flush_wait_column().label("no_flush_wait"),
        )
        .add_cte(for_owner(Batch, "batch_", batch_columns).cte("new_batch"))
        .add_cte(for_owner(Request, "request_", request_columns).cte("new_request"))
    )


@dataclass(frozen=True, slots=True)
class InteractiveOutcome:
    """How a single call ended, as the ledger says: its result row, or ``cancelled``."""

    request_id: str
    status: RequestStatus
    status_code: int | None
    body: dict[str, Any] | None
    error_code: str | None
    error_message: str | None
    cached: bool

    @property
    def retry_after(self) -> float | None:
        """A failed call's provider's Retry-After, in seconds (``store.results.with_retry_after``)."""
        return retry_after_of(self.body)

    @property
    def error_param(self) -> str | None:
        """The request's field a failed call's provider named (its error body's ``param``)."""
        error = self.body.get("error") if isinstance(self.body, Mapping) else None
        param = error.get("param") if isinstance(error, Mapping) else None
        return param if isinstance(param, str) else None

    def to_json(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "status": self.status.value,
            "status_code": self.status_code,
            "body": self.body,
            "error_code": self.error_code,
            "error_message": self.error_message,
            "cached": self.cached,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> InteractiveOutcome:
        return cls(
            request_id=str(data["request_id"]),
            status=RequestStatus(data["status"]),
            status_code=data.get("status_code"),
            body=data.get("body"),
            error_code=data.get("error_code"),
            error_message=data.get("error_message"),
            cached=bool(data.get("cached")),
        )


def interactive_outcome(engine: Engine, request_id: str) -> InteractiveOutcome | None:
    """The request's end from the ledger (its result, or its cancel); None while it runs."""
    query = (
        sa.select(
            Request.status.label("request_status"),
            Request.last_error,
            Result.status,
            Result.status_code,
            Result.response_body,
            Result.error_code,
            Result.error_message,
            Result.cached,
        )
        .outerjoin(Result, Result.request_id == Request.id)
        .where(Request.id == request_id)
    )
    with autocommit_connection(engine) as conn:  # one statement; no rollback (store.batch_statuses)
        row = conn.execute(query).first()
    if row is None:
        return None
    if row.status is not None:
        return InteractiveOutcome(
            request_id,
            RequestStatus(row.status),
            row.status_code,
            row.response_body,
            row.error_code,
            row.error_message,
            bool(row.cached),
        )
    if RequestStatus(row.request_status) == RequestStatus.CANCELLED:
        message = row.last_error or "the request was cancelled"
        return InteractiveOutcome(
            request_id, RequestStatus.CANCELLED, None, None, "cancelled", message, False
        )
    return None


def lease_lapsed(engine: Engine, request_id: str, now: int | None = None) -> bool:
    """Whether the request is running under a lease its worker stopped renewing (it died)."""
    now = now if now is not None else now_seconds()
    query = sa.select(Request.id).where(
        Request.id == request_id, Request.status == RequestStatus.RUNNING, Request.lease_expires_at < now
    )
    with autocommit_connection(engine) as conn:
        return conn.execute(query).first() is not None
