"""The API app in this process (httpx's ASGI transport) with a lane consumer beside it, on the real
PostgreSQL, Redis and simulator: for tests of the single-call path that look inside the process."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx
import redis.asyncio as aioredis
from fastapi import FastAPI
from redis.asyncio.connection import Connection

import store
from api.app import create_app
from config import Settings
from simulator.testing import SimulatorServer
from tests.workers.support import ledger, serving_lane
from workers.lane_transport import LaneTransport


@dataclass
class InProcess:
    app: FastAPI
    key: str
    tenant_id: str
    client: httpx.AsyncClient


@asynccontextmanager
async def in_process_api(
    postgres_url: str,
    redis_url: str,
    redis_prefix: str,
    simulator: SimulatorServer,
    lane_owner: str,
    *,
    api_connection_class: type[Connection] = Connection,
) -> AsyncIterator[InProcess]:
    """The app, a key of a new tenant, and a client; the API's broker connections are of
    ``api_connection_class`` (a test may count what they send)."""
    led = ledger(postgres_url)
    settings = Settings(
        database_url=postgres_url,
        broker_url=redis_url,
        cache_url=redis_url,
        cache_prefix=f"{redis_prefix}cache:",
        key_prefix=redis_prefix,
    )
    app = create_app(settings, dispatch=lambda engine, batch_id: None)
    api_broker = aioredis.Redis.from_url(redis_url, connection_class=api_connection_class)
    app.state.lane_transport = LaneTransport(api_broker, redis_prefix)
    try:
        async with (
            serving_lane(led.engine, settings, simulator, lane_owner),
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://api", timeout=60
            ) as client,
        ):
            key = store.create_api_key(led.engine, led.tenant_id)
            yield InProcess(app, key, led.tenant_id, client)
    finally:
        await api_broker.aclose()
        app.state.engine.dispose()
        led.engine.dispose()
