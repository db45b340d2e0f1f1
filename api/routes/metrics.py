"""``GET /metrics``: Prometheus figures for the operator, never for tenants.

Labels name tenants and their volumes and spend, so a tenant's key opens nothing here ("tenants
apart"): the route asks for ``Authorization: Bearer <TOKENMILL_METRICS_TOKEN>``, and without a token
configured it does not exist (404). It serves what the ledger says now (``telemetry.ledger_metrics``:
requests queued and running per model and tenant); requests, tokens, cost, cache and upstream
figures are counted by the workers, each serving its own ``/metrics`` (``telemetry.exporter``).
"""

from __future__ import annotations

import asyncio
import hmac

from fastapi import APIRouter, Header, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from api.deps import SettingsDep
from api.errors import NotFound, Unauthenticated

__all__ = ["router"]

router = APIRouter(tags=["metrics"])


@router.get("/metrics", include_in_schema=False)
async def metrics(
    request: Request, settings: SettingsDep, authorization: str | None = Header(None)
) -> Response:
    token = settings.metrics_token
    if token is None:
        raise NotFound("Not Found")
    expected = f"Bearer {token.get_secret_value()}".encode()
    if not hmac.compare_digest((authorization or "").encode("utf-8", "replace"), expected):
        raise Unauthenticated("/metrics needs the operator's metrics token (TOKENMILL_METRICS_TOKEN)")
    registry: CollectorRegistry = request.app.state.metrics_registry
    body = await asyncio.to_thread(generate_latest, registry)  # the ledger query: off the loop
    return Response(body, media_type=CONTENT_TYPE_LATEST)
