"""Usage rollups by SQL aggregation over results: billed and cache-served kept apart.

Billed columns sum results that called the provider (``cached`` false) and the paid answers no
result kept (``discarded_answers``: a second delivery's, one that came back after a cancel, an
agent run's answers paid before it was handed back), so that they add up to the provider's
bill; cache-hit columns sum the tokens of answers served from the cache, which cost nothing.
``cost_usd`` sums billed costs, an exact ``Decimal``;
``unpriced_requests`` counts billed results whose model had no price (cost NULL);
``discarded_answers`` counts the paid answers no result kept (not requests: ``requests`` counts
results).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from store.errors import InvalidArgument
from store.tables import DiscardedAnswer, Result

__all__ = ["USAGE_REPORT_TOO_LARGE", "UsageGroup", "UsageRow", "exact_decimal", "usage_report"]

USAGE_REPORT_TOO_LARGE = "usage_report_too_large"

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
    cost_usd: Decimal
    unpriced_requests: int
    cache_hit_prompt_tokens: int
    cache_hit_completion_tokens: int
    discarded_answers: int = 0


def exact_decimal(value: Any) -> Decimal:
    """A sum as the shortest exact decimal (``0.0001098``, not ``0.000109800000``)."""
    amount = Decimal(value)
    return amount.quantize(Decimal(1)) if amount == amount.to_integral_value() else amount.normalize()


_TOKEN_COLUMNS = ("prompt_tokens", "cached_prompt_tokens", "completion_tokens", "reasoning_tokens")


def _spend() -> sa.Subquery:
    """Every result and every discarded paid answer, in one shape (``kept`` tells them apart)."""
    results = sa.select(
        Result.tenant_id,
        Result.model,
        Result.batch_id,
        Result.created_at,
        Result.cached,
        sa.literal(True, sa.Boolean).label("kept"),
        *(getattr(Result, name) for name in _TOKEN_COLUMNS),
        Result.cost_usd,
    )
    discarded = sa.select(
        DiscardedAnswer.tenant_id,
        DiscardedAnswer.model,
        DiscardedAnswer.batch_id,
        DiscardedAnswer.created_at,
        sa.literal(False, sa.Boolean).label("cached"),
        sa.literal(False, sa.Boolean).label("kept"),
        *(getattr(DiscardedAnswer, name) for name in _TOKEN_COLUMNS),
        DiscardedAnswer.cost_usd,
    )
    return sa.union_all(results, discarded).subquery("spend")


def usage_report(
    engine: Engine,
    tenant_id: str | None = None,
    group_by: Sequence[UsageGroup] = ("model", "day"),
    since: int | None = None,
    until: int | None = None,
    batch_id: str | None = None,
    max_rows: int | None = None,
) -> list[UsageRow]:
    """Usage per tenant and per each of ``group_by``, for results created in ``[since, until)``
    (unix seconds), optionally of one tenant or one batch; ordered by its keys. With ``max_rows``,
    a report of more rows raises ``InvalidArgument`` (``usage_report_too_large``) having read
    only one row more: every single call is a batch, so ``group_by=batch`` has a row per call."""
    unknown = set(group_by) - {"model", "day", "batch"}
    if unknown:
        raise ValueError(f"cannot group usage by {sorted(unknown)}")
    spend = _spend().c
    billed = sa.not_(spend.cached)
    kept = spend.kept

    def count_of(condition: sa.ColumnElement[bool]) -> sa.ColumnElement[Any]:
        return sa.func.coalesce(sa.func.sum(sa.case((condition, 1), else_=0)), 0)

    def billed_sum(column: sa.ColumnElement[Any]) -> sa.ColumnElement[Any]:
        return sa.func.coalesce(sa.func.sum(sa.case((billed, column), else_=0)), 0)

    def cached_sum(column: sa.ColumnElement[Any]) -> sa.ColumnElement[Any]:
        return sa.func.coalesce(sa.func.sum(sa.case((spend.cached, column), else_=0)), 0)

    keys: list[sa.ColumnElement[Any]] = [spend.tenant_id]
    if "model" in group_by:
        keys.append(spend.model.label("model"))
    if "day" in group_by:
        keys.append((spend.created_at // _SECONDS_PER_DAY).label("day"))
    if "batch" in group_by:
        keys.append(spend.batch_id.label("batch_id"))
    query = sa.select(
        *keys,
        count_of(kept).label("requests"),
        count_of(sa.and_(kept, billed)).label("billed_requests"),
        count_of(spend.cached).label("cache_hits"),
        billed_sum(spend.prompt_tokens).label("billed_prompt_tokens"),
        billed_sum(spend.cached_prompt_tokens).label("billed_cached_prompt_tokens"),
        billed_sum(spend.completion_tokens).label("billed_completion_tokens"),
        billed_sum(spend.reasoning_tokens).label("billed_reasoning_tokens"),
        billed_sum(spend.cost_usd).label("cost_usd"),
        count_of(sa.and_(kept, billed, spend.cost_usd.is_(None))).label("unpriced_requests"),
        cached_sum(spend.prompt_tokens).label("cache_hit_prompt_tokens"),
        cached_sum(spend.completion_tokens).label("cache_hit_completion_tokens"),
        count_of(sa.not_(kept)).label("discarded_answers"),
    )
    if tenant_id is not None:
        query = query.where(spend.tenant_id == tenant_id)
    if batch_id is not None:
        query = query.where(spend.batch_id == batch_id)
    if since is not None:
        query = query.where(spend.created_at >= since)
    if until is not None:
        query = query.where(spend.created_at < until)
    query = query.group_by(*keys).order_by(*keys)
    if max_rows is not None:
        query = query.limit(max_rows + 1)
    with engine.connect() as conn:
        rows = conn.execute(query).mappings().all()
    if max_rows is not None and len(rows) > max_rows:
        raise InvalidArgument(
            f"the report has more than {max_rows} rows; narrow it with since and until (unix seconds), "
            "batch_id, or fewer group_by keys",
            "group_by",
            code=USAGE_REPORT_TOO_LARGE,
        )
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
            cost_usd=exact_decimal(row["cost_usd"]),
            unpriced_requests=int(row["unpriced_requests"]),
            cache_hit_prompt_tokens=int(row["cache_hit_prompt_tokens"]),
            cache_hit_completion_tokens=int(row["cache_hit_completion_tokens"]),
            discarded_answers=int(row["discarded_answers"]),
        )
        for row in rows
    ]
