"""Agent runs as ledger requests, run by the chunk runner in this process through the real
pipeline (simulator over HTTP, a real cache and database): transcripts and per-call usage in SQL,
follow-ups on a stored conversation, redone runs costing nothing, usage summed in the rollup."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import diskcache
import pytest
import sqlalchemy as sa

from models.cache import DiskCacheStore
from models.cancellation import CancellationToken
from models.retry import RetryPolicy
from simulator.testing import SimulatorServer
from store import (
    Request,
    RequestKind,
    RequestStatus,
    cancel_batch,
    claim_requests,
    create_conversation,
    create_tenant,
    ingest_batch,
    load_conversation,
    pending_request_ids,
    record_results,
    usage_report,
)
from tests.agents.conversation_rules import tool_call_violations
from tests.workers.support import Ledger, ledger, results_of
from workers.agent_tasks import AgentRunSpec, parse_agent_run_body, run_agent
from workers.clients import openai_client_factory
from workers.handlers import request_handlers
from workers.pipeline import ModelCallPipeline
from workers.rate_limits import LocalRateLimiter
from workers.runner import ChunkReport, ChunkRunner, RunnerConfig

AGENT_DEFAULTS = {"model": "gpt-4o-mini", "tools": ["calculator"]}
TWO_CALLS = (
    'What is (2+3)*4? [[call calculator {"expression": "2+3"}]] [[then]] '
    '[[call calculator {"expression": "5*4"}]]'
)


@pytest.fixture
def led(database_url: str) -> Iterator[Ledger]:
    books = ledger(database_url)
    yield books
    books.engine.dispose()


@pytest.fixture
async def pipeline(simulator: SimulatorServer, tmp_path: Path) -> AsyncIterator[ModelCallPipeline]:
    pipeline = ModelCallPipeline(
        openai_client_factory(base_url=simulator.base_url, api_key="sim", timeout=10),
        LocalRateLimiter({}),
        RetryPolicy(max_attempts=2, base_delay=0.01),
        cache_store=DiskCacheStore(diskcache.Cache(str(tmp_path / "cache"))),
    )
    yield pipeline
    await pipeline.close()


def add_agent_batch(
    led: Ledger, lines: Sequence[dict[str, Any]], tenant_id: str | None = None
) -> tuple[str, list[str]]:
    data = "\n".join(json.dumps({"custom_id": f"r{i}", **line}) for i, line in enumerate(lines))
    report = ingest_batch(
        led.engine,
        io.BytesIO(data.encode()),
        tenant_id=tenant_id or led.tenant_id,
        endpoint="/v1/agent_runs",
        defaults=AGENT_DEFAULTS,
    )
    assert report.accepted == len(lines), report
    return report.batch_id, pending_request_ids(led.engine, report.batch_id)


async def run(led: Ledger, pipeline: ModelCallPipeline, ids: list[str]) -> ChunkReport:
    runner = ChunkRunner(
        led.engine, pipeline, RunnerConfig(owner="test"), handlers=request_handlers(led.engine)
    )
    return await runner.run(ids)


async def test_a_runner_given_no_handlers_runs_every_registered_kind(
    led: Ledger, pipeline: ModelCallPipeline
) -> None:
    """``workers.handlers`` is the one list of handlers: the default runner (``tokenmill run``, the
    Celery task) runs agent runs as well as chat completions."""
    batch_id, ids = add_agent_batch(led, [{"prompt": "What is 2+2?"}])
    report = await ChunkRunner(led.engine, pipeline, RunnerConfig(owner="test")).run(ids)
    assert (report.succeeded, report.failed) == (1, 0)
    [row] = results_of(led.engine, batch_id)
    assert row.response_body is not None
    assert row.response_body["stop_reason"] == "answer"


def bodies(led: Ledger, batch_id: str) -> dict[str, dict[str, Any]]:
    return {row.request_id: row.response_body or {} for row in results_of(led.engine, batch_id)}


async def test_two_tool_calls_then_a_follow_up_with_transcripts_and_usage_in_sql(
    led: Ledger, pipeline: ModelCallPipeline, simulator: SimulatorServer
) -> None:
    batch_id, ids = add_agent_batch(led, [{"prompt": TWO_CALLS}])
    report = await run(led, pipeline, ids)
    assert report.succeeded == 1
    [row] = results_of(led.engine, batch_id)
    body = row.response_body
    assert body is not None
    assert body["stop_reason"] == "answer"
    assert "calculator=20" in body["output"]
    assert [m["type"] for m in body["transcript"]] == [
        "UserMessage",
        "AssistantMessage",
        "FunctionExecutionResultMessage",
        "AssistantMessage",
        "FunctionExecutionResultMessage",
        "AssistantMessage",
    ]
    calls = body["model_calls"]
    assert len(calls) == 3 == simulator.stats()["completions"]
    assert all(not call["cached"] for call in calls)
    assert row.prompt_tokens == sum(call["usage"]["prompt_tokens"] for call in calls) > 0
    assert row.completion_tokens == sum(call["usage"]["completion_tokens"] for call in calls) > 0
    assert row.attempts == 3

    conversation_id = body["conversation_id"]
    stored = load_conversation(led.engine, conversation_id)
    assert len(stored) == 6
    assert tool_call_violations(stored) == []

    follow_batch, follow_ids = add_agent_batch(
        led, [{"prompt": "What was the final number? [[recall]]", "conversation_id": conversation_id}]
    )
    await run(led, pipeline, follow_ids)
    [follow] = bodies(led, follow_batch).values()
    assert follow["conversation_id"] == conversation_id
    assert "recall:" in follow["output"]
    assert "20" in follow["output"]
    assert len(load_conversation(led.engine, conversation_id)) == 8


async def test_a_redone_batch_is_all_cache_hits_and_bills_nothing(
    led: Ledger, pipeline: ModelCallPipeline, simulator: SimulatorServer
) -> None:
    lines = [{"prompt": f'Run {n}. [[call calculator {{"expression": "{n}*{n}"}}]]'} for n in range(4)]
    first_batch, first_ids = add_agent_batch(led, lines)
    first = await run(led, pipeline, first_ids)
    upstream = simulator.stats()["completions"]
    assert upstream == 8
    second_batch, second_ids = add_agent_batch(led, lines)
    second = await run(led, pipeline, second_ids)
    assert simulator.stats()["completions"] == upstream, "no model call was repeated upstream"
    assert first.cached == 0
    assert second.cached == 4
    assert second.billed_prompt_tokens == second.billed_completion_tokens == 0
    assert first.billed_prompt_tokens > 0

    rows = {row.batch_id: row for row in usage_report(led.engine, led.tenant_id, ("batch",))}
    assert rows[first_batch].billed_prompt_tokens == first.billed_prompt_tokens
    assert rows[first_batch].billed_completion_tokens == first.billed_completion_tokens
    assert rows[second_batch].billed_prompt_tokens == 0
    assert rows[second_batch].cache_hits == 4
    # The per-call usage stored in the bodies adds up to the billed figures.
    per_call = sum(
        call["usage"]["prompt_tokens"]
        for body in bodies(led, first_batch).values()
        for call in body["model_calls"]
        if not call["cached"]
    )
    assert per_call == first.billed_prompt_tokens


async def test_bad_runs_fail_alone_and_bad_tool_calls_do_not_fail_a_run(
    led: Ledger, pipeline: ModelCallPipeline
) -> None:
    other_tenant = create_tenant(led.engine, "other").id
    foreign = create_conversation(led.engine, other_tenant)
    batch_id, ids = add_agent_batch(
        led,
        [
            {"prompt": '[[call no_such_tool {}]] [[call calculator {"expression": "1/0"}]]'},
            {"prompt": "hi", "conversation_id": foreign},
            {"prompt": "hi", "conversation_id": "conv_missing"},
            {"prompt": "hi", "tools": ["shell"]},
            {"prompt": "[[status 400]]"},
        ],
    )
    report = await run(led, pipeline, ids)
    assert report.succeeded == 1
    assert report.failed == 4
    rows = {row.request_id: row for row in results_of(led.engine, batch_id)}
    good = rows[ids[0]].response_body
    assert good is not None
    results = [
        r for m in good["transcript"] if m["type"] == "FunctionExecutionResultMessage" for r in m["content"]
    ]
    assert [r["is_error"] for r in results] == [True, True]
    assert rows[ids[1]].error_code == "conversation_not_found"
    assert rows[ids[2]].error_code == "conversation_not_found"
    assert rows[ids[3]].error_code == "unknown_tool"
    assert rows[ids[4]].status_code == 400


def test_bodies_are_read_with_inline_messages() -> None:
    spec = parse_agent_run_body(
        {
            "model": "m",
            "input": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"},
            ],
        }
    )
    assert spec.config.system_message == "Be brief."
    assert [m.content for m in spec.inline_history] == ["a", "b"]
    assert spec.input.content == "c"


async def test_a_redone_run_repeats_no_model_call_and_appends_once(
    led: Ledger, pipeline: ModelCallPipeline, simulator: SimulatorServer
) -> None:
    def spec(text: str, conversation_id: str | None = None) -> AgentRunSpec:
        body: dict[str, Any] = {**AGENT_DEFAULTS, "input": text}
        if conversation_id is not None:
            body["conversation_id"] = conversation_id
        return parse_agent_run_body(body)

    first = await run_agent(led.engine, pipeline, spec(TWO_CALLS), tenant_id=led.tenant_id, run_id="req_a")
    upstream = simulator.stats()["completions"]
    redo = await run_agent(led.engine, pipeline, spec(TWO_CALLS), tenant_id=led.tenant_id, run_id="req_a")
    assert redo.conversation_id == first.conversation_id
    # No call went upstream again, and the answers its first attempt paid for are billed as the
    # run's own calls ("bill follows the payer"), not as free hits.
    assert simulator.stats()["completions"] == upstream
    assert [call.cached for call in redo.run.model_calls] == [False] * len(first.run.model_calls)
    assert redo.run.usage == first.run.usage
    follow_spec = spec("And the final number? [[recall]]", first.conversation_id)
    follow = await run_agent(led.engine, pipeline, follow_spec, tenant_id=led.tenant_id, run_id="req_b")
    follow_redo = await run_agent(led.engine, pipeline, follow_spec, tenant_id=led.tenant_id, run_id="req_b")
    # The redo saw the conversation as the first attempt did: the same call, from the cache,
    # billed as its own.
    assert [call.cached for call in follow_redo.run.model_calls] == [False]
    assert follow_redo.run.output == follow.run.output
    assert simulator.stats()["completions"] == upstream + 1
    stored = load_conversation(led.engine, first.conversation_id, tenant_id=led.tenant_id)
    assert len(stored) == 8
    assert tool_call_violations(stored) == []


async def test_a_rate_limited_agent_run_is_handed_back_and_counts_every_attempt(
    led: Ledger, simulator: SimulatorServer
) -> None:
    """An agent run whose model call is told to come back in 3 s (past hand_back_after) goes back
    in line like a batch line, instead of failing; it runs again once due, and its result counts
    the refused attempt too."""
    pipeline = ModelCallPipeline(
        openai_client_factory(base_url=simulator.base_url, api_key="sim", timeout=10),
        LocalRateLimiter({}),
        RetryPolicy(base_delay=0.01, hand_back_after=1.0),
    )
    try:
        batch_id, ids = add_agent_batch(
            led, [{"prompt": "What is 2+2? [[status 429 retry_after=3 times=1]]"}]
        )
        first = await run(led, pipeline, ids)
        assert (first.handed_back, first.failed, first.succeeded) == (1, 0, 0)
        assert results_of(led.engine, batch_id) == []
        with led.engine.connect() as conn:
            not_before = conn.execute(sa.select(Request.not_before).where(Request.id == ids[0])).scalar_one()
        assert not_before is not None
        await asyncio.sleep(not_before - time.time() + 0.05)  # until the time it was given
        again = await run(led, pipeline, ids)
    finally:
        await pipeline.close()
    assert again.succeeded == 1
    [row] = results_of(led.engine, batch_id)
    assert row.attempts == simulator.stats()["completions"] == 2


FOUR_CALLS = (
    'What is ((2+3)*4)-1? [[call calculator {"expression": "2+3"}]] [[then]] '
    '[[call calculator {"expression": "5*4"}]] [[then]] [[call calculator {"expression": "20-1"}]]'
)


def billed_tokens(led: Ledger) -> tuple[int, int, int]:
    """(prompt, completion, discarded answers) the ledger bills the test's tenant."""
    rows = usage_report(led.engine, led.tenant_id, group_by=())
    return (
        sum(row.billed_prompt_tokens for row in rows),
        sum(row.billed_completion_tokens for row in rows),
        sum(row.discarded_answers for row in rows),
    )


