"""``POST /v1/agent_runs`` and ``GET /v1/agent_runs/{id}``: declarative assistant runs on the workers.

A run becomes a one-line batch of kind ``agent_run`` (endpoint ``/v1/agent_runs``), so it gets the
ledger's leases, the sweeper, the cache and the limiter like any batch line, and its usage lands in
``/v1/usage``. Agent runs submitted as lines of a batch are read back here by their request id too.

The body (see ``workers.agent_tasks``): ``model``, ``system_message``, ``tools``,
``max_tool_iterations``, ``output_schema``, ``extra_create_args``, ``input`` (a string or OpenAI
messages) and an optional ``conversation_id``. ``?wait=true`` answers once the run finished.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from sqlalchemy.engine import Engine
from starlette.concurrency import run_in_threadpool

import store
from api.deps import ID_PATTERN, EngineDep, ObjectId, SettingsDep, TenantDep
from api.errors import InvalidRequest, NotFound, ServiceUnavailable
from api.routes.batches import dispatch_or_leave_to_sweeper
from api.routes.single_request import ingest_single, json_object_body, wait_for
from workers.agent_tasks import check_agent_run_body

__all__ = ["agent_run_object", "router"]

router = APIRouter(tags=["agent_runs"])
ENDPOINT = "/v1/agent_runs"
SOURCE_METADATA = {"tokenmill_source": "agent_runs"}
_POLL_SECONDS = (0.02, 0.05, 0.1, 0.2, 0.5)
_PENDING = {store.RequestStatus.QUEUED: "queued", store.RequestStatus.RUNNING: "in_progress"}


def agent_run_object(run: store.AgentRunRecord) -> dict[str, Any]:
    """The run as the API answers it: status, then (once finished) output, transcript, usage."""
    request, result = run.request, run.result
    body = request.body
    obj: dict[str, Any] = {
        "id": request.id,
        "object": "agent_run",
        "created_at": request.created_at,
        "batch_id": request.batch_id,
        "model": body.get("model"),
        "conversation_id": body.get("conversation_id"),
        "status": _PENDING.get(request.status, request.status.value),
        "output": None,
        "error": None,
    }
    if result is None:
        return obj
    obj["finished_at"] = request.finished_at
    if result.status is store.RequestStatus.SUCCEEDED and result.response_body is not None:
        response = result.response_body
        obj.update(
            {
                key: response.get(key)
                for key in (
                    "conversation_id",
                    "status",
                    "stop_reason",
                    "output",
                    "parsed_output",
                    "transcript",
                    "model_calls",
                )
            }
        )
        if response.get("error"):
            obj["error"] = {"code": "incomplete", "message": response["error"]}
    else:
        obj["status"] = result.status.value
        obj["error"] = {"code": result.error_code, "message": result.error_message}
    obj["usage"] = {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
        "cached": result.cached,
        "billed": not result.cached,
    }
    return obj


def _run_of(engine: Engine, tenant_id: str, run_id: str) -> store.AgentRunRecord:
    run = store.get_agent_run(engine, run_id, tenant_id)
    if run is None:
        raise NotFound(f"No such agent run: {run_id}", param="run_id")
    return run


@router.post("/v1/agent_runs")
async def create_agent_run(
    request: Request,
    tenant: TenantDep,
    engine: EngineDep,
    settings: SettingsDep,
    wait: Annotated[bool, Query(description="answer once the run finished")] = False,
) -> dict[str, Any]:
    """Start an assistant run; returns it at once (``status: queued``), or finished with ``wait``."""
    body = await json_object_body(request)
    body.setdefault("model", settings.default_model)
    try:
        # The workers would fail the run on an unknown tool; say so now, before anything is queued.
        check_agent_run_body(body)
    except store.InvalidArgument as e:
        raise InvalidRequest(str(e), param=e.param, code=e.code) from e
    if body.get("conversation_id") is not None:  # null is no conversation, as the workers read it
        if not re.match(ID_PATTERN, str(body["conversation_id"])):
            raise InvalidRequest("'conversation_id' is not an id", param="conversation_id")
        try:
            await run_in_threadpool(
                store.check_conversation, engine, str(body["conversation_id"]), tenant_id=tenant.id
            )
        except store.ConversationNotFound as e:
            raise NotFound(f"No such conversation: {body['conversation_id']}", param="conversation_id") from e
    batch_id = await ingest_single(
        engine,
        tenant.id,
        endpoint=ENDPOINT,
        custom_id="agent_run",
        body=body,
        metadata=SOURCE_METADATA,
        max_body_bytes=settings.max_request_body_bytes,
        invalid_message="the run is invalid",
    )
    [run_id] = await run_in_threadpool(store.pending_request_ids, engine, batch_id)
    # The answer carries the run's id: if the broker is down, the sweeper sends the run later.
    await dispatch_or_leave_to_sweeper(request, engine, batch_id)
    run = await run_in_threadpool(_run_of, engine, tenant.id, run_id)
    if wait and run.result is None:

        async def finished() -> store.AgentRunRecord | None:
            current = await run_in_threadpool(_run_of, engine, tenant.id, run_id)
            return current if current.result is not None else None

        done = await wait_for(
            finished, request=request, seconds=settings.sync_timeout_seconds, schedule=_POLL_SECONDS
        )
        if done is None:
            raise ServiceUnavailable(
                f"run {run_id} did not finish within {settings.sync_timeout_seconds:.0f} s; "
                f"GET /v1/agent_runs/{run_id} later",
                code="timeout",
                bound_to=run_id,  # it goes on running: a retry must not start a second one
            )
        run = done
    return agent_run_object(run)


@router.get("/v1/agent_runs/{run_id}")
async def retrieve_agent_run(run_id: ObjectId, tenant: TenantDep, engine: EngineDep) -> dict[str, Any]:
    """A run of this tenant (another tenant's id is not found)."""
    return agent_run_object(await run_in_threadpool(_run_of, engine, tenant.id, run_id))
