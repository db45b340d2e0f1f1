"""Fair scheduling between tenants: a chunk's free slots go to every tenant's waiting work by
weight, by priority then completion deadline within a tenant, and never idle behind a slow call.

Against real PostgreSQL, the simulator over HTTP, and (the last test) a real worker subprocess
taking Celery messages. Orders are read from the results as they finish, never from timings."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import socket
import time
from collections.abc import Callable, Sequence

import pytest
import redis
import redis.asyncio as aioredis
import sqlalchemy as sa
from pydantic import ValidationError

import store
from config import Settings
from simulator.testing import SimulatorServer
from store import (
    Request,
    RequestStatus,
    ResultRecord,
    create_tenant,
    ingest_batch,
    make_engine,
    pending_request_ids,
)
from tests.cluster import Cluster, run_cli
from tests.workers.support import Ledger, results_of, statuses
from tests.workers.test_runner import make_pipeline
from workers.constants import lane_busy_key
from workers.fair_share import FairGate, FairShare
from workers.lane_pressure import LANE_BUSY_MS, READ_TIMEOUT_SECONDS, LaneBusy
from workers.lane_transport import LaneMessage, LaneTransport
from workers.runner import ChunkReport, ChunkRunner, RunnerConfig

MakeLedger = Callable[[str], Ledger]


def add_batch(
    led: Ledger, tenant_id: str, prompts: Sequence[str], *, priority: int = 0, window: str = "24h"
) -> tuple[str, list[str]]:
    lines = "\n".join(json.dumps({"custom_id": f"r{i}", "prompt": p}) for i, p in enumerate(prompts))
    report = ingest_batch(
        led.engine,
        io.BytesIO(lines.encode()),
        tenant_id=tenant_id,
        defaults={"model": "sim-model"},
        priority=priority,
        completion_window=window,
    )
    assert report.accepted == len(prompts), report
    return report.batch_id, pending_request_ids(led.engine, report.batch_id)


async def run_chunk(
    url: str,
    sim: SimulatorServer,
    ids: list[str],
    finished: list[ResultRecord],
    *,
    in_flight: int = 4,
    refill_seconds: float = 60,
) -> ChunkReport:
    """Run a chunk of ``ids`` as a worker would, its refill on; ``finished`` gets every record in
    the order the requests finished."""
    engine = make_engine(url)
    pipeline = make_pipeline(sim)
    config = RunnerConfig(owner="fair-test", in_flight=in_flight, refill_seconds=refill_seconds)
    try:
        return await ChunkRunner(engine, pipeline, config, on_result=finished.append).run(ids)
    finally:
        await pipeline.close()
        engine.dispose()


def done_when(finished: list[ResultRecord], last_of: set[str], counted: set[str]) -> int:
    """How many of ``counted`` had finished when the last of ``last_of`` did."""
    seen = 0
    left = set(last_of)
    for record in finished:
        left.discard(record.request_id)
        seen += record.request_id in counted
        if not left:
            return seen
    raise AssertionError(f"{len(left)} of them never finished")


async def test_two_equal_tenants_started_together_are_served_in_turn(
    make_ledger: MakeLedger, postgres_url: str, simulator: SimulatorServer
) -> None:
    """A chunk of tenant A's message serves tenant B's batch, queued just after, in turn with
    A's: when A's batch is done, B's is nearly done too (it used to get no slot at all)."""
    led = make_ledger(postgres_url)
    other = create_tenant(led.engine, "other").id
    _, a_ids = add_batch(led, led.tenant_id, [f"a {i}" for i in range(120)])
    _, b_ids = add_batch(led, other, [f"b {i}" for i in range(120)])
    finished: list[ResultRecord] = []
    report = await run_chunk(postgres_url, simulator, a_ids[:50], finished)
    assert report.succeeded == 240
    b_done = done_when(finished, set(a_ids), set(b_ids))
    # In turn: B is behind by at most the window A's own message started with, and what is in
    # flight or claimed behind it (two windows).
    assert b_done >= 120 - 3 * 4, b_done


