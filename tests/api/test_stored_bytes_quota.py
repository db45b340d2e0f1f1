"""Uploads over a tenant's cap on stored file bytes are refused through the API: 400
``file_storage_quota_exceeded`` in OpenAI's error shape (as OpenAI answers its own storage limit),
with no file left on disk and no row; a tenant at its cap is refused before its body is read; other
tenants' uploads go on; deleting a file frees its bytes; concurrent uploads never pass the cap
together; the service default applies to a tenant with no cap of its own. Before, nothing capped
what one tenant stored, and a hostile tenant could fill the files disk for every tenant."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

import store
from api.app import create_app
from config import Settings
from tests.workers.support import ledger

CODE = "file_storage_quota_exceeded"
LINE = b'{"custom_id": "a", "body": {"model": "m", "messages": []}}\n'


@dataclass
class Tenants:
    engine: Engine
    files_dir: Path
    clients: dict[str, httpx.AsyncClient]
    ids: dict[str, str]

    def stored_on_disk(self, name: str) -> list[Path]:
        return sorted(path for path in (self.files_dir / self.ids[name]).rglob("*") if path.is_file())

    def rows(self, name: str) -> int:
        with self.engine.connect() as conn:
            count = conn.execute(
                sa.select(sa.func.count())
                .select_from(store.File)
                .where(store.File.tenant_id == self.ids[name])
            ).scalar_one()
        return int(count)


ApiFactory = Callable[..., AbstractAsyncContextManager[Tenants]]


@pytest.fixture
def api(postgres_url: str, tmp_path: Path) -> ApiFactory:
    """The API in process with ``settings`` given, and a client for each of tenants a and b."""

    @asynccontextmanager
    async def serve(**settings: Any) -> AsyncIterator[Tenants]:
        led = ledger(postgres_url)
        files_dir = tmp_path / "files"
        app = create_app(
            Settings(database_url=postgres_url, files_dir=files_dir, **settings),
            dispatch=lambda engine, batch_id: None,
        )
        ids = {"a": led.tenant_id, "b": store.create_tenant(led.engine, "b").id}
        clients: dict[str, httpx.AsyncClient] = {}
        try:
            for name, tenant_id in ids.items():
                key = store.create_api_key(led.engine, tenant_id)
                clients[name] = httpx.AsyncClient(
                    transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                    base_url="http://api",
                    headers={"Authorization": f"Bearer {key}"},
                )
            yield Tenants(led.engine, files_dir, clients, ids)
        finally:
            for client in clients.values():
                await client.aclose()
            app.state.engine.dispose()
            led.engine.dispose()

    return serve


def content(size: int) -> bytes:
    return (LINE * (size // len(LINE) + 1))[:size]


async def upload(client: httpx.AsyncClient, size: int) -> httpx.Response:
    return await client.post(
        "/v1/files",
        data={"purpose": "batch"},
        files={"file": ("in.jsonl", content(size), "application/jsonl")},
    )


async def quotas(client: httpx.AsyncClient) -> dict[str, Any]:
    answer = await client.get("/v1/usage")
    assert answer.status_code == 200, answer.text
    shown: dict[str, Any] = answer.json()["quotas"]
    return shown


def assert_refused(answer: httpx.Response, *mentions: int) -> None:
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", CODE, "file")
    for number in mentions:
        assert str(number) in error["message"], error["message"]
    assert answer.headers["x-should-retry"] == "false"


async def test_an_upload_over_the_cap_is_refused_and_nothing_of_it_is_kept(api: ApiFactory) -> None:
    async with api(default_max_stored_bytes=None) as tenants:
        a, b = tenants.clients["a"], tenants.clients["b"]
        store.set_tenant_quotas(tenants.engine, tenants.ids["a"], max_stored_bytes=3 * 1024 * 1024)
        first = await upload(a, 2 * 1024 * 1024)
        assert first.status_code == 200, first.text
        kept = tenants.stored_on_disk("a")
        # Past what is left, cut as it is copied (chunks of 1 MiB): no partial file stays.
        assert_refused(await upload(a, 5 * 1024 * 1024), 3 * 1024 * 1024, 2 * 1024 * 1024)
        assert tenants.stored_on_disk("a") == kept
        assert tenants.rows("a") == 1
        # A file that would fit if counted before the others is refused when added.
        assert_refused(await upload(a, 1024 * 1024 + 1))
        assert tenants.stored_on_disk("a") == kept
        assert tenants.rows("a") == 1
        shown = await quotas(a)
        assert (shown["max_stored_bytes"], shown["stored_bytes"], shown["remaining_stored_bytes"]) == (
            3 * 1024 * 1024,
            2 * 1024 * 1024,
            1024 * 1024,
        )
        # The other tenant's uploads are not touched by a's cap.
        for _ in range(3):
            assert (await upload(b, 2 * 1024 * 1024)).status_code == 200
        assert (await quotas(b))["max_stored_bytes"] is None


async def test_a_tenant_at_its_cap_is_refused_before_its_body_is_read(api: ApiFactory) -> None:
    async with api(default_max_stored_bytes=None) as tenants:
        a = tenants.clients["a"]
        store.set_tenant_quotas(tenants.engine, tenants.ids["a"], max_stored_bytes=1000)
        assert (await upload(a, 1000)).status_code == 200
        sent: list[int] = []
        boundary = "b0undary"
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="in.jsonl"\r\n'
            "Content-Type: application/jsonl\r\n\r\n"
        ).encode()

        async def body() -> AsyncIterator[bytes]:
            for index in range(64):
                sent.append(index)
                yield head if index == 0 else content(16 * 1024)
            yield f"\r\n--{boundary}--\r\n".encode()

        answer = await a.post(
            "/v1/files", content=body(), headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
        )
        assert_refused(answer, 1000)
        assert len(sent) <= 1, f"{len(sent)} chunks of the body were read"
        assert tenants.rows("a") == 1


async def test_deleting_a_file_frees_its_bytes(api: ApiFactory) -> None:
    async with api(default_max_stored_bytes=None) as tenants:
        a = tenants.clients["a"]
        store.set_tenant_quotas(tenants.engine, tenants.ids["a"], max_stored_bytes=1000)
        first = await upload(a, 1000)
        assert first.status_code == 200
        assert_refused(await upload(a, 10))
        deleted = await a.delete(f"/v1/files/{first.json()['id']}")
        assert deleted.status_code == 200, deleted.text
        assert (await quotas(a))["stored_bytes"] == 0
        assert tenants.stored_on_disk("a") == []
        assert (await upload(a, 1000)).status_code == 200


async def test_concurrent_uploads_never_pass_the_cap_together(api: ApiFactory) -> None:
    # All eight in flight at once (past the default cap on uploads in flight, 4).
    async with api(default_max_stored_bytes=None, max_uploads_in_flight_per_tenant=8) as tenants:
        a = tenants.clients["a"]
        store.set_tenant_quotas(tenants.engine, tenants.ids["a"], max_stored_bytes=2500)
        answers = await asyncio.gather(*(upload(a, 1000) for _ in range(8)))
        statuses = sorted(answer.status_code for answer in answers)
        assert statuses == [200, 200, 400, 400, 400, 400, 400, 400], [answer.text for answer in answers]
        for answer in answers:
            if answer.status_code == 400:
                assert_refused(answer)
        assert (await quotas(a))["stored_bytes"] == 2000
        assert tenants.rows("a") == 2
        assert len(tenants.stored_on_disk("a")) == 2, "the refused uploads left no file"


async def test_the_service_default_caps_a_tenant_without_its_own(api: ApiFactory) -> None:
    async with api(default_max_stored_bytes=1500) as tenants:
        a, b = tenants.clients["a"], tenants.clients["b"]
        store.set_tenant_quotas(tenants.engine, tenants.ids["b"], max_stored_bytes=10_000)
        assert (await upload(a, 1000)).status_code == 200
        assert_refused(await upload(a, 1000), 1500, 1000)
        assert (await quotas(a))["max_stored_bytes"] == 1500
        for _ in range(3):
            assert (await upload(b, 1000)).status_code == 200, "its own cap wins over the default"
        assert (await quotas(b))["max_stored_bytes"] == 10_000


def test_the_default_is_100_gib() -> None:
    assert Settings().default_max_stored_bytes == 100 * 1024**3
