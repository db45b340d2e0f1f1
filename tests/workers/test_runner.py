"""The chunk runner in this process, against the simulator over HTTP and a real database."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import diskcache
import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from config import ModelLimits
from models.cache import DiskCacheStore
from models.cancellation import CancellationToken
from models.retry import RetryPolicy
from models.types import RequestUsage
from simulator.testing import SimulatorServer
from store import (
    BatchStatus,
    ClaimedRequest,
    Request,
    RequestKind,
    RequestStatus,
    Result,
    ResultRecord,
    cancel_batch,
    claim_requests,
    get_batch,
    ingest_batch,
    iter_output_lines,
    make_engine,
    pending_request_ids,
    record_results,
)
from tests.workers.support import Ledger, add_batch, results_of, statuses
from workers.clients import openai_client_factory
from workers.pipeline import ModelCallPipeline
from workers.rate_limits import LimiterTuning, LocalRateLimiter
from workers.result_writer import UNRECORDABLE, record_isolating_bad_rows
from workers.runner import ChunkReport, ChunkRunner, RunnerConfig, complete_chat

MakeLedger = Callable[[str], Ledger]


def make_pipeline(
    sim: SimulatorServer,
    cache_dir: Path | None = None,
    max_attempts: int = 6,
    hand_back_after: float | None = None,
) -> ModelCallPipeline:
    store = DiskCacheStore(diskcache.Cache(str(cache_dir))) if cache_dir is not None else None
    return ModelCallPipeline(
        openai_client_factory(base_url=sim.base_url, api_key="sim", timeout=10),
        LocalRateLimiter({}),
        RetryPolicy(
            max_attempts=max_attempts, base_delay=0.01, max_delay=0.05, hand_back_after=hand_back_after
        ),
        cache_store=store,
    )


async def run_ids(
    url: str,
    sim: SimulatorServer,
    ids: list[str],
    *,
    cache_dir: Path | None = None,
    in_flight: int = 64,
    max_deliveries: int = 6,
    cancel_check_interval: float = 1.0,
    refill_seconds: float = 0,
    hand_back_after: float | None = None,
    rate_limit_retry_seconds: float | None = None,
) -> ChunkReport:
    engine = make_engine(url)
    pipeline = make_pipeline(sim, cache_dir, hand_back_after=hand_back_after)
    config = RunnerConfig(
        owner="test-owner",
        in_flight=in_flight,
        max_deliveries=max_deliveries,
        cancel_check_interval=cancel_check_interval,
        refill_seconds=refill_seconds,
        rate_limit_retry_seconds=rate_limit_retry_seconds,
    )
    try:
        return await ChunkRunner(engine, pipeline, config).run(ids)
    finally:
        await pipeline.close()
        engine.dispose()


async def test_every_request_recorded_once_with_provider_errors(
    make_ledger: MakeLedger, database_url: str, simulator: SimulatorServer
) -> None:
    led = make_ledger(database_url)
    prompts = [f"question {i}" for i in range(40)] + ["bad [[status 400]]", "long [[context_length]]"]
    batch_id, ids = add_batch(led, prompts)
    report = await run_ids(database_url, simulator, ids)
    results = results_of(led.engine, batch_id)
    assert len(results) == len(prompts)
    assert len({r.request_id for r in results}) == len(prompts)
    failed = {r.request_id: r for r in results if r.status == RequestStatus.FAILED}
    assert set(failed) == set(ids[-2:])
    assert failed[ids[-2]].status_code == 400
    assert failed[ids[-1]].error_code == "context_length_exceeded"
    assert all(r.error_message for r in failed.values())
    ok = [r for r in results if r.status == RequestStatus.SUCCEEDED]
    assert all(r.response_body and r.response_body["object"] == "chat.completion" for r in ok)
    assert all(r.prompt_tokens > 0 and not r.cached for r in ok)
    assert statuses(led.engine, batch_id) == {"succeeded": 40, "failed": 2}
    batch = get_batch(led.engine, batch_id)
    assert batch is not None
    assert batch.status == BatchStatus.COMPLETED
    stats = simulator.stats()
    # Permanent errors are not retried: one upstream call per request.
    assert stats["completions"] == len(prompts)
    assert report.succeeded == 40


async def test_a_chunk_refills_from_its_batch_for_its_refill_seconds(
    make_ledger: MakeLedger, database_url: str, simulator: SimulatorServer
) -> None:
    """Given 10 ids of a 300-request batch, a chunk with a refill budget runs the other queued
    ones too (its window never drains); without one it runs its 10 alone."""
    led = make_ledger(database_url)
    batch_id, ids = add_batch(led, [f"refill {i}" for i in range(300)])
    alone = await run_ids(database_url, simulator, ids[:10], in_flight=8)
    assert (alone.claimed, alone.succeeded) == (10, 10)
    refilled = await run_ids(database_url, simulator, ids[10:20], in_flight=8, refill_seconds=60)
    assert (refilled.claimed, refilled.succeeded) == (290, 290)
    assert statuses(led.engine, batch_id) == {"succeeded": 300}
    assert simulator.stats()["requests"] == 300


async def test_429s_are_retried_honouring_retry_after(
    make_ledger: MakeLedger, sqlite_url: str, simulator: SimulatorServer
) -> None:
    simulator.configure(rate_429=0.3, retry_after_s=0.05)
    led = make_ledger(sqlite_url)
    batch_id, ids = add_batch(led, [f"q{i}" for i in range(60)])
    await run_ids(sqlite_url, simulator, ids)
    results = results_of(led.engine, batch_id)
    assert len(results) == 60
    assert all(r.status == RequestStatus.SUCCEEDED for r in results)
    attempts = sum(r.attempts for r in results)
    stats = simulator.stats()
    # Every attempt is counted, and only the results' attempts went upstream.
    assert attempts == stats["completions"]
    assert stats["by_status"].get("429", 0) == attempts - 60 > 0


def request_row(engine: Engine, request_id: str) -> sa.Row[tuple[Request]]:
    with engine.connect() as conn:
        return conn.execute(sa.select(Request).where(Request.id == request_id)).one()  # type: ignore[return-value]


async def test_a_long_retry_after_hands_the_request_back_with_a_delay(
    make_ledger: MakeLedger, database_url: str, simulator: SimulatorServer
) -> None:
    """A 429 whose Retry-After outlasts hand_back_after is not waited out in the slot: the
    request goes back in line, not before the time it said, without counting as a failed
    delivery; it runs again once that time has come, and its result counts every attempt."""
    led = make_ledger(database_url)
    batch_id, ids = add_batch(led, ["later [[status 429 retry_after=3 times=1]]", "now"])
    handed = time.time()
    report = await run_ids(database_url, simulator, ids, hand_back_after=1.0, rate_limit_retry_seconds=600)
    assert (report.succeeded, report.handed_back, report.failed) == (1, 1, 0)
    row = request_row(led.engine, ids[0])
    assert row.status == RequestStatus.QUEUED
    assert row.not_before is not None
    assert handed + 3 <= row.not_before <= time.time() + 4
    assert row.attempts == 0  # a hand-back is not a delivery that died
    assert row.handed_back_attempts == 1
    assert row.retry_deadline is not None
    assert int(handed) + 600 <= row.retry_deadline <= time.time() + 600
    assert row.last_error.startswith("retry in")
    assert claim_requests(led.engine, ids[:1], "too-early", lease_seconds=10) == []
    await asyncio.sleep(row.not_before - time.time() + 0.05)  # until the time it was given
    again = await run_ids(database_url, simulator, ids[:1], hand_back_after=1.0, rate_limit_retry_seconds=600)
    assert (again.succeeded, again.handed_back) == (1, 0)
    assert statuses(led.engine, batch_id) == {"succeeded": 2}
    stats = simulator.stats()
    assert stats["by_status"] == {"429": 1, "200": 2}
    # Every upstream attempt is counted, the handed-back delivery's included.
    assert sum(r.attempts for r in results_of(led.engine, batch_id)) == stats["completions"] == 3


async def test_a_huge_retry_after_hands_back_within_the_retry_budget(
    make_ledger: MakeLedger, database_url: str, simulator: SimulatorServer
) -> None:
    """A provider asking for a wait of decades does not park the request past its retry budget:
    it comes back in line no later than the budget's end (where it then fails or succeeds)."""
    led = make_ledger(database_url)
    _, ids = add_batch(led, ["ages [[status 429 retry_after=1e9 times=1]]"])
    report = await run_ids(database_url, simulator, ids, hand_back_after=1.0, rate_limit_retry_seconds=30)
    assert report.handed_back == 1
    row = request_row(led.engine, ids[0])
    assert row.retry_deadline is not None
    assert row.not_before is not None
    assert row.not_before <= row.retry_deadline <= time.time() + 30