async def test_a_tenant_of_weight_2_gets_twice_the_slots(
    make_ledger: MakeLedger, postgres_url: str, simulator: SimulatorServer
) -> None:
    led = make_ledger(postgres_url)
    heavy = create_tenant(led.engine, "heavy").id
    store.set_tenant_weight(led.engine, heavy, 2)
    _, light_ids = add_batch(led, led.tenant_id, [f"light {i}" for i in range(150)])
    _, heavy_ids = add_batch(led, heavy, [f"heavy {i}" for i in range(150)])
    finished: list[ResultRecord] = []
    await run_chunk(postgres_url, simulator, light_ids[:50], finished)
    light_done = done_when(finished, set(heavy_ids), set(light_ids))
    # 2 to 1 while both had work: about 75 light ones (the light message's first window aside).
    assert 60 <= light_done <= 90, light_done


async def test_within_a_tenant_higher_priority_then_earlier_deadline_first(
    make_ledger: MakeLedger, postgres_url: str, simulator: SimulatorServer
) -> None:
    """The chunk of a low-priority batch's message runs the tenant's high-priority batch first,
    then, of two batches of equal priority, the one whose completion window ends first."""
    led = make_ledger(postgres_url)
    tenant = led.tenant_id
    _, low = add_batch(led, tenant, [f"low {i}" for i in range(40)], priority=0, window="1h")
    _, late = add_batch(led, tenant, [f"late {i}" for i in range(40)], priority=5, window="24h")
    _, soon = add_batch(led, tenant, [f"soon {i}" for i in range(40)], priority=5, window="2h")
    finished: list[ResultRecord] = []
    await run_chunk(postgres_url, simulator, low[:40], finished)
    # Before the high ones: only the window the low batch's own message began with, and what was
    # claimed in the two windows (in flight and behind) as a batch's last ones were.
    assert done_when(finished, set(soon), set(low)) <= 4
    assert done_when(finished, set(soon), set(late)) <= 2 * 4
    assert done_when(finished, set(late), set(low)) <= 3 * 4
    assert len(finished) == 120


async def test_a_slow_call_leaves_no_slot_idle(
    make_ledger: MakeLedger, postgres_url: str, simulator: SimulatorServer
) -> None:
    """One line of B's whose upstream call takes seconds: while it runs, the other slots run B's
    other lines and all of A's (a tenant that had no message in this chunk), even past the
    chunk's refill window."""
    led = make_ledger(postgres_url)
    other = create_tenant(led.engine, "other").id
    _, b_ids = add_batch(led, led.tenant_id, ["slow [[delay 6]]"] + [f"b {i}" for i in range(30)])
    _, a_ids = add_batch(led, other, [f"a {i}" for i in range(30)])
    finished: list[ResultRecord] = []
    await run_chunk(postgres_url, simulator, b_ids[:4], finished, refill_seconds=0.5)
    assert {record.request_id for record in finished} == set(a_ids) | set(b_ids)
    assert len(finished) == 61
    assert finished[-1].request_id == b_ids[0]  # every other line finished while it waited


async def test_fair_claims_keep_exactly_once_across_concurrent_runners(
    make_ledger: MakeLedger, postgres_url: str, simulator: SimulatorServer
) -> None:
    """Three refilling runners over two tenants' batches: every request has one result."""
    led = make_ledger(postgres_url)
    other = create_tenant(led.engine, "other").id
    a_batch, a_ids = add_batch(led, led.tenant_id, [f"a {i}" for i in range(90)])
    b_batch, b_ids = add_batch(led, other, [f"b {i}" for i in range(90)])
    finished: list[ResultRecord] = []
    await asyncio.gather(
        run_chunk(postgres_url, simulator, a_ids[:10], finished),
        run_chunk(postgres_url, simulator, b_ids[:10], finished),
        run_chunk(postgres_url, simulator, [], finished),
    )
    assert statuses(led.engine, a_batch) == statuses(led.engine, b_batch) == {"succeeded": 90}
    assert len(results_of(led.engine, a_batch)) == len(results_of(led.engine, b_batch)) == 90
    assert len(finished) == 180
    assert simulator.stats()["completions"] == 180


def test_fair_share_gives_slots_by_weight_and_no_credit_for_idle_time() -> None:
    fair = FairShare()
    shares = fair.shares({"a": 1.0, "b": 2.0}, 30)
    assert shares == {"a": 10, "b": 20}
    for tenant, n in shares.items():
        fair.charge(tenant, n)
    for _ in range(50):  # a has nothing more waiting; b runs alone for a while
        for tag in fair.charge("b", fair.shares({"b": 2.0}, 10)["b"]):
            fair.admitted(tag)
    # a comes back: an equal turn from now on, not the 500 slots b had meanwhile.
    assert fair.shares({"a": 1.0, "b": 1.0}, 10) in ({"a": 5, "b": 5}, {"a": 6, "b": 4})


