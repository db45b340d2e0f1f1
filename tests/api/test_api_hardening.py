"""The API's side of the hardening: webhook URLs that would reach the inside, paging cursors that
would tell one tenant about another's ids, tool names that only fail at run time, retried POSTs."""

from __future__ import annotations

import httpx

from tests.api.conftest import LiveAPI
from tests.api.test_api_input import batch_line, client, jsonl

# Each of these reached the server's own network before URLs were checked (or would have).
INTERNAL_WEBHOOK_URLS = [
    ("http://127.0.0.1:8000/hook", "webhook_url_not_public"),
    ("http://localhost/hook", "webhook_url_not_public"),
    ("http://0.0.0.0/hook", "webhook_url_not_public"),
    ("http://2130706433/hook", "webhook_url_not_public"),
    ("http://0x7f000001/hook", "webhook_url_not_public"),
    ("http://127.1/hook", "webhook_url_not_public"),
    ("http://169.254.169.254/latest/meta-data/", "webhook_url_not_public"),
    ("http://10.1.2.3/hook", "webhook_url_not_public"),
    ("http://192.168.0.1/hook", "webhook_url_not_public"),
    ("http://100.100.100.200/hook", "webhook_url_not_public"),
    ("http://224.0.0.1/hook", "webhook_url_not_public"),
    ("http://[::1]/hook", "webhook_url_not_public"),
    ("http://[::ffff:127.0.0.1]/hook", "webhook_url_not_public"),
    ("http://[::ffff:169.254.169.254]/hook", "webhook_url_not_public"),
    ("http://[fd00:ec2::254]/hook", "webhook_url_not_public"),
    ("http://[64:ff9b::a9fe:a9fe]/hook", "webhook_url_not_public"),
    ("http://user:secret@93.184.215.14/hook", "webhook_url_has_credentials"),
    ("http://no-such-host.invalid/hook", "webhook_host_unresolved"),
]


def post_batch(api: LiveAPI, key: str, file_id: str, **extra: object) -> httpx.Response:
    return httpx.post(
        f"{api.base_url}/batches",
        headers={"Authorization": f"Bearer {key}"},
        json={"input_file_id": file_id, "endpoint": "/v1/chat/completions", **extra},
        timeout=30,
    )


def test_webhook_urls_reaching_internal_addresses_are_refused_at_create(live_api: LiveAPI) -> None:
    key = live_api.new_key("webhook-urls")
    sdk = client(live_api, key)
    uploaded = sdk.files.create(file=("in.jsonl", jsonl(batch_line("a"))), purpose="batch")
    redis_port = httpx.URL(live_api.env["TOKENMILL_BROKER_URL"]).port
    cases = [*INTERNAL_WEBHOOK_URLS, (f"http://127.0.0.1:{redis_port}/", "webhook_url_not_public")]
    for url, code in cases:
        answer = post_batch(live_api, key, uploaded.id, webhook_url=url)
        assert answer.status_code == 400, (url, answer.text)
        error = answer.json()["error"]
        assert (error["code"], error["param"]) == (code, "webhook_url"), (url, error)
    assert sdk.batches.list().data == []  # nothing refused was created
    # A public address is accepted (delivery happens when the batch ends).
    accepted = post_batch(live_api, key, uploaded.id, webhook_url="https://93.184.215.14/hook")
    assert accepted.status_code == 200, accepted.text
