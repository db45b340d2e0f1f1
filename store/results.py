"""Recording results: first writer wins, and usage and cost are counted once.

``record_results`` inserts many results in one transaction with ``INSERT .. ON CONFLICT DO
NOTHING .. RETURNING`` (both dialects); only rows actually inserted move their request to its end
status and the batch counters, so a duplicate delivery (at-least-once Celery on Redis) is a no-op.
Batches whose last request ended are finalized in the same transaction.

Cost: a cache hit costs 0; otherwise tokens times the price of the model that answered (see
``store.prices.price_for``), an exact decimal. A model with no price gets cost NULL; its tokens
still count.

Spend is never dropped with a result: a record that went upstream and is not kept (its request
already has a result from another delivery's answer, or was cancelled meanwhile) becomes a
``discarded_answers`` row with its tokens and cost, which usage counts as billed. It is told apart
by the provider's id of the answer (``upstream_request_id``): a duplicate carrying the very answer
already recorded (a redo that found its own earlier answer in the cache, a record written twice)
was paid once, and is not counted again; nor is one without an id, which cannot be told apart.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import sqlite
from sqlalchemy.engine import Connection, Engine

from models.types import RequestUsage
from store.batch_lifecycle import all_finished, finalize_batches
from store.clock import now_seconds
from store.driver import DriverStatement
from store.engine import dialect_insert, is_postgresql, write_transaction
from store.prices import cost_usd, price_for
from store.quotas import add_daily_spend
from store.tables import Batch, DiscardedAnswer, ModelPrice, Request, RequestStatus, Result

__all__ = [
    "RETRY_AFTER_MS",
    "UNIDENTIFIED_ANSWER_PREFIX",
    "UNRECORDABLE",
    "UPSTREAM_AUTHENTICATION_FAILED",
    "UPSTREAM_AUTHENTICATION_STATUSES",
    "PaidAnswer",
    "RecordOutcome",
    "ResultRecord",
    "record_cancelled_spend",
    "record_handed_back_spend",
    "record_results",
    "record_single_call_result",
    "retry_after_of",
    "with_retry_after",
]

_ENDED = (RequestStatus.SUCCEEDED, RequestStatus.FAILED)
# Starts the key a discarded answer that came without a provider id is stored under (never a
# provider's id, so reports can tell the two apart).
UNIDENTIFIED_ANSWER_PREFIX = "tokenmill-unidentified-"
_SECONDS_PER_DAY = 86_400  # tenant_daily_spend's day: store.quotas


# A result's error code when the provider refused tokenmill's own credentials (its key, its access
# to the model; these statuses): the operator's to fix, never the tenant's key. The provider's own
# code (``invalid_api_key``) would read as "your key is invalid", in a batch's error file as in a
# single call's answer (a 502 naming the provider).
UPSTREAM_AUTHENTICATION_FAILED = "upstream_authentication_failed"
UPSTREAM_AUTHENTICATION_STATUSES = (401, 403)
# A result's error code when the ledger refused the record of an answer (``workers.result_writer``):
# the answer was paid and its spend is kept, so asking again pays again.
UNRECORDABLE = "result_not_recordable"
# A failure's body keeps the wait its provider asked for (Retry-After, on a 429), in milliseconds,
# under the body's ``tokenmill`` object (as a cached answer's keeps ``cached``): a single call
# refused past its rate-limit budget tells its caller when to ask again (``api.routes.chat``).
RETRY_AFTER_MS = "retry_after_ms"


def with_retry_after(body: dict[str, Any], seconds: float | None) -> dict[str, Any]:
    """``body`` keeping ``seconds`` (the provider's Retry-After; None: it said nothing)."""
    if seconds is None:
        return body
    return {**body, "tokenmill": {**body.get("tokenmill", {}), RETRY_AFTER_MS: round(seconds * 1000)}}


def retry_after_of(body: Mapping[str, Any] | None) -> float | None:
    """The seconds ``with_retry_after`` kept in a failure's body, if any."""
    extension = body.get("tokenmill") if isinstance(body, Mapping) else None
    milliseconds = extension.get(RETRY_AFTER_MS) if isinstance(extension, Mapping) else None
    if isinstance(milliseconds, int) and not isinstance(milliseconds, bool) and milliseconds >= 0:
        return milliseconds / 1000
    return None


@dataclass(frozen=True, slots=True)
class PaidAnswer:
    """One answer a request paid the provider for (an agent run pays for several)."""

    upstream_request_id: str | None
    model: str | None
    usage: RequestUsage


@dataclass(frozen=True, slots=True)
class ResultRecord:
    """The outcome of one request, as a worker reports it.

    ``status`` is SUCCEEDED (``response_body`` is the provider's JSON, ``status_code`` 200) or
    FAILED (``error_code`` / ``error_message``; ``status_code`` and ``response_body`` when the
    provider answered with an error). ``usage`` is what the answer used; with ``cached`` it is the
    usage of the cached answer served, billed as 0. ``attempts`` counts upstream calls made.
    ``paid_answers``: for a request that paid for several answers (an agent run), each of them,
    so that a record not kept bills each answer not already billed (empty: the record itself is
    its one answer).
    """

    request_id: str
    status: RequestStatus
    response_body: dict[str, Any] | None = None
    status_code: int | None = None
    upstream_request_id: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    finish_reason: str | None = None
    model: str | None = None
    usage: RequestUsage = field(default_factory=RequestUsage)
    cached: bool = False
    latency_ms: float | None = None
    attempts: int = 1
    cache_key: str | None = None
    paid_answers: tuple[PaidAnswer, ...] = ()

    def answers_paid(self) -> tuple[PaidAnswer, ...]:
        if self.paid_answers:
            return self.paid_answers
        # A failure can carry spend too (an agent run that failed after paid model calls).
        usage = self.usage
        if self.cached or (usage.prompt_tokens <= 0 and usage.completion_tokens <= 0):
            return ()
        return (PaidAnswer(self.upstream_request_id, self.model, usage),)


@dataclass(frozen=True)
class RecordOutcome:
    """``inserted``: results written now. ``duplicates``: the request already had a result (this
    write was a no-op). ``skipped``: unknown or cancelled requests. ``finalized_batches``: batches
    this call ended. ``discarded``: requests (among duplicates and skipped) whose record was a paid
    answer, kept as a ``discarded_answers`` row. ``costs``: the cost written with each result
    inserted now (those of priced models), for whoever counts spend as it is recorded."""

    inserted: list[str]
    duplicates: list[str]
    skipped: list[str]
    finalized_batches: list[str]
    discarded: list[str] = field(default_factory=list)
    costs: dict[str, Decimal] = field(default_factory=dict)


# (column, PostgreSQL array element type) of a result row, for the unnest() insert.
_RESULT_COLUMNS: tuple[tuple[str, str], ...] = (
    ("request_id", "varchar"),
    ("batch_id", "varchar"),
    ("tenant_id", "varchar"),
    ("status", "varchar"),
    ("status_code", "integer"),
    ("response_body", "json"),
    ("upstream_request_id", "varchar"),
    ("error_code", "varchar"),
    ("error_message", "text"),
    ("finish_reason", "varchar"),
    ("model", "varchar"),
    ("prompt_tokens", "integer"),
    ("completion_tokens", "integer"),
    ("cached_prompt_tokens", "integer"),
    ("reasoning_tokens", "integer"),
    ("cached", "boolean"),
    ("cost_usd", "numeric"),
    ("latency_ms", "double precision"),
    ("attempts", "integer"),
    ("cache_key", "varchar"),
    ("created_at", "bigint"),
)
# The bodies travel as one JSON array, not as a json[] parameter: psycopg escapes every quote of
# every element of a text array with a regex callback (a JSON body is full of them), which was
# 4-6% of a worker's busy time (py-spy, bench/throughput.py). Each element keeps its text as sent
# (the json type does not normalize it; the export streams that text); a JSON null stands for a
# NULL body.
_NULLABLE_BODY = "CASE WHEN json_typeof(b.body) = 'null' THEN NULL ELSE b.body END"
_ARRAY_COLUMNS = tuple((name, kind) for name, kind in _RESULT_COLUMNS if name != "response_body")
_UNNEST_INSERT = sa.text(
    f"INSERT INTO results ({', '.join(name for name, _ in _RESULT_COLUMNS)}) "
    "SELECT "
    + ", ".join(_NULLABLE_BODY if name == "response_body" else f"u.{name}" for name, _ in _RESULT_COLUMNS)
    + f" FROM unnest({', '.join(f'CAST(:{name} AS {kind}[])' for name, kind in _ARRAY_COLUMNS)}) "
    f"WITH ORDINALITY AS u({', '.join(name for name, _ in _ARRAY_COLUMNS)}, n) "
    "JOIN json_array_elements(CAST(:response_bodies AS json)) WITH ORDINALITY AS b(body, n) USING (n) "
    "ON CONFLICT (request_id) DO NOTHING RETURNING request_id, batch_id, status"
)
_UNNEST_END_REQUESTS = sa.text(
    "UPDATE requests SET status = v.status, cache_key = v.cache_key, finished_at = :now, "
    "lease_owner = NULL, lease_expires_at = NULL "
    "FROM unnest(CAST(:ids AS varchar[]), CAST(:statuses AS varchar[]), CAST(:cache_keys AS varchar[])) "
    "AS v(id, status, cache_key) WHERE requests.id = v.id"
)


def _insert_results(conn: Connection, params: list[dict[str, Any]]) -> list[Any]:
    """Insert, skipping requests that already have a result; returns (request_id, batch_id,
    status) of the rows inserted."""
    if not params:
        return []
    if is_postgresql(conn):
        # One statement with one array per column: a multi-row VALUES of thousands of
        # parameters costs more to build and parse than the insert itself (bench/ingest.py).
        columns: dict[str, Any] = {name: [] for name, _ in _ARRAY_COLUMNS}
        for row in params:
            for name, values in columns.items():
                values.append(row[name])
        columns["status"] = [status.value for status in columns["status"]]
        bodies = (row["response_body"] for row in params)
        columns["response_bodies"] = f"[{','.join('null' if b is None else json.dumps(b) for b in bodies)}]"
        rows = conn.execute(_UNNEST_INSERT, columns).all()
        return [(row.request_id, row.batch_id, RequestStatus(row.status)) for row in rows]
    statement = (
        sqlite.insert(Result)
        .on_conflict_do_nothing(index_elements=[Result.request_id])
        .returning(Result.request_id, Result.batch_id, Result.status)
    )
    return list(conn.execute(statement, params).all())


def record_results(engine: Engine, records: Sequence[ResultRecord], now: int | None = None) -> RecordOutcome:
    """Write ``records`` (first writer wins), end their requests, count them on their batches, and
    finalize batches left with nothing to do. Safe to call again with the same records."""
    for record in records:
        if record.status not in _ENDED:
            raise ValueError(f"a result's status is succeeded or failed, not {record.status!r}")
    # One record per request (the first), in id order so concurrent callers lock rows in the same
    # order and cannot deadlock.
    unique: dict[str, ResultRecord] = {}
    for record in records:
        unique.setdefault(record.request_id, record)
    ordered = [unique[request_id] for request_id in sorted(unique)]
    if not ordered:
        return RecordOutcome([], [], [], [])
    now = now if now is not None else now_seconds()
    with write_transaction(engine) as conn:
        # Read locked (NO KEY UPDATE, as the UPDATE that ends them takes; in id order): a cancel
        # or an expiry committing between this read and that UPDATE got its cancelled request
        # overwritten with this result and counted twice on the batch. Locked so, before their
        # batches, as a cancel and an expiry lock them too (store.batches._lock_unfinished).
        owners = {
            row.id: row
            for row in conn.execute(
                sa.select(Request.id, Request.batch_id, Request.tenant_id, Request.status)
                .where(Request.id.in_(list(unique)))
                .order_by(Request.id)
                .with_for_update(key_share=True)
            )
        }
        prices = {row.model: row for row in _load_prices(conn)}
        params: list[dict[str, Any]] = []
        skipped: list[str] = []
        cancelled: list[ResultRecord] = []
        for record in ordered:
            owner = owners.get(record.request_id)
            if owner is None or owner.status == RequestStatus.CANCELLED:
                skipped.append(record.request_id)
                if owner is not None:
                    cancelled.append(record)
                continue
            params.append(_result_row(record, owner.batch_id, owner.tenant_id, prices, now))
        inserted_rows = _insert_results(conn, params)
        inserted = {request_id for request_id, _, _ in inserted_rows}
        not_kept = [(record, "cancelled") for record in cancelled] + [
            (unique[row["request_id"]], "duplicate") for row in params if row["request_id"] not in inserted
        ]
        per_batch: dict[str, _BatchTotals] = {}
        spend: list[tuple[str, int, Decimal | None]] = []
        discarded = _keep_discarded_spend(conn, not_kept, owners, prices, now, per_batch, spend)
        if inserted:
            _end_requests(conn, [unique[request_id] for request_id in sorted(inserted)], now)
            rows_by_id = {row["request_id"]: row for row in params}
            for request_id, batch_id, status in inserted_rows:
                row = rows_by_id[request_id]
                per_batch.setdefault(batch_id, _BatchTotals()).add_result(status, row)
                spend.append((row["tenant_id"], now, row["cost_usd"]))
        # The batches' rows last, as before: requests are locked before their batch.
        finished = _add_to_batches(conn, per_batch)
        # Only a batch that gained results can have just finished (a discarded answer ends nothing).
        done = sorted(finished & {batch_id for _, batch_id, _ in inserted_rows})
        finalized = finalize_batches(conn, done, now)
        # Last: the tenant's day row is held from here to the commit only (store.quotas).
        add_daily_spend(conn, spend)
    skipped_set = set(skipped)
    duplicates = [
        r.request_id for r in ordered if r.request_id not in inserted and r.request_id not in skipped_set
    ]
    costs = {
        row["request_id"]: row["cost_usd"]
        for row in params
        if row["request_id"] in inserted and row["cost_usd"] is not None
    }
    return RecordOutcome(sorted(inserted), duplicates, skipped, finalized, discarded, costs)


def record_cancelled_spend(
    engine: Engine, records: Sequence[ResultRecord], now: int | None = None
) -> list[str]:
    """Bill what cancelled requests paid for before they stopped (an agent run cancelled after
    some model calls), as ``discarded_answers`` rows; returns the request ids billed. A request
    that is not cancelled (another worker took it over) is skipped: its own result bills what it
    reuses of these answers. Safe to call again with the same records."""
    return _record_spend(engine, records, "cancelled", now)


def record_handed_back_spend(
    engine: Engine, records: Sequence[ResultRecord], now: int | None = None
) -> list[str]:
    """Bill what requests paid for before they were handed back (an agent run told "later" after
    some model calls), as ``discarded_answers`` rows, whatever happens to them next (a cancel or
    an expiry while they wait keeps no result that would). Their redo must not bill these answers
    again: workers give it another cache payer (``workers.agent_tasks``), so they are free hits.
    Returns the request ids billed; safe to call again with the same records."""
    return _record_spend(engine, records, "handed_back", now)


def _record_spend(engine: Engine, records: Sequence[ResultRecord], reason: str, now: int | None) -> list[str]:
    if not records:
        return []
    now = now if now is not None else now_seconds()
    with write_transaction(engine) as conn:
        owners = {
            row.id: row
            for row in conn.execute(
                sa.select(Request.id, Request.batch_id, Request.tenant_id, Request.status).where(
                    Request.id.in_(sorted({record.request_id for record in records}))
                )
            )
        }
        billed = [
            (record, reason)
            for record in records
            if record.request_id in owners
            and (reason != "cancelled" or owners[record.request_id].status == RequestStatus.CANCELLED)
        ]
        prices = {row.model: row for row in _load_prices(conn)}
        per_batch: dict[str, _BatchTotals] = {}
        spend: list[tuple[str, int, Decimal | None]] = []
        billed_ids = _keep_discarded_spend(conn, billed, owners, prices, now, per_batch, spend)
        _add_to_batches(conn, per_batch)
        add_daily_spend(conn, spend)
        return billed_ids


@dataclass
class _KeptResult:
    """What a request's recorded result bills: the provider's ids of its answers (its own, and for
    an agent run those its body lists under ``model_calls``), and which record it was written from
    (its attempts and latency: an answer without a provider id is known by them)."""

    answers: set[str]
    attempts: int
    latency_ms: float | None

    def is_written_from(self, record: ResultRecord) -> bool:
        return (self.attempts, self.latency_ms) == (record.attempts, record.latency_ms)


def _kept_results(conn: Connection, request_ids: Sequence[str]) -> dict[str, _KeptResult]:
    kept: dict[str, _KeptResult] = {}
    rows = conn.execute(
        sa.select(
            Result.request_id,
            Result.upstream_request_id,
            Result.response_body,
            Result.attempts,
            Result.latency_ms,
        ).where(Result.request_id.in_(sorted(set(request_ids))))
    )
    for request_id, upstream_request_id, body, attempts, latency_ms in rows:
        answers: set[str] = set()
        if upstream_request_id is not None:
            answers.add(upstream_request_id)
        calls = body.get("model_calls") if isinstance(body, dict) else None
        for call in calls if isinstance(calls, list) else ():
            answer = call.get("response_id") if isinstance(call, dict) else None
            if isinstance(answer, str):
                answers.add(answer)
        kept[request_id] = _KeptResult(answers, attempts, latency_ms)
    return kept


def _unidentified_answer_key(record: ResultRecord, index: int, answer: PaidAnswer) -> str:
    """Stands in for the provider's id of an answer that came without one, in the discarded row's
    ``upstream_request_id``: the same record written again gives the same key (so the row's unique
    key bills it once), another call's answer (another latency, attempt count or usage) another."""
    usage = answer.usage
    fingerprint = [record.attempts, record.latency_ms, index, answer.model]
    fingerprint += [
        usage.prompt_tokens,
        usage.completion_tokens,
        usage.cached_prompt_tokens,
        usage.reasoning_tokens,
    ]
    digest = hashlib.sha256(json.dumps(fingerprint).encode()).hexdigest()[:40]
    return f"{UNIDENTIFIED_ANSWER_PREFIX}{digest}"


def _keep_discarded_spend(
    conn: Connection,
    not_kept: Sequence[tuple[ResultRecord, str]],
    owners: dict[str, Any],
    prices: dict[str, ModelPrice],
    now: int,
    per_batch: dict[str, _BatchTotals],
    spend: list[tuple[str, int, Decimal | None]],
) -> list[str]:
    """Write a ``discarded_answers`` row for each answer paid by a record not kept, unless it is
    an answer its request's result already bills; returns the ids of the requests billed, adds
    what the rows written bill to ``per_batch`` and appends their (tenant, time, cost) to
    ``spend``."""
    paid = [(record, reason, record.answers_paid()) for record, reason in not_kept]
    paid = [(record, reason, answers) for record, reason, answers in paid if answers]
    if not paid:
        return []
    kept_results = _kept_results(conn, [record.request_id for record, _, _ in paid])
    rows: list[dict[str, Any]] = []
    for record, reason, answers in paid:
        kept = kept_results.get(record.request_id)
        owner = owners[record.request_id]
        for index, answer in enumerate(answers):
            answer_id = answer.upstream_request_id
            if answer_id is None:
                if kept is not None and kept.is_written_from(record):
                    continue  # the kept result's own record, written again (a flush retried)
                answer_id = _unidentified_answer_key(record, index, answer)
            elif kept is not None and answer_id in kept.answers:
                # The answer already billed on the result (a redo that found it in the cache, a
                # record written twice): counting it again would bill what was paid once.
                continue
            usage = answer.usage
            rows.append(
                {
                    "request_id": record.request_id,
                    "batch_id": owner.batch_id,
                    "tenant_id": owner.tenant_id,
                    "reason": reason,
                    "upstream_request_id": answer_id,
                    "model": answer.model,
                    "prompt_tokens": usage.prompt_tokens,
                    "completion_tokens": usage.completion_tokens,
                    "cached_prompt_tokens": usage.cached_prompt_tokens,
                    "reasoning_tokens": usage.reasoning_tokens,
                    "cost_usd": _answer_cost(answer, prices),
                    "created_at": now,
                }
            )
    if not rows:
        return []
    written = conn.execute(
        dialect_insert(conn, DiscardedAnswer)
        .on_conflict_do_nothing(index_elements=["request_id", "upstream_request_id"])
        .returning(DiscardedAnswer.request_id, DiscardedAnswer.upstream_request_id),
        rows,
    ).all()
    kept_rows = {(row["request_id"], row["upstream_request_id"]): row for row in rows}
    for request_id, answer_id in written:
        row = kept_rows[(request_id, answer_id)]
        per_batch.setdefault(row["batch_id"], _BatchTotals()).add_discarded(row)
        spend.append((row["tenant_id"], now, row["cost_usd"]))
    return sorted({request_id for request_id, _ in written})


def _add_to_batches(conn: Connection, per_batch: dict[str, _BatchTotals]) -> set[str]:
    """Raise the batches' request counts and billed counters, in id order (no deadlock between
    writers), and return those of them with every request finished: the only ones to finalize.
    One batch (a single call's, or a window from one batch) says so in its UPDATE's RETURNING;
    several take one read after, under the locks the UPDATE holds, so the counts are the latest."""
    if not per_batch:
        return set()
    increments = (
        sa.update(Batch)
        .where(Batch.id == sa.bindparam("b_id"))
        .values(
            completed_count=Batch.completed_count + sa.bindparam("b_completed"),
            failed_count=Batch.failed_count + sa.bindparam("b_failed"),
            **_BILLED_INCREMENTS,
        )
    )
    if len(per_batch) == 1:
        [(batch_id, totals)] = per_batch.items()
        statement = increments.returning(all_finished())
        return {batch_id} if conn.execute(statement, totals.parameters(batch_id)).scalar_one() else set()
    conn.execute(
        increments,
        [totals.parameters(batch_id) for batch_id, totals in sorted(per_batch.items())],
    )
    query = sa.select(Batch.id).where(Batch.id.in_(sorted(per_batch)), all_finished())
    return set(conn.execute(query).scalars())


_BILLED_COLUMNS = (
    "billed_prompt_tokens",
    "billed_cached_prompt_tokens",
    "billed_completion_tokens",
    "billed_reasoning_tokens",
    "billed_cost_usd",
    "cache_hits",
    "discarded_answer_count",
)
# The batch's billed counters, each raised by its ``b_<column>`` parameter.
_BILLED_INCREMENTS: dict[str, Any] = {
    name: getattr(Batch, name) + sa.bindparam(f"b_{name}") for name in _BILLED_COLUMNS
}


@dataclass
class _BatchTotals:
    """What rows written now add to one batch's counters, summed as ``store.usage`` sums them:
    billed tokens and cost from results not served from the cache and from discarded answers;
    cache hits counted apart."""

    completed: int = 0
    failed: int = 0
    billed: dict[str, Any] = field(default_factory=lambda: dict.fromkeys(_BILLED_COLUMNS, 0))

    def add_result(self, status: RequestStatus, row: dict[str, Any]) -> None:
        if status == RequestStatus.SUCCEEDED:
            self.completed += 1
        else:
            self.failed += 1
        if row["cached"]:
            self.billed["cache_hits"] += 1
        else:
            self._bill(row)

    def add_discarded(self, row: dict[str, Any]) -> None:
        self.billed["discarded_answer_count"] += 1
        self._bill(row)

    def _bill(self, row: dict[str, Any]) -> None:
        billed = self.billed
        for name in ("prompt_tokens", "cached_prompt_tokens", "completion_tokens", "reasoning_tokens"):
            billed[f"billed_{name}"] += row[name] or 0
        if row["cost_usd"] is not None:
            billed["billed_cost_usd"] += row["cost_usd"]

    def parameters(self, batch_id: str) -> dict[str, Any]:
        billed = {f"b_{name}": value for name, value in self.billed.items()}
        billed["b_billed_cost_usd"] = Decimal(billed["b_billed_cost_usd"])
        return {"b_id": batch_id, "b_completed": self.completed, "b_failed": self.failed, **billed}


def _answer_cost(answer: PaidAnswer, prices: dict[str, ModelPrice]) -> Decimal | None:
    usage = answer.usage
    return cost_usd(
        price_for(prices, answer.model),
        usage.prompt_tokens,
        usage.cached_prompt_tokens,
        usage.completion_tokens,
    )


def _cost_of(record: ResultRecord, prices: dict[str, ModelPrice]) -> Decimal | None:
    if record.cached:
        return Decimal(0)
    return _answer_cost(PaidAnswer(record.upstream_request_id, record.model, record.usage), prices)


def _load_prices(conn: Connection) -> list[ModelPrice]:
    rows = conn.execute(sa.select(ModelPrice.__table__)).all()
    return [
        ModelPrice(
            model=row.model,
            input_per_million=row.input_per_million,
            cached_input_per_million=row.cached_input_per_million,
            output_per_million=row.output_per_million,
            updated_at=row.updated_at,
        )
        for row in rows
    ]


def _result_row(
    record: ResultRecord, batch_id: str, tenant_id: str, prices: dict[str, ModelPrice], now: int
) -> dict[str, Any]:
    usage = record.usage
    cost = _cost_of(record, prices)
    status_code = record.status_code
    if status_code is None and record.status == RequestStatus.SUCCEEDED:
        status_code = 200
    return {
        "request_id": record.request_id,
        "batch_id": batch_id,
        "tenant_id": tenant_id,
        "status": record.status,
        "status_code": status_code,
        "response_body": record.response_body,
        "upstream_request_id": record.upstream_request_id,
        "error_code": record.error_code,
        "error_message": record.error_message,
        "finish_reason": record.finish_reason,
        "model": record.model,
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "cached_prompt_tokens": usage.cached_prompt_tokens,
        "reasoning_tokens": usage.reasoning_tokens,
        "cached": record.cached,
        "cost_usd": cost,
        "latency_ms": record.latency_ms,
        "attempts": record.attempts,
        "cache_key": record.cache_key,
        "created_at": now,
    }


def _end_requests(conn: Connection, records: Sequence[ResultRecord], now: int) -> None:
    if is_postgresql(conn):
        conn.execute(
            _UNNEST_END_REQUESTS,
            {
                "now": now,
                "ids": [r.request_id for r in records],
                "statuses": [r.status.value for r in records],
                "cache_keys": [r.cache_key for r in records],
            },
        )
        return
    conn.execute(
        sa.update(Request)
        .where(Request.id == sa.bindparam("r_id"))
        .values(
            status=sa.bindparam("r_status"),
            cache_key=sa.bindparam("r_cache_key"),
            finished_at=now,
            lease_owner=None,
            lease_expires_at=None,
        ),
        [{"r_id": r.request_id, "r_status": r.status, "r_cache_key": r.cache_key} for r in records],
    )


# A single call's result in one statement (``record_single_call_result``): its request locked
# (still not cancelled, of a hidden batch), the result inserted (first writer wins), the request
# ended, its batch's counters raised and, once all finished, the batch ended in the same UPDATE
# (a hidden batch has no files: in_progress -> completed through finalizing, cancelling ->
# cancelled, as finalize_batches moves it), the tenant's day raised by a non-zero cost. Every
# step after the insert hangs on its RETURNING: nothing inserted, nothing changed.
_BATCH_DONE = (
    "(b.completed_count + :b_completed + b.failed_count + :b_failed + b.cancelled_count >= b.total_count)"
)
_SINGLE_CALL_RESULT = sa.text(
    # The price as store.prices.price_for picks it (the exact name, else the longest priced name
    # the model starts with followed by "-"), the cost as cost_usd computes it: exact (times
    # 0.000001, where a numeric division would round), a cache hit's 0.
    "WITH price AS ("
    " SELECT input_per_million, cached_input_per_million, output_per_million FROM model_prices"
    " WHERE model = :model OR left(:model, length(model) + 1) = model || '-'"
    " ORDER BY model = :model DESC, length(model) DESC LIMIT 1"
    "), cost AS ("
    " SELECT CASE WHEN CAST(:cached AS boolean) THEN CAST(0 AS numeric) ELSE ("
    " SELECT (GREATEST(:prompt_tokens - :cached_prompt_tokens, 0) * input_per_million"
    " + :cached_prompt_tokens * cached_input_per_million + :completion_tokens * output_per_million)"
    " * 0.000001 FROM price) END AS usd"
    "), owner AS ("
    " SELECT requests.id, requests.batch_id, requests.tenant_id FROM requests"
    " JOIN batches ON batches.id = requests.batch_id"
    " WHERE requests.id = :request_id AND requests.status <> 'cancelled' AND batches.hidden"
    " FOR UPDATE OF requests"
    "), inserted AS ("
    f" INSERT INTO results ({', '.join(name for name, _ in _RESULT_COLUMNS)})"
    " SELECT "
    + ", ".join(
        "owner.id"
        if name == "request_id"
        else f"owner.{name}"
        if name in ("batch_id", "tenant_id")
        else "(SELECT usd FROM cost)"
        if name == "cost_usd"
        else f"CAST(:{name} AS {kind})"
        for name, kind in _RESULT_COLUMNS
    )
    + " FROM owner ON CONFLICT (request_id) DO NOTHING RETURNING request_id, batch_id, tenant_id, cost_usd"
    "), ended AS ("
    " UPDATE requests SET status = :status, cache_key = :cache_key, finished_at = :created_at,"
    " lease_owner = NULL, lease_expires_at = NULL"
    " FROM inserted WHERE requests.id = inserted.request_id RETURNING requests.id"
    "), counted AS ("
    " UPDATE batches AS b SET completed_count = b.completed_count + :b_completed,"
    " failed_count = b.failed_count + :b_failed, "
    + ", ".join(
        f"{name} = b.{name} + COALESCE(inserted.cost_usd, 0)"
        if name == "billed_cost_usd"
        else f"{name} = b.{name} + :b_{name}"
        for name in _BILLED_COLUMNS
    )
    # Whether the batch is done, worked out once on the row being updated (a sub-select may read
    # it): written out in each of the four, the statement outgrew the 4,096 characters under
    # which psycopg keeps a statement's conversion rather than redoing it at every call.
    + ", (finalizing_at, completed_at, cancelled_at, status) = (SELECT"
    " CASE WHEN done AND b.status = 'in_progress' THEN :created_at ELSE b.finalizing_at END,"
    " CASE WHEN done AND b.status = 'in_progress' THEN :created_at ELSE b.completed_at END,"
    " CASE WHEN done AND b.status = 'cancelling' THEN :created_at ELSE b.cancelled_at END,"
    " CASE WHEN NOT done THEN b.status WHEN b.status = 'in_progress' THEN 'completed'"
    " WHEN b.status = 'cancelling' THEN 'cancelled' ELSE b.status END"
    f" FROM (SELECT {_BATCH_DONE} AS done) AS batch_done)"
    " FROM inserted WHERE b.id = inserted.batch_id"
    " RETURNING b.id, b.status, b.completed_at, b.cancelled_at"
    "), spent AS ("
    " INSERT INTO tenant_daily_spend (tenant_id, day, cost_usd)"
    " SELECT inserted.tenant_id, :day, inserted.cost_usd FROM inserted WHERE inserted.cost_usd <> 0"
    " ON CONFLICT (tenant_id, day) DO UPDATE SET cost_usd = tenant_daily_spend.cost_usd + excluded.cost_usd"
    " RETURNING 1"
    ") SELECT inserted.request_id, inserted.cost_usd, counted.id AS batch_id, counted.status AS batch_status,"
    " counted.completed_at, counted.cancelled_at,"
    " (SELECT count(*) FROM ended) AS ended, (SELECT count(*) FROM spent) AS spent"
    " FROM inserted JOIN counted ON counted.id = inserted.batch_id"
)


_FILLED_BY_THE_STATEMENT = ("batch_id", "tenant_id", "cost_usd")


@functools.cache
def _single_call_result() -> DriverStatement:
    """``_SINGLE_CALL_RESULT`` compiled once, run on the driver (``store.driver``): the statement
    every single call's answer waits for."""
    return DriverStatement(_SINGLE_CALL_RESULT)


def record_single_call_result(
    engine: Engine, record: ResultRecord, now: int | None = None
) -> RecordOutcome | None:
    """``record_results`` for one single call's record (a request of a hidden batch, the
    interactive lane's), on PostgreSQL in one statement that is its own transaction (durable at
    its commit, as ``record_results``'s) instead of BEGIN, seven statements and COMMIT. Returns
    None, having written nothing, when that statement does not apply (SQLite; the request
    unknown, cancelled, of a batch not hidden, or already recorded): then ``record_results``
    decides (duplicates, discarded answers), as it would have alone."""
    if record.status not in _ENDED:
        raise ValueError(f"a result's status is succeeded or failed, not {record.status!r}")
    if not is_postgresql(engine):
        return None
    now = now if now is not None else now_seconds()
    # The owner's columns and the cost are the statement's to fill: placeholders here.
    row = _result_row(record, "", "", {}, now)
    totals = _BatchTotals()
    totals.add_result(record.status, row)
    parameters = {
        **{name: row[name] for name, _ in _RESULT_COLUMNS if name not in _FILLED_BY_THE_STATEMENT},
        **totals.parameters(""),
        "status": record.status.value,
        "response_body": None if record.response_body is None else json.dumps(record.response_body),
        "day": now // _SECONDS_PER_DAY,  # as store.quotas counts a day
    }
    rows = _single_call_result().run(engine, parameters)
    if not rows:
        return None
    (written,) = rows
    ended_now = (written.batch_status == "completed" and written.completed_at == now) or (
        written.batch_status == "cancelled" and written.cancelled_at == now
    )
    costs = {} if written.cost_usd is None else {record.request_id: written.cost_usd}
    return RecordOutcome([record.request_id], [], [], [written.batch_id] if ended_now else [], [], costs)
