"""Single calls (``POST /v1/chat/completions``) in the ledger: one row each, written lean.

A single call is a request like any batch line (leases, the sweeper, results, usage and cost are
the same), under a batch of its own that exists only because every request has one: ``hidden``
(never listed, never retrievable through the Batch API) and never given output or error files.
Both rows are written in one transaction of two inserts, not through a batch ingest ("ledger
first": this commit comes before any message names the request).

The row names its dispatch (``dispatch_id``) at once: the interactive lane's marker in the broker
says whether a message for it is still in flight (``workers.lane_transport``), so the sweeper
sends it again only when that marker is gone.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from store.engine import (
    autocommit_connection,
    flush_with_next_durable_commit,
    is_postgresql,
    write_transaction,
)
from store.errors import InvalidArgument
from store.ids import new_id, now_seconds
from store.quotas import enforce_tenant_quotas, estimate_prompt_tokens
from store.request_kinds import REQUEST_KINDS, BadLine
from store.tables import Batch, BatchStatus, Request, RequestStatus, Result, Tenant

__all__ = [
    "INTERACTIVE_PRIORITY",
    "InteractiveOutcome",
    "InteractiveRequest",
    "interactive_outcome",
    "lease_lapsed",
    "submit_interactive",
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
    request_id = request_id or new_id("batch_req_")
    batch_row = {
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
    request_row = {
        "id": request_id,
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
    with write_transaction(engine) as conn:
        # Committed for every session to see before any message names it ("ledger first"), but
        # not waited onto the disk: the caller hears of the call only through a durable commit
        # after this one (its result's; a streamed call's claim, before its first chunk), which
        # flushes this one too. A crash of PostgreSQL in between loses a call nobody was told of.
        if is_postgresql(conn):
            quotas_set = _insert_in_one_statement(conn, tenant_id, batch_row, request_row)
        else:
            flush_with_next_durable_commit(conn)
            conn.execute(sa.insert(Batch), batch_row)
            conn.execute(sa.insert(Request), request_row)
            quotas_set = True  # enforce_tenant_quotas reads them
        if quotas_set:
            # Over a quota: raises QuotaExceeded and the two rows roll back (nothing queued).
            enforce_tenant_quotas(
                conn, tenant_id, new_requests=1, new_tokens=prompt_tokens, exclude_batch_id=batch_id, now=now
            )
    return InteractiveRequest(request_id, batch_id)


def _with_defaults(table: Any, row: dict[str, Any]) -> dict[str, Any]:
    """``row`` with the columns' Python-side scalar defaults filled in: an INSERT inside a WITH
    is rendered with their parameters but given no values for them."""
    filled = dict(row)
    for column in table.__table__.columns:
        default = column.default
        if column.key not in filled and default is not None and default.is_scalar:
            filled[column.key] = default.arg
    return filled


def _insert_in_one_statement(
    conn: Connection, tenant_id: str, batch_row: dict[str, Any], request_row: dict[str, Any]
) -> bool:
    """PostgreSQL: both rows, the commit told not to wait for the disk, and whether the tenant has
    a quota to enforce, in one round trip (the request row's foreign key to its batch is checked
    at the end of the statement, once both are in). A tenant with no quota takes no lock."""
    batch_row, request_row = _with_defaults(Batch, batch_row), _with_defaults(Request, request_row)
    query = _insert_statement(tuple(batch_row), tuple(request_row))
    parameters = {
        "tenant_id": tenant_id,
        **{f"batch_{name}": value for name, value in batch_row.items()},
        **{f"request_{name}": value for name, value in request_row.items()},
    }
    return bool(conn.execute(query, parameters).one().quota_set)


@functools.cache
def _insert_statement(batch_columns: tuple[str, ...], request_columns: tuple[str, ...]) -> sa.Select[Any]:
    """``_insert_in_one_statement``'s statement, its values as parameters (``batch_<column>``,
    ``request_<column>``, ``tenant_id``): built once, since building and hashing it cost more
    CPU than PostgreSQL spends running it (py-spy, bench/sync_latency.py)."""

    def parameters(table: Any, prefix: str, columns: tuple[str, ...]) -> dict[str, Any]:
        return {name: sa.bindparam(f"{prefix}{name}", type_=table.__table__.c[name].type) for name in columns}

    new_batch = sa.insert(Batch).values(parameters(Batch, "batch_", batch_columns)).returning(Batch.id)
    new_request = (
        sa.insert(Request).values(parameters(Request, "request_", request_columns)).returning(Request.id)
    )
    no_flush_wait = sa.func.set_config(
        sa.literal_column("'synchronous_commit'"), sa.literal_column("'off'"), sa.true()
    )
    quota_set = sa.or_(
        Tenant.max_queued_requests.is_not(None),
        Tenant.max_queued_tokens.is_not(None),
        Tenant.daily_budget_usd.is_not(None),
    )
    return (
        sa.select(quota_set.label("quota_set"), no_flush_wait.label("no_flush_wait"))
        .where(Tenant.id == sa.bindparam("tenant_id"))
        .add_cte(new_batch.cte("new_batch"))
        .add_cte(new_request.cte("new_request"))
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
