"""OpenAI's Batch API: create from an uploaded file, retrieve, list, cancel.

Beyond OpenAI: ``GET /v1/batches/{id}/output`` and ``/errors`` stream the lines finished so
far while the batch runs; ``model`` (default model for short-form lines), ``skip_invalid`` (write the good
lines, report the bad ones instead of rejecting the batch), ``webhook_url`` and ``priority`` may be
passed in the create body (``extra_body`` in the openai SDK).

An input file over ``background_ingest_bytes`` (1 MiB) or ``INLINE_INGEST_MAX_LINES`` lines is read
after the create call answers, as OpenAI does: the batch is ``validating``, then ``in_progress``
(and dispatched) or ``failed`` with its errors; a process reads a few at once, tenants in turn
(``api.validation_slots``). A tenant has at most ``max_validating_batches_per_tenant`` (16)
validating at once (a 429 ``too_many_validating_batches`` beyond), and the API renews their
leases while it reads them (a batch whose API died is failed by the sweeper:
``validation_interrupted``). Over one of the
tenant's quotas (``store.quotas``) a create is refused with 429 and the quota's code, nothing
queued; a batch already answered ``validating`` ends ``failed`` with that code instead. A batch's
``errors`` hold the first 100 line errors; ``errors.total_count`` (tokenmill's)
counts them all."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, BackgroundTasks, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, HttpUrl
from sqlalchemy.engine import Engine
from starlette.concurrency import run_in_threadpool

import store
from api.deps import ID_PATTERN, AfterCursor, EngineDep, ObjectId, SettingsDep, TenantDep
from api.errors import (
    APIError,
    Conflict,
    InvalidRequest,
    NotFound,
    RateLimitExceeded,
    ServiceUnavailable,
    database_unavailable,
    over_quota,
)
from api.routes.json_checks import CheckedJSONRoute
from api.validation_slots import TenantFairSlots
from config import Settings
from store.export import in_chunks
from store.log_redaction import redacted_error_text
from store.tables import MAX_WEBHOOK_URL_CHARS
from telemetry import tracing
from workers.agent_tasks import check_agent_run_body
from workers.webhooks import (
    WEBHOOK_LOOKUPS_BUSY,
    WEBHOOK_RESOLVE_SECONDS,
    WEBHOOK_RESOLVER_BUSY,
    WebhookResolver,
    WebhookURLRefused,
)

__all__ = ["Dispatch", "dispatch_or_leave_to_sweeper", "router"]

# Its create call's body is read into a model: checked first as every producer's JSON is.
router = APIRouter(prefix="/v1/batches", tags=["batches"], route_class=CheckedJSONRoute)

# Sends a batch's queued requests to the workers (set on app.state by create_app).
Dispatch = Callable[[Engine, str], None]

_logger = logging.getLogger("tokenmill.api")

# How long a batch read after its create answered waits out a ledger out of reach (a lock held
# past the API's lock timeout, a restart, a failover) before it is failed, and how often it tries.
_FILL_WAITS_FOR_DATABASE_SECONDS = 600.0
_FILL_RETRY_SECONDS = 2.0


async def dispatch_or_leave_to_sweeper(request: Request, engine: Engine, batch_id: str) -> bool:
    """Send the batch's requests to the workers; False when the broker could not take them. The
    rows are committed and stay queued: the sweeper sends them once the broker is back, so the
    caller answers with the id of what will run, never with an error for it."""
    return await _dispatch_or_leave_to_sweeper(request.app, engine, batch_id)


async def _dispatch_or_leave_to_sweeper(app: Any, engine: Engine, batch_id: str) -> bool:
    dispatch: Dispatch = app.state.dispatch
    try:
        # The root of the batch's trace: its chunk messages carry this span (telemetry.tracing).
        with tracing.span("tokenmill batch dispatch", {"tokenmill.batch_id": batch_id}):
            await run_in_threadpool(dispatch, engine, batch_id)
    except Exception as e:
        _logger.warning("dispatch of %s failed (%s); the sweeper will send it", batch_id, type(e).__name__)
        return False
    return True


class OutputExpiresAfter(BaseModel):
    """OpenAI's ``output_expires_after``, checked as OpenAI checks it (1 hour to 30 days after
    creation). Output files are made from the ledger and kept until deleted: an expiry asked for
    never shortens what is kept."""

    model_config = ConfigDict(extra="forbid")

    anchor: Literal["created_at"]
    seconds: int = Field(ge=3600, le=2_592_000)


class BatchCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_file_id: str = Field(pattern=ID_PATTERN)
    endpoint: str = Field(max_length=100)
    # OpenAI's only window (the SDK's ``Literal["24h"]``); anything else is 400 naming the param.
    completion_window: Literal["24h"] = "24h"
    metadata: dict[str, str] | None = None
    output_expires_after: OutputExpiresAfter | None = None  # the openai SDK's own argument
    # tokenmill extensions
    model: str | None = Field(default=None, description="default model for short-form lines")
    skip_invalid: bool = False
    webhook_url: HttpUrl | None = Field(default=None, description="POSTed the batch object when it ends")
    priority: int = Field(default=0, ge=0, le=9)


async def _checked_webhook_url(
    request: Request, tenant: store.Tenant, url: HttpUrl | None, settings: Settings
) -> str | None:
    """The URL, once its host resolves to public addresses only (``workers.webhooks``), looked
    up by the app's ``WebhookResolver``: the host's name server is the tenant's to make slow."""
    if url is None:
        return None
    if len(str(url)) > MAX_WEBHOOK_URL_CHARS:  # as normalised: "é" is kept as "%C3%A9"
        raise InvalidRequest(
            f"the webhook URL is longer than {MAX_WEBHOOK_URL_CHARS} characters once normalised",
            param="webhook_url",
            code="webhook_url_too_long",
        )
    resolver: WebhookResolver = request.app.state.webhook_resolver
    try:
        await resolver.resolve(str(url), allow_private=settings.webhook_allow_private, owner=tenant.id)
    except WebhookURLRefused as e:
        busy: APIError | None = None
        if e.code == WEBHOOK_LOOKUPS_BUSY:
            busy = RateLimitExceeded(str(e), code=e.code)
        elif e.code == WEBHOOK_RESOLVER_BUSY:  # other tenants' look-ups: not this caller's doing
            busy = ServiceUnavailable(str(e), code=e.code)
        if busy is not None:
            # Look-ups end within their wait or hang on: the SDK's own retries (0.5 s, 1 s) came
            # back to the same refusal.
            busy.retry_after = WEBHOOK_RESOLVE_SECONDS
            raise busy from e
        raise InvalidRequest(str(e), param="webhook_url", code=e.code) from e
    return str(url)


