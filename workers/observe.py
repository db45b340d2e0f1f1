"""The workers' hooks into ``telemetry``: what the chunk runner and the result writer tell the
metrics and the logs about a request, each one line at its call site (``workers.runner``,
``workers.result_writer``, ``workers.pipeline``).

Per request task: its scope (batch, request, tenant, model: on every log line and metric of the
task) and its time in flight; per claim: leases reclaimed from a dead or frozen worker; per ledger
write: what the ledger kept (``telemetry.metrics.observe_recorded``).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

from store import ClaimedRequest
from telemetry import metrics, tracing
from telemetry.context import RequestScope, enter_request

__all__ = [
    "chunk_span",
    "claimed",
    "ended",
    "recorded_request",
    "request_span",
    "requested_model",
    "started",
]


def requested_model(body: dict[str, Any]) -> str | None:
    model = body.get("model")
    return model if isinstance(model, str) else None


def claimed(requests: Sequence[ClaimedRequest]) -> None:
    """Count the leases reclaimed among requests just claimed (their worker died or froze)."""
    for request in requests:
        if request.reclaimed:
            metrics.observe_reclaimed_lease(requested_model(request.body), request.tenant_id)


def started(request: ClaimedRequest) -> None:
    """In the request's own task, as it starts: its scope, and one more in flight."""
    model = requested_model(request.body)
    enter_request(RequestScope(request.batch_id, request.id, request.tenant_id, model))
    metrics.request_started(model)


def ended(request: ClaimedRequest) -> None:
    metrics.request_ended(requested_model(request.body))


def recorded_request(request: ClaimedRequest | None) -> metrics.RecordedRequest | None:
    if request is None:
        return None
    return metrics.RecordedRequest(requested_model(request.body), request.tenant_id)


def chunk_span(size: int, traceparent: str | None) -> AbstractContextManager[Any]:
    """A chunk's span, continuing its dispatch's trace (``telemetry.tracing``)."""
    return tracing.span("tokenmill chunk", {"tokenmill.chunk.requests": size}, traceparent=traceparent)


def request_span(request: ClaimedRequest) -> AbstractContextManager[Any]:
    """One request's run: its model calls' spans are its children; ids and kind, never its body."""
    if not tracing.enabled():
        return tracing.span("")  # the shared null context
    attributes = {
        "tokenmill.request_id": request.id,
        "tokenmill.batch_id": request.batch_id,
        "tokenmill.request.kind": request.kind.value,
        "tokenmill.request.attempts": request.attempts,
    }
    return tracing.span("tokenmill request", attributes)