async def test_the_gate_lets_the_lowest_tag_in_first_and_skips_a_cancelled_waiter() -> None:
    """A newcomer tenant's request does not wait behind another tenant's backlog."""
    fair = FairShare()
    gate = FairGate(1, fair)
    await gate.acquire(0.0)
    order: list[str] = []

    async def wait(name: str, tag: float) -> None:
        await gate.acquire(tag)
        order.append(name)

    backlog = [asyncio.create_task(wait(f"b{n}", 5.0 + n)) for n in range(3)]
    newcomer = asyncio.create_task(wait("a", 1.0))
    await asyncio.sleep(0)
    backlog[0].cancel()
    for _ in range(3):
        gate.release()
        await asyncio.sleep(0)
    await asyncio.gather(*backlog[1:], newcomer)
    assert order == ["a", "b1", "b2"]
    assert backlog[0].cancelled()


def test_a_weight_out_of_range_is_refused_by_name(make_ledger: MakeLedger, postgres_url: str) -> None:
    led = make_ledger(postgres_url)
    for weight in (0.0, -1.0, 1e-300, 0.000_999, float("nan"), float("inf"), 1001.0):
        with pytest.raises(store.InvalidArgument) as refused:
            store.set_tenant_weight(led.engine, led.tenant_id, weight)
        assert refused.value.code == "invalid_weight"
    with pytest.raises(store.NotFound):
        store.set_tenant_weight(led.engine, "no-such-tenant", 2)
    assert store.tenant_weight(led.engine, led.tenant_id) == 1


def test_tenants_set_weight_from_the_cli(make_ledger: MakeLedger, postgres_url: str) -> None:
    led = make_ledger(postgres_url)
    create_tenant(led.engine, "acme", tenant_id="acme")
    env = {**os.environ, "TOKENMILL_DATABASE_URL": postgres_url}
    done = run_cli(env, "tenants", "set", "acme", "--weight", "2.5")
    assert done.returncode == 0, done.stderr
    assert store.tenant_weight(led.engine, "acme") == 2.5
    refused = run_cli(env, "tenants", "set", "acme", "--weight", "0")
    assert refused.returncode != 0
    assert "--weight" in refused.stderr
    assert store.tenant_weight(led.engine, "acme") == 2.5
    unknown = run_cli(env, "tenants", "set", "nobody", "--weight", "2")
    assert unknown.returncode == 1
    assert "no tenant 'nobody'" in unknown.stderr


def test_a_worker_serves_another_tenant_while_a_slow_call_runs(
    cluster: Callable[..., Cluster], postgres_url: str, simulator: SimulatorServer
) -> None:
    """The incident of issue 12: one worker process busy with tenant B's message, one line of
    which takes seconds upstream; tenant A's batch, queued behind B's message, finishes while
    that call still runs (its message used to wait in the broker until B's chunk ended)."""
    c = cluster()
    store.upgrade_to_head(postgres_url)
    engine = make_engine(postgres_url)
    try:
        led = Ledger(engine, create_tenant(engine, "b").id)
        a_tenant = create_tenant(engine, "a").id
        b_batch, b_ids = add_batch(led, led.tenant_id, ["slow [[delay 12]]"] + [f"b {i}" for i in range(20)])
        a_batch, a_ids = add_batch(led, a_tenant, [f"a {i}" for i in range(40)])
        c.dispatcher.dispatch(b_ids)
        c.dispatcher.dispatch(a_ids)
        c.worker("fair", processes=1, concurrency=4)
        deadline = time.monotonic() + 60
        while statuses(engine, a_batch) != {"succeeded": 40} and time.monotonic() < deadline:
            time.sleep(0.1)
        slow = _status(engine, b_ids[0])
        assert statuses(engine, a_batch) == {"succeeded": 40}
        assert slow == RequestStatus.RUNNING  # still upstream: A did not wait for it
        while statuses(engine, b_batch) != {"succeeded": 21} and time.monotonic() < deadline:
            time.sleep(0.1)
        assert statuses(engine, b_batch) == {"succeeded": 21}
    finally:
        engine.dispose()


