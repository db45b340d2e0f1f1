"""What the single-request routes share: the body's checks (``/v1/chat/completions``,
``/v1/agent_runs``); for agent runs, a hidden one-line batch dispatched to the workers and waited
for (chat completions take the interactive lane: ``api.routes.chat``)."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

from fastapi import Request
from sqlalchemy.engine import Engine
from starlette.concurrency import run_in_threadpool

import store
from api.errors import InvalidRequest, over_quota
from api.routes.json_checks import body_refused

__all__ = ["ingest_single", "json_object_body", "wait_for"]

T = TypeVar("T")

# Bodies up to this size are parsed on the event loop (cheaper than a thread hop).
_PARSE_ON_LOOP_BYTES = 64 * 1024


async def json_object_body(request: Request) -> dict[str, Any]:
    """The body as a JSON object, through the checks every batch line gets
    (``store.parse_json``): what a worker could not run is a 400 naming it, never a 500."""
    raw = await request.body()
    try:
        # A large body is parsed and checked off the event loop: a megabyte takes milliseconds
        # to tens of them, which would stall every other request of this process meanwhile.
        if len(raw) > _PARSE_ON_LOOP_BYTES:
            body = await run_in_threadpool(store.parse_json, raw)
        else:
            body = store.parse_json(raw)
    except store.JSONRejected as e:
        raise body_refused(e) from e
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    return body


def _ingest(
    engine: Engine,
    tenant_id: str,
    line: dict[str, Any],
    metadata: Mapping[str, str],
    max_body_bytes: int,
) -> store.IngestReport:
    return store.ingest_batch(
        engine,
        io.BytesIO(json.dumps(line).encode()),
        tenant_id=tenant_id,
        endpoint=line["url"],
        completion_window="24h",
        metadata=metadata,
        max_body_bytes=max_body_bytes,
        priority=9,
        hidden=True,
    )


async def ingest_single(
    engine: Engine,
    tenant_id: str,
    *,
    endpoint: str,
    custom_id: str,
    body: dict[str, Any],
    metadata: Mapping[str, str],
    max_body_bytes: int,
    invalid_message: str,
) -> str:
    """Write the request as a hidden one-line batch; returns the batch id, or raises
    ``InvalidRequest`` with the first validation error (``invalid_message`` if there is none), or
    ``RateLimitExceeded`` over one of the tenant's quotas (nothing written)."""
    line = {"custom_id": custom_id, "method": "POST", "url": endpoint, "body": body}
    try:
        report = await run_in_threadpool(_ingest, engine, tenant_id, line, metadata, max_body_bytes)
    except store.QuotaExceeded as e:
        raise over_quota(e) from e
    if report.status != store.BatchStatus.IN_PROGRESS:
        first = report.errors[0] if report.errors else None
        raise InvalidRequest(
            first.message if first else invalid_message,
            param=first.param if first else None,
            code=first.code if first else None,
        )
    return report.batch_id


async def wait_for(
    fetch: Callable[[], Awaitable[T | None]], *, request: Request, seconds: float, schedule: Sequence[float]
) -> T | None:
    """Poll ``fetch`` (sleeping along ``schedule``, then its last step) until it answers; None when
    ``seconds`` pass or the client goes away first."""
    deadline = time.monotonic() + seconds
    attempt = 0
    while (answer := await fetch()) is None:
        if time.monotonic() > deadline or await request.is_disconnected():
            return None
        await asyncio.sleep(schedule[min(attempt, len(schedule) - 1)])
        attempt += 1
    return answer
