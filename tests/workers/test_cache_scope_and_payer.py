"""The pipeline's shared cache against real Redis, PostgreSQL and the simulator over HTTP: tenants
do not read each other's answers ("tenants apart"), and the bill follows the request that paid
("bill follows the payer")."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable

import pytest
import redis

from models.cache import CachedCompletion, RedisStore
from models.retry import RetryPolicy
from models.types import UserMessage
from simulator.testing import SimulatorServer
from store import create_tenant, ingest_batch, pending_request_ids, usage_report
from tests.workers.support import Ledger, results_of
from workers.clients import openai_client_factory
from workers.pipeline import CacheScope, ModelCallPipeline
from workers.rate_limits import LocalRateLimiter
from workers.runner import ChunkRunner, RunnerConfig

MakeLedger = Callable[[str], Ledger]
PromptBatch = tuple[str, list[str]]


@pytest.fixture
async def cache_store(redis_url: str, redis_prefix: str) -> AsyncIterator[RedisStore[CachedCompletion]]:
    store = RedisStore.from_url(redis_url, redis_prefix)
    yield store
    await store.close()


def make_pipeline(
    sim: SimulatorServer, store: RedisStore[CachedCompletion], scope: CacheScope = "tenant"
) -> ModelCallPipeline:
    return ModelCallPipeline(
        openai_client_factory(base_url=sim.base_url, api_key="sim", timeout=30),
        LocalRateLimiter({}),
        RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.05),
        cache_store=store,
        cache_scope=scope,
    )


def add_batch(led: Ledger, tenant_id: str, prompts: list[str]) -> PromptBatch:
    lines = "\n".join(json.dumps({"custom_id": f"r{i}", "prompt": p}) for i, p in enumerate(prompts))
    report = ingest_batch(
        led.engine, io.BytesIO(lines.encode()), tenant_id=tenant_id, defaults={"model": "sim-model"}
    )
    assert report.accepted == len(prompts), report
    return report.batch_id, pending_request_ids(led.engine, report.batch_id)


async def run_chunk(led: Ledger, pipeline: ModelCallPipeline, ids: list[str]) -> None:
    await ChunkRunner(led.engine, pipeline, RunnerConfig(owner="test-owner")).run(ids)


@pytest.mark.parametrize("scope", ["tenant", "global"])
async def test_a_tenant_is_not_served_another_tenants_answer_unless_the_operator_shares_the_cache(
    make_ledger: MakeLedger,
    postgres_url: str,
    simulator: SimulatorServer,
    cache_store: RedisStore[CachedCompletion],
    scope: CacheScope,
) -> None:
    """Tenant B sends tenant A's exact prompt after A's answer is cached: under the default
    per-tenant scope B pays for its own call (it learns nothing of A); under the operator's
    global scope it gets A's answer as a free hit."""
    led = make_ledger(postgres_url)
    tenant_a = led.tenant_id
    tenant_b = create_tenant(led.engine, "tenant b").id
    prompt = "the secret plan of tenant a [[delay 0.3]]"
    batch_a, ids_a = add_batch(led, tenant_a, [prompt])
    batch_b, ids_b = add_batch(led, tenant_b, [prompt])
    pipeline = make_pipeline(simulator, cache_store, scope)
    try:
        await run_chunk(led, pipeline, ids_a)
        await run_chunk(led, pipeline, ids_b)
    finally:
        await pipeline.close()
    (result_a,) = results_of(led.engine, batch_a)
    (result_b,) = results_of(led.engine, batch_b)
    assert result_a.cached is False
    if scope == "tenant":
        assert result_b.cached is False
        assert result_b.cache_key != result_a.cache_key
        assert simulator.stats()["completions"] == 2
    else:
        assert result_b.cached is True
        assert result_b.cache_key == result_a.cache_key
        assert simulator.stats()["completions"] == 1


