"""What one ``POST /v1/batches`` holds of the API: a file of many lines, however few its bytes, is
read after the call answers (``validating``), as a large file is, rather than on an API thread
inside the request. On the real API app in this process (the line bound made small), PostgreSQL
and Redis."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from starlette.concurrency import run_in_threadpool

import api.routes.batches
import store
from simulator.testing import SimulatorServer
from tests.api.in_process import InProcess, in_process_api

WAIT_SECONDS = 60  # a safety net: a waiting step fails the test rather than hang it


@pytest.fixture
async def in_process(
    postgres_url: str, redis_url: str, redis_prefix: str, simulator: SimulatorServer
) -> AsyncIterator[InProcess]:
    async with in_process_api(postgres_url, redis_url, redis_prefix, simulator, "create-lane") as api:
        yield api


def _input_file(in_process: InProcess, tmp_path: Path, lines: int) -> str:
    rows = [{"custom_id": f"c{i}", "prompt": "hi"} for i in range(lines)]
    path = tmp_path / f"in-{lines}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    engine = in_process.app.state.engine
    return store.create_file(
        engine, in_process.tenant_id, path.name, "batch", path.stat().st_size, str(path)
    ).id


async def test_a_create_reads_at_most_its_line_bound_inside_the_request(
    in_process: InProcess, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A file under ``background_ingest_bytes`` (1 MiB) was read inside the create call whatever
    its lines: 27,000 short lines held an API thread 2.3 s, and a tenant creating many such
    batches at once took the threads every tenant's requests run on. Past
    ``INLINE_INGEST_MAX_LINES`` it is read after the call answers, as a large file is (a few at a
    time per tenant and per process); a file within it answers as it always did."""
    monkeypatch.setattr(api.routes.batches, "INLINE_INGEST_MAX_LINES", 5, raising=False)
    headers = {"Authorization": f"Bearer {in_process.key}"}
    body = {"endpoint": "/v1/chat/completions", "model": "sim-model"}

    many = await run_in_threadpool(_input_file, in_process, tmp_path, 12)
    answer = await in_process.client.post(
        "/v1/batches", headers=headers, json={**body, "input_file_id": many}
    )
    assert answer.status_code == 200, answer.text
    created = answer.json()
    assert (created["status"], created["request_counts"]["total"]) == ("validating", 0)
    deadline = WAIT_SECONDS
    while (batch := (await in_process.client.get(f"/v1/batches/{created['id']}", headers=headers)).json())[
        "status"
    ] == "validating":
        deadline -= 1
        assert deadline > 0, batch
        await in_process.client.get("/healthz")  # one turn of the app before looking again
    assert (batch["status"], batch["request_counts"]["total"]) == ("in_progress", 12)

    few = await run_in_threadpool(_input_file, in_process, tmp_path, 5)
    answer = await in_process.client.post("/v1/batches", headers=headers, json={**body, "input_file_id": few})
    assert (answer.json()["status"], answer.json()["request_counts"]["total"]) == ("in_progress", 5)
