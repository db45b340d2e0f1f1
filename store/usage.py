"""Usage rollups by SQL aggregation over results: billed and cache-served kept apart.

Billed columns sum results that called the provider (``cached`` false); cache-hit columns sum the
tokens of answers served from the cache, which cost nothing. ``cost_usd`` sums billed costs;
``unpriced_requests`` counts billed results whose model had no price (cost NULL).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from store.tables import Result

__all__ = ["UsageGroup", "UsageRow", "usage_report"]

UsageGroup = Literal["model", "day", "batch"]
_EPOCH = dt.date(1970, 1, 1)
_SECONDS_PER_DAY = 86_400


@dataclass(frozen=True, slots=True)
class UsageRow:
    """One group's usage; a key not grouped by is None. ``day`` is the UTC day of the result."""

    tenant_id: str
    model: str | None
    day: dt.date | None
    batch_id: str | None
    requests: int
    billed_requests: int
    cache_hits: int
    billed_prompt_tokens: int
    billed_cached_prompt_tokens: int
    billed_completion_tokens: int
    billed_reasoning_tokens: int
    cost_usd: float
    unpriced_requests: int
    cache_hit_prompt_tokens: int
    cache_hit_completion_tokens: int


def usage_report(
    engine: Engine,
    tenant_id: str | None = None,
    group_by: Sequence[UsageGroup] = ("model", "day"),
    since: int | None = None,
    until: int | None = None,
    batch_id: str | None = None,
) -> list[UsageRow]:
    """Usage per tenant and per each of ``group_by``, for results created in ``[since, until)``
    (unix seconds), optionally of one tenant or one batch; ordered by its keys."""
    unknown = set(group_by) - {"model", "day", "batch"}
    if unknown:
        raise ValueError(f"cannot group usage by {sorted(unknown)}")
    billed = sa.not_(Result.cached)

    def billed_sum(column: sa.ColumnElement[Any]) -> sa.ColumnElement[Any]:
        return sa.func.coalesce(sa.func.sum(sa.case((billed, column), else_=0)), 0)

    def cached_sum(column: sa.ColumnElement[Any]) -> sa.ColumnElement[Any]:
        return sa.func.coalesce(sa.func.sum(sa.case((Result.cached, column), else_=0)), 0)

    keys: list[sa.ColumnElement[Any]] = [Result.tenant_id.expression]
    if "model" in group_by:
        keys.append(Result.model.label("model"))
    if "day" in group_by:
        keys.append((Result.created_at // _SECONDS_PER_DAY).label("day"))
    if "batch" in group_by:
        keys.append(Result.batch_id.label("batch_id"))
    query = sa.select(
        *keys,
        sa.func.count().label("requests"),
        billed_sum(sa.literal(1)).label("billed_requests"),
        cached_sum(sa.literal(1)).label("cache_hits"),
        billed_sum(Result.prompt_tokens.expression).label("billed_prompt_tokens"),
        billed_sum(Result.cached_prompt_tokens.expression).label("billed_cached_prompt_tokens"),
        billed_sum(Result.completion_tokens.expression).label("billed_completion_tokens"),
        billed_sum(Result.reasoning_tokens.expression).label("billed_reasoning_tokens"),
        sa.func.coalesce(sa.func.sum(sa.case((billed, Result.cost_usd), else_=0.0)), 0.0).label("cost_usd"),
        billed_sum(sa.case((Result.cost_usd.is_(None), 1), else_=0)).label("unpriced_requests"),
        cached_sum(Result.prompt_tokens.expression).label("cache_hit_prompt_tokens"),
        cached_sum(Result.completion_tokens.expression).label("cache_hit_completion_tokens"),
    )
    if tenant_id is not None:
        query = query.where(Result.tenant_id == tenant_id)
    if batch_id is not None:
        query = query.where(Result.batch_id == batch_id)
    if since is not None:
        query = query.where(Result.created_at >= since)
    if until is not None:
        query = query.where(Result.created_at < until)
    query = query.group_by(*keys).order_by(*keys)
    with engine.connect() as conn:
        rows = conn.execute(query).mappings().all()
    return [
        UsageRow(
            tenant_id=row["tenant_id"],
            model=row.get("model"),
            day=_EPOCH + dt.timedelta(days=int(row["day"])) if "day" in row else None,
            batch_id=row.get("batch_id"),
            requests=int(row["requests"]),
            billed_requests=int(row["billed_requests"]),
            cache_hits=int(row["cache_hits"]),
            billed_prompt_tokens=int(row["billed_prompt_tokens"]),
            billed_cached_prompt_tokens=int(row["billed_cached_prompt_tokens"]),
            billed_completion_tokens=int(row["billed_completion_tokens"]),
            billed_reasoning_tokens=int(row["billed_reasoning_tokens"]),
            cost_usd=float(row["cost_usd"]),
            unpriced_requests=int(row["unpriced_requests"]),
            cache_hit_prompt_tokens=int(row["cache_hit_prompt_tokens"]),
            cache_hit_completion_tokens=int(row["cache_hit_completion_tokens"]),
        )
        for row in rows
    ]