async def wait_for_simulator_idle(simulator: SimulatorServer) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while (stats := simulator.stats())["in_flight"]:
        assert time.monotonic() < deadline, "the simulator still has calls in flight"
        await asyncio.sleep(0.02)
    return stats


async def test_an_agent_run_cancelled_mid_run_bills_every_model_call_it_paid_for(
    led: Ledger, pipeline: ModelCallPipeline, simulator: SimulatorServer
) -> None:
    """A four-call agent run (three tool rounds, 0.4 s a call) whose batch is cancelled after its
    first call was answered: the run stops, the request ends cancelled, and every call the
    simulator answered is billed to the tenant (as discarded answers: no result is kept)."""
    simulator.configure(latency_ms=400)
    batch_id, ids = add_agent_batch(led, [{"prompt": FOUR_CALLS}])
    runner = ChunkRunner(
        led.engine,
        pipeline,
        RunnerConfig(owner="test", cancel_check_interval=0.05),
        handlers=request_handlers(led.engine),
    )
    running = asyncio.create_task(runner.run(ids))
    deadline = time.monotonic() + 30
    while simulator.stats()["completions"] < 1:
        assert time.monotonic() < deadline, "the run's first model call never finished"
        await asyncio.sleep(0.01)
    await asyncio.to_thread(cancel_batch, led.engine, batch_id)
    report = await asyncio.wait_for(running, timeout=60)
    stats = await wait_for_simulator_idle(simulator)
    assert report.cancelled == 1
    assert results_of(led.engine, batch_id) == []
    assert 1 <= stats["completions"] < 4  # stopped mid-run
    prompt, completion, discarded = billed_tokens(led)
    assert (prompt, completion) == (stats["prompt_tokens"], stats["completion_tokens"])
    assert discarded == stats["completions"]


