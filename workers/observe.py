"""The workers' hooks into ``telemetry``: what the chunk runner and the result writer tell the
metrics and the logs about a request, each one line at its call site (``workers.runner``,
``workers.result_writer``, ``workers.pipeline``).

Per request task: its scope (batch, request, tenant, model: on every log line and metric of the
task) and its time in flight; per claim: leases reclaimed from a dead or frozen worker; per ledger
write: what the ledger kept (``telemetry.metrics.observe_recorded``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from store import ClaimedRequest
from telemetry import metrics
from telemetry.context import RequestScope, enter_request

__all__ = ["claimed", "ended", "recorded_request", "requested_model", "started"]


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
