"""A hostile tenant against a live ``tokenmill api``: what the hardening still let through, each
found by trying it over HTTP (the official ``openai`` SDK, raw httpx where the SDK would hide the
answer)."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import sqlalchemy as sa
from sqlalchemy.orm import Session

import store
from tests.api.conftest import LiveAPI, start_api
from tests.api.test_api_hardening import post_batch
from tests.api.test_api_input import batch_line, client, jsonl
from tests.cluster import Cluster, run_cli


def agent_line(custom_id: str, tools: list[str]) -> dict[str, object]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/agent_runs",
        "body": {"model": "sim-model", "tools": tools, "input": "What is 2+2?"},
    }


def test_agent_run_lines_naming_an_unknown_tool_are_refused_at_ingest_by_line(live_api: LiveAPI) -> None:
    """``POST /v1/agent_runs`` refused an unknown tool name, but the same run as a batch line was
    queued, and failed on a worker at run time (after a batch was billed for its other lines)."""
    key = live_api.new_key("batch-tools")
    headers = {"Authorization": f"Bearer {key}"}
    lines = jsonl(
        agent_line("good", ["calculator"]),
        agent_line("bad", ["calculator", "rm_rf"]),
        {"custom_id": "short", "prompt": "hi", "tools": ["curl_internal"]},
        {"custom_id": "broken", "prompt": "hi", "max_tool_iterations": "many"},
    )
    with client(live_api, key) as sdk:
        uploaded = sdk.files.create(file=("in.jsonl", lines), purpose="batch")
    for skip_invalid, status in ((False, "failed"), (True, "in_progress")):
        answer = httpx.post(
            f"{live_api.base_url}/batches",
            headers=headers,
            json={
                "input_file_id": uploaded.id,
                "endpoint": "/v1/agent_runs",
                "model": "sim-model",
                "skip_invalid": skip_invalid,
            },
            timeout=30,
        )
        assert answer.status_code == 200, answer.text
        batch = answer.json()
        assert batch["status"] == status, batch
        errors = {(e["line"], e["code"], e["param"]) for e in batch["errors"]["data"]}
        assert errors == {
            (2, "unknown_tool", "body.tools"),
            (3, "unknown_tool", "tools"),
            (4, "invalid_agent_run", None),
        }, batch["errors"]
        assert "rm_rf" in batch["errors"]["data"][0]["message"]
        assert batch["request_counts"]["total"] == (1 if skip_invalid else 0)


def batch_row(engine: sa.Engine, batch_id: str) -> store.Batch:
    with Session(engine) as session:
        batch = session.get(store.Batch, batch_id)
        assert batch is not None
        session.expunge(batch)
        return batch


def test_a_batch_left_validating_by_a_killed_api_is_failed_by_the_sweeper(
    cluster: Callable[..., Cluster], postgres_url: str, tmp_path: Path
) -> None:
    """An API process killed while a batch waited for (or was in) background validation left it
    ``validating`` until its completion window ended, 24 h later. Its lease, renewed by a live
    API only, now runs out and the sweep fails it; a live validation longer than the lease is
    left alone."""
    c = cluster()
    lease_seconds = 3  # the least allowed: validating the big file takes longer (7 s on 2 quiet cores)
    env = {
        **c.env,
        "TOKENMILL_FILES_DIR": str(tmp_path / "files"),
        "TOKENMILL_MAX_UPLOAD_BYTES": str(64 * 1024 * 1024),
        "TOKENMILL_BACKGROUND_INGEST_BYTES": "0",  # every file is read after the create call
        "TOKENMILL_MAX_BACKGROUND_INGESTS": "1",
        "TOKENMILL_VALIDATION_LEASE_SECONDS": str(lease_seconds),
    }
    migrated = run_cli(env, "db", "upgrade")
    assert migrated.returncode == 0, migrated.stderr
    created = run_cli(env, "keys", "create", "validating")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    engine = store.make_engine(postgres_url)
    big = jsonl(*(batch_line(f"r{i}", "x" * 100) for i in range(250_000)))
    process, root = start_api(env, tmp_path / "api-1.log")
    try:
        with openai.OpenAI(base_url=f"{root}/v1", api_key=key, max_retries=0, timeout=120) as sdk:
            big_file = sdk.files.create(file=("big.jsonl", big), purpose="batch")
            small_file = sdk.files.create(file=("small.jsonl", jsonl(batch_line("a"))), purpose="batch")
            reading = sdk.batches.create(
                input_file_id=big_file.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
            waiting = sdk.batches.create(
                input_file_id=small_file.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
    finally:
        process.kill()
        process.wait()
    # The small file waits for the one slot the big file holds: nobody reads it any more.
    assert batch_row(engine, waiting.id).status == store.BatchStatus.VALIDATING
    c.beat()
    deadline = time.monotonic() + 60
    while batch_row(engine, waiting.id).status == store.BatchStatus.VALIDATING:
        assert time.monotonic() < deadline, "the abandoned batch is still validating"
        time.sleep(0.2)
    abandoned = batch_row(engine, waiting.id)
    assert abandoned.status == store.BatchStatus.FAILED
    assert [e["code"] for e in abandoned.errors or []] == ["validation_interrupted"]
    assert batch_row(engine, reading.id).status != store.BatchStatus.VALIDATING
    with engine.connect() as conn:
        count = sa.select(sa.func.count()).select_from(store.Request)
        assert conn.execute(count.where(store.Request.batch_id == waiting.id)).scalar_one() == 0

    # A live API renews the lease of what it reads, however long that takes.
    process, root = start_api(env, tmp_path / "api-2.log")
    try:
        with openai.OpenAI(base_url=f"{root}/v1", api_key=key, max_retries=0, timeout=120) as sdk:
            started = time.monotonic()
            batch = sdk.batches.create(
                input_file_id=big_file.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
            while batch.status == "validating":
                assert time.monotonic() - started < 110, "still validating"
                time.sleep(0.2)
                batch = sdk.batches.retrieve(batch.id)
            took = time.monotonic() - started
    finally:
        process.kill()  # the sweeper dispatches what it had not yet
        process.wait()
    engine.dispose()
    print(f"validating 250k lines took {took:.1f} s")
    assert (batch.status, batch.errors) == ("in_progress", None)
    assert batch.request_counts is not None
    assert batch.request_counts.total == 250_000
    assert took > lease_seconds + 1, f"validation took {took:.1f} s, not longer than its lease"


def test_webhook_urls_embedding_an_internal_ipv4_in_6to4_are_refused(live_api: LiveAPI) -> None:
    """6to4 addresses (2002:AABB:CCDD::/48) carry an IPv4 address that a host with a 6to4 route
    sends to: ``[2002:a9fe:a9fe::]`` is the cloud metadata address, and was accepted."""
    key = live_api.new_key("webhook-6to4")
    with client(live_api, key) as sdk:
        uploaded = sdk.files.create(file=("in.jsonl", jsonl(batch_line("a"))), purpose="batch")
    for url in ("http://[2002:7f00:1::]/hook", "http://[2002:a9fe:a9fe::1]/hook", "http://[2002:a00:1::]/"):
        answer = post_batch(live_api, key, uploaded.id, webhook_url=url)
        assert answer.status_code == 400, (url, answer.text)
        error = answer.json()["error"]
        assert (error["code"], error["param"]) == ("webhook_url_not_public", "webhook_url"), (url, error)
    # 6to4 of a public IPv4 address is public.
    public = post_batch(live_api, key, uploaded.id, webhook_url="http://[2002:5db8:d70e::]/hook")
    assert public.status_code == 200, public.text


def test_refused_upload_fields_and_query_values_are_echoed_bounded(live_api: LiveAPI) -> None:
    """A refused ``purpose`` (a multipart field: up to 1 MB) and ``group_by`` (the query string)
    were echoed whole into the error message."""
    key = live_api.new_key("echo-bounds")
    headers = {"Authorization": f"Bearer {key}"}
    long_purpose = "p" * 50_000
    refused = httpx.post(
        f"{live_api.base_url}/files",
        headers=headers,
        files={"file": ("in.jsonl", jsonl(batch_line("a")))},
        data={"purpose": long_purpose},
    )
    assert refused.status_code == 400, refused.text[:300]
    error = refused.json()["error"]
    assert error["param"] == "purpose"
    assert len(error["message"]) < 400, len(error["message"])
    assert "50000 characters" in error["message"]
    grouped = httpx.get(f"{live_api.base_url}/usage", headers=headers, params={"group_by": "g" * 8000})
    assert grouped.status_code == 400, grouped.text[:300]
    error = grouped.json()["error"]
    assert error["param"] == "group_by"
    assert len(error["message"]) < 400, len(error["message"])


def test_a_webhook_url_longer_than_the_ledger_keeps_is_refused_by_name(live_api: LiveAPI) -> None:
    """URLs are checked for 2083 characters as sent, but the ledger keeps 2000 of the URL as
    normalised (``é`` becomes ``%C3%A9``): both overflowed into a 500."""
    key = live_api.new_key("webhook-length")
    with client(live_api, key) as sdk:
        uploaded = sdk.files.create(file=("in.jsonl", jsonl(batch_line("a"))), purpose="batch")
    for url in ("https://93.184.215.14/" + "a" * 2040, "https://93.184.215.14/" + "\u00e9" * 600):
        answer = post_batch(live_api, key, uploaded.id, webhook_url=url)
        assert answer.status_code == 400, (len(url), answer.text)
        error = answer.json()["error"]
        assert (error["code"], error["param"]) == ("webhook_url_too_long", "webhook_url"), error
    longest = "https://93.184.215.14/" + "a" * (2000 - len("https://93.184.215.14/"))
    accepted = post_batch(live_api, key, uploaded.id, webhook_url=longest)
    assert accepted.status_code == 200, accepted.text
    assert accepted.json()["webhook"]["url"] == longest


def test_tokenmill_submit_refuses_agent_run_lines_naming_an_unknown_tool(
    cluster: Callable[..., Cluster], tmp_path: Path
) -> None:
    """The CLI's submit wrote to the ledger without the check the API makes on each line."""
    c = cluster()
    migrated = run_cli(c.env, "db", "upgrade")
    assert migrated.returncode == 0, migrated.stderr
    source = tmp_path / "runs.jsonl"
    source.write_bytes(jsonl(agent_line("good", ["calculator"]), agent_line("bad", ["rm_rf"])))
    submitted = run_cli(c.env, "submit", str(source), "--endpoint", "/v1/agent_runs", "--model", "sim-model")
    assert submitted.returncode == 1, (submitted.stdout, submitted.stderr)
    assert "line 2: unknown_tool" in submitted.stderr, submitted.stderr