async def test_a_rate_limit_past_the_retry_budget_fails_the_request(
    make_ledger: MakeLedger, database_url: str, simulator: SimulatorServer
) -> None:
    """The budget runs from the first hand-back: a line still rate limited past it fails with
    the provider's 429 (its attempts all counted) instead of going back in line again."""
    led = make_ledger(database_url)
    batch_id, ids = add_batch(led, ["never [[status 429 retry_after=2]]"])
    first = await run_ids(database_url, simulator, ids, hand_back_after=1.0, rate_limit_retry_seconds=1)
    assert first.handed_back == 1
    row = request_row(led.engine, ids[0])
    assert row.not_before is not None
    await asyncio.sleep(row.not_before - time.time() + 0.05)
    second = await run_ids(database_url, simulator, ids, hand_back_after=1.0, rate_limit_retry_seconds=1)
    assert (second.failed, second.handed_back) == (1, 0)
    [result] = results_of(led.engine, batch_id)
    assert result.status_code == 429
    assert result.error_code == "rate_limit_exceeded"
    assert result.attempts == simulator.stats()["completions"] == 2


async def test_a_repeat_is_a_cache_hit_billed_nothing(
    make_ledger: MakeLedger, sqlite_url: str, simulator: SimulatorServer, tmp_path: Path
) -> None:
    led = make_ledger(sqlite_url)
    first_batch, first_ids = add_batch(led, ["same question", "other question"])
    await run_ids(sqlite_url, simulator, first_ids, cache_dir=tmp_path / "cache")
    second_batch, second_ids = add_batch(led, ["same question"])
    report = await run_ids(sqlite_url, simulator, second_ids, cache_dir=tmp_path / "cache")
    [hit] = results_of(led.engine, second_batch)
    assert hit.cached
    assert hit.attempts == 0
    assert simulator.stats()["completions"] == 2
    assert report.billed_prompt_tokens == 0
    original = next(r for r in results_of(led.engine, first_batch) if r.request_id == first_ids[0])
    assert hit.response_body is not None
    assert original.response_body is not None
    marker = hit.response_body.pop("tokenmill")
    assert marker == {"cached": True, "billed_usage": {"prompt_tokens": 0, "completion_tokens": 0}}
    # A completion of its own id; which answer it served is its upstream request id.
    assert hit.response_body.pop("id") == f"chatcmpl-{second_ids[0]}"
    assert original.response_body.pop("id") == hit.upstream_request_id
    assert hit.response_body == original.response_body  # the answer, as the provider first gave it
    assert "tokenmill" not in original.response_body


