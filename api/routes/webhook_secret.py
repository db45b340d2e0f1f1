"""``GET /v1/webhook_secret`` and ``POST /v1/webhook_secret/rotate``: the secret that signs the
calling tenant's webhook deliveries (Standard Webhooks; ``openai``'s ``client.webhooks.unwrap(body,
headers, secret=...)`` verifies them). Rotating takes effect for every delivery sent from then on,
retries of earlier events included."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

import store
from api.deps import EngineDep, TenantDep

__all__ = ["router"]

router = APIRouter(prefix="/v1/webhook_secret", tags=["webhooks"])


def _secret_object(secret: str) -> dict[str, Any]:
    return {"object": "webhook_secret", "secret": secret}


@router.get("")
async def get_webhook_secret(tenant: TenantDep, engine: EngineDep) -> dict[str, Any]:
    return _secret_object(await run_in_threadpool(store.webhook_secret, engine, tenant.id))


@router.post("/rotate")
async def rotate_webhook_secret(tenant: TenantDep, engine: EngineDep) -> dict[str, Any]:
    return _secret_object(await run_in_threadpool(store.webhook_secret, engine, tenant.id, rotate=True))
