"""What one upload can cost the API: echoed input and ingest memory stay bounded, against a live
``tokenmill api`` with generous limits (1 MB lines, 64 MB uploads) on its own PostgreSQL."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis

from tests import services
from tests.api.conftest import api_env, start_api
from tests.cluster import run_cli

LINE_BYTES = 1024 * 1024


@dataclass
class BigAPI:
    base_url: str
    env: dict[str, str]
    process: subprocess.Popen[bytes]

    def client(self, tenant: str) -> openai.OpenAI:
        created = run_cli(self.env, "keys", "create", tenant, timeout=60)
        assert created.returncode == 0, created.stderr
        return openai.OpenAI(
            base_url=self.base_url, api_key=created.stdout.strip(), max_retries=0, timeout=120
        )

    def reset_peak_rss(self) -> None:
        # Linux: writing 5 to clear_refs resets the process's peak RSS (VmHWM) to its current RSS.
        Path(f"/proc/{self.process.pid}/clear_refs").write_text("5")

    def rss_mb(self, field: str) -> float:
        for row in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if row.startswith(f"{field}:"):
                return int(row.split()[1]) / 1024
        raise AssertionError(f"no {field} in /proc/{self.process.pid}/status")


@pytest.fixture(scope="module")
def big_api(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BigAPI]:
    tmp_path = tmp_path_factory.mktemp("big-api")
    broker_url = services.private_database_url(redis_url, "big_api")
    broker = redis.Redis.from_url(broker_url)
    broker.flushdb()
    with services.fresh_postgres_database() as postgres_url:
        env = api_env(
            postgres_url,
            broker_url,
            tmp_path,
            TOKENMILL_MAX_UPLOAD_BYTES=str(64 * 1024 * 1024),
            TOKENMILL_MAX_REQUEST_BODY_BYTES=str(LINE_BYTES + 4096),
        )
        migrate = run_cli(env, "db", "upgrade")
        assert migrate.returncode == 0, migrate.stderr
        process, root = start_api(env, tmp_path / "api.log")
        try:
            yield BigAPI(f"{root}/v1", env, process)
        finally:
            process.terminate()  # graceful: waits for validations still running
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            broker.flushdb()
            broker.close()


def validated(big_api: BigAPI, api: openai.OpenAI, batch_id: str, seconds: float = 90) -> dict[str, Any]:
    """The batch object once it is no longer ``validating`` (files over 1 MiB are read after the
    create call answered)."""
    deadline = time.monotonic() + seconds
    while True:
        answer = httpx.get(
            f"{big_api.base_url}/batches/{batch_id}", headers={"Authorization": f"Bearer {api.api_key}"}
        )
        assert answer.status_code == 200, answer.text[:500]
        batch: dict[str, Any] = answer.json()
        if batch["status"] != "validating":
            batch["response_bytes"] = len(answer.content)
            return batch
        assert time.monotonic() < deadline, f"batch {batch_id} still validating after {seconds} s"
        time.sleep(0.2)


def chat_line(custom_id: str, content: str = "hi", url: str = "/v1/chat/completions") -> bytes:
    body = {"model": "sim-model", "messages": [{"role": "user", "content": content}]}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body}).encode()


def test_a_megabyte_url_is_not_echoed_into_the_batch(big_api: BigAPI) -> None:
    api = big_api.client("echo")
    huge_url = "/v1/" + "u" * (LINE_BYTES - 1000)
    content = b"\n".join([chat_line("good"), *(chat_line(f"bad-{i}", url=huge_url) for i in range(20))])
    uploaded = api.files.create(file=("echo.jsonl", content), purpose="batch")
    headers = {"Authorization": f"Bearer {api.api_key}"}
    for skip_invalid in (False, False, True):
        created = api.batches.create(
            input_file_id=uploaded.id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            extra_body={"skip_invalid": skip_invalid},
        )
        assert created.status == "validating"
        batch = validated(big_api, api, created.id)
        assert batch["response_bytes"] < 20_000, batch["response_bytes"]  # was 20 MB: every url whole
        assert batch["status"] == ("in_progress" if skip_invalid else "failed")
        assert [error["code"] for error in batch["errors"]["data"]] == ["unknown_endpoint"] * 20
        assert batch["errors"]["total_count"] == 20
        assert "characters)" in batch["errors"]["data"][0]["message"]  # says how much was cut
    listed = httpx.get(f"{big_api.base_url}/batches", headers=headers)
    assert listed.status_code == 200
    assert len(listed.json()["data"]) == 3
    assert len(listed.content) < 60_000, len(listed.content)


def test_ingest_memory_does_not_grow_with_the_lines(big_api: BigAPI) -> None:
    api = big_api.client("memory")
    lines = 40
    content = b"\n".join(chat_line(f"r{i}", "x" * (LINE_BYTES - 200)) for i in range(lines))
    uploaded = api.files.create(file=("big.jsonl", content), purpose="batch")
    del content
    big_api.reset_peak_rss()
    before = big_api.rss_mb("VmRSS")
    created = api.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    batch = validated(big_api, api, created.id)
    growth = big_api.rss_mb("VmHWM") - before
    assert batch["status"] == "in_progress", batch["errors"]
    assert batch["request_counts"]["total"] == lines
    # 40 MB of lines: the old ingest held every body, its COPY text and their bytes (~4 x 40 MB)
    assert growth < 64, f"peak RSS grew {growth:.0f} MB creating a batch from {lines} MB of lines"


def test_a_large_file_is_validated_after_the_create_call_answers(big_api: BigAPI) -> None:
    # A 100k-line create held its request 44.6 s; now it answers "validating" at once.
    api = big_api.client("later")
    lines = [chat_line(f"r{i}", f"question {i}") for i in range(30_000)]
    good = api.files.create(file=("good.jsonl", b"\n".join(lines)), purpose="batch")
    created = api.batches.create(
        input_file_id=good.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert created.status == "validating"
    assert created.request_counts is not None
    assert created.request_counts.total == 0
    batch = validated(big_api, api, created.id)
    assert batch["status"] == "in_progress"
    assert batch["request_counts"]["total"] == 30_000
    assert batch["in_progress_at"] is not None

    lines[12_345] = b"{not json"
    bad = api.files.create(file=("bad.jsonl", b"\n".join(lines)), purpose="batch")
    created = api.batches.create(
        input_file_id=bad.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert created.status == "validating"
    batch = validated(big_api, api, created.id)
    assert batch["status"] == "failed"
    assert batch["failed_at"] is not None
    assert [(error["line"], error["code"]) for error in batch["errors"]["data"]] == [(12_346, "invalid_json")]

    # Cancelled while validating (or just after): cancelled, nothing left queued.
    created = api.batches.create(
        input_file_id=good.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    cancelled = api.batches.cancel(created.id)
    assert cancelled.status in ("cancelling", "cancelled")
    batch = validated(big_api, api, created.id)
    assert batch["status"] == "cancelled"
    assert batch["request_counts"]["total"] in (0, 30_000)


def test_a_retry_during_background_validation_replays_the_batch(big_api: BigAPI) -> None:
    """The create call has answered (``validating``) while its file is still being read: a retry
    with its Idempotency-Key replays that answer (it was refused 409 until the validation ended,
    and past the stale bound it created a second batch)."""
    with big_api.client("idempotent-later") as api:
        _retry_during_validation(big_api, api)


def _retry_during_validation(big_api: BigAPI, api: openai.OpenAI) -> None:
    lines = [chat_line(f"r{i}", f"question {i}") for i in range(30_000)]
    uploaded = api.files.create(file=("big.jsonl", b"\n".join(lines)), purpose="batch")

    def create() -> httpx.Response:
        return httpx.post(
            f"{big_api.base_url}/batches",
            headers={"Authorization": f"Bearer {api.api_key}", "Idempotency-Key": "big-1"},
            json={
                "input_file_id": uploaded.id,
                "endpoint": "/v1/chat/completions",
                "completion_window": "24h",
            },
            timeout=120,
        )

    first = create()
    assert first.status_code == 200, first.text[:500]
    assert first.json()["status"] == "validating"
    again = create()
    assert again.status_code == 200, again.text[:500]
    assert again.headers.get("idempotent-replayed") == "true"
    assert again.json()["id"] == first.json()["id"]
    assert validated(big_api, api, first.json()["id"])["status"] == "in_progress"


def test_an_upload_sent_as_json_with_an_idempotency_key_costs_no_parse(big_api: BigAPI) -> None:
    """A body with an ``Idempotency-Key`` is hashed before the route sees it, a JSON one as parsed
    (so a retry with its keys reordered matches). On the upload path a body may be 200 MB: sent as
    ``application/json``, it was parsed and dumped whole on an API thread, holding the GIL (every
    tenant's calls waited) and ~30x its size in memory (48 MB of ``[{},...]``: ~1.4 GB, ~3 s; at
    the 200 MB default limit, ~6 GB), before the route refused it for not being a form."""
    with big_api.client("json-upload") as api:
        body = b"[" + b"{}," * (16 * 1024 * 1024 - 1) + b"{}]"  # 48 MB
        big_api.reset_peak_rss()
        before = big_api.rss_mb("VmRSS")
        answer = httpx.post(
            f"{big_api.base_url}/files",
            headers={
                "Authorization": f"Bearer {api.api_key}",
                "Content-Type": "application/json",
                "Idempotency-Key": "json-upload-1",
            },
            content=body,
            timeout=120,
        )
        growth = big_api.rss_mb("VmHWM") - before
        assert answer.status_code in (400, 422), answer.text[:500]
        assert growth < 100, f"peak RSS grew {growth:.0f} MB hashing a 48 MB JSON upload"