async def test_cancelling_stops_new_calls(
    make_ledger: MakeLedger, sqlite_url: str, simulator: SimulatorServer
) -> None:
    simulator.configure(latency_ms=200)
    led = make_ledger(sqlite_url)
    batch_id, ids = add_batch(led, [f"q{i}" for i in range(40)])

    async def cancel_soon() -> None:
        await asyncio.sleep(0.5)
        await asyncio.to_thread(cancel_batch, led.engine, batch_id)

    canceller = asyncio.create_task(cancel_soon())
    await run_ids(sqlite_url, simulator, ids, in_flight=2, cancel_check_interval=0.2)
    await canceller
    calls = simulator.stats()["completions"]
    # 2 in flight, 200 ms each: about 10 calls in the first second; none after the cancel was seen.
    assert calls <= 12
    counts = statuses(led.engine, batch_id)
    assert counts.get("cancelled", 0) == 40 - counts.get("succeeded", 0)
    batch = get_batch(led.engine, batch_id)
    assert batch is not None
    assert batch.status == BatchStatus.CANCELLED


async def test_a_cancel_lets_calls_in_flight_finish_into_the_output(
    make_ledger: MakeLedger, database_url: str, simulator: SimulatorServer
) -> None:
    """As OpenAI's cancel does: requests already sent upstream (which the provider bills) finish
    and are recorded, with their usage, in the ledger and the output file; the rest are cancelled
    and the batch ends ``cancelled`` once the ones in flight have settled."""
    simulator.configure(latency_ms=2000)
    led = make_ledger(database_url)
    batch_id, ids = add_batch(led, [f"in flight {i}" for i in range(100)])

    async def cancel_while_in_flight() -> None:
        deadline = time.monotonic() + 30
        while (await asyncio.to_thread(simulator.stats))["in_flight"] < 16:
            assert time.monotonic() < deadline, "the calls never reached the simulator"
            await asyncio.sleep(0.05)
        cancelling = await asyncio.to_thread(cancel_batch, led.engine, batch_id)
        # Not ended while calls are in flight: their results are still to come.
        assert cancelling.status == BatchStatus.CANCELLING

    canceller = asyncio.create_task(cancel_while_in_flight())
    report = await run_ids(database_url, simulator, ids, in_flight=16, cancel_check_interval=0.2)
    await canceller
    stats = simulator.stats()
    answered = stats["completions"]
    assert answered >= 16
    assert stats["accepted"] == answered  # nobody hung up on a call the provider would bill
    succeeded = [r for r in results_of(led.engine, batch_id) if r.status == RequestStatus.SUCCEEDED]
    assert len(succeeded) == answered == report.succeeded
    assert sum(r.prompt_tokens for r in succeeded) == stats["prompt_tokens"]
    assert sum(r.completion_tokens for r in succeeded) == stats["completion_tokens"]
    assert statuses(led.engine, batch_id) == {"succeeded": answered, "cancelled": 100 - answered}
    batch = get_batch(led.engine, batch_id)
    assert batch is not None
    assert batch.status == BatchStatus.CANCELLED
    output = [json.loads(line) for line in iter_output_lines(led.engine, batch_id)]
    assert sorted(line["custom_id"] for line in output) == sorted(
        f"r{ids.index(r.request_id)}" for r in succeeded
    )