async def test_duplicate_deliveries_of_an_agent_run_bill_each_answer_once(
    led: Ledger, pipeline: ModelCallPipeline, simulator: SimulatorServer, tmp_path: Path
) -> None:
    """Three deliveries of one agent run: the first pays for its three model calls and is kept;
    the second (a worker with a cache of its own) pays for all three again and is not kept; the
    third finds the first's answers in the cache (its own calls). The ledger bills exactly what
    the simulator answered: the second delivery's calls as discarded answers, the third's nothing."""
    batch_id, ids = add_agent_batch(led, [{"prompt": TWO_CALLS}])
    [claimed] = claim_requests(led.engine, ids, "test", 300)
    handler = request_handlers(led.engine)[RequestKind.AGENT_RUN]
    other_worker = ModelCallPipeline(
        openai_client_factory(base_url=simulator.base_url, api_key="sim", timeout=10),
        LocalRateLimiter({}),
        RetryPolicy(max_attempts=2, base_delay=0.01),
        cache_store=DiskCacheStore(diskcache.Cache(str(tmp_path / "other-cache"))),
    )
    token = CancellationToken()
    try:
        first = await handler(claimed, pipeline, token)
        second = await handler(claimed, other_worker, token)
        third = await handler(claimed, pipeline, token)
    finally:
        await other_worker.close()
    stats = await wait_for_simulator_idle(simulator)
    assert stats["completions"] == 6
    assert record_results(led.engine, [first]).inserted == ids
    for duplicate in (second, third, second):  # the second written twice: billed once
        assert record_results(led.engine, [duplicate]).duplicates == ids
    prompt, completion, discarded = billed_tokens(led)
    assert (prompt, completion) == (stats["prompt_tokens"], stats["completion_tokens"])
    assert discarded == 3
    [kept] = results_of(led.engine, batch_id)
    assert kept.upstream_request_id is not None