def _status(engine: sa.Engine, request_id: str) -> RequestStatus:
    with engine.connect() as conn:
        return RequestStatus(
            conn.execute(sa.select(Request.status).where(Request.id == request_id)).scalar_one()
        )


async def test_a_chunk_keeps_a_smaller_window_while_single_calls_are_sent(
    make_ledger: MakeLedger, postgres_url: str, redis_url: str, redis_prefix: str, simulator: SimulatorServer
) -> None:
    """Batch work gives way to single calls (``workers.lane_pressure``): a call sent to the lane
    marks it busy, and while the mark lives a chunk keeps no more than two of its smaller windows
    claimed or running. Before, it kept its whole window going whatever the lane had waiting."""
    led = make_ledger(postgres_url)
    _, ids = add_batch(led, led.tenant_id, [f"batch {i}" for i in range(60)])
    simulator.configure(latency_ms=20)
    broker = aioredis.Redis.from_url(redis_url)
    sync_broker = redis.Redis.from_url(redis_url)
    transport = LaneTransport(broker, redis_prefix)
    chunk_ended = asyncio.Event()

    async def send_single_calls() -> None:
        # A caller sending one call after another, each well within the mark's life.
        n = 0
        while not chunk_ended.is_set():
            await transport.send(LaneMessage(f"req_single_{n}", stream=False), "someone")
            n += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(chunk_ended.wait(), LANE_BUSY_MS / 4000)

    await transport.send(LaneMessage("req_single", stream=False), "someone")
    sending = asyncio.create_task(send_single_calls())
    try:
        engine = make_engine(postgres_url)
        pipeline = make_pipeline(simulator)
        config = RunnerConfig(owner="busy-lane-test", in_flight=16, refill_seconds=60)
        runner = ChunkRunner(
            engine, pipeline, config, lane_busy=LaneBusy(sync_broker, redis_prefix, batch_share=0.125)
        )
        try:
            report = await runner.run(ids[:30])
        finally:
            await pipeline.close()
            engine.dispose()
    finally:
        chunk_ended.set()
        await sending
        await broker.aclose()
        sync_broker.close()
    assert report.succeeded == 60
    assert simulator.stats()["peak_in_flight"] <= 2  # 16 x 0.125, nothing claimed ahead


def test_the_window_kept_while_the_lane_is_busy_is_the_operators_share(
    redis_url: str, redis_prefix: str
) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        readers = {share: LaneBusy(client, redis_prefix, batch_share=share) for share in (0.125, 0.5, 1.0)}
        assert {share: reader.window(64) for share, reader in readers.items()} == {
            0.125: 64,
            0.5: 64,
            1.0: 64,
        }
        client.set(lane_busy_key(redis_prefix), 1, px=LANE_BUSY_MS)
        readers = {share: LaneBusy(client, redis_prefix, batch_share=share) for share in (0.125, 0.5, 1.0)}
        assert {share: reader.window(64) for share, reader in readers.items()} == {0.125: 8, 0.5: 32, 1.0: 64}
        assert LaneBusy(client, redis_prefix, batch_share=0.001).window(64) == 1  # never none at all
    finally:
        client.close()
    with pytest.raises(ValidationError, match="lane_busy_batch_share"):
        Settings(lane_busy_batch_share=0)


def test_a_broker_that_never_answers_holds_a_chunks_loop_once_briefly() -> None:
    """The busy mark is read on the chunk's event loop: against a broker that accepts and never
    answers, the broker's own client (no socket timeout) blocked it for good while the lease
    thread kept the chunk's leases alive. Now one read waits its short timeout, reads as not busy,
    and the broker is left alone for a while."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    port = silent.getsockname()[1]
    reader = LaneBusy.from_url(f"redis://127.0.0.1:{port}/0", "tmtest:silent:", batch_share=0.125)
    try:
        started = time.monotonic()
        assert reader.window(64) == 64
        first = time.monotonic() - started
        started = time.monotonic()
        assert [reader.window(64) for _ in range(20)] == [64] * 20  # not asked again meanwhile
        again = time.monotonic() - started
    finally:
        reader.client.close()
        silent.close()
    assert first < 20 * READ_TIMEOUT_SECONDS  # bounded (connect, then one read), however loaded
    assert again < READ_TIMEOUT_SECONDS