async def test_a_cancel_ends_a_wait_for_a_rate_limit_at_once(
    make_ledger: MakeLedger, database_url: str, simulator: SimulatorServer
) -> None:
    """A request waiting behind a tpm limit that another booked (max_tokens=10**12) does not keep
    its batch in ``cancelling``: the cancel ends its wait, the call in flight finishes, and the
    batch is ``cancelled`` within seconds."""
    led = make_ledger(database_url)
    lines = [
        {"custom_id": "huge", "prompt": "long answer [[delay 2]]", "max_tokens": 10**12},
        {"custom_id": "behind", "prompt": "short answer"},
    ]
    report = ingest_batch(
        led.engine,
        io.BytesIO("\n".join(json.dumps(line) for line in lines).encode()),
        tenant_id=led.tenant_id,
        defaults={"model": "sim-model"},
    )
    batch_id = report.batch_id
    ids = pending_request_ids(led.engine, batch_id)
    engine = make_engine(database_url)
    pipeline = ModelCallPipeline(
        openai_client_factory(base_url=simulator.base_url, api_key="sim", timeout=10),
        LocalRateLimiter({"sim-model": ModelLimits(tpm=1000)}, LimiterTuning(max_wait_seconds=600)),
        RetryPolicy(),
    )

    async def cancel_while_waiting() -> None:
        deadline = time.monotonic() + 30
        while (await asyncio.to_thread(simulator.stats))["in_flight"] < 1:
            assert time.monotonic() < deadline, "the huge request never reached the simulator"
            await asyncio.sleep(0.05)
        await asyncio.to_thread(cancel_batch, led.engine, batch_id)

    canceller = asyncio.create_task(cancel_while_waiting())
    started = time.monotonic()
    config = RunnerConfig(owner="test-owner", cancel_check_interval=0.2)
    try:
        await asyncio.wait_for(ChunkRunner(engine, pipeline, config).run(ids), timeout=30)
    finally:
        await pipeline.close()
        engine.dispose()
    await canceller
    assert time.monotonic() - started < 15
    assert statuses(led.engine, batch_id) == {"succeeded": 1, "cancelled": 1}
    batch = get_batch(led.engine, batch_id)
    assert batch is not None
    assert batch.status == BatchStatus.CANCELLED


