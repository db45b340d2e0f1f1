"""The interactive lane: each worker process serves single calls (``POST /v1/chat/completions``)
on an event loop and a thread of its own, apart from its Celery chunks.

A prefork process busy with a chunk takes no other Celery message until the chunk ends (minutes,
behind a rate limit), so single calls get capacity of their own: ``LaneConsumer`` takes their ids
from the tenants' lane queues (``workers.lane_transport``), up to ``lane_in_flight_per_process``
at once, shared between tenants by weight with a cap per tenant (``workers.lane_scheduler``), each
through the same path as a batch line:

* claim with a lease ("leases, not trust"), kept alive by a ``LeaseKeeper`` thread; a consumer
  that dies leaves its requests to the sweeper, which sends them again once their leases lapse;
* the same pipeline as chunks (per-tenant cache and single-flight, global limits, retries);
* the result written to the ledger (first writer wins; usage and exact cost as any line's)
  *before* the answer is pushed to the waiting API, so the answer a caller gets is the one the
  ledger keeps, and a caller told "done" finds it in ``/v1/usage``;
* a streamed call relays each chunk as the provider sends it (``lane:stream:{id}``), then its
  outcome, written to the ledger first as well;
* its batch's cancel (the API's wait timed out, its client went away) stops its waits and
  retries, as a batch cancel does; a "later" (``RetryLater``) hands it back to the queue, whence
  the sweeper sends it on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError
from sqlalchemy.engine import Engine

from models.cancellation import CancellationToken
from models.errors import ModelClientError
from models.openai import request_from_openai_body
from models.retry import RATE_LIMIT_DEADLINE, RetryLater
from store import (
    STOPPED_BATCH_STATUSES,
    ClaimedRequest,
    RequestKind,
    ResultRecord,
    batch_statuses,
    cancel_claimed,
    claim_requests,
    release_requests,
)
from store.engine import again_if_disconnected
from store.interactive import InteractiveOutcome
from telemetry import tracing
from telemetry.metrics import observe_recorded
from telemetry.model_events import install_model_event_metrics
from workers import observe
from workers.lane_scheduler import LaneScheduler
from workers.lane_threads import LaneThreads
from workers.lane_transport import LaneMessage, LaneTransport
from workers.pipeline import ModelCallPipeline
from workers.result_writer import record_single_call
from workers.runner import (
    LeaseKeeper,
    RequestCancelled,
    cancelled_means_request_cancelled,
    complete_chat,
    failed_record,
    hand_back_times,
    record_of_call,
)

__all__ = ["LaneConsumer", "start_in_background", "stop"]

_logger = logging.getLogger(__name__)

T = TypeVar("T")

_TAKE_TIMEOUT_SECONDS = 1.0
_CANCEL_CHECK_SECONDS = 0.5


def outcome_of(record: ResultRecord) -> InteractiveOutcome:
    return InteractiveOutcome(
        request_id=record.request_id,
        status=record.status,
        status_code=record.status_code,
        body=record.response_body,
        error_code=record.error_code,
        error_message=record.error_message,
        cached=record.cached,
    )


class LaneConsumer:
    """Serves lane messages with ``pipeline`` until ``stop`` is set; one per event loop."""

    def __init__(
        self,
        engine: Engine,
        pipeline: ModelCallPipeline,
        transport: LaneTransport,
        *,
        owner: str,
        lease_seconds: int,
        in_flight: int,
        max_deliveries: int,
        rate_limit_retry_seconds: float | None = None,
    ) -> None:
        self.engine = engine
        self.rate_limit_retry_seconds = rate_limit_retry_seconds
        self.pipeline = pipeline
        self.transport = transport
        self.owner = owner
        self.lease_seconds = lease_seconds
        self.in_flight = in_flight
        self.max_deliveries = max_deliveries
        self.running: dict[str, ClaimedRequest] = {}
        self.tokens: dict[str, CancellationToken] = {}
        self.scheduler = LaneScheduler(transport, owner, in_flight)
        # The ledger's threads while ``run`` runs (``workers.lane_threads``); else asyncio's.
        self._threads: LaneThreads | None = None

    async def _ledger(self, function: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """``function(*args, **kwargs)`` (a ledger call) on a thread."""
        if self._threads is not None:
            return await self._threads.run(function, *args, **kwargs)
        return await asyncio.to_thread(function, *args, **kwargs)

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        keeper = LeaseKeeper(
            self.engine,
            self.owner,
            self.lease_seconds,
            max(0.5, self.lease_seconds / 4),
            lambda: list(self.running),
            lambda lost: loop.call_soon_threadsafe(self._lose, lost),
        )
        keeper.start()
        # Enough threads that the lane's ledger calls do not queue behind each other.
        self._threads = LaneThreads(min(32, self.in_flight + 4), "lane ledger")
        watcher = asyncio.create_task(self._watch_cancels())
        gate = asyncio.Semaphore(self.in_flight)
        serving: set[asyncio.Task[None]] = set()
        try:
            while not stop.is_set():
                await gate.acquire()
                try:
                    taken = await self.scheduler.take(_TAKE_TIMEOUT_SECONDS)
                except (RedisError, OSError):
                    gate.release()
                    _logger.warning("the lane cannot read its queue; trying again", exc_info=True)
                    await asyncio.sleep(_TAKE_TIMEOUT_SECONDS)
                    continue
                if taken is None:
                    gate.release()
                    continue
                task = asyncio.create_task(self._serve_for(*taken))
                serving.add(task)
                task.add_done_callback(serving.discard)
                task.add_done_callback(lambda _: gate.release())
                # The call's claim goes to the ledger before the next take goes to Redis: one
                # turn of the loop, which the waiting caller would otherwise wait out.
                await asyncio.sleep(0)
        finally:
            if serving:
                await asyncio.wait(serving)
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            await asyncio.to_thread(keeper.stop)
            threads, self._threads = self._threads, None
            # A ledger call still running (the watcher's, cancelled) ends on its own: not waited
            # for past a few seconds.
            await asyncio.to_thread(threads.stop, 5.0)

    async def _serve_for(self, tenant_id: str, message: LaneMessage) -> None:
        try:
            await self.serve(message)
        finally:
            await self.scheduler.done(tenant_id)

    async def serve(self, message: LaneMessage) -> None:
        # A child of the API's span across the lane (telemetry.tracing): one trace per call.
        attributes: tracing.Attributes = {
            "tokenmill.request_id": message.request_id,
            "tokenmill.stream": message.stream,
        }
        with tracing.span("tokenmill lane request", attributes, traceparent=message.traceparent):
            await self._serve_one(message)

    async def _serve_one(self, message: LaneMessage) -> None:
        request_id = message.request_id
        try:
            # A plain call's claim need not wait for the disk: its caller hears of it only through
            # the durable commit of its result. A streamed call's must: its first chunk reaches
            # the caller before any result, and this commit makes the request's row durable too.
            # Once more on a connection that died under it: else its caller waits for the sweeper.
            claimed = await self._ledger(
                again_if_disconnected,
                claim_requests,
                self.engine,
                [request_id],
                self.owner,
                self.lease_seconds,
                durable=message.stream,
            )
        except Exception:
            # The ledger out of reach: the settled marker lets the sweeper send it again.
            _logger.exception("the lane could not claim request %s", request_id)
            claimed = []
        if not claimed:
            # The marker covers nothing any more.
            await self._settle(request_id)
            return  # finished, cancelled or run elsewhere: its caller reads the ledger
        # Claimed, the marker covers nothing any more either: a plain call's goes with its
        # reply, in the same round trip (``LaneTransport.reply``); while it runs, its lease is
        # what tells the sweeper (a request running under an expired lease is sent again,
        # whatever its marker). A streamed call's goes alongside the call, as its answer is
        # many round trips.
        settling = asyncio.create_task(self._settle(request_id)) if message.stream else None
        answered = False
        try:
            answered = await self._serve_claimed(claimed, message)
        finally:
            if settling is not None:
                await settling
            elif not answered:  # handed back, released, or its answer lost
                await self._settle(request_id)

    async def _settle(self, request_id: str) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self.transport.settle(request_id)

    async def _serve_claimed(self, claimed: list[ClaimedRequest], message: LaneMessage) -> bool:
        """Run the claimed request; whether its answer (which settles a plain call) was pushed."""
        request_id = message.request_id
        request = claimed[0]
        observe.claimed(claimed)
        self.running[request_id] = request
        token = self.tokens[request_id] = CancellationToken()
        observe.started(request)  # as a chunk's request task: its scope, and one more in flight
        try:
            return await self._run(request, token, message.stream)
        except Exception:
            _logger.exception("the lane failed request %s; it goes back in line", request_id)
            await self._ledger(release_requests, self.engine, [request_id], self.owner)
            return False
        finally:
            observe.ended(request)
            self.running.pop(request_id, None)
            self.tokens.pop(request_id, None)

    async def _run(self, request: ClaimedRequest, token: CancellationToken, stream: bool) -> bool:
        """Run and record the request, then answer; whether the answer was pushed."""
        RATE_LIMIT_DEADLINE.set(request.retry_deadline)
        if request.attempts > self.max_deliveries:
            error = ModelClientError(
                f"gave up after {request.attempts - 1} deliveries that did not finish", code="max_deliveries"
            )
            record = failed_record(request.id, error, attempts=0)
        else:
            try:
                record = await self._call(request, token, stream)
            except RequestCancelled:
                await self._ledger(cancel_claimed, self.engine, [request.id], self.owner)
                return await self._answer(request.id, None, stream)
            except RetryLater as later:
                # Back in line with its delay, as a chunk hands a request back; the sweeper
                # sends it on (the API keeps waiting for the ledger). Its rate-limit budget
                # starts with the provider's first "later", as a chunk's does.
                budget = self.rate_limit_retry_seconds
                not_before, deadline = hand_back_times(later, budget, request.retry_deadline)
                await self._ledger(
                    release_requests,
                    self.engine,
                    [request.id],
                    self.owner,
                    str(later),
                    not_before,
                    handed_back=True,
                    upstream_attempts=later.attempts,
                    retry_deadline=deadline,
                )
                return False
        if request.handed_back_attempts:
            record = dataclasses.replace(record, attempts=record.attempts + request.handed_back_attempts)
        # Ledger first, then the answer: what the caller gets is what the ledger keeps.
        with tracing.span("tokenmill ledger write", {"tokenmill.ledger.records": 1}):
            outcome, replaced = await self._ledger(record_single_call, self.engine, record)
        kept = request.id in outcome.inserted and request.id not in replaced
        if request.id in outcome.inserted:  # counted once committed, as the result writer counts
            observe_recorded(
                [(record, observe.recorded_request(request))], outcome.costs, replaced=set(replaced)
            )
        return await self._answer(request.id, outcome_of(record) if kept else None, stream)

    async def _call(self, request: ClaimedRequest, token: CancellationToken, stream: bool) -> ResultRecord:
        if request.kind is not RequestKind.CHAT_COMPLETION:
            error = ModelClientError(f"the interactive lane runs no {request.kind.value} requests")
            return failed_record(request.id, error, attempts=0)
        if not stream:
            # As a batch line's, but the cache read and locked in one trip: a single call is
            # rarely a repeat, and a miss then costs one round trip fewer.
            return await complete_chat(request, self.pipeline, token, lookup_first=False)
        try:
            chat = request_from_openai_body(request.body)
        except ModelClientError as e:
            return failed_record(request.id, e, attempts=0)
        relayed = False
        relay_lost = False

        async def relay(text: str, cached: bool) -> None:
            nonlocal relayed, relay_lost
            if relay_lost:
                return
            try:
                await self.transport.append(request.id, text=text, cached=None if relayed else cached)
            except (RedisError, OSError):
                # The caller's relay is lost, not the call: it is read to its end and recorded
                # (raising here would cut off a paid call and run it again); the API, hearing
                # nothing, reads the answer from the ledger.
                relay_lost = True
                _logger.warning("the stream of request %s lost its relay", request.id, exc_info=True)
                return
            relayed = True

        with cancelled_means_request_cancelled(request.id, token):
            call = await self.pipeline.call_stream(
                chat.model,
                chat.messages,
                relay,
                **chat.create_kwargs(),
                cancellation_token=token,
                tenant_id=request.tenant_id,
                payer=request.id,
            )
        return record_of_call(request.id, chat.model, call)

    async def _answer(self, request_id: str, outcome: InteractiveOutcome | None, stream: bool) -> bool:
        """Tell the waiting API: the outcome, or (None) to read the ledger's; a plain call's
        reply settles its message too. Whether it was pushed."""
        reply: dict[str, Any] = outcome.to_json() if outcome is not None else {"ledger": True}
        try:
            if stream:
                await self.transport.append(request_id, outcome=reply)
            else:
                await self.transport.reply(request_id, reply)
        except (RedisError, OSError):
            # The API reads the ledger when no answer comes.
            _logger.warning("the answer of request %s could not be pushed", request_id, exc_info=True)
            return False
        return True

    def _lose(self, lost: set[str]) -> None:
        """Another worker took these over (our lease lapsed): stop their waits and retries; a call
        already upstream ends, and its record loses to the other's (first writer wins)."""
        for request_id in lost:
            token = self.tokens.get(request_id)
            if token is not None:
                token.cancel()

    async def _watch_cancels(self) -> None:
        while True:
            await asyncio.sleep(_CANCEL_CHECK_SECONDS)
            if not self.running:
                continue
            batches = {request.batch_id: request.id for request in list(self.running.values())}
            try:
                statuses = await self._ledger(batch_statuses, self.engine, list(batches))
            except Exception:
                _logger.warning("the lane could not read its batches' statuses", exc_info=True)
                continue
            for batch_id, status in statuses.items():
                if status in STOPPED_BATCH_STATUSES:
                    token = self.tokens.get(batches[batch_id])
                    if token is not None:
                        token.cancel()


