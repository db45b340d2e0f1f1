"""``POST /v1/agent_runs`` against the API in this process on the real PostgreSQL (no workers:
a run is queued and answered ``queued``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import store
from api.app import create_app
from config import Settings
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
