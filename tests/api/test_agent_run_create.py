"""``POST /v1/agent_runs`` against the API in this process on the real PostgreSQL (no workers:
a run is queued and answered ``queued``)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import store
from api.app import create_app
from config import Settings
from models.types import UserMessage
from store.schema import upgrade_to_head


@pytest.fixture
async def api(postgres_url: str, tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, dict[str, str]]]:
    upgrade_to_head(postgres_url)
    app = create_app(
        Settings(database_url=postgres_url, files_dir=tmp_path / "files"),
        dispatch=lambda engine, batch_id: None,
    )
    engine = app.state.engine
    tenant = store.create_tenant(engine, "agents")
    headers = {"Authorization": f"Bearer {store.create_api_key(engine, tenant.id)}"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as client:
        yield client, headers
    engine.dispose()


async def test_a_conversation_id_of_null_starts_a_new_conversation(
    api: tuple[httpx.AsyncClient, dict[str, str]],
) -> None:
    """``"conversation_id": null`` is no conversation, as the workers read it (and as an SDK
    writes an unset optional field). The API looked up a conversation named "None" and answered
    404 ``No such conversation: None``."""
    client, headers = api
    body: dict[str, Any] = {"model": "sim-model", "input": "hi", "conversation_id": None}
    created = await client.post("/v1/agent_runs", headers=headers, json=body)
    assert created.status_code == 200, created.text
    assert created.json()["status"] == "queued"
    assert created.json()["conversation_id"] is None


async def test_continuing_a_long_conversation_does_not_load_it_in_the_api(
    api: tuple[httpx.AsyncClient, dict[str, str]], postgres_url: str
) -> None:
    """The API checks that a run's conversation is the tenant's; it did so by loading and
    validating every message (~0.3 s of CPU, holding the GIL, per create for 30,000 short
    messages), before any quota was checked: each create of a run continuing a long conversation
    cost every tenant's calls that time. The workers load it; the API reads its row alone."""
    client, headers = api
    engine = store.make_engine(postgres_url)
    try:
        tenant = store.authenticate_api_key(engine, headers["Authorization"].removeprefix("Bearer "))
        assert tenant is not None
        message = UserMessage(content="x", source="user")
        long_id = store.create_conversation(engine, tenant.id, [message] * 60_000)
        short_id = store.create_conversation(engine, tenant.id, [message])
    finally:
        engine.dispose()

    async def create_cpu_seconds(conversation_id: str) -> float:
        started = time.process_time()
        body = {"model": "sim-model", "input": "more", "conversation_id": conversation_id}
        created = await client.post("/v1/agent_runs", headers=headers, json=body)
        assert created.status_code == 200, created.text
        assert created.json()["conversation_id"] == conversation_id
        return time.process_time() - started

    await create_cpu_seconds(short_id)  # warm
    short = min([await create_cpu_seconds(short_id) for _ in range(3)])
    long = min([await create_cpu_seconds(long_id) for _ in range(3)])
    assert long - short < 0.1, (
        f"a create continuing 60,000 messages: {long:.3f} s of CPU, one message {short:.3f} s"
    )


async def test_a_tool_timeout_past_the_bound_is_refused(
    api: tuple[httpx.AsyncClient, dict[str, str]],
) -> None:
    """A run holds its worker slot while a tool call runs; with a timeout of days, a tool that can
    be made to hang (one fetching a URL the tenant names) held the slot for good, and enough such
    runs held every worker's slots: every tenant's work waited. At most 600 s, else 400."""
    client, headers = api
    body: dict[str, Any] = {"model": "sim-model", "input": "hi", "tools": ["calculator"]}
    refused = await client.post("/v1/agent_runs", headers=headers, json={**body, "tool_timeout_seconds": 1e6})
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert (error["code"], error["param"]) == ("invalid_agent_run", "tool_timeout_seconds")
    taken = await client.post("/v1/agent_runs", headers=headers, json={**body, "tool_timeout_seconds": 600})
    assert taken.status_code == 200, taken.text