async def test_a_request_redelivered_too_often_fails_without_a_call(
    make_ledger: MakeLedger, sqlite_url: str, simulator: SimulatorServer
) -> None:
    led = make_ledger(sqlite_url)
    batch_id, ids = add_batch(led, ["poison"])
    # Three deliveries whose workers died (claimed, lease run out).
    for _ in range(3):
        claim_requests(led.engine, ids, "dead-worker", lease_seconds=-1)
    await run_ids(sqlite_url, simulator, ids, max_deliveries=3)
    [result] = results_of(led.engine, batch_id)
    assert result.status == RequestStatus.FAILED
    assert result.error_code == "max_deliveries"
    assert simulator.stats()["completions"] == 0
    with led.engine.connect() as conn:
        assert conn.execute(sa.select(Request.attempts).where(Request.id == ids[0])).scalar_one() == 4


async def test_a_request_stuck_past_max_request_seconds_is_handed_back(
    make_ledger: MakeLedger, database_url: str, simulator: SimulatorServer
) -> None:
    """A handler that never returns is cancelled after ``max_request_seconds``; its request goes back
    in line (another delivery redoes it) and the chunk ends instead of holding it for good."""
    led = make_ledger(database_url)
    batch_id, ids = add_batch(led, ["stuck", "fine 1", "fine 2"])

    async def hangs_on_the_first(
        request: ClaimedRequest, pipeline: ModelCallPipeline, token: CancellationToken
    ) -> ResultRecord:
        if request.id == ids[0]:
            await asyncio.Event().wait()  # a call that never comes back
        return await complete_chat(request, pipeline, token)

    engine = make_engine(database_url)
    pipeline = make_pipeline(simulator)
    config = RunnerConfig(owner="test-owner", lease_seconds=3, max_request_seconds=1.5)
    try:
        report = await asyncio.wait_for(
            ChunkRunner(
                engine, pipeline, config, handlers={RequestKind.CHAT_COMPLETION: hangs_on_the_first}
            ).run(ids),
            timeout=20,
        )
    finally:
        await pipeline.close()
        engine.dispose()
    assert (report.succeeded, report.released) == (2, 1)
    assert statuses(led.engine, batch_id) == {"succeeded": 2, "queued": 1}


async def test_a_busy_event_loop_does_not_lose_its_leases(
    make_ledger: MakeLedger, postgres_url: str, simulator: SimulatorServer
) -> None:
    """A handler blocks the loop for three leases; meanwhile another worker tries to claim its
    request after two: the lease must still be held (the heartbeat does not need the loop)."""
    led = make_ledger(postgres_url)
    batch_id, ids = add_batch(led, ["slow"])
    lease = 2

    async def blocking_handler(
        request: ClaimedRequest, pipeline: ModelCallPipeline, token: CancellationToken
    ) -> ResultRecord:
        time.sleep(3 * lease)  # noqa: ASYNC251 - on purpose: nothing else on this loop runs meanwhile
        return ResultRecord(request_id=request.id, status=RequestStatus.SUCCEEDED, response_body={})

    stolen: list[ClaimedRequest] = []

    def other_worker() -> None:
        time.sleep(2 * lease)
        stolen.extend(claim_requests(led.engine, ids, "other-worker", lease_seconds=30))

    thief = threading.Thread(target=other_worker)
    thief.start()
    pipeline = make_pipeline(simulator)
    try:
        runner = ChunkRunner(
            led.engine,
            pipeline,
            RunnerConfig(owner="slow-owner", lease_seconds=lease),
            handlers={RequestKind.CHAT_COMPLETION: blocking_handler},
        )
        report = await runner.run(ids)
    finally:
        await asyncio.to_thread(thief.join)
        await pipeline.close()
    assert stolen == []
    assert report.succeeded == 1
    assert [r.request_id for r in results_of(led.engine, batch_id)] == ids


