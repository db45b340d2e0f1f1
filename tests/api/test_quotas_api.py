"""Quotas through the live API and the operator's CLI: ``tokenmill tenants set`` sets them, a
create over one is refused with 429 in OpenAI's error shape before anything is queued (batches,
chat completions, agent runs), and ``/v1/usage`` shows what is left. No workers run here, so what
is created stays queued."""

from __future__ import annotations

import io
import json
from typing import Any

import httpx
import openai
import pytest

from tests.api.conftest import LiveAPI


def upload(api: LiveAPI, key: str, lines: int, prefix: str) -> str:
    client = openai.OpenAI(base_url=api.base_url, api_key=key, max_retries=0)
    rows = [{"custom_id": f"{prefix}{i}", "prompt": "hello", "model": "gpt-4o-mini"} for i in range(lines)]
    content = "\n".join(json.dumps(row) for row in rows).encode()
    return client.files.create(file=io.BytesIO(content), purpose="batch").id


def create_batch(api: LiveAPI, key: str, file_id: str) -> httpx.Response:
    return httpx.post(
        f"{api.base_url}/batches",
        headers={"Authorization": f"Bearer {key}"},
        json={"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"},
        timeout=30,
    )


def quotas(api: LiveAPI, key: str) -> dict[str, Any]:
    reply = httpx.get(f"{api.base_url}/usage", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert reply.status_code == 200, reply.text
    shown: dict[str, Any] = reply.json()["quotas"]
    return shown


def assert_refused(reply: httpx.Response, code: str) -> None:
    assert reply.status_code == 429, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == ("rate_limit_error", code)
    assert error["message"]


def test_over_the_queued_requests_quota_every_create_is_refused_before_anything_is_queued(
    live_api: LiveAPI,
) -> None:
    key = live_api.new_key("quota-requests")
    set_quota = live_api.cli("tenants", "set", "quota-requests", "--max-queued-requests", "3")
    assert set_quota.returncode == 0, set_quota.stderr
    assert "of 3" in set_quota.stdout
    assert quotas(live_api, key)["max_queued_requests"] == 3

    first = create_batch(live_api, key, upload(live_api, key, 2, "a"))
    assert first.status_code == 200, first.text
    assert first.json()["status"] == "in_progress"
    shown = quotas(live_api, key)
    assert (shown["queued_requests"], shown["remaining_queued_requests"]) == (2, 1)

    too_many = create_batch(live_api, key, upload(live_api, key, 2, "b"))
    assert_refused(too_many, "queued_requests_quota_exceeded")
    listed = httpx.get(f"{live_api.base_url}/batches", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert [batch["id"] for batch in listed.json()["data"]] == [first.json()["id"]], "no batch was queued"

    assert create_batch(live_api, key, upload(live_api, key, 1, "c")).status_code == 200
    assert quotas(live_api, key)["remaining_queued_requests"] == 0
    headers = {"Authorization": f"Bearer {key}"}
    chat = httpx.post(
        f"{live_api.base_url}/chat/completions",
        headers=headers,
        json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
        timeout=30,
    )
    assert_refused(chat, "queued_requests_quota_exceeded")
    agent = httpx.post(
        f"{live_api.base_url}/agent_runs",
        headers=headers,
        json={"model": "gpt-4o-mini", "input": "hi"},
        timeout=30,
    )
    assert_refused(agent, "queued_requests_quota_exceeded")
    assert quotas(live_api, key)["queued_requests"] == 3, "the refused single requests left nothing queued"

    cleared = live_api.cli("tenants", "set", "quota-requests", "--max-queued-requests", "none")
    assert cleared.returncode == 0, cleared.stderr
    shown = quotas(live_api, key)
    assert (shown["max_queued_requests"], shown["remaining_queued_requests"]) == (None, None)
    assert create_batch(live_api, key, upload(live_api, key, 2, "d")).status_code == 200


def test_the_queued_tokens_quota_and_the_daily_budget_are_named_when_refused(live_api: LiveAPI) -> None:
    key = live_api.new_key("quota-tokens")
    set_quota = live_api.cli("tenants", "set", "quota-tokens", "--max-queued-tokens", "10")
    assert set_quota.returncode == 0, set_quota.stderr
    assert_refused(create_batch(live_api, key, upload(live_api, key, 2, "t")), "queued_tokens_quota_exceeded")
    assert quotas(live_api, key)["queued_tokens"] == 0

    budget = live_api.cli(
        "tenants", "set", "quota-tokens", "--max-queued-tokens", "none", "--daily-budget-usd", "0"
    )
    assert budget.returncode == 0, budget.stderr
    shown = quotas(live_api, key)
    assert (shown["daily_budget_usd"], shown["spent_today_usd"], shown["remaining_budget_usd"]) == (0, 0, 0)
    assert_refused(create_batch(live_api, key, upload(live_api, key, 1, "u")), "daily_budget_exceeded")


def test_the_cli_refuses_bad_quota_values_and_unknown_tenants(live_api: LiveAPI) -> None:
    live_api.new_key("quota-cli")
    bad = live_api.cli("tenants", "set", "quota-cli", "--max-queued-requests", "-5")
    assert bad.returncode != 0
    assert "--max-queued-requests" in bad.stderr
    unknown = live_api.cli("tenants", "show", "nobody-here")
    assert unknown.returncode == 1
    assert "no tenant" in unknown.stderr
    shown = live_api.cli("tenants", "show", "quota-cli")
    assert shown.returncode == 0, shown.stderr
    assert "no limit" in shown.stdout


def test_the_stored_bytes_cap_is_set_shown_and_refuses_an_upload_over_it(live_api: LiveAPI) -> None:
    """``--max-stored-bytes``: shown by ``tenants show`` and ``/v1/usage``; an upload over it is a
    400 ``file_storage_quota_exceeded`` (as OpenAI answers its storage limit); ``none`` gives the
    tenant the service default back (100 GiB unless the operator sets another)."""
    key = live_api.new_key("quota-stored")
    default = 100 * 1024**3
    shown = quotas(live_api, key)
    assert (shown["max_stored_bytes"], shown["stored_bytes"], shown["remaining_stored_bytes"]) == (
        default,
        0,
        default,
    )
    set_cap = live_api.cli("tenants", "set", "quota-stored", "--max-stored-bytes", "300")
    assert set_cap.returncode == 0, set_cap.stderr
    assert "stored files:    0 bytes of 300 (left: 300; the limit is its own)" in set_cap.stdout
    file_id = upload(live_api, key, 2, "s")  # about 130 bytes
    stored = quotas(live_api, key)["stored_bytes"]
    assert 0 < stored <= 300
    client = openai.OpenAI(base_url=live_api.base_url, api_key=key, max_retries=0)
    with pytest.raises(openai.BadRequestError) as refused:
        upload(live_api, key, 4, "t")
    assert refused.value.code == "file_storage_quota_exceeded"
    assert "300" in refused.value.message
    assert str(stored) in refused.value.message
    assert [file.id for file in client.files.list()] == [file_id]
    assert quotas(live_api, key)["remaining_stored_bytes"] == 300 - stored
    show = live_api.cli("tenants", "show", "quota-stored")
    assert f"stored files:    {stored} bytes of 300 (left: {300 - stored};" in show.stdout

    cleared = live_api.cli("tenants", "set", "quota-stored", "--max-stored-bytes", "none")
    assert cleared.returncode == 0, cleared.stderr
    assert f"of {default} (left: {default - stored}; the limit is the service default)" in cleared.stdout
    assert quotas(live_api, key)["max_stored_bytes"] == default
    upload(live_api, key, 4, "u")
    bad = live_api.cli("tenants", "set", "quota-stored", "--max-stored-bytes", "-1")
    assert bad.returncode != 0
    assert "--max-stored-bytes" in bad.stderr
