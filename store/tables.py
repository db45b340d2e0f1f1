"""The ledger's tables, as SQLAlchemy 2 typed mappings.

Times are integer unix seconds (what the OpenAI API returns), so they compare and group the same
way on SQLite and PostgreSQL (a day is ``created_at // 86400``). Money is US dollars as exact
decimals (``Decimal``; NUMERIC on PostgreSQL): prices per million tokens to the micro-dollar
(``PRICE_SCALE`` places), costs per request to ``COST_SCALE`` places, which holds any price times
any token count exactly. (SQLite keeps NUMERIC as a double: there a sum is exact to about 15
significant digits, read back rounded to ``COST_SCALE`` places.) Enums are stored as plain strings (no native
PostgreSQL enum types), so adding a value needs no type migration.
"""

from __future__ import annotations

import enum
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, InstrumentedAttribute, Mapped, mapped_column

__all__ = [
    "COST_SCALE",
    "MAX_CUSTOM_ID_CHARS",
    "MAX_FILENAME_CHARS",
    "MAX_MODEL_CHARS",
    "MAX_WEBHOOK_URL_CHARS",
    "NO_TENANT",
    "PRICE_SCALE",
    "REQUESTS_AUTOVACUUM",
    "RUNNING_PREDICATE",
    "UNFINISHED_PREDICATE",
    "AgentMessage",
    "AgentState",
    "ApiKey",
    "Base",
    "Batch",
    "BatchStatus",
    "Conversation",
    "ConversationMessage",
    "ConversationRun",
    "DashboardSession",
    "DiscardedAnswer",
    "File",
    "FileKind",
    "IdempotencyKey",
    "ModelPrice",
    "Request",
    "RequestKind",
    "RequestStatus",
    "Result",
    "Tenant",
    "TenantDailySpend",
    "status_is",
    "unfinished_values",
]


class BatchStatus(enum.StrEnum):
    """OpenAI's batch lifecycle; which status may follow which is ``store.batch_lifecycle``'s."""

    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


class RequestStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class RequestKind(enum.StrEnum):
    CHAT_COMPLETION = "chat_completion"
    AGENT_RUN = "agent_run"


class FileKind(enum.StrEnum):
    """An uploaded file has content on disk; a batch's output and error files are generated from
    the results table when read."""

    UPLOAD = "upload"
    BATCH_OUTPUT = "batch_output"
    BATCH_ERROR = "batch_error"


# The longest webhook URL a batch keeps (as normalised: the API refuses longer ones by name).
MAX_WEBHOOK_URL_CHARS = 2000
# A model name as the ledger keeps it (results, discarded answers, prices): a request naming a longer
# one is refused before it is queued or sent (``store.request_kinds``).
MAX_MODEL_CHARS = 200
# A line's custom_id (refused longer at ingest) and an upload's file name (cut to it), as kept.
MAX_CUSTOM_ID_CHARS = 512
MAX_FILENAME_CHARS = 500


def _str_enum(enum_class: type[enum.StrEnum]) -> sa.Enum:
    # Store the value ("in_progress"), not the member name, and no CHECK constraint / native type.
    return sa.Enum(
        enum_class,
        native_enum=False,
        create_constraint=False,
        length=32,
        values_callable=lambda members: [member.value for member in members],
    )


PRICE_SCALE = 6
"""Decimal places of a price (US dollars per million tokens): to the micro-dollar."""
COST_SCALE = PRICE_SCALE + 6
"""Decimal places of a cost: a price per million tokens times a token count, divided by 10**6."""
_PRICE = sa.Numeric(18, PRICE_SCALE)
_COST = sa.Numeric(24, COST_SCALE)


