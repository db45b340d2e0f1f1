"""What a hostile tenant tried on ``POST /v1/chat/completions`` (and the routes beside it), on the
real thing: PostgreSQL, Redis, the simulator over HTTP, a lane consumer in this process."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from starlette.types import Message

import store
from simulator.testing import SimulatorServer
from store.tables import MAX_MODEL_CHARS, Batch, Request
from tests.api.in_process import InProcess, in_process_api


@pytest.fixture
async def api(
    postgres_url: str, redis_url: str, redis_prefix: str, simulator: SimulatorServer
) -> AsyncIterator[InProcess]:
    async with in_process_api(postgres_url, redis_url, redis_prefix, simulator, "hostile-tenant-lane") as api:
        yield api


def requests_of(api: InProcess) -> int:
    with api.app.state.engine.connect() as connection:
        count = connection.execute(
            sa.select(sa.func.count()).select_from(Request).where(Request.tenant_id == api.tenant_id)
        ).scalar_one()
    return int(count)


def body(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": "sim-model", "messages": [{"role": "user", "content": content}], **extra}


async def cut_off(
    app: FastAPI, path: str, headers: list[tuple[bytes, bytes]], start: bytes = b'{"model": "x'
) -> list[Message]:
    """A POST announcing 1000 bytes, of which the first few come before the client goes; what was
    sent back."""
    incoming: list[Message] = [
        {"type": "http.request", "body": start, "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent: list[Message] = []

    async def receive() -> Message:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"api"), (b"content-length", b"1000"), *headers],
        "client": ("127.0.0.1", 5000),
        "server": ("api", 80),
    }
    await app(scope, receive, send)
    return sent


@pytest.mark.parametrize("valid_key", [True, False])
async def test_a_client_gone_mid_body_is_dropped_quietly(
    api: InProcess, valid_key: bool, caplog: pytest.LogCaptureFixture
) -> None:
    key = api.key if valid_key else "sk-not-a-key"
    auth = (b"authorization", f"Bearer {key}".encode())
    before = requests_of(api)
    with caplog.at_level(logging.DEBUG):
        chat = await cut_off(api.app, "/v1/chat/completions", [auth, (b"content-type", b"application/json")])
        upload = await cut_off(
            api.app,
            "/v1/files",
            [auth, (b"content-type", b"multipart/form-data; boundary=xyz")],
            b"--xyz\r\nContent-Disposition: form-data; na",
        )
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert errors == [], [r.getMessage() for r in errors]
    for sent in (chat, upload):
        assert all(m.get("status", 0) < 500 for m in sent if m["type"] == "http.response.start"), sent
    assert requests_of(api) == before


async def test_a_trailing_slash_does_not_burn_the_idempotency_key(api: InProcess) -> None:
    headers = {"Authorization": f"Bearer {api.key}", "Idempotency-Key": f"k-{uuid.uuid4().hex}"}
    payload = body(f"hi {uuid.uuid4().hex}")
    redirected = await api.client.post("/v1/chat/completions/", json=payload, headers=headers)
    assert redirected.status_code == 307
    answered = await api.client.post("/v1/chat/completions", json=payload, headers=headers)
    assert answered.status_code == 200, answered.text
    again = await api.client.post("/v1/chat/completions", json=payload, headers=headers)
    assert again.status_code == 200
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == answered.json()


def assert_upstream_refusal(answer: httpx.Response, status: int) -> None:
    assert answer.status_code == 502, answer.text
    assert "www-authenticate" not in answer.headers
    error = answer.json()["error"]
    assert error["code"] == "upstream_authentication_failed"
    assert error["type"] == "upstream_error"
    assert "provider" in error["message"]
    assert f"HTTP {status}" in error["message"]
    assert error["code"] != "invalid_api_key"


@pytest.mark.parametrize("status", [401, 403])
@pytest.mark.parametrize("stream", [False, True])
async def test_an_upstream_credentials_refusal_is_a_502_not_the_tenants_401(
    api: InProcess, status: int, stream: bool
) -> None:
    headers = {"Authorization": f"Bearer {api.key}", "Idempotency-Key": f"k-{uuid.uuid4().hex}"}
    payload = body(f"[[status {status}]] {uuid.uuid4().hex}", stream=stream)
    answer = await api.client.post("/v1/chat/completions", json=payload, headers=headers)
    assert_upstream_refusal(answer, status)
    # The tenant's own key still answers as valid.
    listed = await api.client.get("/v1/batches", headers={"Authorization": f"Bearer {api.key}"})
    assert listed.status_code == 200


async def test_a_model_longer_than_the_ledger_keeps_is_refused_before_anything_is_queued(
    api: InProcess,
) -> None:
    before = requests_of(api)
    for stream in (False, True):
        answer = await api.client.post(
            "/v1/chat/completions",
            json=body("hi", model="m" * 5000, stream=stream),
            headers={"Authorization": f"Bearer {api.key}"},
        )
        assert answer.status_code == 400, answer.text
        error = answer.json()["error"]
        assert error["type"] == "invalid_request_error"
        assert error["param"] == "model"
        assert str(MAX_MODEL_CHARS) in error["message"]
        assert len(json.dumps(error)) < 1000
    assert requests_of(api) == before


async def test_a_key_revoked_mid_request_leaves_the_idempotency_key_unused(
    api: InProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Idempotency-Key was taken under the key's tenant, then the route found the key revoked
    (the operator revoked it in between): its 401 is no outcome of the operation. Kept, the
    tenant's retry with its new key would have been answered that 401 for a day."""
    from api.routes import chat
    from store import create_api_key, revoke_api_key

    submit = chat.submit_interactive_for_key

    def revoked_first(engine: Any, key: str, *args: Any, **kwargs: Any) -> Any:
        revoke_api_key(engine, key)
        return submit(engine, key, *args, **kwargs)

    idempotency = {"Idempotency-Key": f"k-{uuid.uuid4().hex}"}
    payload = body(f"hi {uuid.uuid4().hex}")
    monkeypatch.setattr(chat, "submit_interactive_for_key", revoked_first)
    refused = await api.client.post(
        "/v1/chat/completions", json=payload, headers={"Authorization": f"Bearer {api.key}", **idempotency}
    )
    assert refused.status_code == 401
    monkeypatch.undo()
    new_key = create_api_key(api.app.state.engine, api.tenant_id, "after revocation")
    answered = await api.client.post(
        "/v1/chat/completions", json=payload, headers={"Authorization": f"Bearer {new_key}", **idempotency}
    )
    assert answered.status_code == 200, answered.text
    assert "idempotent-replayed" not in answered.headers


