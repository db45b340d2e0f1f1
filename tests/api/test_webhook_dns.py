"""A webhook host whose DNS answers slowly or never, against the API in this process on the real
PostgreSQL. The resolver is the one fault injected here (the machine's DNS cannot be told to hang
for one name): ``socket.getaddrinfo`` blocks for that name until the test lets it go.

Before, ``POST /v1/batches`` resolved the webhook host on the API's shared thread pool (40
threads), for as long as the resolver took: a tenant whose domain's name server never answers
held a thread per create for the resolver's whole timeout, and 40 such creates at once left
every other tenant's request (the key's look-up included) waiting for a thread.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

import store
from api.app import create_app
from config import Settings
from store.schema import upgrade_to_head
from workers.webhooks import (
    WEBHOOK_RESOLVE_SECONDS,
    WEBHOOK_RESOLVER_BUSY,
    WEBHOOK_RESOLVER_THREADS,
    WEBHOOK_RESOLVES_PER_OWNER,
)

_HANGING_HOST = "hangs.webhooks.invalid"
# More creates than the API has threads.
_HOSTILE_CREATES = 60


class _HangingResolver:
    """``socket.getaddrinfo`` that blocks for ``_HANGING_HOST`` until released."""

    def __init__(self, real: Callable[..., Any]) -> None:
        self.real = real
        self.released = threading.Event()
        self.blocked = 0
        self.lock = threading.Lock()

    def __call__(self, host: Any, *args: Any, **kwargs: Any) -> Any:
        if host == _HANGING_HOST:
            with self.lock:
                self.blocked += 1
            self.released.wait(120)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return self.real(host, *args, **kwargs)


@pytest.fixture
async def api(postgres_url: str, tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    upgrade_to_head(postgres_url)
    settings = Settings(database_url=postgres_url, files_dir=tmp_path / "files")
    app = create_app(settings, dispatch=lambda engine, batch_id: None)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://api", timeout=120
    ) as client:
        yield client, app.state.engine
    app.state.engine.dispose()


async def _tenant_with_file(client: httpx.AsyncClient, engine: Any, name: str) -> tuple[dict[str, str], str]:
    tenant = store.create_tenant(engine, name)
    headers = {"Authorization": f"Bearer {store.create_api_key(engine, tenant.id)}"}
    line = '{"custom_id": "a", "prompt": "hi", "model": "sim-model"}\n'
    uploaded = await client.post(
        "/v1/files", headers=headers, files={"file": ("in.jsonl", line.encode())}, data={"purpose": "batch"}
    )
    assert uploaded.status_code == 200, uploaded.text
    return headers, uploaded.json()["id"]


async def test_a_webhook_host_whose_dns_never_answers_holds_up_no_other_tenant(
    api: tuple[httpx.AsyncClient, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    client, engine = api
    resolver = _HangingResolver(socket.getaddrinfo)
    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    hostile, hostile_file = await _tenant_with_file(client, engine, "hangs-dns")
    other, other_file = await _tenant_with_file(client, engine, "bystander")
    try:
        creates = [
            asyncio.create_task(
                client.post(
                    "/v1/batches",
                    headers=hostile,
                    json={
                        "input_file_id": hostile_file,
                        "endpoint": "/v1/chat/completions",
                        "webhook_url": f"https://{_HANGING_HOST}/hook",
                    },
                )
            )
            for _ in range(_HOSTILE_CREATES)
        ]
        # Every hostile create is answered or hangs in the resolver (before, 20 of them waited
        # for a thread of the API's pool, every one of which hung in the resolver) ...
        await _until(
            lambda: resolver.blocked + sum(task.done() for task in creates) >= _HOSTILE_CREATES,
            "the hostile creates wait for the API's threads",
        )
        # ... and another tenant's create is served while none of the look-ups has ended.
        served = await asyncio.wait_for(
            client.post(
                "/v1/batches",
                headers=other,
                json={"input_file_id": other_file, "endpoint": "/v1/chat/completions"},
            ),
            timeout=60,
        )
        assert served.status_code == 200, served.text
        assert not resolver.released.is_set()
        # Each hostile create hears, within the bound, that its host did not resolve, or (past its
        # share of look-ups at once) to retry later.
        answers = await asyncio.wait_for(asyncio.gather(*creates), timeout=WEBHOOK_RESOLVE_SECONDS * 10)
        codes = Counter((answer.status_code, answer.json()["error"]["code"]) for answer in answers)
        assert codes == {
            (400, "webhook_host_unresolved"): WEBHOOK_RESOLVES_PER_OWNER,
            (429, "webhook_lookups_busy"): _HOSTILE_CREATES - WEBHOOK_RESOLVES_PER_OWNER,
        }
        assert resolver.blocked == WEBHOOK_RESOLVES_PER_OWNER
    finally:
        resolver.released.set()


async def _until(condition: Callable[[], bool], failure: str, seconds: float = 60) -> None:
    try:
        async with asyncio.timeout(seconds):
            while not condition():  # noqa: ASYNC110 - counts other threads change
                await asyncio.sleep(0.01)
    except TimeoutError:
        pytest.fail(f"{failure} (still after {seconds:g} s)")


_RESOLVING_HOST = "resolves.webhooks.example"


async def test_another_tenants_webhook_host_is_not_said_unresolved_while_the_lookups_are_taken(
    api: tuple[httpx.AsyncClient, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A few tenants whose name servers hang (a DNS provider's outage, or tenants that collude)
    take every thread of the resolver, each within its share. Another tenant's look-up then waited
    in the pool's queue past the wait and was never tried, and its create heard a final 400
    ``webhook_host_unresolved`` for a host that resolves: now a 503 the SDK retries."""
    client, engine = api
    hanging = _HangingResolver(socket.getaddrinfo)

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host == _RESOLVING_HOST:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port))]
        return hanging(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    hanging_tenants = WEBHOOK_RESOLVER_THREADS // WEBHOOK_RESOLVES_PER_OWNER
    try:
        creates = []
        for index in range(hanging_tenants):
            headers, file_id = await _tenant_with_file(client, engine, f"dns-outage-{index}")
            creates += [
                asyncio.create_task(
                    client.post(
                        "/v1/batches",
                        headers=headers,
                        json={
                            "input_file_id": file_id,
                            "endpoint": "/v1/chat/completions",
                            "webhook_url": f"https://{_HANGING_HOST}/hook",
                        },
                    )
                )
                for _ in range(WEBHOOK_RESOLVES_PER_OWNER)
            ]
        await _until(
            lambda: hanging.blocked >= WEBHOOK_RESOLVER_THREADS, "the look-ups take the resolver's threads"
        )
        other, other_file = await _tenant_with_file(client, engine, "bystander")
        answer = await client.post(
            "/v1/batches",
            headers=other,
            json={
                "input_file_id": other_file,
                "endpoint": "/v1/chat/completions",
                "webhook_url": f"https://{_RESOLVING_HOST}/hook",
            },
        )
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"]["code"] == WEBHOOK_RESOLVER_BUSY
        assert answer.headers["retry-after"] == str(int(WEBHOOK_RESOLVE_SECONDS))
        await asyncio.gather(*creates)
    finally:
        hanging.released.set()