async def test_a_failed_agent_runs_duplicates_bill_each_answer_once(
    led: Ledger, pipeline: ModelCallPipeline, simulator: SimulatorServer, tmp_path: Path
) -> None:
    """A run whose first model call is answered and whose second fails for good (its prompt is over
    the simulator's context limit) is kept as failed with the first call's spend. A duplicate that
    finds that answer in the cache (its own call) bills nothing more; one from a worker with
    another cache paid for it again, and bills that."""
    probe = ModelCallPipeline(
        openai_client_factory(base_url=simulator.base_url, api_key="sim", timeout=10),
        LocalRateLimiter({}),
        RetryPolicy(max_attempts=1),
    )
    other_worker = ModelCallPipeline(
        openai_client_factory(base_url=simulator.base_url, api_key="sim", timeout=10),
        LocalRateLimiter({}),
        RetryPolicy(max_attempts=1),
        cache_store=DiskCacheStore(diskcache.Cache(str(tmp_path / "other-cache"))),
    )
    try:
        spec = parse_agent_run_body({**AGENT_DEFAULTS, "input": TWO_CALLS})
        probed = await run_agent(led.engine, probe, spec, tenant_id=None, run_id="probe")
        simulator.reset()
        simulator.configure(max_context_tokens=probed.run.model_calls[0].usage.prompt_tokens)
        batch_id, ids = add_agent_batch(led, [{"prompt": TWO_CALLS}])
        [claimed] = claim_requests(led.engine, ids, "test", 300)
        handler = request_handlers(led.engine)[RequestKind.AGENT_RUN]
        token = CancellationToken()
        first = await handler(claimed, pipeline, token)
        again = await handler(claimed, pipeline, token)
        elsewhere = await handler(claimed, other_worker, token)
    finally:
        await probe.close()
        await other_worker.close()
    stats = await wait_for_simulator_idle(simulator)
    assert stats["accepted"] == 2  # the first call, by the first delivery and the other worker
    assert first.status is RequestStatus.FAILED
    assert first.usage.prompt_tokens > 0
    assert record_results(led.engine, [first]).inserted == ids
    for duplicate in (again, elsewhere):
        assert record_results(led.engine, [duplicate]).duplicates == ids
    prompt, completion, discarded = billed_tokens(led)
    assert (prompt, completion) == (stats["prompt_tokens"], stats["completion_tokens"])
    assert discarded == 1
    assert len(results_of(led.engine, batch_id)) == 1