async def test_a_result_whose_write_stalls_keeps_its_lease(
    make_ledger: MakeLedger, postgres_url: str, simulator: SimulatorServer
) -> None:
    """The answer is in, but the ledger's results table is locked for three leases (a database
    stall): the request's lease is still extended meanwhile, so no other worker adopts it (with the
    cache off, that would be a second paid call); once the lock goes the result is written."""
    led = make_ledger(postgres_url)
    batch_id, ids = add_batch(led, ["answered, then stuck"])
    lease = 2
    blocker = led.engine.connect()
    blocker.execute(sa.text("LOCK TABLE results IN EXCLUSIVE MODE"))  # reads pass, writes wait
    pipeline = make_pipeline(simulator)
    runner = ChunkRunner(led.engine, pipeline, RunnerConfig(owner="stalled-owner", lease_seconds=lease))
    running = asyncio.create_task(runner.run(ids))
    try:
        deadline = time.monotonic() + 30
        while simulator.stats()["completions"] < 1:
            assert time.monotonic() < deadline, "the call was never made"
            await asyncio.sleep(0.05)
        stall_end = time.monotonic() + 3 * lease
        while time.monotonic() < stall_end:
            stolen = await asyncio.to_thread(claim_requests, led.engine, ids, "other-worker", 30)
            assert stolen == [], "another worker adopted a request whose result was being written"
            await asyncio.sleep(0.2)
        assert not running.done()
    finally:
        blocker.rollback()
        blocker.close()
        report = await running
        await pipeline.close()
    assert report.succeeded == 1
    assert [r.request_id for r in results_of(led.engine, batch_id)] == ids
    assert simulator.stats()["completions"] == 1


def answered(request_id: str, answer: str, content: str, *, model: str = "sim-model") -> ResultRecord:
    """A succeeded record as the runner makes it: the provider's answer, paid for."""
    return ResultRecord(
        request_id=request_id,
        status=RequestStatus.SUCCEEDED,
        response_body={"object": "chat.completion", "choices": [{"message": {"content": content}}]},
        status_code=200,
        upstream_request_id=answer,
        model=model,
        usage=RequestUsage(prompt_tokens=70, completion_tokens=30),
    )