# A file read inside its create call has at most this many lines (and at most
# ``background_ingest_bytes``): a line costs the ingest ~85 us, so ~0.2 s of an API thread, as a
# cancel's chunk. Bounded by bytes alone, 27,000 short lines in 1 MiB held a thread 2.3 s, and a
# tenant creating many such batches at once took the threads every tenant's requests run on; past
# it a file is read after the call answers (``validating``), a few at a time per tenant and per
# process, as a large file is.
INLINE_INGEST_MAX_LINES = 2_000


def _more_lines_than(path: Path, limit: int) -> bool:
    """Whether the file at ``path`` (of at most ``background_ingest_bytes``: read whole, ~1 ms a
    MiB) has more than ``limit`` lines, a last one without its newline counted."""
    try:
        content = path.read_bytes()
    except FileNotFoundError:
        return False  # deleted meanwhile: the inline read says so (404)
    return content.count(b"\n") + (not content.endswith(b"\n")) > limit


def _prepare(
    engine: Engine, tenant: store.Tenant, body: BatchCreate, webhook_url: str | None, settings: Settings
) -> tuple[store.BatchSpec, Path, bool]:
    """(the checked batch, its input file, whether to read it after answering); ``webhook_url``
    checked already. A batch read later is written now, status ``validating``."""
    file = store.get_file(engine, body.input_file_id, tenant.id)
    if file is None:
        raise NotFound(f"No such File object: {body.input_file_id}", param="input_file_id")
    if file.kind != store.FileKind.UPLOAD or file.storage_path is None:
        raise InvalidRequest(f"{body.input_file_id} is not an uploaded input file", param="input_file_id")
    if file.purpose != "batch":
        raise InvalidRequest(
            f"{body.input_file_id} has purpose {file.purpose!r}, not 'batch'", param="input_file_id"
        )
    path = Path(file.storage_path)
    if not path.exists():
        raise NotFound(f"the content of {file.id} is no longer on this server", param="input_file_id")
    try:
        spec = store.prepare_batch(
            tenant_id=tenant.id,
            endpoint=body.endpoint,
            completion_window=body.completion_window,
            metadata=body.metadata,
            input_file_id=file.id,
            defaults={"model": body.model} if body.model else None,
            priority=body.priority,
            webhook_url=webhook_url,
        )
    except store.InvalidArgument as e:
        raise InvalidRequest(str(e), param=e.param, code=e.code) from e
    try:
        # A tenant already at a quota is refused before its file is read; the quota is enforced
        # when the rows are written (store.quotas), which a background validation does too.
        store.check_tenant_quotas(engine, tenant.id, new_requests=1, new_tokens=1)
    except store.QuotaExceeded as e:
        raise over_quota(e) from e
    in_background = (file.bytes or 0) > settings.background_ingest_bytes or _more_lines_than(
        path, INLINE_INGEST_MAX_LINES
    )  # an upload's bytes are always set
    if in_background:
        limit = settings.max_validating_batches_per_tenant
        try:
            spec = store.open_batch(
                engine, spec, lease_seconds=settings.validation_lease_seconds, max_validating=limit
            )
        except store.InvalidState as e:
            raise RateLimitExceeded(
                f"{limit} of your batches are still validating; create this one once one of them is "
                "in_progress or failed",
                code="too_many_validating_batches",
            ) from e
    return spec, path, in_background


