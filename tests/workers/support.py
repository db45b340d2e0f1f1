"""Helpers of the worker tests: a ledger with a batch in it, and what the ledger then says."""

from __future__ import annotations

import asyncio
import io
import json
import threading
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass

import redis
import redis.asyncio as aioredis
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from config import Settings
from simulator.testing import SimulatorServer
from store import (
    Request,
    RequestStatus,
    Result,
    create_tenant,
    ingest_batch,
    make_engine,
    pending_request_ids,
    upgrade_to_head,
)
from workers.clients import build_pipeline
from workers.constants import LIMIT_PREFIX
from workers.lane import LaneConsumer
from workers.lane_transport import LaneTransport


@dataclass
class Ledger:
    engine: Engine
    tenant_id: str


def ledger(url: str) -> Ledger:
    upgrade_to_head(url)
    engine = make_engine(url)
    return Ledger(engine, create_tenant(engine, "test").id)


def add_batch(led: Ledger, prompts: Sequence[str], *, model: str = "sim-model") -> tuple[str, list[str]]:
    """A batch of short-form lines; returns its id and its request ids in line order."""
    lines = "\n".join(json.dumps({"custom_id": f"r{i}", "prompt": p}) for i, p in enumerate(prompts))
    report = ingest_batch(
        led.engine, io.BytesIO(lines.encode()), tenant_id=led.tenant_id, defaults={"model": model}
    )
    assert report.accepted == len(prompts), report
    return report.batch_id, pending_request_ids(led.engine, report.batch_id)


def results_of(engine: Engine, batch_id: str) -> list[Result]:
    with engine.connect() as conn:
        return list(conn.execute(sa.select(Result).where(Result.batch_id == batch_id)).all())  # type: ignore[arg-type]


def statuses(engine: Engine, batch_id: str) -> dict[str, int]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(Request.status, sa.func.count())
            .where(Request.batch_id == batch_id)
            .group_by(Request.status)
        ).all()
    return {str(row[0].value if hasattr(row[0], "value") else row[0]): int(row[1]) for row in rows}


@contextmanager
def limiter_admissions(redis_url: str, key_prefix: str, model: str, rpm: float) -> Iterator[list[float]]:
    """The start times (Redis clock, epoch seconds) the shared limiter granted ``model``'s calls at
    ``rpm`` (the paced rate), whatever the endpoint, its keys under ``key_prefix``; in the order
    granted, complete once the block ends.

    Read from the limiter's own state as it changes: every grant sets the key's theoretical
    arrival time to ``start + 60 / rpm`` (``backends/redis.py``), and MONITOR shows the commands
    the Lua script runs."""
    admissions: list[float] = []
    stop = f"limiter-admissions-done-{uuid.uuid4().hex}"
    subscribed = threading.Event()

    def watch() -> None:
        # No read timeout (redis-py's default is 5 s): the limiter may be quiet longer than that
        # while workers start on a loaded machine; the end marker below ends the wait.
        with redis.Redis.from_url(redis_url, socket_timeout=None).monitor() as monitor:
            subscribed.set()
            for command in monitor.listen():
                words = command["command"].split(" ")
                if (
                    len(words) == 4
                    and words[0] == "HSET"
                    and words[1].startswith(f"{key_prefix}{LIMIT_PREFIX}")
                    and words[1].endswith(f":{model}")
                    and words[2] == "tat_r"
                ):
                    admissions.append(float(words[3]) - 60 / rpm)
                elif words == ["ECHO", stop]:
                    return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    assert subscribed.wait(10), "MONITOR did not start"
    try:
        yield admissions
    finally:
        client = redis.Redis.from_url(redis_url)
        try:
            client.echo(stop)
        finally:
            client.close()
        watcher.join(30)
        assert not watcher.is_alive(), "MONITOR did not see the end marker"


def running_leased_by(engine: Engine, batch_id: str, worker: str) -> int:
    """How many of the batch's requests run under a lease of the worker named ``worker``."""
    with engine.connect() as conn:
        return int(
            conn.execute(
                sa.select(sa.func.count()).where(
                    Request.batch_id == batch_id,
                    Request.status == RequestStatus.RUNNING,
                    Request.lease_owner.like(f"{worker}@%"),
                )
            ).scalar_one()
        )


@asynccontextmanager
async def serving_lane(
    engine: Engine, settings: Settings, simulator: SimulatorServer, owner: str
) -> AsyncIterator[LaneConsumer]:
    """A lane consumer on this event loop (4 slots, the simulator upstream, no cache) serving the
    broker and key prefix of ``settings`` until the block ends; it ends once its calls have."""
    assert settings.broker_url is not None
    pipeline = build_pipeline(
        settings, cache=False, client_env={"OPENAI_BASE_URL": simulator.base_url, "OPENAI_API_KEY": "sim"}
    )
    broker = aioredis.Redis.from_url(settings.broker_url)
    consumer = LaneConsumer(
        engine,
        pipeline,
        LaneTransport(broker, settings.key_prefix),
        owner=owner,
        lease_seconds=30,
        in_flight=4,
        max_deliveries=3,
    )
    stop = asyncio.Event()
    serving = asyncio.create_task(consumer.run(stop))
    try:
        yield consumer
    finally:
        stop.set()
        await serving
        await pipeline.close()
        await broker.aclose()
