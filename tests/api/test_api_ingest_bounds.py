"""What one upload can cost the API: echoed input and ingest memory stay bounded, against a live
``tokenmill api`` with generous limits (1 MB lines, 64 MB uploads) on its own PostgreSQL."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import redis

from tests import services
from tests.api.conftest import api_env, start_api
from tests.cluster import run_cli

BROKER_DB = 13
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
    broker_url = services.redis_db_url(redis_url, BROKER_DB)
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
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
            broker.flushdb()
            broker.close()


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
        answer = httpx.get(f"{big_api.base_url}/batches/{created.id}", headers=headers)
        assert len(answer.content) < 20_000, len(answer.content)  # was 20 MB: every url whole
        batch = answer.json()
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
    batch = api.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    growth = big_api.rss_mb("VmHWM") - before
    assert batch.status == "in_progress", batch.errors
    assert batch.request_counts is not None
    assert batch.request_counts.total == lines
    # 40 MB of lines: the old ingest held every body, its COPY text and their bytes (~4 x 40 MB)
    assert growth < 64, f"peak RSS grew {growth:.0f} MB creating a batch from {lines} MB of lines"