# --- one lane per worker process, on a thread of its own --------------------------------------

_thread: threading.Thread | None = None
_stopping: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None


def start_in_background() -> None:
    """Start this process's lane (a daemon thread with its own event loop, pipeline and ledger
    connections), unless ``lane_in_flight_per_process`` is 0 or there is no broker."""
    global _thread
    from workers import context

    settings = context.settings()
    if settings.lane_in_flight_per_process == 0 or settings.broker_url is None or _thread is not None:
        return
    ready = threading.Event()
    _thread = threading.Thread(target=_serve_forever, args=(ready,), name="interactive lane", daemon=True)
    _thread.start()
    ready.wait(10)


def stop(timeout: float = 10.0) -> None:
    """Stop taking single calls; wait up to ``timeout`` for those in flight (their leases bring
    back what does not finish)."""
    global _thread, _stopping
    thread, stopping = _thread, _stopping
    _thread, _stopping = None, None
    if thread is None or stopping is None:
        return
    loop, event = stopping
    with contextlib.suppress(RuntimeError):  # its loop already closed
        loop.call_soon_threadsafe(event.set)
    thread.join(timeout)


def _serve_forever(ready: threading.Event) -> None:
    from workers.context import new_event_loop

    try:
        # uvloop's loop, as the chunks' (workers.context): asyncio's own transports and scheduling
        # are Python code on every step of every call.
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            runner.run(_serve(ready))
    except Exception:
        _logger.exception("the interactive lane stopped")