def test_a_result_the_database_refuses_still_bills_its_answer_and_logs_no_data(
    make_ledger: MakeLedger, postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Row by row after a refused batch write: each refused row (a provider id too long for its
    column, a NUL in the model) fails alone but keeps its answer's bill; a duplicate paid answer in
    the same write is still reported as discarded; the database's words are logged redacted."""
    led = make_ledger(postgres_url)
    prompts = ["dup", "bad", "bad model", "good", "absurd usage"]
    batch_id, (dup, bad, bad_model, good, absurd) = add_batch(led, prompts)
    record_results(led.engine, [answered(dup, "answer-dup-1", "first")])
    secret = "secret-prompt-fragment"
    records = [
        answered(dup, "answer-dup-2", "second"),
        answered(bad, "answer-" + "x" * 300, secret),
        answered(bad_model, "answer-bad-model", "fine", model="sim\x00model"),
        answered(good, "answer-good", "fine"),
        dataclasses.replace(
            answered(absurd, "answer-absurd", "fine"), usage=RequestUsage(prompt_tokens=2**40)
        ),
    ]
    with caplog.at_level(logging.INFO):
        outcome, replaced = record_isolating_bad_rows(led.engine, records)
    assert replaced == [bad, bad_model, absurd]
    assert outcome.discarded == [dup]
    assert sorted(outcome.inserted) == sorted([bad, bad_model, good, absurd])
    results = {r.request_id: r for r in results_of(led.engine, batch_id)}
    for request_id in (bad, bad_model):
        failed = results[request_id]
        assert (failed.status, failed.error_code) == (RequestStatus.FAILED, UNRECORDABLE)
        # The provider charged for the answer: the failure bills it.
        assert (failed.prompt_tokens, failed.completion_tokens) == (70, 30)
    bounded_id = results[bad].upstream_request_id
    assert bounded_id is not None
    assert bounded_id.startswith("answer-x")
    assert len(bounded_id) <= 200
    assert results[bad].model == "sim-model"
    assert results[bad_model].model == "sim\ufffdmodel"  # as near the truth as a text column holds
    # Usage the database cannot hold fails the request unbilled, not every write after it.
    assert (results[absurd].error_code, results[absurd].prompt_tokens) == (UNRECORDABLE, 0)
    assert "could not be recorded" in caplog.text
    # Logged as the redaction helper words it: the database's DETAIL lines may quote the row.
    assert "details withheld from logs" in caplog.text
    assert secret not in caplog.text


async def lines_failed_once(
    make_ledger: MakeLedger, database_url: str, simulator: SimulatorServer, *bad: str
) -> list[Result]:
    """Run a batch of one fine line and the ``bad`` ones, each allowed 3 deliveries: the fine line
    succeeds, every bad one fails, and each line was sent upstream once and tried once (none went
    back in line to be paid again). The bad lines' results, in order."""
    led = make_ledger(database_url)
    prompts = ["fine", *bad]
    batch_id, ids = add_batch(led, prompts)
    await run_ids(database_url, simulator, ids, max_deliveries=3)
    results = {r.request_id: r for r in results_of(led.engine, batch_id)}
    assert statuses(led.engine, batch_id) == {"succeeded": 1, "failed": len(bad)}
    assert simulator.stats()["completions"] == len(prompts), "one upstream call per line, none retried"
    with led.engine.connect() as conn:
        attempts = conn.execute(sa.select(Request.attempts).where(Request.id.in_(ids))).scalars().all()
    assert sorted(attempts) == [1] * len(prompts)
    failed = [results[request_id] for request_id in ids[1:]]
    for each in failed:
        assert each.status == RequestStatus.FAILED
    return failed


async def test_a_line_answered_with_absurd_usage_fails_once(
    make_ledger: MakeLedger, database_url: str, simulator: SimulatorServer
) -> None:
    """Usage the ledger cannot hold (2^64-1; just under 2^63, past int64 once summed) is the
    provider's error: the line fails once with 0 tokens, never goes back in line to be paid again
    (it used to fail the client's usage check, a handler crash, redelivered up to max_deliveries)."""
    bad = [f"absurd [[reasoning {2**64 - 1}]]", "absurd [[reasoning 9223372036854775000]]"]
    for failed in await lines_failed_once(make_ledger, database_url, simulator, *bad):
        assert failed.error_code == "upstream_usage_invalid"
        assert "usage.completion_tokens" in (failed.error_message or "")
        assert (failed.prompt_tokens, failed.completion_tokens, failed.reasoning_tokens) == (0, 0, 0)


async def test_a_line_answered_unreadably_fails_once(
    make_ledger: MakeLedger, database_url: str, simulator: SimulatorServer
) -> None:
    """A 200 whose body arrived whole but is no JSON (``[[garbage]]``) was answered and billed:
    the line fails once with ``upstream_response_invalid`` and is never sent again (it used to be
    the retryable "malformed provider response", asked again up to the retry policy's attempts)."""
    [failed] = await lines_failed_once(make_ledger, database_url, simulator, "unreadable [[garbage]]")
    assert failed.error_code == "upstream_response_invalid"
    assert "cannot be read" in (failed.error_message or "")
    assert (failed.upstream_request_id or "").startswith("req_"), "the answer's id, to trace it upstream"
    assert (failed.prompt_tokens, failed.completion_tokens) == (0, 0)


async def test_a_line_answered_with_the_wrong_shape_fails_once(
    make_ledger: MakeLedger, database_url: str, simulator: SimulatorServer
) -> None:
    """A 200 whose body is a whole JSON object of the wrong shape (``[[garbage shape]]``: its
    ``choices[0].message`` a string) was answered and billed: the line fails once with
    ``upstream_response_invalid``, never sent again (reading it used to raise a bare
    AttributeError, which the runner took for a crash and delivered again)."""
    [failed] = await lines_failed_once(make_ledger, database_url, simulator, "wrong shape [[garbage shape]]")
    assert failed.error_code == "upstream_response_invalid"
    assert "choices[0].message" in (failed.error_message or "")
    assert (failed.upstream_request_id or "").startswith("chatcmpl-"), "the answer's id"


@pytest.mark.parametrize("status", [401, 403])
async def test_a_line_the_provider_refuses_on_tokenmills_credentials_does_not_blame_the_tenants_key(
    make_ledger: MakeLedger, database_url: str, simulator: SimulatorServer, status: int
) -> None:
    """The provider's 401/403 is about the operator's credentials for it, never the tenant's key:
    the line's error (and its error file entry) says ``upstream_authentication_failed``, as a
    single call's 502 does. It said the provider's ``invalid_api_key``."""
    [failed] = await lines_failed_once(make_ledger, database_url, simulator, f"refused [[status {status}]]")
    assert failed.status_code == status
    assert failed.error_code == "upstream_authentication_failed"
    assert failed.response_body is not None
    assert failed.response_body["error"]["code"] == "upstream_authentication_failed"


def content_parts_text(simulator: SimulatorServer, prompt: str) -> str:
    """The text parts the simulator answers ``prompt`` with (``[[content_parts ...]]``), joined."""
    body = {"model": "sim-model", "messages": [{"role": "user", "content": prompt}]}
    answer = httpx.post(f"{simulator.base_url}/chat/completions", json=body, timeout=30).json()
    parts = answer["choices"][0]["message"]["content"]
    text = "".join(part["text"] for part in parts if part.get("type") == "text")
    assert text
    return text


async def test_a_line_answered_in_content_parts_keeps_its_text_and_replays_it_from_the_cache(
    make_ledger: MakeLedger, postgres_url: str, simulator: SimulatorServer, tmp_path: Path
) -> None:
    """An answer whose text is a list of content parts (Mistral, some OpenAI-compatible servers:
    ``[[content_parts]]``) is the line's text in its output, a string as OpenAI's SDK reads it; a
    part that is no text (an image) is kept aside under ``tokenmill_non_text_parts``. Such lines
    used to succeed, and be billed, with no text. A repeat is a cache hit with the same text."""
    prompts = ["parts [[content_parts]]", "parts and a picture [[content_parts image]]"]
    expected = [content_parts_text(simulator, prompt) for prompt in prompts]
    led = make_ledger(postgres_url)
    batch_id, ids = add_batch(led, prompts)
    await run_ids(postgres_url, simulator, ids, cache_dir=tmp_path / "cache")
    paid = {r.request_id: r for r in results_of(led.engine, batch_id)}
    repeat_batch, repeat_ids = add_batch(led, prompts)
    await run_ids(postgres_url, simulator, repeat_ids, cache_dir=tmp_path / "cache")
    hits = {r.request_id: r for r in results_of(led.engine, repeat_batch)}
    assert simulator.stats()["completions"] == 2 * len(prompts), "the direct looks, then one paid call each"
    for first, again, text in zip(ids, repeat_ids, expected, strict=True):
        assert (paid[first].status, paid[first].cached, hits[again].cached) == (
            RequestStatus.SUCCEEDED,
            False,
            True,
        )
        assert paid[first].completion_tokens > 0
        for result in (paid[first], hits[again]):
            assert result.response_body is not None
            assert result.response_body["choices"][0]["message"]["content"] == text
    image_body = paid[ids[1]].response_body
    assert image_body is not None
    image_message = image_body["choices"][0]["message"]
    assert [part["type"] for part in image_message["tokenmill_non_text_parts"]] == ["image_url"]
    lines = [json.loads(line) for line in iter_output_lines(led.engine, batch_id)]
    assert [line["response"]["body"]["choices"][0]["message"]["content"] for line in lines] == expected


async def test_a_line_answered_with_a_content_part_of_the_wrong_shape_fails_once(
    make_ledger: MakeLedger, postgres_url: str, simulator: SimulatorServer
) -> None:
    """A text part whose ``text`` is a number (``[[content_parts bad]]``): the answer was billed,
    so the line fails once with ``upstream_response_invalid`` naming the part, never sent again."""
    [failed] = await lines_failed_once(make_ledger, postgres_url, simulator, "bad part [[content_parts bad]]")
    assert failed.error_code == "upstream_response_invalid"
    assert "choices[0].message.content[2].text is a number" in (failed.error_message or "")