class Base(DeclarativeBase):
    type_annotation_map = {
        dict[str, Any]: sa.JSON(),
        list[Any]: sa.JSON(),
    }


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(200))
    created_at: Mapped[int] = mapped_column(sa.BigInteger)
    # Signs the tenant's webhook deliveries (Standard Webhooks: ``whsec_<base64>``); kept in
    # clear, since signing needs it, and shown only to the tenant (or an operator's CLI).
    webhook_secret: Mapped[str | None] = mapped_column(sa.String(100))
    # Quotas the operator sets (``store.quotas``); None is no limit. Over one, a create is refused.
    max_queued_requests: Mapped[int | None] = mapped_column(sa.BigInteger)
    max_queued_tokens: Mapped[int | None] = mapped_column(sa.BigInteger)
    daily_budget_usd: Mapped[Decimal | None] = mapped_column(_PRICE)
    # The cap on its uploaded files' bytes (None: the service's default), and what they hold now:
    # kept in the transactions that add and delete an upload (``store.files``), read as one row.
    max_stored_bytes: Mapped[int | None] = mapped_column(sa.BigInteger)
    stored_file_bytes: Mapped[int] = mapped_column(sa.BigInteger, server_default="0")
    # Its share of the workers while tenants' work waits (workers.fair_share): weight 2 is served
    # twice as fast as weight 1.
    weight: Mapped[float] = mapped_column(sa.Float, default=1.0, server_default="1")


class TenantDailySpend(Base):
    """What a tenant was billed on a UTC day (``day``: days since 1970-01-01), added to in the
    transactions that write its results and discarded answers: the daily budget reads one row,
    not the day's results (``store.quotas``)."""

    __tablename__ = "tenant_daily_spend"

    tenant_id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    day: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=False)
    cost_usd: Mapped[Decimal] = mapped_column(_COST, default=0)


class DashboardSession(Base):
    """A login to the dashboard (``/ui``). The browser holds a random token in a cookie; only its
    SHA-256 is kept here. A session lives until ``expires_at``, until logout deletes it, or until
    its API key is revoked (then it is refused, and deleted with the key)."""

    __tablename__ = "dashboard_sessions"

    token_hash: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    api_key_id: Mapped[str] = mapped_column(sa.ForeignKey("api_keys.id", ondelete="CASCADE"), index=True)
    tenant_id: Mapped[str] = mapped_column(sa.String(64))
    # Sent back in the logout form: a cross-site form cannot know it.
    csrf_token: Mapped[str] = mapped_column(sa.String(64))
    created_at: Mapped[int] = mapped_column(sa.BigInteger)
    expires_at: Mapped[int] = mapped_column(sa.BigInteger, index=True)