def test_one_tenant_cannot_queue_enough_validations_to_hold_up_another(
    cluster: Callable[..., Cluster], tmp_path: Path
) -> None:
    """Files over ``background_ingest_bytes`` are validated a few at a time per API process, in
    arrival order: a tenant that created hundreds of batches on a large file held every other
    tenant's batches ``validating`` behind them for hours. Each tenant now has at most
    ``max_validating_batches_per_tenant`` validating; more is a 429 that a retry with the same
    Idempotency-Key gets past once they are done (a 429 is not kept for replay)."""
    c = cluster()
    env = {
        **c.env,
        "TOKENMILL_FILES_DIR": str(tmp_path / "files"),
        "TOKENMILL_MAX_UPLOAD_BYTES": str(64 * 1024 * 1024),
        "TOKENMILL_BACKGROUND_INGEST_BYTES": "0",
        "TOKENMILL_MAX_BACKGROUND_INGESTS": "1",
        "TOKENMILL_MAX_VALIDATING_BATCHES_PER_TENANT": "2",
    }
    migrated = run_cli(env, "db", "upgrade")
    assert migrated.returncode == 0, migrated.stderr
    keys = [run_cli(env, "keys", "create", name).stdout.strip() for name in ("hog", "other")]
    big = jsonl(*(batch_line(f"r{i}", "x" * 100) for i in range(60_000)))
    process, root = start_api(env, tmp_path / "api.log")
    try:
        hog, other = (openai.OpenAI(base_url=f"{root}/v1", api_key=key, max_retries=0) for key in keys)
        big_file = hog.files.create(file=("big.jsonl", big), purpose="batch")
        body = {"input_file_id": big_file.id, "endpoint": "/v1/chat/completions"}
        auth = {"Authorization": f"Bearer {keys[0]}"}
        # Many at once get no further than one at a time.
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            burst = list(
                pool.map(
                    lambda _: httpx.post(f"{root}/v1/batches", headers=auth, json=body, timeout=60), range(12)
                )
            )
        assert sorted(answer.status_code for answer in burst) == [200] * 2 + [429] * 10
        created = [hog.batches.retrieve(answer.json()["id"]) for answer in burst if answer.status_code == 200]
        headers = {**auth, "Idempotency-Key": "third"}
        third = httpx.post(f"{root}/v1/batches", headers=headers, json=body, timeout=60)
        assert third.status_code == 429, third.text
        assert third.json()["error"]["code"] == "too_many_validating_batches"
        # Another tenant is not counted against the first one's validations.
        small = other.files.create(file=("small.jsonl", jsonl(batch_line("a"))), purpose="batch")
        theirs = other.batches.create(
            input_file_id=small.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        assert theirs.status == "validating"
        deadline = time.monotonic() + 100
        while any(hog.batches.retrieve(b.id).status == "validating" for b in created):
            assert time.monotonic() < deadline, "still validating"
            time.sleep(0.5)
        retried = httpx.post(f"{root}/v1/batches", headers=headers, json=body, timeout=60)
        assert retried.status_code == 200, retried.text
        assert "idempotent-replayed" not in retried.headers
        hog.close()
        other.close()
    finally:
        process.kill()
        process.wait()


def test_a_tenants_queued_validations_wait_their_turn_with_another_tenants(
    cluster: Callable[..., Cluster], tmp_path: Path
) -> None:
    """A process's validation slots went out in arrival order: a tenant with several batches
    waiting to be read held another tenant's batch, created after them, ``validating`` until all
    of them were read. A freed slot now goes to the waiting tenants in turn
    (``api.validation_slots``): the other tenant's batch is read next."""
    c = cluster()
    env = {
        **c.env,
        "TOKENMILL_FILES_DIR": str(tmp_path / "files"),
        "TOKENMILL_MAX_UPLOAD_BYTES": str(64 * 1024 * 1024),
        "TOKENMILL_BACKGROUND_INGEST_BYTES": "0",
        "TOKENMILL_MAX_BACKGROUND_INGESTS": "1",
    }
    migrated = run_cli(env, "db", "upgrade")
    assert migrated.returncode == 0, migrated.stderr
    keys = [run_cli(env, "keys", "create", name).stdout.strip() for name in ("hog", "other")]
    process, root = start_api(env, tmp_path / "api.log")
    try:
        hog, other = (openai.OpenAI(base_url=f"{root}/v1", api_key=key, max_retries=0) for key in keys)
        big = hog.files.create(
            file=("big.jsonl", jsonl(*(batch_line(f"r{i}", "x" * 100) for i in range(20_000)))),
            purpose="batch",
        )
        hogs = [
            hog.batches.create(input_file_id=big.id, endpoint="/v1/chat/completions", completion_window="24h")
            for _ in range(4)
        ]
        small = other.files.create(file=("small.jsonl", jsonl(batch_line("a"))), purpose="batch")
        theirs = other.batches.create(
            input_file_id=small.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        assert theirs.status == "validating"
        deadline = time.monotonic() + 100
        while other.batches.retrieve(theirs.id).status == "validating":
            assert time.monotonic() < deadline, "still validating"
            time.sleep(0.1)
        still = [b.id for b in hogs if hog.batches.retrieve(b.id).status == "validating"]
        assert len(still) >= 2, "the other tenant's batch was read after the first tenant's queue"
        hog.close()
        other.close()
    finally:
        process.kill()
        process.wait()
