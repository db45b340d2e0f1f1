"""The API's side of the hardening: webhook URLs that would reach the inside, paging cursors that
would tell one tenant about another's ids, tool names that only fail at run time, retried POSTs."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest
import sqlalchemy as sa
from openai.types.chat import ChatCompletionMessageParam

import store
from simulator.testing import SimulatorServer
from store.tables import Request
from tests import services
from tests.api.conftest import LiveAPI, start_api
from tests.api.test_api_input import batch_line, client, jsonl
from tests.cluster import Cluster, run_cli

CHAT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]

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


def post_batch(
    api: LiveAPI, key: str, file_id: str, *, idempotency_key: str | None = None, **extra: object
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"}
    if idempotency_key is not None:
        headers["Idempotency-Key"] = idempotency_key
    return httpx.post(
        f"{api.base_url}/batches",
        headers=headers,
        json={"input_file_id": file_id, "endpoint": "/v1/chat/completions", **extra},
        timeout=30,
    )


def test_webhook_urls_reaching_internal_addresses_are_refused_at_create(live_api: LiveAPI) -> None:
    key = live_api.new_key("webhook-urls")
    with client(live_api, key) as sdk:
        uploaded = sdk.files.create(file=("in.jsonl", jsonl(batch_line("a"))), purpose="batch")
    redis_port = httpx.URL(live_api.env["TOKENMILL_BROKER_URL"]).port
    cases = [*INTERNAL_WEBHOOK_URLS, (f"http://127.0.0.1:{redis_port}/", "webhook_url_not_public")]
    for url, code in cases:
        answer = post_batch(live_api, key, uploaded.id, webhook_url=url)
        assert answer.status_code == 400, (url, answer.text)
        error = answer.json()["error"]
        assert (error["code"], error["param"]) == (code, "webhook_url"), (url, error)
    with client(live_api, key) as sdk:
        assert sdk.batches.list().data == []  # nothing refused was created
    # A public address is accepted (delivery happens when the batch ends).
    accepted = post_batch(live_api, key, uploaded.id, webhook_url="https://93.184.215.14/hook")
    assert accepted.status_code == 200, accepted.text


def test_a_paging_cursor_of_another_tenant_pages_like_an_unknown_id(
    live_api: LiveAPI, request: pytest.FixtureRequest
) -> None:
    """``after=<id>`` must not tell a tenant whether someone else's id exists."""
    mine = client(live_api, live_api.new_key("cursor-mine"))
    theirs = client(live_api, live_api.new_key("cursor-theirs"))
    request.addfinalizer(mine.close)
    request.addfinalizer(theirs.close)
    own_files = [
        mine.files.create(file=("in.jsonl", jsonl(batch_line("a"))), purpose="batch") for _ in range(2)
    ]
    own_batch = mine.batches.create(
        input_file_id=own_files[0].id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    # The other tenant's objects are newer (times are whole seconds), so a cursor resolved across
    # tenants would page into the caller's older ones.
    while int(time.time()) <= own_batch.created_at:
        time.sleep(0.05)
    their_file = theirs.files.create(file=("in.jsonl", jsonl(batch_line("b"))), purpose="batch")
    their_batch = theirs.batches.create(
        input_file_id=their_file.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    headers = {"Authorization": f"Bearer {mine.api_key}"}
    for kind, foreign, unknown in (
        ("files", their_file.id, "file-000000000000000000000000"),
        ("batches", their_batch.id, "batch_00000000000000000000000000000000"),
    ):
        pages = [
            httpx.get(f"{live_api.base_url}/{kind}", params={"after": cursor}, headers=headers).json()
            for cursor in (foreign, unknown)
        ]
        assert pages[0] == pages[1], kind
        assert pages[0]["data"] == [], kind
    # The caller's own cursor still pages.
    everything = [file.id for file in mine.files.list()]
    assert len(everything) == 2
    page = httpx.get(f"{live_api.base_url}/files", params={"after": everything[0]}, headers=headers).json()
    assert [file["id"] for file in page["data"]] == everything[1:]


def test_an_agent_run_naming_an_unknown_tool_is_refused_at_create(live_api: LiveAPI) -> None:
    key = live_api.new_key("tools")
    headers = {"Authorization": f"Bearer {key}"}
    answer = httpx.post(
        f"{live_api.base_url}/agent_runs",
        headers=headers,
        json={"model": "sim-model", "tools": ["calculator", "rm_rf"], "input": "hi"},
        timeout=30,
    )
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert (error["code"], error["param"]) == ("unknown_tool", "tools")
    assert "rm_rf" in error["message"]
    with client(live_api, key) as sdk:
        assert sdk.batches.list().data == []
    known = httpx.post(
        f"{live_api.base_url}/agent_runs",
        headers=headers,
        json={"model": "sim-model", "tools": ["calculator"], "input": "hi"},
        timeout=30,
    )
    assert known.status_code == 200, known.text


@pytest.mark.slow
def test_with_the_broker_down_what_is_answered_with_an_id_runs_and_nothing_else(
    cluster: Callable[..., Cluster], simulator: SimulatorServer, tmp_path: Path
) -> None:
    """A client told "failed" must not be billed: with the broker unreachable, a batch and an agent
    run are answered with their ids (the sweeper sends them later), and a chat completion, whose
    answer has no id to come back for, is answered 503 and never runs."""
    c = cluster()
    c.env["TOKENMILL_FILES_DIR"] = str(tmp_path / "files")
    assert run_cli(c.env, "db", "upgrade").returncode == 0
    key = run_cli(c.env, "keys", "create", "broker-down").stdout.strip()
    headers = {"Authorization": f"Bearer {key}"}
    dead_broker = f"redis://127.0.0.1:{services.free_port()}/0"
    api, root = start_api({**c.env, "TOKENMILL_BROKER_URL": dead_broker}, c.logs / "api.log")
    try:
        with openai.OpenAI(base_url=f"{root}/v1", api_key=key, max_retries=0) as sdk:
            lines = [batch_line(f"r{i}", f"question {i}") for i in (1, 2)]
            for line in lines:
                line["body"] = {**line["body"], "model": "batch-model"}  # type: ignore[dict-item]
            uploaded = sdk.files.create(file=("in.jsonl", jsonl(*lines)), purpose="batch")
            batch = sdk.batches.create(
                input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
            assert batch.status == "in_progress"
            with pytest.raises(openai.InternalServerError) as refused:
                sdk.chat.completions.create(
                    model="chat-model", messages=CHAT, extra_headers={"Idempotency-Key": "chat-1"}
                )
            assert refused.value.status_code == 503
            assert isinstance(refused.value.body, dict)
            assert refused.value.body["code"] == "broker_unavailable"
        run = httpx.post(
            f"{root}/v1/agent_runs",
            headers=headers,
            json={"model": "agent-model", "input": "hello"},
            timeout=30,
        )
        assert run.status_code == 200, run.text
        run_id = run.json()["id"]
    finally:
        api.terminate()
        api.wait(timeout=10)
    c.worker("w1")
    c.beat()
    engine = store.make_engine(c.env["TOKENMILL_DATABASE_URL"])
    try:
        deadline = time.monotonic() + 60
        while True:
            ended = store.get_batch(engine, batch.id)
            agent_run = store.get_agent_run(engine, run_id, tenant_id=ended.tenant_id if ended else "")
            if ended is not None and ended.status == "completed" and agent_run and agent_run.result:
                break
            assert time.monotonic() < deadline, (ended, agent_run)
            time.sleep(0.2)
    finally:
        engine.dispose()
    by_model = simulator.stats()["by_model"]
    assert by_model.get("batch-model") == 2
    assert by_model.get("agent-model", 0) >= 1
    assert "chat-model" not in by_model
    # The broker is back: the client's retry with its key runs once; a second retry replays it.
    api, root = start_api(c.env, c.logs / "api-again.log")
    try:
        with openai.OpenAI(base_url=f"{root}/v1", api_key=key, max_retries=0, timeout=60) as sdk:
            answers = [
                sdk.chat.completions.with_raw_response.create(
                    model="chat-model", messages=CHAT, extra_headers={"Idempotency-Key": "chat-1"}
                )
                for _ in range(2)
            ]
    finally:
        api.terminate()
        api.wait(timeout=10)
    first, again = (answer.parse() for answer in answers)
    assert again.id == first.id
    assert answers[1].headers["idempotent-replayed"] == "true"
    assert simulator.stats()["by_model"].get("chat-model") == 1


def test_a_post_retried_with_its_idempotency_key_answers_the_first_object_again(live_api: LiveAPI) -> None:
    key = live_api.new_key("idempotent")
    with client(live_api, key) as sdk:
        # An upload retried with a new multipart boundary is still the same request.
        uploads = [
            sdk.files.create(
                file=("in.jsonl", jsonl(batch_line("a"))),
                purpose="batch",
                extra_headers={"Idempotency-Key": "upload-1"},
            )
            for _ in range(2)
        ]
        assert uploads[0].id == uploads[1].id
        assert [file.id for file in sdk.files.list()] == [uploads[0].id]
        file_id = uploads[0].id
        first = post_batch(live_api, key, file_id, metadata={"n": "1"}, idempotency_key="batch-1")
        again = post_batch(live_api, key, file_id, metadata={"n": "1"}, idempotency_key="batch-1")
        assert first.status_code == again.status_code == 200, (first.text, again.text)
        assert again.json()["id"] == first.json()["id"]
        assert again.headers["idempotent-replayed"] == "true"
        assert [batch.id for batch in sdk.batches.list()] == [first.json()["id"]]
        # The same key for another request is refused, by name; nothing is created.
        other = post_batch(live_api, key, file_id, metadata={"n": "2"}, idempotency_key="batch-1")
        assert other.status_code == 422, other.text
        assert other.json()["error"]["code"] == "idempotency_key_reused"
        assert len(sdk.batches.list().data) == 1
        # An error answer is kept too: the retry gets the same error, not a second attempt.
        missing = [post_batch(live_api, key, "file-nope", idempotency_key="batch-2") for _ in range(2)]
        assert [answer.status_code for answer in missing] == [404, 404]
        assert missing[1].json() == missing[0].json()
        bad_key = post_batch(live_api, key, file_id, idempotency_key="no spaces allowed")
        assert bad_key.status_code == 400
        assert bad_key.json()["error"]["code"] == "invalid_idempotency_key"
    # Keys are the tenant's own: another tenant's same key is another request.
    other_key = live_api.new_key("idempotent-other")
    with client(live_api, other_key) as sdk:
        upload = sdk.files.create(file=("in.jsonl", jsonl(batch_line("a"))), purpose="batch")
        theirs = post_batch(live_api, other_key, upload.id, metadata={"n": "1"}, idempotency_key="batch-1")
        assert theirs.status_code == 200, theirs.text
        assert theirs.json()["id"] != first.json()["id"]
        assert "idempotent-replayed" not in theirs.headers


def test_a_tenant_reads_and_rotates_its_webhook_secret_and_sees_its_delivery_state(live_api: LiveAPI) -> None:
    key = live_api.new_key("secret-holder")
    headers = {"Authorization": f"Bearer {key}"}
    shown = httpx.get(f"{live_api.base_url}/webhook_secret", headers=headers).json()
    assert shown["secret"].startswith("whsec_")
    by_operator = live_api.cli("keys", "webhook-secret", "secret-holder")
    assert by_operator.returncode == 0, by_operator.stderr
    assert by_operator.stdout.strip() == shown["secret"]
    rotated = httpx.post(f"{live_api.base_url}/webhook_secret/rotate", headers=headers).json()
    assert rotated["secret"].startswith("whsec_")
    assert rotated["secret"] != shown["secret"]
    assert httpx.get(f"{live_api.base_url}/webhook_secret", headers=headers).json() == rotated
    other = live_api.new_key("secret-other")
    theirs = httpx.get(f"{live_api.base_url}/webhook_secret", headers={"Authorization": f"Bearer {other}"})
    assert theirs.json()["secret"] != rotated["secret"]
    # The batch object shows where its event goes and how the delivery went.
    with client(live_api, key) as sdk:
        uploaded = sdk.files.create(file=("in.jsonl", jsonl(batch_line("a"))), purpose="batch")
    created = post_batch(live_api, key, uploaded.id, webhook_url="https://93.184.215.14/hook").json()
    assert created["webhook"] == {
        "url": "https://93.184.215.14/hook",
        "attempts": 0,
        "delivered_at": None,
        "next_attempt_at": None,
        "last_error": None,
    }


def test_a_wait_that_timed_out_is_replayed_and_starts_no_second_run(live_api: LiveAPI) -> None:
    """No workers: a ``wait=true`` run times out with 503 while the run stays queued (it runs once
    workers come). A retry with the key must get that answer again, not start (and bill) a second
    run."""
    key = live_api.new_key("idempotent-wait")
    headers = {"Authorization": f"Bearer {key}", "Idempotency-Key": "run-wait-1"}

    def start() -> httpx.Response:
        return httpx.post(
            f"{live_api.base_url}/agent_runs",
            params={"wait": "true"},
            headers=headers,
            json={"model": "agent-model", "input": "hello"},
            timeout=60,
        )

    first = start()
    assert first.status_code == 503, first.text
    assert first.json()["error"]["code"] == "timeout"
    again = start()
    assert again.status_code == 503, again.text
    assert again.headers.get("idempotent-replayed") == "true"
    run_id = first.headers["tokenmill-bound-to"]
    assert again.headers["tokenmill-bound-to"] == run_id
    engine = store.make_engine(live_api.database_url)
    try:
        with engine.connect() as conn:
            tenant_id = conn.execute(sa.select(Request.tenant_id).where(Request.id == run_id)).scalar_one()
            runs = conn.execute(
                sa.select(sa.func.count()).select_from(Request).where(Request.tenant_id == tenant_id)
            ).scalar_one()
    finally:
        engine.dispose()
    assert runs == 1


@pytest.mark.slow
def test_a_chat_timeout_with_its_call_upstream_is_replayed_not_sent_again(
    cluster: Callable[..., Cluster], simulator: SimulatorServer
) -> None:
    """The wait ends while a worker's call is with the provider: the cancel cannot stop that call
    (it finishes and is billed), so the 503 names the batch and is kept for the key; the retry
    replays it instead of sending (and billing) the request again."""
    c = cluster()
    assert run_cli(c.env, "db", "upgrade").returncode == 0
    key = run_cli(c.env, "keys", "create", "chat-timeout").stdout.strip()
    c.worker("w1")
    api, root = start_api({**c.env, "TOKENMILL_SYNC_TIMEOUT_SECONDS": "3"}, c.logs / "api.log")
    try:

        def ask() -> httpx.Response:
            return httpx.post(
                f"{root}/v1/chat/completions",
                headers={"Authorization": f"Bearer {key}", "Idempotency-Key": "slow-1"},
                json={"model": "slow-model", "messages": [{"role": "user", "content": "[[delay 8]] hi"}]},
                timeout=60,
            )

        deadline = time.monotonic() + 60
        while (
            warm := httpx.post(
                f"{root}/v1/chat/completions",
                headers={"Authorization": f"Bearer {key}"},
                json={"model": "warm-model", "messages": CHAT},
                timeout=60,
            )
        ).status_code != 200:  # the worker is up and taking requests
            assert time.monotonic() < deadline, warm.text
        first = ask()
        assert first.status_code == 503, first.text
        assert first.json()["error"]["code"] == "timeout"
        again = ask()
        assert again.status_code == 503, again.text
        assert again.headers.get("idempotent-replayed") == "true"
        assert again.headers["tokenmill-bound-to"] == first.headers["tokenmill-bound-to"]
    finally:
        api.terminate()
        api.wait(timeout=10)
    deadline = time.monotonic() + 60
    while simulator.stats()["in_flight"]:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert simulator.stats()["by_model"].get("slow-model") == 1


def test_an_answer_bound_to_work_that_goes_on_tells_the_sdk_not_to_retry(live_api: LiveAPI) -> None:
    """A 503 bound to work that goes on (here a ``wait=true`` run that timed out, queued still)
    said nothing of retrying: the openai SDK retries every 503 (twice by default) and sends no
    Idempotency-Key of its own, so each retry started, and billed, one more run. ``x-should-retry:
    false``: the answer names the run to follow instead (a keyed retry would replay it anyway)."""
    key = live_api.new_key("bound-no-retry")
    first = httpx.post(
        f"{live_api.base_url}/agent_runs",
        params={"wait": "true"},
        headers={"Authorization": f"Bearer {key}"},
        json={"model": "agent-model", "input": "hello"},
        timeout=60,
    )
    assert first.status_code == 503, first.text
    assert first.headers["tokenmill-bound-to"]
    assert first.headers["x-should-retry"] == "false"