class ApiKey(Base):
    """A tenant's API key. Only the SHA-256 of the key is stored; ``prefix`` (its first characters)
    lets a person tell keys apart."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(sa.ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    key_hash: Mapped[str] = mapped_column(sa.String(64), unique=True)
    prefix: Mapped[str] = mapped_column(sa.String(16))
    name: Mapped[str | None] = mapped_column(sa.String(200))
    created_at: Mapped[int] = mapped_column(sa.BigInteger)
    revoked_at: Mapped[int | None] = mapped_column(sa.BigInteger)


class File(Base):
    """An OpenAI Files API object. Uploaded content lives on disk at ``storage_path``; a batch's
    output / error file has ``batch_id`` set and no path (its content is generated from results)."""

    __tablename__ = "files"

    id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(sa.ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    filename: Mapped[str] = mapped_column(sa.String(MAX_FILENAME_CHARS))
    purpose: Mapped[str] = mapped_column(sa.String(32))
    # A batch output / error file's is None until first measured (``store.export.with_bytes``).
    bytes: Mapped[int | None] = mapped_column(sa.BigInteger)
    created_at: Mapped[int] = mapped_column(sa.BigInteger)
    status: Mapped[str] = mapped_column(sa.String(32))
    kind: Mapped[FileKind] = mapped_column(_str_enum(FileKind))
    storage_path: Mapped[str | None] = mapped_column(sa.String(1000))
    batch_id: Mapped[str | None] = mapped_column(sa.String(64), index=True)


# What the partial indexes of batches hold, as the queries say it (``Batch.hidden.is_(False)``;
# a webhook not yet delivered): PostgreSQL uses such an index only for a query that implies it.
LISTED_PREDICATE = "hidden IS false"
WEBHOOK_PENDING_PREDICATE = "webhook_url IS NOT NULL AND webhook_delivered_at IS NULL"


class Batch(Base):
    __tablename__ = "batches"
    __table_args__ = (
        sa.Index("ix_batches_tenant_id_id", "tenant_id", "id"),
        # Pages of batches, newest first (the API's and the dashboard's: a tenant's, and every
        # tenant's for operators), of the batches listed only: each single call is a hidden batch,
        # and an index of them all had a page step over every call made since.
        sa.Index(
            "ix_batches_listed_tenant_id_created_at_id",
            "tenant_id",
            "created_at",
            "id",
            postgresql_where=sa.text(LISTED_PREDICATE),
            sqlite_where=sa.text(LISTED_PREDICATE),
        ),
        sa.Index(
            "ix_batches_listed_created_at_id",
            "created_at",
            "id",
            postgresql_where=sa.text(LISTED_PREDICATE),
            sqlite_where=sa.text(LISTED_PREDICATE),
        ),
        # The beat's look for completion webhooks to send (every sweep), oldest first.
        sa.Index(
            "ix_batches_webhook_pending_created_at_id",
            "created_at",
            "id",
            postgresql_where=sa.text(WEBHOOK_PENDING_PREDICATE),
            sqlite_where=sa.text(WEBHOOK_PENDING_PREDICATE),
        ),
        # A tenant's open batches, found without reading its ended ones (store.quotas).
        sa.Index("ix_batches_tenant_id_status", "tenant_id", "status"),
    )

    id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(sa.ForeignKey("tenants.id", ondelete="CASCADE"))
    endpoint: Mapped[str] = mapped_column(sa.String(100))
    kind: Mapped[RequestKind] = mapped_column(_str_enum(RequestKind))
    completion_window: Mapped[str] = mapped_column(sa.String(16))
    input_file_id: Mapped[str | None] = mapped_column(sa.String(64))
    output_file_id: Mapped[str | None] = mapped_column(sa.String(64))
    error_file_id: Mapped[str | None] = mapped_column(sa.String(64))
    status: Mapped[BatchStatus] = mapped_column(_str_enum(BatchStatus), index=True)
    # ``metadata`` is reserved on declarative classes, hence the attribute name.
    batch_metadata: Mapped[dict[str, Any] | None] = mapped_column("metadata", sa.JSON)
    # Validation failures: [{"line", "code", "message", "param"}], the first MAX_STORED_ERRORS
    # of them (see ingest); error_count counts them all.
    errors: Mapped[list[Any] | None] = mapped_column(sa.JSON)
    error_count: Mapped[int] = mapped_column(sa.Integer, default=0, server_default="0")
    priority: Mapped[int] = mapped_column(sa.Integer, default=0)
    # A one-request batch behind POST /v1/chat/completions or /v1/agent_runs: billed and
    # recorded like any batch, but not listed among the producer's batches.
    hidden: Mapped[bool] = mapped_column(sa.Boolean, default=False, server_default=sa.false())
    webhook_url: Mapped[str | None] = mapped_column(sa.String(MAX_WEBHOOK_URL_CHARS))
    # While ``validating`` in the background: until when the API reading its file holds it (it
    # renews this); past it the sweeper fails the batch (store.ingest.fail_abandoned_validations).
    validating_until: Mapped[int | None] = mapped_column(sa.BigInteger)
    # Delivery of the completion webhook (at least once, retried by the sweeper with backoff).
    webhook_attempts: Mapped[int] = mapped_column(sa.Integer, default=0, server_default="0")
    webhook_next_at: Mapped[int | None] = mapped_column(sa.BigInteger)
    webhook_delivered_at: Mapped[int | None] = mapped_column(sa.BigInteger)
    webhook_last_error: Mapped[str | None] = mapped_column(sa.Text)
    total_count: Mapped[int] = mapped_column(sa.Integer, default=0)
    # The prompt tokens of its requests, estimated when they were written (store.quotas).
    prompt_tokens_estimate: Mapped[int] = mapped_column(sa.BigInteger, default=0, server_default="0")
    completed_count: Mapped[int] = mapped_column(sa.Integer, default=0)
    failed_count: Mapped[int] = mapped_column(sa.Integer, default=0)
    # Not in OpenAI's request_counts; needed to know when a cancelled batch has nothing left.
    cancelled_count: Mapped[int] = mapped_column(sa.Integer, default=0)
    # What its results and discarded answers billed so far, as ``store.usage`` sums them, moved in
    # the transactions that write those rows: reading a batch (its ``usage``) costs this row, not
    # a sum over a million results.
    billed_prompt_tokens: Mapped[int] = mapped_column(sa.BigInteger, default=0, server_default="0")
    billed_cached_prompt_tokens: Mapped[int] = mapped_column(sa.BigInteger, default=0, server_default="0")
    billed_completion_tokens: Mapped[int] = mapped_column(sa.BigInteger, default=0, server_default="0")
    billed_reasoning_tokens: Mapped[int] = mapped_column(sa.BigInteger, default=0, server_default="0")
    billed_cost_usd: Mapped[Decimal] = mapped_column(_COST, default=Decimal(0), server_default="0")
    cache_hits: Mapped[int] = mapped_column(sa.Integer, default=0, server_default="0")
    discarded_answer_count: Mapped[int] = mapped_column(sa.Integer, default=0, server_default="0")
    created_at: Mapped[int] = mapped_column(sa.BigInteger)
    expires_at: Mapped[int] = mapped_column(sa.BigInteger)
    in_progress_at: Mapped[int | None] = mapped_column(sa.BigInteger)
    finalizing_at: Mapped[int | None] = mapped_column(sa.BigInteger)
    completed_at: Mapped[int | None] = mapped_column(sa.BigInteger)
    failed_at: Mapped[int | None] = mapped_column(sa.BigInteger)
    expired_at: Mapped[int | None] = mapped_column(sa.BigInteger)
    cancelling_at: Mapped[int | None] = mapped_column(sa.BigInteger)
    cancelled_at: Mapped[int | None] = mapped_column(sa.BigInteger)


# The predicate of the partial indexes on requests still to run (queued or running).
UNFINISHED_PREDICATE = "status IN ('queued', 'running')"
RUNNING_PREDICATE = "status = 'running'"
# The autovacuum settings of ``requests`` on PostgreSQL (migration 0016): vacuumed and analyzed
# after a fixed number of changed rows, so that the dead row versions claims step over and the
# age of the statistics stay bounded however large the ledger grows.
REQUESTS_AUTOVACUUM = {
    "autovacuum_vacuum_scale_factor": "0",
    "autovacuum_vacuum_threshold": "20000",
    "autovacuum_analyze_scale_factor": "0",
    "autovacuum_analyze_threshold": "50000",
}


class Request(Base):
    """One input line of a batch. ``attempts`` counts claims (deliveries to a worker)."""

    __tablename__ = "requests"
    __table_args__ = (
        sa.UniqueConstraint("batch_id", "custom_id", name="uq_requests_batch_id_custom_id"),
        sa.Index("ix_requests_batch_id_line_number", "batch_id", "line_number"),
        sa.Index("ix_requests_status_lease_expires_at", "status", "lease_expires_at"),
        sa.Index("ix_requests_status_dispatched_at", "status", "dispatched_at"),
        # Only the requests still to run, so that what reads them (claims, enqueue, progress,
        # the sweeper) costs what is left, not what the ledger ever ran; the store's queries
        # spell these statuses as SQL literals, which is what lets PostgreSQL use these indexes.
        sa.Index(
            "ix_requests_unfinished_batch_id_line_number",
            "batch_id",
            "line_number",
            postgresql_where=sa.text(UNFINISHED_PREDICATE),
            sqlite_where=sa.text(UNFINISHED_PREDICATE),
        ),
        sa.Index(
            "ix_requests_unfinished_dispatch_id",
            "dispatch_id",
            postgresql_where=sa.text(UNFINISHED_PREDICATE),
            sqlite_where=sa.text(UNFINISHED_PREDICATE),
        ),
        # The running ones alone, for a refill's look-up of leases that ran out in a tenant's
        # batches: a few pages, which the planner takes even before ANALYZE has seen a new
        # batch (it took the index above and read the whole batch).
        sa.Index(
            "ix_requests_running_batch_id_lease_expires_at",
            "batch_id",
            "lease_expires_at",
            postgresql_where=sa.text(RUNNING_PREDICATE),
            sqlite_where=sa.text(RUNNING_PREDICATE),
        ),
    )

    id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    batch_id: Mapped[str] = mapped_column(sa.ForeignKey("batches.id", ondelete="CASCADE"))
    tenant_id: Mapped[str] = mapped_column(sa.String(64))
    custom_id: Mapped[str] = mapped_column(sa.String(MAX_CUSTOM_ID_CHARS))
    line_number: Mapped[int] = mapped_column(sa.Integer)
    kind: Mapped[RequestKind] = mapped_column(_str_enum(RequestKind))
    body: Mapped[dict[str, Any]] = mapped_column(sa.JSON)
    status: Mapped[RequestStatus] = mapped_column(_str_enum(RequestStatus))
    priority: Mapped[int] = mapped_column(sa.Integer, default=0)
    attempts: Mapped[int] = mapped_column(sa.Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(sa.String(200))
    lease_expires_at: Mapped[int | None] = mapped_column(sa.BigInteger)
    dispatch_id: Mapped[str | None] = mapped_column(sa.String(200))
    dispatched_at: Mapped[int | None] = mapped_column(sa.BigInteger)
    not_before: Mapped[int | None] = mapped_column(sa.BigInteger)
    # Set when a worker hands the request back for rate limits: the upstream attempts made by such
    # deliveries (the result's count adds them: every attempt is counted), and the time after which
    # a rate limit fails it instead of being retried again.
    handed_back_attempts: Mapped[int] = mapped_column(sa.Integer, default=0, server_default="0")
    retry_deadline: Mapped[int | None] = mapped_column(sa.BigInteger)
    cache_key: Mapped[str | None] = mapped_column(sa.String(200))
    last_error: Mapped[str | None] = mapped_column(sa.Text)
    created_at: Mapped[int] = mapped_column(sa.BigInteger)
    finished_at: Mapped[int | None] = mapped_column(sa.BigInteger)


class Result(Base):
    """The one outcome of a request (the primary key is the request id, so the database admits one
    row per request). A failed request has a row too, with its error. Tokens of a cache hit are
    those of the answer it served; ``cached`` keeps them out of billed usage and its cost is 0."""

    __tablename__ = "results"
    __table_args__ = (
        sa.Index("ix_results_tenant_id_created_at", "tenant_id", "created_at"),
        sa.Index("ix_results_batch_id", "batch_id"),
        # The dashboard's charts over every tenant: a bounded window of the newest results.
        sa.Index("ix_results_created_at", "created_at"),
    )

    request_id: Mapped[str] = mapped_column(
        sa.ForeignKey("requests.id", ondelete="CASCADE"), primary_key=True
    )
    batch_id: Mapped[str] = mapped_column(sa.String(64))
    tenant_id: Mapped[str] = mapped_column(sa.String(64))
    status: Mapped[RequestStatus] = mapped_column(_str_enum(RequestStatus))
    status_code: Mapped[int | None] = mapped_column(sa.Integer)
    response_body: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON)
    upstream_request_id: Mapped[str | None] = mapped_column(sa.String(200))
    error_code: Mapped[str | None] = mapped_column(sa.String(100))
    error_message: Mapped[str | None] = mapped_column(sa.Text)
    finish_reason: Mapped[str | None] = mapped_column(sa.String(32))
    model: Mapped[str | None] = mapped_column(sa.String(MAX_MODEL_CHARS))
    prompt_tokens: Mapped[int] = mapped_column(sa.Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(sa.Integer, default=0)
    cached_prompt_tokens: Mapped[int] = mapped_column(sa.Integer, default=0)
    reasoning_tokens: Mapped[int] = mapped_column(sa.Integer, default=0)
    cached: Mapped[bool] = mapped_column(sa.Boolean, default=False)
    cost_usd: Mapped[Decimal | None] = mapped_column(_COST)
    latency_ms: Mapped[float | None] = mapped_column(sa.Float)
    attempts: Mapped[int] = mapped_column(sa.Integer, default=1)
    cache_key: Mapped[str | None] = mapped_column(sa.String(200))
    created_at: Mapped[int] = mapped_column(sa.BigInteger)


class DiscardedAnswer(Base):
    """An upstream answer that arrived and was paid for but did not become its request's result:
    the request already had one (a second delivery that also called upstream) or was cancelled
    meanwhile. Its tokens and cost count as billed in usage, so the ledger's spend is the
    provider's bill for every answer received, not only for the answers kept."""

    __tablename__ = "discarded_answers"
    __table_args__ = (
        # One row per answer: writing the same records again adds nothing.
        sa.UniqueConstraint(
            "request_id", "upstream_request_id", name="uq_discarded_answers_request_id_upstream_request_id"
        ),
        sa.Index("ix_discarded_answers_tenant_id_created_at", "tenant_id", "created_at"),
        sa.Index("ix_discarded_answers_created_at", "created_at"),
        sa.Index("ix_discarded_answers_batch_id", "batch_id"),
    )

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(sa.ForeignKey("requests.id", ondelete="CASCADE"))
    batch_id: Mapped[str] = mapped_column(sa.String(64))
    tenant_id: Mapped[str] = mapped_column(sa.String(64))
    reason: Mapped[str] = mapped_column(sa.String(32))  # "duplicate" | "cancelled" | "handed_back"
    upstream_request_id: Mapped[str | None] = mapped_column(sa.String(200))
    model: Mapped[str | None] = mapped_column(sa.String(MAX_MODEL_CHARS))
    prompt_tokens: Mapped[int] = mapped_column(sa.Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(sa.Integer, default=0)
    cached_prompt_tokens: Mapped[int] = mapped_column(sa.Integer, default=0)
    reasoning_tokens: Mapped[int] = mapped_column(sa.Integer, default=0)
    cost_usd: Mapped[Decimal | None] = mapped_column(_COST)
    created_at: Mapped[int] = mapped_column(sa.BigInteger)


class ModelPrice(Base):
    """US dollars per million tokens. ``cached_input`` is the provider's prompt-cache price."""

    __tablename__ = "model_prices"

    model: Mapped[str] = mapped_column(sa.String(MAX_MODEL_CHARS), primary_key=True)
    input_per_million: Mapped[Decimal] = mapped_column(_PRICE)
    cached_input_per_million: Mapped[Decimal] = mapped_column(_PRICE)
    output_per_million: Mapped[Decimal] = mapped_column(_PRICE)
    updated_at: Mapped[int] = mapped_column(sa.BigInteger)


class Conversation(Base):
    """An agent conversation, continued by id across agent runs."""

    __tablename__ = "conversations"

    id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    tenant_id: Mapped[str | None] = mapped_column(sa.String(64), index=True)
    created_at: Mapped[int] = mapped_column(sa.BigInteger)
    updated_at: Mapped[int] = mapped_column(sa.BigInteger)


class ConversationMessage(Base):
    """One message (``LLMMessage`` as JSON, its ``type`` field included), in order by ``position``."""

    __tablename__ = "conversation_messages"

    conversation_id: Mapped[str] = mapped_column(
        sa.ForeignKey("conversations.id", ondelete="CASCADE"), primary_key=True
    )
    position: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    message: Mapped[dict[str, Any]] = mapped_column(sa.JSON)
    created_at: Mapped[int] = mapped_column(sa.BigInteger)


class ConversationRun(Base):
    """An agent run whose messages were appended to a conversation, and where they start: a run
    redone after its worker died appends nothing twice, and reads the conversation as it was
    before its own messages."""

    __tablename__ = "conversation_runs"

    conversation_id: Mapped[str] = mapped_column(
        sa.ForeignKey("conversations.id", ondelete="CASCADE"), primary_key=True
    )
    run_id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    first_position: Mapped[int] = mapped_column(sa.Integer)
    message_count: Mapped[int] = mapped_column(sa.Integer)
    created_at: Mapped[int] = mapped_column(sa.BigInteger)


# The tenant_id of agent rows that belong to no tenant: a primary key column cannot be NULL.
NO_TENANT = ""


class AgentState(Base):
    """The saved state of one agent (``AgentId`` = type + key) of one tenant (``""`` for none: a
    primary key column cannot be NULL). ``version`` grows by one per save (optimistic concurrency);
    ``last_message_id`` and ``last_reply`` let a redelivered message be answered without running
    its handler twice."""

    __tablename__ = "agent_states"

    tenant_id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    agent_type: Mapped[str] = mapped_column(sa.String(200), primary_key=True)
    agent_key: Mapped[str] = mapped_column(sa.String(500), primary_key=True)
    state: Mapped[dict[str, Any]] = mapped_column(sa.JSON)
    version: Mapped[int] = mapped_column(sa.Integer)
    last_message_id: Mapped[str | None] = mapped_column(sa.String(200))
    last_reply: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON)
    updated_at: Mapped[int] = mapped_column(sa.BigInteger)


