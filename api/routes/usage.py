"""``GET /v1/usage``: tokens and cost per model / day / batch, billed and cache hits kept apart."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query

import store
from api.deps import ID_PATTERN, EngineDep, SettingsDep, TenantDep
from api.errors import InvalidRequest
from store.input_checks import quote_input

__all__ = ["quotas_object", "router", "usage_row"]

router = APIRouter(tags=["usage"])
# 9999-12-31T23:59:59Z: later instants are no date, and overflow the ledger's BIGINT columns.
LATEST_SECONDS = 253_402_300_799
Grouping = Literal["model", "day", "batch"]
# Rows one answer may hold (a few MB). Every single call is a batch in the ledger: grouped by
# batch, a busy tenant's report had a row per call ever made (300,000 calls: 90 MB, 11 s of the
# API's Python, 518 MB).
MAX_USAGE_ROWS = 10_000


def usage_row(row: store.UsageRow) -> dict[str, Any]:
    return {
        "model": row.model,
        "day": row.day.isoformat() if row.day else None,
        "batch_id": row.batch_id,
        "requests": row.requests,
        "billed": {
            "requests": row.billed_requests,
            "prompt_tokens": row.billed_prompt_tokens,
            "cached_prompt_tokens": row.billed_cached_prompt_tokens,
            "completion_tokens": row.billed_completion_tokens,
            "reasoning_tokens": row.billed_reasoning_tokens,
            # A JSON number: the float of the exact decimal prints as that decimal (0.0001098).
            "cost_usd": float(row.cost_usd),
            "unpriced_requests": row.unpriced_requests,
            # Paid answers that no result kept (a second delivery's): in the sums above, not in requests.
            "discarded_answers": row.discarded_answers,
        },
        "cache_hits": {
            "requests": row.cache_hits,
            "prompt_tokens": row.cache_hit_prompt_tokens,
            "completion_tokens": row.cache_hit_completion_tokens,
        },
    }


def quotas_object(status: store.QuotaStatus) -> dict[str, Any]:
    """The tenant's quotas (null: none set), what they hold now and what is left of each."""
    quotas = status.quotas

    def money(amount: Any) -> float | None:
        return None if amount is None else float(amount)  # prints as the exact decimal

    return {
        "max_queued_requests": quotas.max_queued_requests,
        "queued_requests": status.queued_requests,
        "remaining_queued_requests": status.remaining_requests,
        "max_queued_tokens": quotas.max_queued_tokens,
        "queued_tokens": status.queued_tokens,
        "remaining_queued_tokens": status.remaining_tokens,
        "daily_budget_usd": money(quotas.daily_budget_usd),
        "spent_today_usd": money(status.spent_today_usd),
        "remaining_budget_usd": money(status.remaining_budget_usd),
        # Uploaded files' bytes (batch output and error files do not count); the limit that
        # applies: the tenant's own, else the service's default.
        "max_stored_bytes": status.max_stored_bytes,
        "stored_bytes": status.stored_bytes,
        "remaining_stored_bytes": status.remaining_stored_bytes,
    }


@router.get("/v1/usage")
def usage(
    tenant: TenantDep,
    engine: EngineDep,
    settings: SettingsDep,
    group_by: str = Query(
        "model,day", description="comma-separated: model, day, batch (or empty for totals)"
    ),
    since: int | None = Query(None, ge=0, le=LATEST_SECONDS, description="unix seconds, inclusive"),
    until: int | None = Query(None, ge=0, le=LATEST_SECONDS, description="unix seconds, exclusive"),
    batch_id: Annotated[str | None, Query(pattern=ID_PATTERN)] = None,
) -> dict[str, Any]:
    """Your usage. Billed figures count what was paid upstream; cache hits are served free.
    ``quotas`` (tokenmill's): your quotas, what they hold now and what is left (the daily budget
    counts from 00:00 UTC; stored bytes are your uploaded files')."""
    groups = [part.strip() for part in group_by.split(",") if part.strip()]
    unknown = [part for part in groups if part not in ("model", "day", "batch")]
    if unknown:
        raise InvalidRequest(
            f"group_by accepts model, day and batch; got {quote_input(', '.join(unknown))}", param="group_by"
        )
    try:
        rows = store.usage_report(
            engine,
            tenant_id=tenant.id,
            group_by=tuple(groups),  # type: ignore[arg-type]  # checked just above
            since=since,
            until=until,
            batch_id=batch_id,
            max_rows=MAX_USAGE_ROWS,
        )
    except store.InvalidArgument as e:
        raise InvalidRequest(str(e), param=e.param, code=e.code) from e
    status = store.quota_status(engine, tenant.id, default_max_stored_bytes=settings.default_max_stored_bytes)
    quotas = quotas_object(status)
    return {"object": "list", "data": [usage_row(row) for row in rows], "quotas": quotas}
