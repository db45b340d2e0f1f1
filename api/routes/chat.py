"""``POST /v1/chat/completions``: OpenAI-compatible and synchronous, served by the workers.

The request becomes a one-line batch: it goes through the same ledger, cache, rate limits and
retries as any batch line and its usage is recorded the same way; this route waits for its result.
``stream: true`` is answered as a stream once the result is in (the chunks replay the finished
completion), so streaming clients work unchanged.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy.engine import Engine
from starlette.concurrency import run_in_threadpool

import store
from api.deps import EngineDep, SettingsDep, TenantDep
from api.errors import APIError, ServiceUnavailable, UpstreamFailed
from api.routes.single_request import dispatch_or_cancel, ingest_single, json_object_body, wait_for

__all__ = ["router"]

router = APIRouter(tags=["chat"])
SYNC_METADATA = {"tokenmill_source": "chat.completions"}
_POLL_SECONDS = (0.01, 0.02, 0.05, 0.1, 0.2)


def _outcome(engine: Engine, batch_id: str) -> dict[str, Any] | None:
    """The finished request's output or error line, or None while it runs."""
    batch = store.get_batch(engine, batch_id)
    if batch is None or batch.status not in store.ENDED_STATUSES:
        return None
    for line in store.iter_output_lines(engine, batch_id):
        outcome: dict[str, Any] = json.loads(line)
        return outcome
    for line in store.iter_error_lines(engine, batch_id):
        outcome = json.loads(line)
        return outcome
    return {"error": {"code": "cancelled", "message": f"the request was {batch.status}"}, "response": None}


async def _cancel_after_timeout(engine: Engine, batch_id: str, seconds: float) -> dict[str, Any]:
    """Cancel a request not answered in time. Raises ``ServiceUnavailable``: freeing the
    Idempotency-Key when nothing ran, bound to the batch when a call already upstream goes on (and
    is billed), so that a retry replays this answer rather than paying again. Returns the outcome
    when the request ended by itself meanwhile."""
    batch = await run_in_threadpool(store.cancel_batch, engine, batch_id)
    if batch.status == store.BatchStatus.CANCELLED:
        raise ServiceUnavailable(
            f"no result within {seconds:.0f} s; the request was cancelled before it ran", code="timeout"
        )
    outcome = await run_in_threadpool(_outcome, engine, batch_id)
    if outcome is None:
        raise ServiceUnavailable(
            f"no result within {seconds:.0f} s; batch {batch_id} is cancelled, but its call already sent "
            "to the model provider finishes and is billed",
            code="timeout",
            bound_to=batch_id,
        )
    return outcome


def _error_for(outcome: dict[str, Any]) -> APIError:
    error = outcome.get("error") or {}
    response = outcome.get("response") or {}
    status_code = int(response.get("status_code") or 0)
    message = str(error.get("message") or "the request failed")
    code = error.get("code")
    if 400 <= status_code < 500 and status_code != 429:
        failure = APIError(message, code=code)
        failure.status_code = status_code
        failure.type = "invalid_request_error"
        return failure
    return UpstreamFailed(f"the model provider failed: {message}", code=code)


def _stream(completion: dict[str, Any]) -> Iterator[bytes]:
    """SSE chunks replaying a finished completion, ending with usage and ``[DONE]``."""
    base = {
        "id": completion.get("id"),
        "object": "chat.completion.chunk",
        "created": completion.get("created", int(time.time())),
        "model": completion.get("model"),
    }
    for choice in completion.get("choices", []):
        message = choice.get("message") or {}
        delta: dict[str, Any] = {"role": "assistant", "content": message.get("content")}
        if message.get("tool_calls"):
            delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]
        chunk = {
            **base,
            "choices": [{"index": choice.get("index", 0), "delta": delta, "finish_reason": None}],
        }
        yield f"data: {json.dumps(chunk)}\n\n".encode()
        end = {"index": choice.get("index", 0), "delta": {}, "finish_reason": choice.get("finish_reason")}
        yield f"data: {json.dumps({**base, 'choices': [end]})}\n\n".encode()
    if completion.get("usage") is not None:
        yield f"data: {json.dumps({**base, 'choices': [], 'usage': completion['usage']})}\n\n".encode()
    yield b"data: [DONE]\n\n"


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(
    request: Request, tenant: TenantDep, engine: EngineDep, settings: SettingsDep
) -> JSONResponse | StreamingResponse:
    """A chat completion, exactly as OpenAI's endpoint takes and answers it."""
    body = await json_object_body(request)
    stream = bool(body.pop("stream", False))
    body.pop("stream_options", None)
    body.setdefault("model", settings.default_model)
    batch_id = await ingest_single(
        engine,
        tenant.id,
        endpoint="/v1/chat/completions",
        custom_id="request",
        body=body,
        metadata=SYNC_METADATA,
        max_body_bytes=settings.max_request_body_bytes,
        invalid_message="the request is invalid",
    )
    await dispatch_or_cancel(request, engine, batch_id)
    outcome = await wait_for(
        lambda: run_in_threadpool(_outcome, engine, batch_id),
        request=request,
        seconds=settings.sync_timeout_seconds,
        schedule=_POLL_SECONDS,
    )
    if outcome is None:
        outcome = await _cancel_after_timeout(engine, batch_id, settings.sync_timeout_seconds)
    response = outcome.get("response") or {}
    if outcome.get("error") is not None or response.get("status_code") != 200:
        raise _error_for(outcome)
    completion: dict[str, Any] = response["body"]
    headers = {"x-request-id": str(outcome.get("id"))}
    if stream:
        return StreamingResponse(_stream(completion), media_type="text/event-stream", headers=headers)
    return JSONResponse(completion, headers=headers)