class AgentMessage(Base):
    """A message sent to an agent through the distributed runtime, written before the Celery
    message that names it ("ledger first": the broker carries ids, never content). ``tenant_id`` is
    ``""`` for none, as in ``agent_states``."""

    __tablename__ = "agent_messages"

    tenant_id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    id: Mapped[str] = mapped_column(sa.String(200), primary_key=True)
    agent_type: Mapped[str] = mapped_column(sa.String(200))
    agent_key: Mapped[str] = mapped_column(sa.String(500))
    sender: Mapped[str | None] = mapped_column(sa.String(800))
    payload: Mapped[dict[str, Any]] = mapped_column(sa.JSON)
    created_at: Mapped[int] = mapped_column(sa.BigInteger, index=True)
    # Deliveries claimed; the worker running it and until when (extended while it runs); when it
    # was answered. Unanswered under an expired lease: its worker died, the sweeper sends it again.
    attempts: Mapped[int] = mapped_column(sa.Integer, default=0, server_default="0")
    lease_owner: Mapped[str | None] = mapped_column(sa.String(200))
    lease_expires_at: Mapped[int | None] = mapped_column(sa.BigInteger, index=True)
    answered_at: Mapped[int | None] = mapped_column(sa.BigInteger)


class IdempotencyKey(Base):
    """A POST sent with an ``Idempotency-Key``: the request's hash and, once answered, the answer,
    replayed to a retry with the same key (kept ``idempotency_retention_seconds``). A row with no
    ``status_code`` is a request still being answered."""

    __tablename__ = "idempotency_keys"

    tenant_id: Mapped[str] = mapped_column(sa.ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)
    key: Mapped[str] = mapped_column(sa.String(255), primary_key=True)
    request_hash: Mapped[str] = mapped_column(sa.String(64))
    status_code: Mapped[int | None] = mapped_column(sa.Integer)
    response_headers: Mapped[list[Any] | None] = mapped_column(sa.JSON)
    response_body: Mapped[bytes | None] = mapped_column(sa.LargeBinary)
    created_at: Mapped[int] = mapped_column(sa.BigInteger, index=True)