async def _serve(ready: threading.Event) -> None:
    global _stopping
    from store import make_engine
    from workers import context
    from workers.clients import build_pipeline
    from workers.leases import lease_owner

    settings = context.settings()
    assert settings.broker_url is not None
    tracing.configure(settings, "tokenmill-worker")
    # The model events of its calls (metrics, and their spans): on before its first call, which may
    # come before any chunk's (workers.context installs it at the first chunk). Idempotent.
    install_model_event_metrics()
    in_flight = settings.lane_in_flight_per_process
    loop = asyncio.get_running_loop()
    # Ledger calls run on the consumer's own threads (``LaneThreads``); asyncio's default pool
    # serves only the odd blocking call (stopping, a disk cache store): a few threads do.
    loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(4, "lane"))
    stop_event = asyncio.Event()
    _stopping = (loop, stop_event)
    engine = make_engine(settings.database_url, pool_size=min(16, in_flight), max_overflow=16)
    client = aioredis.Redis.from_url(settings.broker_url)
    pipeline = build_pipeline(settings)
    consumer = LaneConsumer(
        engine,
        pipeline,
        LaneTransport(client, settings.key_prefix),
        owner=lease_owner("lane"),
        lease_seconds=settings.lease_seconds,
        in_flight=in_flight,
        max_deliveries=settings.max_attempts,
        rate_limit_retry_seconds=min(
            settings.interactive_rate_limit_retry_seconds, settings.rate_limit_retry_seconds
        ),
    )
    ready.set()
    try:
        await consumer.run(stop_event)
    finally:
        await pipeline.close()
        await client.aclose()
        engine.dispose()
