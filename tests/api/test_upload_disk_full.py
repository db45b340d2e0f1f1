"""An upload that the disk cannot take (full, or a quota: here the process's file size limit, which
fails a write as a full disk does, without privileges) answers a named 507 in OpenAI's error shape
and leaves nothing behind: before, the half-written ``.partial`` file stayed on the full disk for
good (each failed upload kept the space it took) and the caller got a bare 500."""

from __future__ import annotations

import resource
import shutil
import signal
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

import store
from api.app import create_app
from config import Settings
from tests.workers.support import ledger

LIMIT_BYTES = 1024 * 1024


@pytest.fixture(autouse=True)
def writes_past_the_limit_fail() -> Iterator[None]:
    """SIGXFSZ ignored: a write past the file size limit fails with EFBIG, as on a full disk."""
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGXFSZ, previous)


@contextmanager
def file_size_limit() -> Iterator[None]:
    """While it lasts, this process's writes past LIMIT_BYTES fail (from any thread)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT_BYTES, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


@pytest.fixture
async def api(postgres_url: str, tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, Path]]:
    led = ledger(postgres_url)
    files_dir = tmp_path / "files"
    app = create_app(
        Settings(database_url=postgres_url, files_dir=files_dir), dispatch=lambda engine, batch_id: None
    )
    key = store.create_api_key(led.engine, led.tenant_id)
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
            base_url="http://api",
            headers={"Authorization": f"Bearer {key}"},
        ) as client:
            yield client, files_dir
    finally:
        app.state.engine.dispose()
        led.engine.dispose()


async def _upload(client: httpx.AsyncClient, size: int, idempotency_key: str | None = None) -> httpx.Response:
    line = b'{"custom_id": "a", "body": {"model": "m", "messages": []}}\n'
    return await client.post(
        "/v1/files",
        data={"purpose": "batch"},
        files={"file": ("in.jsonl", line * (size // len(line) + 1), "application/jsonl")},
        headers={} if idempotency_key is None else {"Idempotency-Key": idempotency_key},
    )


@pytest.mark.parametrize("refused_by", ["files_dir", "spool", "idempotency_spool"])
async def test_an_upload_the_disk_cannot_take_is_a_507_and_leaves_no_file(
    api: tuple[httpx.AsyncClient, Path], monkeypatch: pytest.MonkeyPatch, refused_by: str
) -> None:
    """``spool``: the form parser's temporary file is refused (the whole request under the limit);
    ``idempotency_spool``: the Idempotency-Key middleware's, which spools the whole body before
    the form parser (was a 500 ``internal_error``); ``files_dir``: the copy into the files
    directory alone is."""
    client, files_dir = api
    idempotency_key = "disk-full" if refused_by == "idempotency_spool" else None
    if refused_by == "files_dir":
        copy = shutil.copyfileobj

        def copy_on_a_full_disk(source: Any, target: Any, length: int = 0) -> None:
            with file_size_limit():
                copy(source, target, length)

        monkeypatch.setattr(shutil, "copyfileobj", copy_on_a_full_disk)
        answer = await _upload(client, 3 * LIMIT_BYTES)
        monkeypatch.undo()
    else:
        with file_size_limit():
            answer = await _upload(client, 3 * LIMIT_BYTES, idempotency_key)
    assert [p.name for p in files_dir.rglob("*") if p.is_file()] == []
    assert answer.status_code == 507, answer.text
    error = answer.json()["error"]
    assert error["code"] == "insufficient_storage"
    assert error["type"] == "server_error"
    # The disk mended, the same upload is taken.
    again = await _upload(client, 3 * LIMIT_BYTES, idempotency_key)
    assert again.status_code == 200, again.text


async def test_an_upload_to_a_files_directory_that_cannot_be_made_is_a_503(
    api: tuple[httpx.AsyncClient, Path],
) -> None:
    client, files_dir = api
    files_dir.parent.mkdir(parents=True, exist_ok=True)
    files_dir.write_bytes(b"")  # a file where the directory should be: no tenant directory in it
    answer = await _upload(client, 1024)
    assert answer.status_code == 503, answer.text
    error = answer.json()["error"]
    assert error["code"] == "service_unavailable"
    assert str(files_dir) not in error["message"]
