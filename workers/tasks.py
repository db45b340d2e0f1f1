"""The Celery tasks: ``tokenmill.complete_chunk`` and ``tokenmill.sweep``.

Messages carry request ids and a dispatch id, never prompts or keys (invariant 1 and 8). Chunks
run on the worker process's one event loop (``context.run_in_loop``), through the pipeline that
lives on it, so connections to the provider, Redis and the limiter's state carry from chunk to chunk.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

from workers import context
from workers.agent_tasks import handlers_with_agents
from workers.app import app
from workers.constants import COMPLETE_CHUNK_TASK, SWEEP_TASK
from workers.dispatch import Dispatcher
from workers.runner import ChunkReport, ChunkRunner, RunnerConfig
from workers.sweeper import sweep

__all__ = ["complete_chunk", "dispatcher", "run_chunk", "sweep_task"]


def dispatcher() -> Dispatcher:
    settings = context.settings()
    return Dispatcher(
        celery=app,
        engine=context.engine(),
        redis_client=context.redis_client(),
        key_prefix=settings.key_prefix,
        chunk_size=settings.chunk_size,
    )


async def run_chunk(request_ids: list[str], owner: str) -> ChunkReport:
    settings = context.settings()
    runner = ChunkRunner(
        context.engine(),
        context.pipeline(),
        RunnerConfig(
            owner=owner,
            lease_seconds=settings.lease_seconds,
            in_flight=settings.in_flight_per_process,
            max_deliveries=settings.max_attempts,
            # Stop starting requests well before the message becomes visible again.
            deadline_seconds=settings.visibility_timeout_seconds / 2,
            refill_seconds=settings.chunk_refill_seconds,
            # Longer than any honest request (every attempt timing out, with backoff between).
            max_request_seconds=settings.max_attempts * (settings.upstream_timeout_seconds + 60),
            rate_limit_retry_seconds=settings.rate_limit_retry_seconds,
        ),
        handlers=handlers_with_agents(context.engine()),
    )
    return await runner.run(request_ids)


@app.task(name=COMPLETE_CHUNK_TASK, bind=True, ignore_result=True)  # type: ignore[untyped-decorator, unused-ignore]
def complete_chunk(self: Any, request_ids: list[str], dispatch_id: str | None = None) -> dict[str, int]:
    # A lease owner per execution: a redelivered message is another owner, even in this process.
    owner = f"{self.request.hostname or 'worker'}/{os.getpid()}/{uuid.uuid4().hex[:12]}"
    report = context.run_in_loop(run_chunk(list(request_ids), owner))
    if dispatch_id is not None:
        dispatcher().finished(dispatch_id)
    return {
        "claimed": report.claimed,
        "succeeded": report.succeeded,
        "failed": report.failed,
        "cached": report.cached,
        "released": report.released,
    }


@app.task(name=SWEEP_TASK, ignore_result=True)  # type: ignore[untyped-decorator, unused-ignore]
def sweep_task() -> dict[str, int]:
    report = sweep(dispatcher(), grace_seconds=int(context.settings().sweep_grace_seconds))
    return {"dead_dispatches": report.dead_dispatches, "redispatched": report.redispatched}