async def hand_back_after_a_paid_call(led: Ledger, pipeline: ModelCallPipeline) -> tuple[str, list[str]]:
    """An agent run handed back twice: first its first call is refused (429, come back in 3 s);
    then that call is answered (paid) and the next one is refused. Returns once it waits again."""
    prompt = 'What is 2+3? [[call calculator {"expression": "2+3"}]] [[status 429 retry_after=3 times=1]]'
    batch_id, ids = add_agent_batch(led, [{"prompt": prompt}])
    for _ in range(2):
        with led.engine.connect() as conn:
            not_before = conn.execute(sa.select(Request.not_before).where(Request.id == ids[0])).scalar_one()
        if not_before is not None:
            await asyncio.sleep(max(0.0, not_before - time.time() + 0.05))  # until the time it was given
        report = await run(led, pipeline, ids)
        assert (report.handed_back, report.failed, report.succeeded) == (1, 0, 0)
    return batch_id, ids


def hand_back_pipeline(simulator: SimulatorServer, tmp_path: Path) -> ModelCallPipeline:
    return ModelCallPipeline(
        openai_client_factory(base_url=simulator.base_url, api_key="sim", timeout=10),
        LocalRateLimiter({}),
        RetryPolicy(base_delay=0.01, hand_back_after=1.0),
        cache_store=DiskCacheStore(diskcache.Cache(str(tmp_path / "cache"))),
    )


async def test_a_handed_back_agent_run_cancelled_while_it_waits_bills_what_it_paid_for(
    led: Ledger, simulator: SimulatorServer, tmp_path: Path
) -> None:
    """The answer the run paid for before it was handed back is billed (a discarded answer) when
    its batch is cancelled while the run waits in line: no later result would bill it."""
    pipeline = hand_back_pipeline(simulator, tmp_path)
    try:
        batch_id, _ = await hand_back_after_a_paid_call(led, pipeline)
    finally:
        await pipeline.close()
    await asyncio.to_thread(cancel_batch, led.engine, batch_id)
    stats = await wait_for_simulator_idle(simulator)
    assert stats["accepted"] == 1
    assert results_of(led.engine, batch_id) == []
    prompt, completion, discarded = billed_tokens(led)
    assert (prompt, completion) == (stats["prompt_tokens"], stats["completion_tokens"])
    assert discarded == 1


async def test_a_handed_back_agent_run_that_finishes_bills_each_answer_once(
    led: Ledger, simulator: SimulatorServer, tmp_path: Path
) -> None:
    """The redo after the hand-back finds the answer billed at hand-back in the cache: a free hit,
    not its own call billed a second time; the ledger bills exactly what the simulator answered."""
    pipeline = hand_back_pipeline(simulator, tmp_path)
    try:
        batch_id, ids = await hand_back_after_a_paid_call(led, pipeline)
        with led.engine.connect() as conn:
            not_before = conn.execute(sa.select(Request.not_before).where(Request.id == ids[0])).scalar_one()
        await asyncio.sleep(max(0.0, not_before - time.time() + 0.05))
        assert (await run(led, pipeline, ids)).succeeded == 1
    finally:
        await pipeline.close()
    stats = await wait_for_simulator_idle(simulator)
    assert stats["accepted"] == 2
    [row] = results_of(led.engine, batch_id)
    assert [call["cached"] for call in (row.response_body or {})["model_calls"]] == [True, False]
    prompt, completion, discarded = billed_tokens(led)
    assert (prompt, completion) == (stats["prompt_tokens"], stats["completion_tokens"])
    assert discarded == 1