async def test_a_redo_bills_the_answer_its_own_killed_attempt_paid_for_and_others_get_it_free(
    make_ledger: MakeLedger,
    postgres_url: str,
    simulator: SimulatorServer,
    cache_store: RedisStore[CachedCompletion],
) -> None:
    """Request R's first attempt got its answer and wrote the cache, then died before the ledger
    (the call below, with no ledger write). R's redo finds that answer: it is billed as R's call,
    not as a free hit. Request S, same tenant and prompt, gets it as a hit billed 0. The ledger's
    billed tokens equal what the simulator delivered."""
    led = make_ledger(postgres_url)
    prompt = "an answer paid for once"
    batch_id, (request_r, request_s) = add_batch(led, led.tenant_id, [prompt, prompt])
    pipeline = make_pipeline(simulator, cache_store)
    try:
        killed_attempt = await pipeline.call(
            "sim-model",
            [UserMessage(content=prompt, source="user")],
            tenant_id=led.tenant_id,
            payer=request_r,
        )
        assert killed_attempt.result is not None
        assert not killed_attempt.cached
        await run_chunk(led, pipeline, [request_r])
        await run_chunk(led, pipeline, [request_s])
    finally:
        await pipeline.close()
    rows = {row.request_id: row for row in results_of(led.engine, batch_id)}
    delivered = simulator.stats()
    assert delivered["completions"] == 1
    assert rows[request_r].cached is False
    assert rows[request_r].prompt_tokens == delivered["prompt_tokens"]
    assert rows[request_r].completion_tokens == delivered["completion_tokens"]
    assert rows[request_r].attempts == 0  # no upstream call of its own this time
    assert rows[request_s].cached is True
    assert rows[request_s].cost_usd == 0
    (usage,) = usage_report(led.engine, led.tenant_id, group_by=())
    assert usage.billed_requests == 1
    assert usage.cache_hits == 1
    assert usage.billed_prompt_tokens == delivered["prompt_tokens"]
    assert usage.billed_completion_tokens == delivered["completion_tokens"]


def test_a_worker_killed_between_cache_and_ledger_loses_no_bill(
    make_ledger: MakeLedger,
    postgres_url: str,
    redis_url: str,
    redis_prefix: str,
    simulator: SimulatorServer,
) -> None:
    """A worker gets and caches every answer of a batch, then is SIGKILLed before its buffered
    results reach the ledger. The redo makes no upstream call, and the ledger bills exactly the
    tokens the simulator delivered (it used to bill 0: every redo was a free hit)."""
    led = make_ledger(postgres_url)
    count = 12
    # One slow request keeps the chunk, and so its unflushed results, alive until the kill. (Its
    # answer, sent to a dead worker after the kill, is not one the ledger can know of; short, so
    # that the next test's simulator reset waits for it.)
    prompts = [f"paid once, billed once {i}" for i in range(count)] + ["keeps the chunk open [[delay 12]]"]
    batch_id, all_ids = add_batch(led, led.tenant_id, prompts)
    ids = all_ids[:count]
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.workers.crash_before_ledger",
            postgres_url,
            redis_url,
            redis_prefix,
            simulator.base_url,
            ",".join(all_ids),
        ],
        stdout=subprocess.DEVNULL,
    )
    cache = redis.Redis.from_url(redis_url)
    try:
        deadline = time.monotonic() + 60
        while len([k for k in cache.scan_iter(match=f"{redis_prefix}*") if b":lock:" not in k]) < count:
            assert worker.poll() is None, "the doomed worker exited early"
            assert time.monotonic() < deadline, "the doomed worker never cached its answers"
            time.sleep(0.05)
        worker.kill()
        worker.wait()
    finally:
        cache.close()
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    assert results_of(led.engine, batch_id) == []  # nothing reached the ledger
    delivered = simulator.stats()
    assert delivered["accepted"] == count, "the slow request answered before the kill"

    async def redo() -> None:
        store = RedisStore.from_url(redis_url, redis_prefix)
        pipeline = make_pipeline(simulator, store)
        try:
            deadline = time.monotonic() + 60
            # Claimable once the killed worker's one-second leases have run out.
            while len(results_of(led.engine, batch_id)) < count:
                assert time.monotonic() < deadline, "the redo never claimed the killed worker's requests"
                await run_chunk(led, pipeline, ids)
                await asyncio.sleep(0.2)
        finally:
            await pipeline.close()

    asyncio.run(redo())
    rows = results_of(led.engine, batch_id)
    assert simulator.stats()["completions"] == count + 1  # the redo asked for nothing again
    assert [row.cached for row in rows] == [False] * count
    (usage,) = usage_report(led.engine, led.tenant_id, group_by=())
    assert usage.billed_prompt_tokens == delivered["prompt_tokens"]
    assert usage.billed_completion_tokens == delivered["completion_tokens"]
