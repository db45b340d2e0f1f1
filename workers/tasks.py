"""The Celery tasks: ``tokenmill.complete_chunk`` and ``tokenmill.sweep``.

Messages carry request ids and a dispatch id, never prompts or keys ("ledger first", "secrets
stay secret": docs/design.md). Chunks run on the worker process's one event loop
(``context.run_in_loop``), through the pipeline that lives on it, so connections to the
provider, Redis and the limiter's state carry from chunk to chunk.

A worker exits within ``worker_shutdown_seconds`` (30 s) of SIGTERM or SIGINT whatever its broker
does: a watchdog started by the first shutdown signal ends it (and its pool) past that time.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import billiard  # type: ignore[import-untyped]  # Celery's multiprocessing fork, untyped
from celery.signals import worker_ready, worker_shutting_down

from telemetry import tracing
from workers import context
from workers.app import app
from workers.constants import COMPLETE_CHUNK_TASK, SWEEP_TASK
from workers.dispatch import Dispatcher
from workers.enqueue import make_dispatcher
from workers.fair_share import FairShare
from workers.lane_pressure import LaneBusy
from workers.leases import lease_owner
from workers.runner import ChunkReport, ChunkRunner, RunnerConfig
from workers.sweeper import sweep

__all__ = ["complete_chunk", "dispatcher", "run_chunk", "sweep_task"]

_logger = logging.getLogger(__name__)


def dispatcher() -> Dispatcher:
    return make_dispatcher(app, context.engine(), context.redis_client(), context.settings())


# The tenants' shares of this process's slots, carried from chunk to chunk (a fork starts empty).
_fair_share = FairShare()


_lane_busy_reader: LaneBusy | None = None
_lane_busy_pid = 0


def _lane_busy() -> LaneBusy | None:
    """This process's reader of the lane's busy mark (after a fork, a new one on the new client);
    None without a broker (embedded mode has no lane) or when batch work never gives way."""
    global _lane_busy_reader, _lane_busy_pid
    settings = context.settings()
    if settings.broker_url is None or settings.lane_busy_batch_share >= 1:
        return None
    if _lane_busy_reader is None or _lane_busy_pid != os.getpid():
        _lane_busy_reader = LaneBusy.from_url(
            settings.broker_url, settings.key_prefix, settings.lane_busy_batch_share
        )
        _lane_busy_pid = os.getpid()
    return _lane_busy_reader


async def run_chunk(
    request_ids: list[str],
    owner: str,
    on_claimed: Callable[[], None] | None = None,
    keep_alive: Callable[[], None] | None = None,
    traceparent: str | None = None,
) -> ChunkReport:
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
        fair_share=_fair_share,
        lane_busy=_lane_busy(),
    )
    return await runner.run(
        request_ids, on_claimed=on_claimed, keep_alive=keep_alive, traceparent=traceparent
    )


class _FailureBackoff:
    """Consecutive chunk failures of this process: the n-th waits 2**(n-1) s, at most
    ``CHUNK_FAILURE_BACKOFF_MAX_SECONDS``."""

    def __init__(self) -> None:
        self.consecutive = 0

    def failed(self) -> None:
        self.consecutive += 1
        time.sleep(min(CHUNK_FAILURE_BACKOFF_MAX_SECONDS, 2.0 ** (self.consecutive - 1)))

    def succeeded(self) -> None:
        self.consecutive = 0


CHUNK_FAILURE_BACKOFF_MAX_SECONDS = 30.0
_failure_backoff = _FailureBackoff()


@app.task(name=COMPLETE_CHUNK_TASK, bind=True, ignore_result=True)  # type: ignore[untyped-decorator, unused-ignore]
def complete_chunk(self: Any, request_ids: list[str], dispatch_id: str | None = None) -> dict[str, int]:
    owner = lease_owner(self.request.hostname)
    settle = None if dispatch_id is None else functools.partial(dispatcher().settle, dispatch_id)
    hold = None if dispatch_id is None else functools.partial(dispatcher().hold, dispatch_id)
    try:
        # Held while the chunk runs: it claims the message's ids a window at a time, fairly with
        # every tenant's work (workers.dispatch)...
        traceparent = _traceparent(self.request)
        report = context.run_in_loop(
            run_chunk(list(request_ids), owner, on_claimed=hold, keep_alive=hold, traceparent=traceparent)
        )
    except Exception:
        # A process whose chunks fail (its database out of reach, say) fails fast, and would take
        # most messages from the queue: it waits before taking the next, so healthy ones get them.
        # Settled before the wait, not after: the sweeper re-sends the requests while this process
        # still waits (settled after, the re-sent message arrived just as this process was free).
        if settle is not None:
            settle()
        _failure_backoff.failed()
        raise
    else:
        _failure_backoff.succeeded()
    finally:
        # ...and whatever happened: a chunk that failed leaves its requests queued or handed
        # back, for the sweeper to send again within its grace.
        if settle is not None:
            settle()
    return {
        "claimed": report.claimed,
        "succeeded": report.succeeded,
        "failed": report.failed,
        "cached": report.cached,
        "released": report.released,
    }


def _traceparent(request: Any) -> str | None:
    """The ``traceparent`` header the dispatch put on the message (``workers.dispatch``): Celery
    gives a message's custom headers as attributes of the task's request."""
    value = getattr(request, tracing.TRACEPARENT, None)
    if value is None:
        value = (getattr(request, "headers", None) or {}).get(tracing.TRACEPARENT)
    return value if isinstance(value, str) else None


class _ShutdownWatchdog:
    """Started by the first shutdown signal of the worker's main process: if the process still
    runs ``worker_shutdown_seconds`` later (a broker that stopped answering leaves Celery's cold
    shutdown waiting on it for good), kill the pool processes and exit. Their chunks' requests
    come back through their leases, like a SIGKILL's."""

    def __init__(self) -> None:
        self._started = False

    def start(self) -> None:
        if self._started:
            return
        self._started = True
        seconds = context.settings().worker_shutdown_seconds
        threading.Thread(
            target=self._exit_after, args=(seconds,), name="shutdown watchdog", daemon=True
        ).start()

    @staticmethod
    def _exit_after(seconds: float) -> None:
        time.sleep(seconds)
        _logger.critical("worker still running %.0f s after it was asked to stop: exiting now", seconds)
        for child in billiard.active_children():
            with contextlib.suppress(OSError):
                os.kill(child.pid, signal.SIGKILL)
        logging.shutdown()
        os._exit(1)


_shutdown_watchdog = _ShutdownWatchdog()


@worker_ready.connect  # type: ignore[untyped-decorator, unused-ignore]
def _watch_shutdown_signals(**_: Any) -> None:
    """Start the watchdog on the signal itself: Celery tells ``worker_shutting_down`` only after
    its soft shutdown, and then only if nothing before hung."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        celerys = signal.getsignal(sig)
        if callable(celerys):
            signal.signal(sig, functools.partial(_start_watchdog_then, celerys))


def _start_watchdog_then(handler: Callable[[int, Any], Any], signum: int, frame: Any) -> Any:
    _shutdown_watchdog.start()
    return handler(signum, frame)


@worker_shutting_down.connect  # type: ignore[untyped-decorator, unused-ignore]
def _exit_within_the_shutdown_bound(**_: Any) -> None:
    _shutdown_watchdog.start()


@app.task(name=SWEEP_TASK, ignore_result=True)  # type: ignore[untyped-decorator, unused-ignore]
def sweep_task() -> dict[str, int]:
    report = sweep(dispatcher(), grace_seconds=int(context.settings().sweep_grace_seconds))
    return {"dead_dispatches": report.dead_dispatches, "redispatched": report.redispatched}
