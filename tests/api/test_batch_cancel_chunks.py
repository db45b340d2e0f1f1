"""POST /v1/batches/{id}/cancel on a batch larger than the cancel ends in one request: it answers
``cancelling`` within its bound of chunks (``api.routes.batches.CANCEL_CHUNKS_IN_REQUEST``), the
sweep's ``store.finish_stopped_batches`` ends the rest; a small batch answers ``cancelled`` as
before. On the real API app in this process (chunks made small), PostgreSQL and Redis."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator

import pytest
from starlette.concurrency import run_in_threadpool

import api.routes.batches
import store
import store.batches
from simulator.testing import SimulatorServer
from tests.api.in_process import InProcess, in_process_api


@pytest.fixture
async def in_process(
    postgres_url: str, redis_url: str, redis_prefix: str, simulator: SimulatorServer
) -> AsyncIterator[InProcess]:
    async with in_process_api(postgres_url, redis_url, redis_prefix, simulator, "cancel-lane") as api:
        yield api


def _batch(in_process: InProcess, lines: int) -> str:
    rows = [
        {
            "custom_id": f"c{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "sim-model", "messages": [{"role": "user", "content": "hi"}]},
        }
        for i in range(lines)
    ]
    source = io.BytesIO("".join(json.dumps(row) + "\n" for row in rows).encode())
    engine = in_process.app.state.engine
    return store.ingest_batch(engine, source, tenant_id=in_process.tenant_id).batch_id


async def test_a_cancel_answers_after_its_bound_and_the_sweep_ends_the_rest(
    in_process: InProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store.batches, "STOP_CHUNK_LINES", 2)
    monkeypatch.setattr(api.routes.batches, "CANCEL_CHUNKS_IN_REQUEST", 2)
    engine = in_process.app.state.engine
    headers = {"Authorization": f"Bearer {in_process.key}"}
    large = await run_in_threadpool(_batch, in_process, 7)
    small = await run_in_threadpool(_batch, in_process, 2)

    answer = await in_process.client.post(f"/v1/batches/{large}/cancel", headers=headers)
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "cancelling"
    progress = await run_in_threadpool(store.batch_progress, engine, large)
    assert (progress.cancelled, progress.queued) == (4, 3)

    assert await run_in_threadpool(store.finish_stopped_batches, engine) == [large]
    ended = await in_process.client.get(f"/v1/batches/{large}", headers=headers)
    assert ended.json()["status"] == "cancelled"
    progress = await run_in_threadpool(store.batch_progress, engine, large)
    assert (progress.cancelled, progress.queued) == (7, 0)

    answer = await in_process.client.post(f"/v1/batches/{small}/cancel", headers=headers)
    assert answer.json()["status"] == "cancelled"


async def test_a_cancel_ends_at_most_one_chunk_inside_its_request(
    in_process: InProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancel's request holds an API thread for one chunk's transaction, not ten (~2 s each of
    a tenant's cancels at 5,000-line chunks): many large batches cancelled at once must not take
    the API's threads from every other tenant. A cancel sent again does no more; the sweep ends
    the rest, and nothing of the batch is left queued."""
    monkeypatch.setattr(store.batches, "STOP_CHUNK_LINES", 2)
    engine = in_process.app.state.engine
    headers = {"Authorization": f"Bearer {in_process.key}"}
    large = await run_in_threadpool(_batch, in_process, 30)

    answer = await in_process.client.post(f"/v1/batches/{large}/cancel", headers=headers)
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "cancelling"
    progress = await run_in_threadpool(store.batch_progress, engine, large)
    assert (progress.cancelled, progress.queued) == (2, 28)

    again = await in_process.client.post(f"/v1/batches/{large}/cancel", headers=headers)
    assert again.json()["status"] == "cancelling"
    progress = await run_in_threadpool(store.batch_progress, engine, large)
    assert (progress.cancelled, progress.queued) == (4, 26)

    assert await run_in_threadpool(store.finish_stopped_batches, engine) == [large]
    ended = await in_process.client.get(f"/v1/batches/{large}", headers=headers)
    assert ended.json()["status"] == "cancelled"
    progress = await run_in_threadpool(store.batch_progress, engine, large)
    assert (progress.cancelled, progress.queued) == (30, 0)
