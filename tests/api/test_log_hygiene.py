"""No prompt text, key or secret in any log line of any process, database and library errors
included: a deployment (api, worker, beat) runs secret prompts through faults, then every log is
searched for them."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest

import store
from simulator.testing import SimulatorServer
from tests.api.conftest import start_api
from tests.cluster import Cluster, run_cli

pytestmark = pytest.mark.slow

SECRET = "Zq7-SECRET-PROMPT-Wx4"


def chat_line(custom_id: str, content: str) -> dict[str, object]:
    body = {"model": "sim-model", "messages": [{"role": "user", "content": content}], "max_tokens": 20}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


def test_no_prompt_or_key_reaches_a_log_through_faults(
    cluster: Callable[..., Cluster], simulator: SimulatorServer, tmp_path: Path
) -> None:
    c = cluster()
    c.env["TOKENMILL_FILES_DIR"] = str(tmp_path / "files")
    c.env["TOKENMILL_MAX_ATTEMPTS"] = "2"
    assert run_cli(c.env, "db", "upgrade").returncode == 0
    created = run_cli(c.env, "keys", "create", "acme")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    # Workers at INFO, as an operator would run them: their events are logged too.
    c.start("worker", "--processes=1", "--concurrency=8", "--loglevel=INFO", "--hostname=w1@%h", name="w1")
    c.beat()
    api, root = start_api(c.env, c.logs / "api.log")
    headers = {"Authorization": f"Bearer {key}"}
    try:
        with openai.OpenAI(base_url=f"{root}/v1", api_key=key, max_retries=0) as client:
            # A line PostgreSQL refuses (NaN is not JSON), in a batch and as a single request.
            bad = json.dumps(chat_line("nan", f"{SECRET} nan")).replace(
                '"max_tokens": 20', '"max_tokens": NaN'
            )
            uploaded = client.files.create(file=("bad.jsonl", bad.encode() + b"\n"), purpose="batch")
            answer = httpx.post(
                f"{root}/v1/batches",
                headers=headers,
                json={"input_file_id": uploaded.id, "endpoint": "/v1/chat/completions"},
                timeout=30,
            )
            assert SECRET not in answer.text
            answer = httpx.post(
                f"{root}/v1/chat/completions",
                headers={**headers, "Content-Type": "application/json"},
                content=json.dumps(chat_line("x", f"{SECRET} single")["body"]).replace("20", "NaN"),
                timeout=30,
            )
            assert SECRET not in answer.text
            # Upstream faults: retried then failed, refused, over the context window, and a success.
            lines = [
                chat_line("e500", f"{SECRET} [[status 500]]"),
                chat_line("e400", f"{SECRET} [[status 400]]"),
                chat_line("ctx", f"{SECRET} [[context_length]]"),
                chat_line("ok", f"{SECRET} fine"),
            ]
            content = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
            uploaded = client.files.create(file=("in.jsonl", content), purpose="batch")
            batch = client.batches.create(
                input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
            deadline = time.monotonic() + 90
            while (batch := client.batches.retrieve(batch.id)).status != "completed":
                assert time.monotonic() < deadline, batch
                time.sleep(0.25)
            assert batch.request_counts is not None
            assert (batch.request_counts.completed, batch.request_counts.failed) == (1, 3)
    finally:
        api.terminate()
        api.wait(timeout=10)
    for process in c.processes:  # flush and close every log
        process.terminate()
        process.wait(timeout=30)
    engine = store.make_engine(c.env["TOKENMILL_DATABASE_URL"])
    webhook_secret = store.webhook_secret(engine, "acme")
    engine.dispose()
    logs = {path.name: path.read_text(errors="replace") for path in c.logs.glob("*.log")}
    assert set(logs) >= {"api.log", "w1.log", "beat.log"}
    assert any(logs.values())
    for name, text in logs.items():
        for secret in (SECRET, key, webhook_secret):
            leaks = [line for line in text.splitlines() if secret in line]
            assert not leaks, (name, leaks[:3])
    # Structured: one JSON object per log line (telemetry.logs); a worker's lines about a request
    # name it and its batch, and the API's access lines are JSON too.
    records = {
        name: [json.loads(line) for line in text.splitlines() if line.startswith("{")]
        for name, text in logs.items()
    }
    assert any({"request_id", "batch_id", "tenant"} <= set(line) for line in records["w1.log"]), logs[
        "w1.log"
    ][-3000:]
    assert any(line.get("logger") == "uvicorn.access" for line in records["api.log"]), logs["api.log"][-3000:]
    for name, text in logs.items():
        # Celery's direct prints at shutdown ("worker: Warm shutdown ...") are not log records.
        loose = [
            line for line in text.splitlines() if line.strip() and not line.startswith(("{", "worker: "))
        ]
        assert not loose, (name, loose[:5])