# --- the single call's one-statement key look-up and rows (store.submit_interactive_for_key) ---


def rows(api: InProcess) -> tuple[int, int]:
    """(requests, batches) in the whole ledger."""
    with api.app.state.engine.connect() as conn:
        requests = conn.execute(sa.select(sa.func.count()).select_from(Request)).scalar_one()
        batches = conn.execute(sa.select(sa.func.count()).select_from(Batch)).scalar_one()
    return int(requests), int(batches)


GOOD = {"model": "sim-model", "messages": [{"role": "user", "content": "hi"}]}
BODIES: list[Any] = [
    GOOD,
    {**GOOD, "stream": True},
    {"model": "sim-model"},  # no messages: the line check's 400, for a known key
    {**GOOD, "model": "m" * (MAX_MODEL_CHARS + 1)},
    {**GOOD, "stream": "yes"},  # the route's own 400, before the submit
    [1, 2],  # not an object
    {"model": "sim-model", "messages": [{"role": "user", "content": "a\u0000b"}]},
    {**GOOD, "seed": 10**40},
]


async def test_a_key_the_ledger_does_not_know_hears_401_whatever_its_body(api: InProcess) -> None:
    revoked = store.create_api_key(api.app.state.engine, api.tenant_id, "gone")
    assert store.revoke_api_key(api.app.state.engine, revoked)
    for key in ("tm-" + "x" * 40, revoked):
        for body in BODIES:
            answer = await api.client.post(
                "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
            )
            assert answer.status_code == 401, (body, answer.text)
            assert answer.json()["error"]["code"] == "invalid_api_key"
    assert rows(api) == (0, 0)


async def test_odd_keys_are_refused_and_queue_nothing(api: InProcess) -> None:
    for authorization in (
        b"Bearer ",
        b"Bearer  ",
        b"Bearer " + b"k" * 20_000,
        "Bearer tm-\u00e9\u00e8".encode("latin-1"),
        b"Bearer tm-\xff\xfe",
        b"Basic dG06eA==",
        b"Bearer tm-a tm-b",
        b"Bearer " + api.key.encode() + b"x",
        b"Bearer " + api.key[:-1].encode(),
    ):
        answer = await api.client.post(
            "/v1/chat/completions", json=GOOD, headers=[(b"authorization", authorization)]
        )
        assert answer.status_code == 401, (authorization[:40], answer.text)
    assert rows(api) == (0, 0)


async def test_each_keys_call_is_queued_under_its_own_tenant(api: InProcess) -> None:
    engine = api.app.state.engine
    other = store.create_tenant(engine, "other")
    other_key = store.create_api_key(engine, other.id, "k")
    for key, tenant_id in ((api.key, api.tenant_id), (other_key, other.id), (api.key, api.tenant_id)):
        answer = await api.client.post(
            "/v1/chat/completions", json=GOOD, headers={"Authorization": f"Bearer {key}"}
        )
        assert answer.status_code == 200, answer.text
        with engine.connect() as conn:
            row = conn.execute(
                sa.select(
                    Request.tenant_id, Batch.tenant_id, Batch.status, Batch.completed_count, Batch.hidden
                )
                .join(Batch, Batch.id == Request.batch_id)
                .where(Request.id == answer.headers["x-request-id"])
            ).one()
        assert tuple(row) == (tenant_id, tenant_id, store.BatchStatus.COMPLETED, 1, True)
