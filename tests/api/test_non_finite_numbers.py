"""NaN and Infinity (which Python's ``json`` reads, and JSON, PostgreSQL's JSONB and most providers
do not) in every way a tenant's JSON enters the API, over real HTTP to a live ``tokenmill api``:
each is a 400 in OpenAI's error shape whose code is ``non_finite_number`` and whose ``param``
names where it was; nothing is queued or stored, and what else the tenant submitted is kept.
(Batch lines: ``test_a_poisoned_line_is_named_and_skip_invalid_runs_the_rest`` in test_api_input.py.)"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi.routing import APIRoute

import store
from api.app import ROUTERS
from api.routes.json_checks import CheckedJSONRoute, reads_a_json_model
from tests.api.conftest import LiveAPI

NON_FINITE = "non_finite_number"
GOOD_CHAT = '{"model": "m", "messages": [{"role": "user", "content": "hi"}]'


def chat_body(extra: str) -> bytes:
    """A chat completion body with ``extra`` (raw JSON members) added at its end."""
    return (GOOD_CHAT + (", " + extra if extra else "") + "}").encode()


# (raw members added to a good chat completion body, the param named)
CHAT_CASES: list[tuple[str, str | None]] = [
    ('"temperature": NaN', "temperature"),
    ('"stream": true, "temperature": NaN', "temperature"),
    ('"stream": true, "stream_options": {"include_usage": true}, "top_p": Infinity', "top_p"),
    ('"metadata": {"tag": NaN}', "metadata.tag"),
    ('"logit_bias": {"50256": -Infinity}', "logit_bias.50256"),
    (
        '"tools": [{"type": "function", "function": {"name": "f", "parameters": '
        '{"type": "object", "properties": {"x": {"type": "number", "maximum": NaN}}}}}]',
        "tools[0].function.parameters.properties.x.maximum",
    ),
    ('"messages": [{"role": "user", "content": [{"type": "text", "text": "hi", "x": NaN}]}]', None),
    (
        '"response_format": {"type": "json_schema", '
        '"json_schema": {"name": "s", "schema": {"minimum": -Infinity}}}',
        None,
    ),
]


def requests_of(api: LiveAPI, tenant: str) -> int:
    engine = store.make_engine(api.database_url)
    try:
        with engine.connect() as conn:
            query = (
                sa.select(sa.func.count()).select_from(store.Request).where(store.Request.tenant_id == tenant)
            )
            return int(conn.execute(query).scalar_one())
    finally:
        engine.dispose()


def assert_refused(answer: httpx.Response, param: str | None) -> dict[str, Any]:
    assert answer.status_code == 400, answer.text[:300]
    error = answer.json()["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", NON_FINITE), error
    assert "NaN" in error["message"]
    if param is not None:
        assert error["param"] == param, error
    return dict(error)


def auth(key: str, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", "Content-Type": "application/json", **extra}


@pytest.mark.parametrize(
    ("extra", "param"), CHAT_CASES, ids=[param or extra[:20] for extra, param in CHAT_CASES]
)
def test_a_chat_completion_with_a_non_finite_number_is_refused_by_name(
    live_api: LiveAPI, extra: str, param: str | None
) -> None:
    tenant = f"nan-chat-{abs(hash(extra))}"
    key = live_api.new_key(tenant)
    answer = httpx.post(
        f"{live_api.base_url}/chat/completions", headers=auth(key), content=chat_body(extra), timeout=30
    )
    error = assert_refused(answer, param)
    if param is None:  # a nested one: its path, whatever the members' order
        assert error["param"].startswith(("messages[0].content[0].x", "response_format.")), error
    assert requests_of(live_api, tenant) == 0


@pytest.mark.parametrize("wait", [False, True], ids=["queued", "wait"])
def test_an_agent_run_with_a_non_finite_number_is_refused_by_name(live_api: LiveAPI, wait: bool) -> None:
    tenant = f"nan-agent-{wait}"
    key = live_api.new_key(tenant)
    for body, param in [
        (b'{"model": "m", "input": "hi", "max_turns": NaN}', "max_turns"),
        (b'{"model": "m", "input": "hi", "tools": ["calculator"], "x": {"y": [1, -Infinity]}}', "x.y[1]"),
    ]:
        answer = httpx.post(
            f"{live_api.base_url}/agent_runs",
            params={"wait": str(wait).lower()},
            headers=auth(key),
            content=body,
            timeout=30,
        )
        assert_refused(answer, param)
    assert requests_of(live_api, tenant) == 0


def test_an_idempotency_key_replays_the_refusal_and_runs_nothing(live_api: LiveAPI) -> None:
    tenant = "nan-idempotent"
    key = live_api.new_key(tenant)
    url = f"{live_api.base_url}/chat/completions"
    headers = auth(key, **{"Idempotency-Key": "nan-once"})
    first = httpx.post(url, headers=headers, content=chat_body('"temperature": NaN'), timeout=30)
    again = httpx.post(url, headers=headers, content=chat_body('"temperature": NaN'), timeout=30)
    assert_refused(first, "temperature")
    assert_refused(again, "temperature")
    assert again.headers.get("idempotent-replayed") == "true"
    assert first.json() == again.json()
    assert requests_of(live_api, tenant) == 0


def upload(api: LiveAPI, key: str, content: bytes) -> str:
    uploaded = httpx.post(
        f"{api.base_url}/files",
        headers={"Authorization": f"Bearer {key}"},
        files={"file": ("in.jsonl", content)},
        data={"purpose": "batch"},
        timeout=30,
    )
    assert uploaded.status_code == 200, uploaded.text
    return str(uploaded.json()["id"])


@pytest.mark.parametrize(
    ("member", "param"),
    [
        ('"metadata": {"tag": NaN}', "metadata.tag"),
        ('"priority": NaN', "priority"),
        ('"completion_window": Infinity', "completion_window"),
        ('"skip_invalid": NaN', "skip_invalid"),
        ('"x_extra": -Infinity', "x_extra"),
    ],
)
def test_a_batch_create_with_a_non_finite_number_is_refused_by_name(
    live_api: LiveAPI, member: str, param: str
) -> None:
    tenant = f"nan-batch-{param}"
    key = live_api.new_key(tenant)
    line = {
        "custom_id": "a",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": json.loads(chat_body("")),
    }
    file_id = upload(live_api, key, json.dumps(line).encode() + b"\n")
    body = f'{{"input_file_id": "{file_id}", "endpoint": "/v1/chat/completions", {member}}}'
    answer = httpx.post(f"{live_api.base_url}/batches", headers=auth(key), content=body.encode(), timeout=30)
    assert_refused(answer, param)
    listed = httpx.get(f"{live_api.base_url}/batches", headers=auth(key), timeout=30).json()
    assert listed["data"] == []
    assert requests_of(live_api, tenant) == 0
    # What the tenant submitted before is kept: the file is there, and makes a batch once asked right.
    good = f'{{"input_file_id": "{file_id}", "endpoint": "/v1/chat/completions"}}'
    created = httpx.post(f"{live_api.base_url}/batches", headers=auth(key), content=good.encode(), timeout=30)
    assert created.status_code == 200, created.text
    assert requests_of(live_api, tenant) == 1


def test_every_route_reading_a_json_model_checks_its_body_first() -> None:
    """A route added later whose body FastAPI reads into a model gets the same checks."""
    routes = [route for router in ROUTERS for route in router.routes if isinstance(route, APIRoute)]
    model_routes = [route for route in routes if reads_a_json_model(route)]
    assert [route.path for route in model_routes] == ["/v1/batches"]
    assert all(isinstance(route, CheckedJSONRoute) for route in model_routes)


@pytest.mark.parametrize("authorization", [None, "Bearer tm-no-such-key"], ids=["no-key", "unknown-key"])
def test_a_refused_batch_body_from_no_known_key_hears_401_first(
    live_api: LiveAPI, authorization: str | None
) -> None:
    """As on every route, a caller with no valid key learns nothing of what is wrong with its body."""
    headers = {"authorization": authorization} if authorization else {}
    body = b'{"input_file_id": "file-x", "endpoint": "/v1/chat/completions", "metadata": {"tag": NaN}}'
    answer = httpx.post(f"{live_api.base_url}/batches", headers=headers, content=body, timeout=30)
    assert answer.status_code == 401, answer.text
    assert answer.json()["error"]["code"] != NON_FINITE