def _fill(
    engine: Engine, spec: store.BatchSpec, path: Path, body: BatchCreate, settings: Settings
) -> store.IngestReport:
    with path.open("rb") as source:
        return store.fill_batch(
            engine,
            spec,
            source,
            skip_invalid=body.skip_invalid,
            max_body_bytes=settings.max_request_body_bytes,
            max_lines=settings.max_requests_per_batch,
            check_body=check_agent_run_body if spec.kind == store.RequestKind.AGENT_RUN else None,
        )


async def _fill_in_background(
    app: Any, engine: Engine, spec: store.BatchSpec, path: Path, body: BatchCreate, settings: Settings
) -> None:
    """Read an opened batch's file after the create call answered, then dispatch it. At most
    ``max_background_ingests`` run at once in this process (each holds up to ~64 MB); the rest
    wait, still ``validating``, and a freed slot goes to the waiting tenants in turn."""
    if getattr(app.state, "ingest_slots", None) is None:
        app.state.ingest_slots = TenantFairSlots(settings.max_background_ingests)
    slots: TenantFairSlots = app.state.ingest_slots
    # The batch's lease is renewed while it waits for a slot and while it is read: a batch whose
    # renewals stop (this process died) is failed by the sweeper.
    validating = _validations_held(app, engine, settings.validation_lease_seconds)
    validating.add(spec.batch_id)
    try:
        async with slots.slot(spec.row["tenant_id"]):
            try:
                report = await _fill_waiting_for_database(engine, spec, path, body, settings)
            except FileNotFoundError:
                message = f"the content of {spec.row['input_file_id']} was deleted before it was read"
                await run_in_threadpool(store.fail_batch, engine, spec.batch_id, "file_not_found", message)
                return
            except Exception:
                _logger.exception("validating batch %s failed", spec.batch_id)
                message = "the input file could not be read; it has been logged"
                await run_in_threadpool(store.fail_batch, engine, spec.batch_id, "internal_error", message)
                return
    finally:
        validating.discard(spec.batch_id)
    if report.status == store.BatchStatus.IN_PROGRESS:
        await _dispatch_or_leave_to_sweeper(app, engine, spec.batch_id)


async def _fill_waiting_for_database(
    engine: Engine, spec: store.BatchSpec, path: Path, body: BatchCreate, settings: Settings
) -> store.IngestReport:
    """``_fill``, tried again while the ledger is out of reach: the batch was answered
    ``validating`` already, and failing it lost its requests to a wait of seconds (an operator's
    lock past the API's lock timeout, a failover). Each try is one transaction that rolled back
    whole, and a batch cancelled or expired meanwhile is not filled; its lease is renewed as
    before while it waits."""
    deadline = asyncio.get_running_loop().time() + _FILL_WAITS_FOR_DATABASE_SECONDS
    while True:
        try:
            return await run_in_threadpool(_fill, engine, spec, path, body, settings)
        except Exception as error:
            if database_unavailable(error) is None or asyncio.get_running_loop().time() > deadline:
                raise
            _logger.warning(
                "validating batch %s waits for the database: %s", spec.batch_id, redacted_error_text(error)
            )
        await asyncio.sleep(_FILL_RETRY_SECONDS)


def _validations_held(app: Any, engine: Engine, lease_seconds: int) -> set[str]:
    """The ids of the batches this process validates (or will: waiting for a slot), whose
    leases one task renews together, so that many waiting batches cost one UPDATE a turn."""
    held: set[str] | None = getattr(app.state, "validations_held", None)
    if held is None:
        held = app.state.validations_held = set()
        app.state.validation_renewer = asyncio.create_task(_renew_validations(engine, held, lease_seconds))
    return held


async def _renew_validations(engine: Engine, held: set[str], lease_seconds: int) -> None:
    """Renew the leases of ``held`` every third of a lease, for the life of the process; a failed
    renewal is retried at the next turn."""
    while True:
        await asyncio.sleep(lease_seconds / 3)
        if not held:
            continue
        try:
            await run_in_threadpool(store.extend_validation, engine, sorted(held), lease_seconds)
        except Exception as e:
            _logger.warning("renewing %d validation lease(s) failed (%s)", len(held), type(e).__name__)


