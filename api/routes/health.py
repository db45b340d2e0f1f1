"""Liveness and readiness."""

from __future__ import annotations

from typing import Any

import redis
from fastapi import APIRouter
from fastapi.responses import JSONResponse

import store
from api.deps import EngineDep, SettingsDep

__all__ = ["router"]

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process answers."""
    return {"status": "ok"}


@router.get("/readyz", response_model=None)
def readyz(engine: EngineDep, settings: SettingsDep) -> dict[str, Any] | JSONResponse:
    """The database is reachable and at the code's schema revision, and the broker answers."""
    checks: dict[str, str] = {}
    try:
        store.require_schema_at_head(engine)
        checks["database"] = "ok"
    except store.SchemaBehind as e:
        checks["database"] = str(e)
    except Exception as e:  # any driver error means "not ready", with its reason
        checks["database"] = f"unreachable: {type(e).__name__}: {e}"
    if settings.broker_url is None:
        checks["broker"] = "not configured (TOKENMILL_BROKER_URL is unset)"
    else:
        client = redis.Redis.from_url(settings.broker_url, socket_connect_timeout=2, socket_timeout=2)
        try:
            client.ping()
            checks["broker"] = "ok"
        except redis.RedisError as e:
            checks["broker"] = f"unreachable: {e}"
        finally:
            client.close()
    ready = all(value == "ok" for value in checks.values())
    body = {"status": "ready" if ready else "not ready", "checks": checks}
    return body if ready else JSONResponse(body, status_code=503)
