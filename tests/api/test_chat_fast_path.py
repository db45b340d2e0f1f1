"""What a chat completion costs the API process, counted on the real thing (PostgreSQL, Redis, the
simulator over HTTP, a lane consumer in this process): one thread hop (the key's look-up and the
call's rows together) and one write to the broker (its lane message and the wait for its reply).
Each hop is a thread wake-up and a GIL hand-over; each write a round trip and a wake-up of the event
loop: at 16 concurrent calls on 2 cores they were the API's latency (bench/sync_latency.py)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import anyio.to_thread
import httpx
import pytest
from redis.asyncio.connection import Connection

from simulator.testing import SimulatorServer
from tests.api.in_process import InProcess, in_process_api

T = TypeVar("T")


class CountingConnection(Connection):
    """A Redis connection that counts its writes (each a command, or a pipeline of them)."""

    writes = 0

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        CountingConnection.writes += 1
        await super().send_packed_command(command, check_health)


@pytest.fixture
async def in_process(
    postgres_url: str, redis_url: str, redis_prefix: str, simulator: SimulatorServer
) -> AsyncIterator[InProcess]:
    # The API's own broker connections count their writes.
    async with in_process_api(
        postgres_url,
        redis_url,
        redis_prefix,
        simulator,
        "fast-path-lane",
        api_connection_class=CountingConnection,
    ) as api:
        yield api


async def chat(api: InProcess, key: str | None = None) -> httpx.Response:
    return await api.client.post(
        "/v1/chat/completions",
        json={"model": "sim-model", "messages": [{"role": "user", "content": f"hi {uuid.uuid4().hex}"}]},
        headers={"Authorization": f"Bearer {key or api.key}"},
    )


async def test_a_chat_completion_costs_one_thread_hop_and_one_write_to_the_broker(
    in_process: InProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert (await chat(in_process)).status_code == 200  # connections opened, caches warm
    hops: list[str] = []
    run_sync = anyio.to_thread.run_sync

    async def counting_run_sync(func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        hops.append(getattr(func, "__name__", repr(func)))
        return await run_sync(func, *args, **kwargs)

    monkeypatch.setattr(anyio.to_thread, "run_sync", counting_run_sync)
    CountingConnection.writes = 0
    answer = await chat(in_process)
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"]
    assert answer.headers["x-request-id"].startswith("batch_req_")
    assert answer.headers["tokenmill-cache"] == "miss"
    assert len(hops) == 1, hops
    assert CountingConnection.writes == 1


async def test_the_fast_path_answers_errors_as_every_route_does(in_process: InProcess) -> None:
    unknown = await chat(in_process, key="sk-not-a-key")
    assert unknown.status_code == 401
    assert unknown.headers["www-authenticate"] == "Bearer"
    assert unknown.json()["error"]["code"] == "invalid_api_key"
    missing = await in_process.client.post("/v1/chat/completions", json={"messages": []})
    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "missing_api_key"
    bad = await in_process.client.post(
        "/v1/chat/completions",
        content=b"{not json",
        headers={"Authorization": f"Bearer {in_process.key}", "Content-Type": "application/json"},
    )
    assert bad.status_code == 400
    assert bad.json()["error"]["type"] == "invalid_request_error"
    # Other methods and paths still go through the routing.
    assert (await in_process.client.get("/v1/chat/completions")).status_code == 405
    assert (await in_process.client.post("/v1/chat/completions/x")).status_code == 404
    schema = (await in_process.client.get("/openapi.json")).json()
    assert "/v1/chat/completions" in schema["paths"]