def status_is(status: RequestStatus) -> sa.ColumnElement[bool]:
    """``requests.status = '<status>'`` with the status as an SQL literal, not a parameter: only
    from a literal can PostgreSQL tell that the partial indexes on unfinished requests
    (``UNFINISHED_PREDICATE``) cover a query, and a statement psycopg prepares (run five times on
    a connection) may get a generic plan, which sees parameters only as unknowns. Without them,
    claims and counts step over every line a batch already finished."""
    return Request.status == sa.literal_column(f"'{status.value}'", Request.status.type)


def unfinished_values(column: InstrumentedAttribute[str | None], name: str) -> sa.CTE:
    """The distinct values of ``column`` (a request column a partial index on unfinished requests
    leads with) among queued and running requests, read as a loose index scan: each step the next
    value after the last, one index probe, so that the read costs the values, not the rows (a
    million-line batch is one batch id and 2,000 dispatch ids). A recursive CTE named ``name``,
    its column ``value``, whose last row is NULL."""
    unfinished = sa.or_(status_is(RequestStatus.QUEUED), status_is(RequestStatus.RUNNING))
    first = sa.select(sa.func.min(column).label("value")).where(unfinished)
    values = first.cte(name, recursive=True)
    after = sa.select(sa.func.min(column)).where(unfinished, column > values.c.value)
    return values.union_all(sa.select(after.scalar_subquery()).where(values.c.value.is_not(None)))