@router.post("")
async def create_batch(
    body: BatchCreate,
    request: Request,
    background: BackgroundTasks,
    tenant: TenantDep,
    engine: EngineDep,
    settings: SettingsDep,
) -> dict[str, Any]:
    """Validate the input file line by line and queue its requests. A file with bad lines gives a
    batch in status ``failed`` whose ``errors`` name each line, unless ``skip_invalid``. A file over
    ``background_ingest_bytes`` is validated after this answers: the batch is ``validating``, then
    ``in_progress`` or ``failed``."""
    webhook_url = await _checked_webhook_url(request, tenant, body.webhook_url, settings)
    spec, path, in_background = await run_in_threadpool(_prepare, engine, tenant, body, webhook_url, settings)
    if in_background:
        background.add_task(_fill_in_background, request.app, engine, spec, path, body, settings)
    else:
        try:
            report = await run_in_threadpool(_fill, engine, spec, path, body, settings)
        except FileNotFoundError as e:
            raise NotFound(
                f"the content of {body.input_file_id} is no longer on this server", param="input_file_id"
            ) from e
        except store.QuotaExceeded as e:
            raise over_quota(e) from e  # nothing of it was written
        if report.status == store.BatchStatus.IN_PROGRESS:
            await dispatch_or_leave_to_sweeper(request, engine, spec.batch_id)
    batch = await run_in_threadpool(store.get_batch, engine, spec.batch_id, tenant.id)
    assert batch is not None
    return store.batch_object(engine, batch)


def _tenant_batch(engine: Engine, tenant: store.Tenant, batch_id: str) -> store.Batch:
    batch = store.get_batch(engine, batch_id, tenant.id)
    # A single call's batch (hidden) is a ledger detail, not a batch of the producer's.
    if batch is None or batch.hidden:
        raise NotFound(f"No such Batch object: {batch_id}", param="batch_id")
    return batch


@router.get("/{batch_id}")
def retrieve_batch(batch_id: ObjectId, tenant: TenantDep, engine: EngineDep) -> dict[str, Any]:
    return store.batch_object(engine, _tenant_batch(engine, tenant, batch_id))


@router.get("")
def list_batches(
    tenant: TenantDep, engine: EngineDep, after: AfterCursor = None, limit: int = Query(20, ge=1, le=100)
) -> dict[str, Any]:
    page = store.list_batches(engine, tenant.id, after=after, limit=limit)
    data = [store.batch_object(engine, batch) for batch in page.data]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": page.has_more,
    }


# A cancel holds its API thread for one chunk's transaction (``store.batches.STOP_CHUNK_LINES``
# lines, ~0.1-0.2 s), whatever the batch's size: the one that moves the batch, after which none of
# its queued requests starts upstream (the chunk runner and the lane read its status). It answers
# ``cancelling``, as OpenAI does, and the sweep ends the rest (``store.finish_stopped_batches``).
# At ten chunks a cancel held a thread ~2 s: a tenant cancelling many large batches at once took
# that many of the threads every tenant's requests run on. A batch of up to a chunk answers
# ``cancelled`` as it always did.
CANCEL_CHUNKS_IN_REQUEST = 1


@router.post("/{batch_id}/cancel")
def cancel_batch(batch_id: ObjectId, tenant: TenantDep, engine: EngineDep) -> dict[str, Any]:
    _tenant_batch(engine, tenant, batch_id)
    try:
        batch = store.cancel_batch(engine, batch_id, max_chunks=CANCEL_CHUNKS_IN_REQUEST)
    except store.InvalidState as e:
        raise Conflict(str(e), param="batch_id") from e
    return store.batch_object(engine, batch)


@router.get("/{batch_id}/output", response_model=None)
def batch_output_so_far(batch_id: ObjectId, tenant: TenantDep, engine: EngineDep) -> StreamingResponse:
    """The output lines finished so far (OpenAI's output format), while the batch still runs."""
    _tenant_batch(engine, tenant, batch_id)
    return StreamingResponse(
        in_chunks(store.iter_output_lines(engine, batch_id)), media_type="application/jsonl"
    )


@router.get("/{batch_id}/errors", response_model=None)
def batch_errors_so_far(batch_id: ObjectId, tenant: TenantDep, engine: EngineDep) -> StreamingResponse:
    """The error lines so far, while the batch still runs."""
    _tenant_batch(engine, tenant, batch_id)
    return StreamingResponse(
        in_chunks(store.iter_error_lines(engine, batch_id)), media_type="application/jsonl"
    )
