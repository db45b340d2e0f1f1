"""What one tenant's uploads may hold on the files directory (``TOKENMILL_MAX_FILE_BYTES_PER_TENANT``).

Uploads are kept until deleted and were not limited at all: one tenant could fill the disk with
200 MB uploads, after which every tenant's upload failed 507 (and whatever else shares that disk).
Past its limit a tenant's upload is refused with 429 ``file_storage_quota_exceeded`` (not to be
retried), nothing of it stays on disk, and other tenants upload as before."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

import store
from api.app import create_app
from config import Settings
from tests.workers.support import ledger

UPLOAD_BYTES = 100_000
LIMIT_BYTES = 250_000  # two uploads fit, a third does not


@dataclass
class Tenants:
    first: httpx.AsyncClient
    second: httpx.AsyncClient
    files_dir: Path


@pytest.fixture
async def tenants(postgres_url: str, tmp_path: Path) -> AsyncIterator[Tenants]:
    led = ledger(postgres_url)
    files_dir = tmp_path / "files"
    settings = Settings(database_url=postgres_url, files_dir=files_dir, max_file_bytes_per_tenant=LIMIT_BYTES)
    app = create_app(settings, dispatch=lambda engine, batch_id: None)
    first_key = store.create_api_key(led.engine, led.tenant_id)
    second_key = store.create_api_key(led.engine, store.create_tenant(led.engine, "other").id)
    transport = httpx.ASGITransport(app=app)
    try:
        async with (
            httpx.AsyncClient(
                transport=transport, base_url="http://api", headers={"Authorization": f"Bearer {first_key}"}
            ) as first,
            httpx.AsyncClient(
                transport=transport, base_url="http://api", headers={"Authorization": f"Bearer {second_key}"}
            ) as second,
        ):
            yield Tenants(first, second, files_dir)
    finally:
        app.state.engine.dispose()
        led.engine.dispose()


async def upload(client: httpx.AsyncClient) -> httpx.Response:
    line = b'{"custom_id": "a", "body": {"model": "m", "messages": []}}\n'
    content = (line * (UPLOAD_BYTES // len(line) + 1))[:UPLOAD_BYTES]
    return await client.post(
        "/v1/files", data={"purpose": "batch"}, files={"file": ("in.jsonl", content, "application/jsonl")}
    )


def stored_bytes(files_dir: Path) -> int:
    return sum(path.stat().st_size for path in files_dir.rglob("*") if path.is_file())


def assert_over_storage(answer: httpx.Response) -> None:
    assert answer.status_code == 429, answer.text
    assert answer.json()["error"]["code"] == "file_storage_quota_exceeded"
    assert answer.headers.get("x-should-retry") == "false"  # only deleting files frees room


async def test_a_tenant_past_its_file_storage_is_refused_and_others_upload_as_before(tenants: Tenants) -> None:
    kept = [await upload(tenants.first) for _ in range(2)]
    assert [answer.status_code for answer in kept] == [200, 200]
    for _ in range(3):  # was: every upload kept, without end
        assert_over_storage(await upload(tenants.first))
    assert stored_bytes(tenants.files_dir) == 2 * UPLOAD_BYTES  # nothing of the refused ones stays
    # Another tenant's storage is its own.
    assert (await upload(tenants.second)).status_code == 200
    # Deleting a file makes room again.
    deleted = await tenants.first.delete(f"/v1/files/{kept[0].json()['id']}")
    assert deleted.status_code == 200, deleted.text
    assert (await upload(tenants.first)).status_code == 200


async def test_concurrent_uploads_cannot_both_pass_a_limit_only_one_fits(tenants: Tenants) -> None:
    answers = await asyncio.gather(*(upload(tenants.first) for _ in range(5)))
    assert sorted(answer.status_code for answer in answers) == [200, 200, 429, 429, 429]
    for answer in answers:
        if answer.status_code == 429:
            assert_over_storage(answer)
    assert stored_bytes(tenants.files_dir) == 2 * UPLOAD_BYTES
