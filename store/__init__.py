"""The SQL ledger: every request, its state, its result and what it cost.

Works on SQLite (embedded default) and PostgreSQL. Every operation is a plain function whose first
argument is an ``Engine`` (from :func:`make_engine`); each runs in its own transaction and returns
plain dataclasses or detached ORM rows. Times are unix seconds; ``now`` parameters exist so tests
and sweepers can pin the clock.

Engines::

    make_engine(url) -> Engine            # sqlite:///..., postgresql://, postgres://, postgresql+psycopg://
    upgrade_to_head(url_or_engine) / downgrade_to_base(url_or_engine)
    current_revision(engine) -> str | None ; head_revision() -> str
    require_schema_at_head(engine)        # raises SchemaBehind with "run `tokenmill db upgrade`"

After a Celery prefork fork, call ``engine.dispose(close=False)`` in the child (or create the
engine in the child): pooled connections must not cross a fork.

Tenants, keys, files::

    create_tenant(engine, name, tenant_id=None) -> Tenant
    set_tenant_weight(engine, tenant_id, weight) ; tenant_weight(engine, tenant_id) -> float
    create_api_key(engine, tenant_id, name=None) -> str            # plaintext, returned once
    authenticate_api_key(engine, key) -> Tenant | None             # None when unknown or revoked
    revoke_api_key(engine, key_or_id) -> bool
    create_file(engine, tenant_id, filename, purpose, bytes, storage_path, status="processed",
                default_max_stored_bytes=None) -> File   # QuotaExceeded over the stored-bytes cap
    get_file(engine, file_id, tenant_id=None) -> File | None
    list_files(engine, tenant_id, purpose=None, after=None, limit=100) -> list[File]
    delete_file(engine, file_id, tenant_id=None) -> File | None

Batches::

    ingest_batch(engine, source, *, tenant_id, endpoint, defaults, skip_invalid, ...) -> IngestReport
    REQUEST_KINDS: endpoint -> RequestKindSpec (kind, body check, short form); one entry per kind
    parse_json(data, prefix="") -> Any   # refuses NaN, depth > MAX_JSON_DEPTH, NUL, lone surrogates
    # the same in steps, for a file read after the create call answered (status "validating"):
    prepare_batch(*, tenant_id, endpoint, ...) -> BatchSpec ; open_batch(engine, spec) -> BatchSpec
    fill_batch(engine, spec, source, *, skip_invalid, ...) -> IngestReport
    fail_batch(engine, batch_id, code, message) -> bool    # a validating batch whose file is gone
    get_batch(engine, batch_id, tenant_id=None) -> Batch | None
    list_batches(engine, tenant_id, after=None, limit=20) -> BatchPage
    batch_progress(engine, batch_id) -> BatchProgress
    batch_object(engine, batch) -> dict      # the batch as the routes answer and webhooks carry it
    ALLOWED_TRANSITIONS, ENDED_STATUSES      # the state machine (store.batch_lifecycle)
    cancel_batch(engine, batch_id, now=None, *, error=None, max_chunks=None) -> Batch  # in chunks
    expire_batches(engine, now=None) -> list[str]
    finish_stopped_batches(engine, now=None) -> list[str]  # what a cancel / expiry that died left

Work (workers and the sweeper)::

    pending_request_ids(engine, batch_id, limit=None) -> list[str]     # queued, in line order
    pending_request_pages(engine, batch_id, page) -> Iterator[list[str]]  # the same, a page at a time
    mark_dispatched(engine, request_ids, dispatch_id, now=None) -> int
    claim_requests(engine, request_ids, owner, lease_seconds, now=None) -> list[ClaimedRequest]
    claim_queued(engine, batch_ids, owner, lease_seconds, limit, now=None) -> list[ClaimedRequest]
    tenant_queues(engine) -> list[TenantQueue]     # tenants with batches in progress, their weights
    claim_in_order(engine, batch_ids, owner, lease_seconds, limit, now=None) -> list[ClaimedRequest]
    extend_leases(engine, request_ids, owner, lease_seconds, now=None) -> list[str]  # ids still held
    release_requests(engine, request_ids, owner, error=None, not_before=None, *, handed_back=False,
                     upstream_attempts=0, retry_deadline=None) -> int
    unsettled_dispatch_ids(engine, *, now, settled_before) -> list[str]      # the sweeper's two steps
    requests_to_redispatch(engine, *, now, settled_before, dead_dispatch_ids, limit) -> [(id, batch)]
    batch_statuses(engine, batch_ids) -> dict[str, BatchStatus]
    cancel_claimed(engine, request_ids, owner) -> int    # a worker's requests of a cancelled batch
    record_results(engine, records: Sequence[ResultRecord], now=None) -> RecordOutcome
    UPSTREAM_AUTHENTICATION_FAILED        # a result's code when the provider refused our credentials
    record_cancelled_spend(engine, records, now=None) -> list[str]   # paid calls of cancelled runs
    record_handed_back_spend(engine, records, now=None) -> list[str] # paid calls of handed-back runs

Output and usage::

    iter_output_lines(engine, batch_id) -> Iterator[bytes]   # OpenAI output JSONL, line order
    iter_error_lines(engine, batch_id) -> Iterator[bytes]
    with_bytes(engine, files) -> files                       # output/error files' sizes measured
    batch_file_ids(batch_id) -> tuple[str, str]              # (output_file_id, error_file_id)
    usage_report(engine, tenant_id=None, group_by=("model", "day"), since=None, until=None,
                 batch_id=None, max_rows=None) -> list[UsageRow]   # InvalidArgument past max_rows
    set_price(engine, model, input_per_million, cached_input_per_million, output_per_million)
    get_prices(engine) -> dict[str, ModelPrice] ; price_for(prices, model) -> ModelPrice | None

Agent conversations and agent state::

    create_conversation(engine, tenant_id=None, messages=(), *, conversation_id=None, run_id=None) -> str
    append_messages(engine, conversation_id, messages, *, run_id=None, tenant_id=None) -> int  # length
    load_conversation(engine, conversation_id, *, tenant_id=None, before_run=None) -> list[LLMMessage]
    # a run_id appends once (a redone run appends nothing); before_run reads what that run first saw
    check_conversation(engine, conversation_id, *, tenant_id)   # ConversationNotFound, nothing loaded
    get_agent_run(engine, request_id, tenant_id) -> AgentRunRecord | None   # request + result rows
    load_agent_state(engine, agent_type, agent_key, tenant_id=None) -> dict | None
    get_agent_state(engine, agent_type, agent_key, tenant_id=None) -> StoredAgentState | None
    save_agent_state(engine, agent_type, agent_key, state, tenant_id=None, *, expected_version=None,
                     message_id=None, reply=None) -> int                        # new version
    record_agent_message(engine, message_id, *, agent_type, agent_key, payload, sender=None,
                         tenant_id=None) -> bool                                # False: id seen before
    get_agent_message(engine, message_id, tenant_id=None) -> StoredAgentMessage | None
    claim_agent_message(engine, message_id, tenant_id, owner, lease_seconds) -> int | None  # deliveries
    extend_agent_message_lease(engine, message_id, tenant_id, owner, lease_seconds) -> bool
    answer_agent_message(engine, message_id, tenant_id) -> None
    agent_messages_to_resend(engine, *, now, limit) -> list[AgentMessageToResend]   # lease expired
    hold_for_resend(engine, message, hold_seconds) -> bool                   # False: taken meanwhile

Exceptions::

    StoreError
     ├── SchemaBehind
     ├── NotFound
     │    ├── BatchNotFound
     │    └── ConversationNotFound
     ├── InvalidState
     │    └── AgentStateConflict
     ├── QuotaExceeded: a create over a tenant's quota (``code`` names which)
     └── InvalidArgument (also a ValueError): a bad endpoint, completion window or metadata

    JSONRejected (a ValueError): input parse_json refuses; ``code`` names why, ``param`` where
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from store.agent_messages import (
        AgentMessageToResend,
        StoredAgentMessage,
        agent_messages_to_resend,
        answer_agent_message,
        claim_agent_message,
        extend_agent_message_lease,
        get_agent_message,
        hold_for_resend,
        record_agent_message,
    )
    from store.agent_runs import AgentRunRecord, get_agent_run
    from store.agent_state import StoredAgentState, get_agent_state, load_agent_state, save_agent_state
    from store.batch_lifecycle import (
        ALLOWED_TRANSITIONS,
        ENDED_STATUSES,
        STOPPED_BATCH_STATUSES,
        batch_file_ids,
        batch_object,
    )
    from store.batches import (
        BatchPage,
        BatchProgress,
        batch_progress,
        batch_statuses,
        cancel_batch,
        cancel_claimed,
        expire_batches,
        finish_stopped_batches,
        get_batch,
        list_batches,
    )
    from store.conversations import (
        append_messages,
        check_conversation,
        create_conversation,
        load_conversation,
    )
    from store.engine import make_engine
    from store.errors import (
        AgentStateConflict,
        BatchNotFound,
        ConversationNotFound,
        InvalidArgument,
        InvalidState,
        NotFound,
        QuotaExceeded,
        SchemaBehind,
        StoreError,
    )
    from store.export import iter_error_lines, iter_output_lines, with_bytes
    from store.files import create_file, delete_file, get_file, list_files
    from store.idempotency import (
        IdempotencyClaim,
        IdempotencyOutcome,
        StoredResponse,
        abandon_idempotency_key,
        claim_idempotency_key,
        purge_idempotency_keys,
        store_idempotent_response,
    )
    from store.ingest import (
        MAX_STORED_ERRORS,
        BatchSpec,
        ExtraBodyCheck,
        IngestReport,
        LineError,
        extend_validation,
        fail_abandoned_validations,
        fail_batch,
        fill_batch,
        ingest_batch,
        open_batch,
        prepare_batch,
    )
    from store.input_checks import MAX_JSON_DEPTH, JSONRejected, parse_json
    from store.leases import (
        ClaimedRequest,
        TenantQueue,
        claim_in_order,
        claim_queued,
        claim_requests,
        extend_leases,
        mark_dispatched,
        pending_request_ids,
        pending_request_pages,
        release_requests,
        requests_to_redispatch,
        tenant_queues,
        unsettled_dispatch_ids,
    )
    from store.prices import get_prices, price_for, set_price
    from store.quotas import (
        QuotaStatus,
        StoredBytes,
        TenantQuotas,
        check_tenant_quotas,
        enforce_tenant_quotas,
        get_tenant_quotas,
        quota_status,
        set_tenant_quotas,
        stored_bytes,
        stored_bytes_exceeded,
    )
    from store.request_kinds import ENDPOINT_KINDS, REQUEST_KINDS, RequestKindSpec
    from store.results import (
        UPSTREAM_AUTHENTICATION_FAILED,
        UPSTREAM_AUTHENTICATION_STATUSES,
        PaidAnswer,
        RecordOutcome,
        ResultRecord,
        record_cancelled_spend,
        record_handed_back_spend,
        record_results,
    )
    from store.schema import (
        current_revision,
        downgrade_to_base,
        head_revision,
        require_schema_at_head,
        upgrade_to_head,
    )
    from store.tables import (
        AgentMessage,
        AgentState,
        ApiKey,
        Base,
        Batch,
        BatchStatus,
        Conversation,
        ConversationMessage,
        ConversationRun,
        DashboardSession,
        DiscardedAnswer,
        File,
        FileKind,
        IdempotencyKey,
        ModelPrice,
        Request,
        RequestKind,
        RequestStatus,
        Result,
        Tenant,
    )
    from store.tenants import (
        MAX_TENANT_WEIGHT,
        MIN_TENANT_WEIGHT,
        WEBHOOK_SECRET_PREFIX,
        authenticate_api_key,
        create_api_key,
        create_tenant,
        get_tenant,
        new_webhook_secret,
        revoke_api_key,
        set_tenant_weight,
        tenant_weight,
        webhook_secret,
    )
    from store.usage import UsageGroup, UsageRow, usage_report
    from store.webhooks import DueWebhook, claim_due_webhooks, record_webhook_attempt
else:
    import importlib

    # Each public name's submodule, imported on the name's first use (PEP 562): importing
    # ``store`` or one of its submodules stays cheap.
    _SOURCES = {
        "ExtraBodyCheck": "store.ingest",
        "extend_validation": "store.ingest",
        "fail_abandoned_validations": "store.ingest",
        "AgentMessageToResend": "store.agent_messages",
        "StoredAgentMessage": "store.agent_messages",
        "agent_messages_to_resend": "store.agent_messages",
        "answer_agent_message": "store.agent_messages",
        "claim_agent_message": "store.agent_messages",
        "extend_agent_message_lease": "store.agent_messages",
        "get_agent_message": "store.agent_messages",
        "hold_for_resend": "store.agent_messages",
        "record_agent_message": "store.agent_messages",
        "AgentRunRecord": "store.agent_runs",
        "get_agent_run": "store.agent_runs",
        "StoredAgentState": "store.agent_state",
        "get_agent_state": "store.agent_state",
        "load_agent_state": "store.agent_state",
        "save_agent_state": "store.agent_state",
        "ALLOWED_TRANSITIONS": "store.batch_lifecycle",
        "ENDED_STATUSES": "store.batch_lifecycle",
        "STOPPED_BATCH_STATUSES": "store.batch_lifecycle",
        "batch_file_ids": "store.batch_lifecycle",
        "batch_object": "store.batch_lifecycle",
        "BatchPage": "store.batches",
        "BatchProgress": "store.batches",
        "batch_progress": "store.batches",
        "batch_statuses": "store.batches",
        "cancel_batch": "store.batches",
        "cancel_claimed": "store.batches",
        "expire_batches": "store.batches",
        "finish_stopped_batches": "store.batches",
        "get_batch": "store.batches",
        "list_batches": "store.batches",
        "append_messages": "store.conversations",
        "check_conversation": "store.conversations",
        "create_conversation": "store.conversations",
        "load_conversation": "store.conversations",
        "make_engine": "store.engine",
        "AgentStateConflict": "store.errors",
        "BatchNotFound": "store.errors",
        "ConversationNotFound": "store.errors",
        "InvalidArgument": "store.errors",
        "InvalidState": "store.errors",
        "NotFound": "store.errors",
        "QuotaExceeded": "store.errors",
        "QuotaStatus": "store.quotas",
        "TenantQuotas": "store.quotas",
        "check_tenant_quotas": "store.quotas",
        "enforce_tenant_quotas": "store.quotas",
        "get_tenant_quotas": "store.quotas",
        "quota_status": "store.quotas",
        "set_tenant_quotas": "store.quotas",
        "StoredBytes": "store.quotas",
        "stored_bytes": "store.quotas",
        "stored_bytes_exceeded": "store.quotas",
        "SchemaBehind": "store.errors",
        "StoreError": "store.errors",
        "iter_error_lines": "store.export",
        "iter_output_lines": "store.export",
        "with_bytes": "store.export",
        "create_file": "store.files",
        "delete_file": "store.files",
        "get_file": "store.files",
        "list_files": "store.files",
        "IdempotencyClaim": "store.idempotency",
        "IdempotencyOutcome": "store.idempotency",
        "StoredResponse": "store.idempotency",
        "abandon_idempotency_key": "store.idempotency",
        "claim_idempotency_key": "store.idempotency",
        "purge_idempotency_keys": "store.idempotency",
        "store_idempotent_response": "store.idempotency",
        "MAX_STORED_ERRORS": "store.ingest",
        "BatchSpec": "store.ingest",
        "IngestReport": "store.ingest",
        "LineError": "store.ingest",
        "fail_batch": "store.ingest",
        "fill_batch": "store.ingest",
        "ingest_batch": "store.ingest",
        "open_batch": "store.ingest",
        "prepare_batch": "store.ingest",
        "MAX_JSON_DEPTH": "store.input_checks",
        "JSONRejected": "store.input_checks",
        "parse_json": "store.input_checks",
        "ClaimedRequest": "store.leases",
        "TenantQueue": "store.leases",
        "claim_in_order": "store.leases",
        "claim_queued": "store.leases",
        "claim_requests": "store.leases",
        "extend_leases": "store.leases",
        "mark_dispatched": "store.leases",
        "pending_request_ids": "store.leases",
        "pending_request_pages": "store.leases",
        "release_requests": "store.leases",
        "requests_to_redispatch": "store.leases",
        "tenant_queues": "store.leases",
        "unsettled_dispatch_ids": "store.leases",
        "get_prices": "store.prices",
        "price_for": "store.prices",
        "set_price": "store.prices",
        "ENDPOINT_KINDS": "store.request_kinds",
        "REQUEST_KINDS": "store.request_kinds",
        "RequestKindSpec": "store.request_kinds",
        "UPSTREAM_AUTHENTICATION_FAILED": "store.results",
        "UPSTREAM_AUTHENTICATION_STATUSES": "store.results",
        "PaidAnswer": "store.results",
        "RecordOutcome": "store.results",
        "ResultRecord": "store.results",
        "record_cancelled_spend": "store.results",
        "record_handed_back_spend": "store.results",
        "record_results": "store.results",
        "current_revision": "store.schema",
        "downgrade_to_base": "store.schema",
        "head_revision": "store.schema",
        "require_schema_at_head": "store.schema",
        "upgrade_to_head": "store.schema",
        "AgentMessage": "store.tables",
        "AgentState": "store.tables",
        "ApiKey": "store.tables",
        "Base": "store.tables",
        "Batch": "store.tables",
        "BatchStatus": "store.tables",
        "Conversation": "store.tables",
        "ConversationMessage": "store.tables",
        "ConversationRun": "store.tables",
        "DashboardSession": "store.tables",
        "DiscardedAnswer": "store.tables",
        "File": "store.tables",
        "FileKind": "store.tables",
        "IdempotencyKey": "store.tables",
        "ModelPrice": "store.tables",
        "Request": "store.tables",
        "RequestKind": "store.tables",
        "RequestStatus": "store.tables",
        "Result": "store.tables",
        "Tenant": "store.tables",
        "WEBHOOK_SECRET_PREFIX": "store.tenants",
        "authenticate_api_key": "store.tenants",
        "create_api_key": "store.tenants",
        "create_tenant": "store.tenants",
        "get_tenant": "store.tenants",
        "MAX_TENANT_WEIGHT": "store.tenants",
        "MIN_TENANT_WEIGHT": "store.tenants",
        "set_tenant_weight": "store.tenants",
        "tenant_weight": "store.tenants",
        "new_webhook_secret": "store.tenants",
        "revoke_api_key": "store.tenants",
        "webhook_secret": "store.tenants",
        "UsageGroup": "store.usage",
        "UsageRow": "store.usage",
        "usage_report": "store.usage",
        "DueWebhook": "store.webhooks",
        "claim_due_webhooks": "store.webhooks",
        "record_webhook_attempt": "store.webhooks",
    }

    def __getattr__(name: str) -> object:
        if name not in _SOURCES:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(_SOURCES[name]), name)
        # Kept here: the next ``store.<name>`` (a route's, per request) is a plain look-up.
        globals()[name] = value
        return value


__all__ = [
    "ALLOWED_TRANSITIONS",
    "ENDED_STATUSES",
    "ENDPOINT_KINDS",
    "MAX_JSON_DEPTH",
    "MAX_STORED_ERRORS",
    "MAX_TENANT_WEIGHT",
    "MIN_TENANT_WEIGHT",
    "REQUEST_KINDS",
    "STOPPED_BATCH_STATUSES",
    "UPSTREAM_AUTHENTICATION_FAILED",
    "UPSTREAM_AUTHENTICATION_STATUSES",
    "WEBHOOK_SECRET_PREFIX",
    "AgentMessage",
    "AgentMessageToResend",
    "AgentRunRecord",
    "AgentState",
    "AgentStateConflict",
    "ApiKey",
    "Base",
    "Batch",
    "BatchNotFound",
    "BatchPage",
    "BatchProgress",
    "BatchSpec",
    "BatchStatus",
    "ClaimedRequest",
    "Conversation",
    "ConversationMessage",
    "ConversationNotFound",
    "ConversationRun",
    "DashboardSession",
    "DiscardedAnswer",
    "DueWebhook",
    "ExtraBodyCheck",
    "File",
    "FileKind",
    "IdempotencyClaim",
    "IdempotencyKey",
    "IdempotencyOutcome",
    "IngestReport",
    "InvalidArgument",
    "InvalidState",
    "JSONRejected",
    "LineError",
    "ModelPrice",
    "NotFound",
    "PaidAnswer",
    "QuotaExceeded",
    "QuotaStatus",
    "RecordOutcome",
    "Request",
    "RequestKind",
    "RequestKindSpec",
    "RequestStatus",
    "Result",
    "ResultRecord",
    "SchemaBehind",
    "StoreError",
    "StoredAgentMessage",
    "StoredAgentState",
    "StoredBytes",
    "StoredResponse",
    "Tenant",
    "TenantQueue",
    "TenantQuotas",
    "UsageGroup",
    "UsageRow",
    "abandon_idempotency_key",
    "agent_messages_to_resend",
    "answer_agent_message",
    "append_messages",
    "authenticate_api_key",
    "batch_file_ids",
    "batch_object",
    "batch_progress",
    "batch_statuses",
    "cancel_batch",
    "cancel_claimed",
    "check_conversation",
    "check_tenant_quotas",
    "claim_agent_message",
    "claim_due_webhooks",
    "claim_idempotency_key",
    "claim_in_order",
    "claim_queued",
    "claim_requests",
    "create_api_key",
    "create_conversation",
    "create_file",
    "create_tenant",
    "current_revision",
    "delete_file",
    "downgrade_to_base",
    "enforce_tenant_quotas",
    "expire_batches",
    "extend_agent_message_lease",
    "extend_leases",
    "extend_validation",
    "fail_abandoned_validations",
    "fail_batch",
    "fill_batch",
    "finish_stopped_batches",
    "get_agent_message",
    "get_agent_run",
    "get_agent_state",
    "get_batch",
    "get_file",
    "get_prices",
    "get_tenant",
    "get_tenant_quotas",
    "head_revision",
    "hold_for_resend",
    "ingest_batch",
    "iter_error_lines",
    "iter_output_lines",
    "list_batches",
    "list_files",
    "load_agent_state",
    "load_conversation",
    "make_engine",
    "mark_dispatched",
    "new_webhook_secret",
    "open_batch",
    "parse_json",
    "pending_request_ids",
    "pending_request_pages",
    "prepare_batch",
    "price_for",
    "purge_idempotency_keys",
    "quota_status",
    "record_agent_message",
    "record_cancelled_spend",
    "record_handed_back_spend",
    "record_results",
    "record_webhook_attempt",
    "release_requests",
    "requests_to_redispatch",
    "require_schema_at_head",
    "revoke_api_key",
    "save_agent_state",
    "set_price",
    "set_tenant_quotas",
    "set_tenant_weight",
    "store_idempotent_response",
    "stored_bytes",
    "stored_bytes_exceeded",
    "tenant_queues",
    "tenant_weight",
    "unsettled_dispatch_ids",
    "upgrade_to_head",
    "usage_report",
    "webhook_secret",
    "with_bytes",
]
