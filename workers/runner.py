"""The chunk runner: claim a chunk of requests and run them concurrently on one event loop.

Used by the Celery task (on the worker process's one event loop) and by the embedded mode (``tokenmill
run``). For each request: claim with a lease, then the request's handler (for chat completions:
``ModelCallPipeline.call``, i.e. cache -> limiter -> client with retries), then a ``ResultRecord``
written to the ledger in batches (every ``flush_size`` results or ``flush_interval`` seconds,
``workers.result_writer``), first writer wins. Alongside:

* a heartbeat (``LeaseKeeper``, on a thread of its own so that a busy event loop cannot starve
  it) extends the leases of what is still unfinished four times per lease; a lease found lost
  (another worker took the request) cancels that request here;
* a watcher reads the batches' status every ``cancel_check_interval``: a cancelled or expired
  batch starts no new request and its pending ones are cancelled; a call already sent upstream
  runs to its end and its result is recorded, as OpenAI's cancel does (the provider bills it
  either way), while the token passed to it stops its waits and retries; a request that stops
  after paid calls (an agent run between model calls) has them billed as discarded answers;
* a request whose call says "later" (``RetryLater``: a long rate-limit wait, a 429 storm) is
  handed back to the queue with a ``not_before`` delay rather than waited out in a slot;
* a deadline (half the visibility timeout under Celery) stops starting requests, so a chunk
  never outlives its message's visibility; what was not started is released for the sweeper;
* for ``refill_seconds`` from its start, the chunk fills the free slots of its window with
  queued requests of any tenant, shared by the tenants' weights (``workers.fair_share``; within a
  tenant by priority, then completion deadline: ``store.claim_in_order``), so a process does not
  drain its window at the end of every message and no tenant's big batch holds every worker.
  A message's own ids are claimed a window's worth at a time like the rest; past
  ``refill_seconds`` the free slots are still filled while a request started within it runs (a
  slow upstream call holds its own slot, never the others: no head-of-line blocking).

A request delivered more than ``max_deliveries`` times (it keeps killing workers, say) is recorded
as failed without another call. Handlers are per request kind (``workers.handlers``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from sqlalchemy.engine import Engine

from models.cancellation import CancellationToken
from models.errors import AuthenticationFailed, ModelClientError, ProviderUnavailable, RateLimited
from models.openai import chat_completion_body, request_from_openai_body
from models.retry import RATE_LIMIT_DEADLINE, RetryLater
from store import (
    STOPPED_BATCH_STATUSES,
    UPSTREAM_AUTHENTICATION_FAILED,
    UPSTREAM_AUTHENTICATION_STATUSES,
    ClaimedRequest,
    RequestKind,
    RequestStatus,
    ResultRecord,
    batch_statuses,
    cancel_claimed,
    claim_in_order,
    claim_requests,
    extend_leases,
    record_cancelled_spend,
    record_handed_back_spend,
    release_requests,
    tenant_queues,
)
from store.clock import ledger_time
from store.results import with_retry_after
from workers import observe
from workers.fair_share import FairGate, FairShare
from workers.lane_pressure import LaneBusy
from workers.leases import Heartbeat
from workers.pipeline import CallResult, ModelCallPipeline
from workers.result_writer import ResultWriter

__all__ = [
    "ChunkReport",
    "ChunkRunner",
    "LeaseKeeper",
    "RequestCancelled",
    "RequestHandedBack",
    "RequestHandler",
    "RunnerConfig",
    "cancelled_means_request_cancelled",
    "complete_chat",
    "failed_record",
    "hand_back_times",
    "record_of_call",
]

_logger = logging.getLogger(__name__)


class RequestCancelled(Exception):
    """A handler stopped because its batch was cancelled; the request ends as cancelled.

    ``spent``: what the request paid upstream before it stopped (an agent run's finished model
    calls), billed as discarded answers once the request is cancelled; None if nothing."""

    def __init__(self, request_id: str, spent: ResultRecord | None = None) -> None:
        super().__init__(request_id)
        self.spent = spent


class RequestHandedBack(RetryLater):
    """A handler's ``RetryLater`` with what the request paid upstream before it (an agent run's
    finished model calls): billed once the request is back in line (``record_handed_back_spend``),
    since a cancel or an expiry while it waits keeps no result that would bill it."""

    def __init__(self, later: RetryLater, spent: ResultRecord | None) -> None:
        super().__init__(later.delay, later.reason, later.error)
        self.attempts = later.attempts
        self.spent = spent


def hand_back_times(
    later: RetryLater, budget: float | None, retry_deadline: int | None, now: float | None = None
) -> tuple[int, int | None]:
    """When a request handed back with ``later`` is due again, and the end of its rate-limit
    ``budget`` (seconds) to record when none is yet (``retry_deadline``: the one it has)."""
    now = ledger_time() if now is None else now  # compared with the ledger's now (store.clock)
    # The budget starts with the provider's first "later", not with our own limiter's.
    deadline = int(now + budget) if budget is not None and later.error is not None else None
    # Not back later than the budget's end: a longer wait would only fail it unseen.
    not_before = math.ceil(now + later.delay)
    budget_end = retry_deadline if retry_deadline is not None else deadline
    if budget_end is not None:
        not_before = min(not_before, budget_end)
    return not_before, deadline


class RequestHandler(Protocol):
    """Runs one claimed request to its record. Raise ``RequestCancelled`` when ``token`` fired."""

    def __call__(
        self, request: ClaimedRequest, pipeline: ModelCallPipeline, token: CancellationToken
    ) -> Awaitable[ResultRecord]: ...


@dataclass
class RunnerConfig:
    owner: str
    lease_seconds: int = 20
    in_flight: int = 64
    max_deliveries: int = 6
    flush_size: int = 50
    flush_interval: float = 0.1
    cancel_check_interval: float = 1.0
    deadline_seconds: float | None = None
    # For this many seconds from the chunk's start, fill the window's free slots with queued
    # requests of every tenant, by weight (``workers.fair_share``), so it stays full; 0 = never
    # (the chunk runs its message's ids alone). Time, not a count: a count drains the window every
    # few seconds when replies are fast.
    refill_seconds: float = 0
    refill_poll: float = 0.05
    # A request still running after this long is taken for stuck: cancelled here, its lease left
    # to expire so that another worker redoes it. None: no limit.
    max_request_seconds: float | None = None
    # How long a request keeps retrying rate limits, from its first hand-back for one; past it a
    # 429 fails it. None: until its batch's completion window ends.
    rate_limit_retry_seconds: float | None = None

    @property
    def heartbeat_interval(self) -> float:
        """Leases are extended four times per lease: a heartbeat or two may be late (a database
        hiccup) before a live request loses its lease."""
        return max(0.5, self.lease_seconds / 4)


@dataclass
class ChunkReport:
    """What one chunk did. ``billed_*`` tokens exclude cache hits (a hit is free)."""

    requested: int = 0
    claimed: int = 0
    succeeded: int = 0
    failed: int = 0
    cached: int = 0
    cancelled: int = 0
    released: int = 0
    handed_back: int = 0  # put back in line with a delay (RetryLater)
    duplicates: int = 0
    upstream_attempts: int = 0
    billed_prompt_tokens: int = 0
    billed_completion_tokens: int = 0
    finalized_batches: list[str] = field(default_factory=list)


def failed_record(
    request_id: str, error: ModelClientError, *, attempts: int, latency_ms: float | None = None
) -> ResultRecord:
    """A failure as the batch error file shows it: the provider's status, code and message (a
    refusal of tokenmill's credentials under a code of its own, ``UPSTREAM_AUTHENTICATION_FAILED``)."""
    code = error.code or type(error).__name__
    if isinstance(error, AuthenticationFailed) and error.status_code in UPSTREAM_AUTHENTICATION_STATUSES:
        code = UPSTREAM_AUTHENTICATION_FAILED
    body = None
    if error.status_code is not None:
        body = {
            "error": {
                "message": error.message,
                "type": type(error).__name__,
                "param": error.param,
                "code": code,
            }
        }
        if isinstance(error, RateLimited | ProviderUnavailable):
            body = with_retry_after(body, error.retry_after)
    return ResultRecord(
        request_id=request_id,
        status=RequestStatus.FAILED,
        response_body=body,
        status_code=error.status_code,
        upstream_request_id=error.request_id,
        error_code=code,
        error_message=error.message,
        model=error.model,
        attempts=attempts,
        latency_ms=latency_ms,
    )


def record_of_call(request_id: str, model: str, call: CallResult) -> ResultRecord:
    if call.result is None:
        assert call.error is not None
        return failed_record(request_id, call.error, attempts=call.attempts, latency_ms=call.latency_ms)
    result = call.result
    body = chat_completion_body(result, model=model)
    if result.cached:
        # The body is the provider's answer as first served, usage included; say that this copy
        # came from the cache and billed nothing, so nobody summing output lines counts it again.
        # It is a completion of its own, as each of OpenAI's is: its own id (the paid answer's
        # stays its upstream_request_id), which a client may key on.
        body = {
            **body,
            "id": f"chatcmpl-{request_id}",
            "tokenmill": {"cached": True, "billed_usage": {"prompt_tokens": 0, "completion_tokens": 0}},
        }
    return ResultRecord(
        request_id=request_id,
        status=RequestStatus.SUCCEEDED,
        response_body=body,
        status_code=200,
        upstream_request_id=result.response_id,
        finish_reason=result.finish_reason,
        model=result.model or model,
        usage=result.usage,
        cached=result.cached,
        latency_ms=call.latency_ms,
        attempts=call.attempts,
        cache_key=call.cache_key,
    )


async def complete_chat(
    request: ClaimedRequest,
    pipeline: ModelCallPipeline,
    token: CancellationToken,
    *,
    lookup_first: bool = True,
) -> ResultRecord:
    """The handler of ``/v1/chat/completions`` lines (``lookup_first``: ``ModelCallPipeline.call``'s)."""
    try:
        chat = request_from_openai_body(request.body)
    except ModelClientError as e:
        return failed_record(request.id, e, attempts=0)
    with cancelled_means_request_cancelled(request.id, token):
        call = await pipeline.call(
            chat.model,
            chat.messages,
            **chat.create_kwargs(),
            cancellation_token=token,
            tenant_id=request.tenant_id,
            payer=request.id,
            lookup_first=lookup_first,
        )
    return record_of_call(request.id, chat.model, call)


@contextlib.contextmanager
def cancelled_means_request_cancelled(request_id: str, token: CancellationToken) -> Iterator[None]:
    """A cancel that came through the request's own token ends the request (``RequestCancelled``);
    any other cancel (the process stopping) goes on as it is."""
    try:
        yield
    except asyncio.CancelledError:
        if token.is_cancelled():
            raise RequestCancelled(request_id) from None
        raise


ResultListener = Callable[[ResultRecord], None]

# The longest wait between two looks for work while a chunk has free slots but nothing waits.
MAX_IDLE_REFILL_POLL = 1.0


class LeaseKeeper(Heartbeat):
    """Extends the leases of a chunk's unfinished requests every ``interval`` from a thread of its
    own (``workers.leases.Heartbeat``). ``leased()`` names what to extend (called on that thread);
    ``on_lost(ids)`` hears of leases another worker now holds."""

    def __init__(
        self,
        engine: Engine,
        owner: str,
        lease_seconds: int,
        interval: float,
        leased: Callable[[], list[str]],
        on_lost: Callable[[set[str]], object],
        also: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(f"leases {owner}", interval, self._extend)
        self._engine = engine
        self._owner = owner
        self._lease_seconds = lease_seconds
        self._leased = leased
        self._on_lost = on_lost
        self._also = also

    def _extend(self) -> None:
        ids = self._leased()
        held = set(extend_leases(self._engine, ids, self._owner, self._lease_seconds))
        lost = set(ids) - held
        if lost:
            self._on_lost(lost)
        if self._also is not None:
            try:
                self._also()
            except Exception:
                # Not the leases' business: they were extended; the next beat tries again.
                _logger.exception("a chunk's keep-alive failed; trying again")


class ChunkRunner:
    """Runs chunks of request ids through ``pipeline``; one runner per event loop."""

    def __init__(
        self,
        engine: Engine,
        pipeline: ModelCallPipeline,
        config: RunnerConfig,
        *,
        handlers: Mapping[RequestKind, RequestHandler] | None = None,
        fair_share: FairShare | None = None,
        on_result: ResultListener | None = None,
        lane_busy: LaneBusy | None = None,
    ) -> None:
        self.engine = engine
        # Whether single calls were sent lately: the refill then keeps a smaller window
        # (``workers.lane_pressure``).
        self.lane_busy = lane_busy
        self.pipeline = pipeline
        self.config = config
        if handlers is None:
            # Every registered kind (deferred: the agent-run handler imports this module).
            from workers.handlers import request_handlers

            handlers = request_handlers(engine)
        self.handlers = dict(handlers)
        self.on_result = on_result
        # The tenants' shares of this runner's slots; pass one per process to carry them from
        # chunk to chunk.
        self.fair_share = fair_share if fair_share is not None else FairShare()

    async def run(
        self,
        request_ids: Sequence[str],
        *,
        on_claimed: Callable[[], None] | None = None,
        keep_alive: Callable[[], None] | None = None,
        traceparent: str | None = None,
    ) -> ChunkReport:
        """Claim ``request_ids`` and run what was claimed; ``on_claimed`` is called (off the loop)
        once the claim is committed, whatever it took, and ``keep_alive`` (from the lease
        heartbeat's thread) every heartbeat while the chunk runs.

        A refilling chunk claims a window's worth of its ids at first and the rest with every
        tenant's work, fairly; with nothing of its own to claim it still serves what waits.
        ``traceparent``: the span of the dispatch that sent the chunk, to continue
        (``telemetry.tracing``)."""
        with observe.chunk_span(len(request_ids), traceparent):
            return await self._run(request_ids, on_claimed, keep_alive)

    async def _run(
        self,
        request_ids: Sequence[str],
        on_claimed: Callable[[], None] | None,
        keep_alive: Callable[[], None] | None,
    ) -> ChunkReport:
        config = self.config
        report = ChunkReport(requested=len(request_ids))
        started = time.monotonic()
        refilling = config.refill_seconds > 0
        window = config.in_flight
        if refilling and self.lane_busy is not None:
            window = self.lane_busy.window(window)  # single calls waiting: the batch gives way
        first = list(request_ids)[:window] if refilling else list(request_ids)
        claimed = await asyncio.to_thread(
            claim_requests, self.engine, first, config.owner, config.lease_seconds
        )
        report.claimed = len(claimed)
        observe.claimed(claimed)
        tags = {request.id: self.fair_share.charge(request.tenant_id, 1)[0] for request in claimed}
        if on_claimed is not None:
            await asyncio.to_thread(on_claimed)
        if not claimed and not refilling:
            return report
        await _ChunkRun(self, claimed, report, started, tags, keep_alive).run()
        return report


class _ChunkRun:
    """One claimed chunk on its way through a ``ChunkRunner``: the state its requests share, and
    one method per thing that happens to them (run, hand back, lose a lease, overrun, see their
    batch stop, refill, finish, wind down)."""

    def __init__(
        self,
        runner: ChunkRunner,
        claimed: Sequence[ClaimedRequest],
        report: ChunkReport,
        started: float,
        tags: dict[str, float],
        keep_alive: Callable[[], None] | None = None,
    ) -> None:
        self.engine = runner.engine
        self.fair_share = runner.fair_share
        self.pipeline = runner.pipeline
        self.handlers = runner.handlers
        self.on_result = runner.on_result
        self.lane_busy = runner.lane_busy
        self.config = config = runner.config
        self.report = report
        self.started = started  # monotonic, before the claim
        self.claimed = claimed
        self.writer = ResultWriter(self.engine, report, config.flush_size, config.flush_interval)
        self.unfinished: dict[str, ClaimedRequest] = {request.id: request for request in claimed}
        # ``running`` holds only the tasks not yet settled: a chunk that refills for long starts
        # tens of thousands, and nothing here may cost time in proportion to that.
        self.running: dict[str, asyncio.Task[None]] = {}
        self.all_settled = asyncio.Event()
        self.started_at: dict[str, float] = {}  # of the running ones, monotonic
        self.overdue: set[str] = set()
        self.batch_tokens = {request.batch_id: CancellationToken() for request in claimed}
        self.request_tokens: dict[str, CancellationToken] = {}  # of the requests past the gate
        self.to_cancel: list[str] = []
        self.cancelled_spend: list[ResultRecord] = []  # paid calls of the requests in ``to_cancel``
        # Requests waiting for a slot go in by their fair-share tags (``workers.fair_share``).
        self.gate = FairGate(config.in_flight, self.fair_share)
        self.tags = tags  # of the claimed requests not yet let in
        loop = asyncio.get_running_loop()
        self.keeper = LeaseKeeper(
            self.engine,
            config.owner,
            config.lease_seconds,
            config.heartbeat_interval,
            self.leased,
            lambda lost: loop.call_soon_threadsafe(self.lose, lost),
            also=keep_alive,
        )

    async def run(self) -> None:
        config = self.config
        self.fail_overdelivered()
        await self.stop_stopped_batches()
        writing = asyncio.create_task(self.writer.run())
        refilling = asyncio.create_task(self.refill())
        helpers = [asyncio.create_task(self.watch_batches()), refilling]
        if config.max_request_seconds is not None:
            helpers.append(asyncio.create_task(self.give_up_overdue()))
        self.keeper.start()
        try:
            self.start(list(self.unfinished.values()))
            while True:
                if self.running:
                    self.all_settled.clear()
                    await self.all_settled.wait()
                # All settled; the refill may still be claiming more.
                await asyncio.wait({refilling}, timeout=max(0.2, 4 * config.refill_poll))
                if not self.running and refilling.done():
                    break
        finally:
            await self.wind_down(helpers, writing)

    def fail_overdelivered(self) -> None:
        self.deliverable(self.claimed)

    def deliverable(self, requests: Sequence[ClaimedRequest]) -> list[ClaimedRequest]:
        """Those of ``requests`` to run; the ones delivered too often end failed here."""
        config = self.config
        to_run = []
        for request in requests:
            if request.attempts > config.max_deliveries:
                error = ModelClientError(
                    f"gave up after {request.attempts - 1} deliveries that did not finish",
                    code="max_deliveries",
                )
                self.finish(failed_record(request.id, error, attempts=0))
            else:
                to_run.append(request)
        return to_run

    def finish(self, record: ResultRecord) -> None:
        report = self.report
        request = self.unfinished.pop(record.request_id, None)
        if record.status is RequestStatus.SUCCEEDED:
            report.succeeded += 1
            if record.cached:
                report.cached += 1
            else:
                report.billed_prompt_tokens += record.usage.prompt_tokens
                report.billed_completion_tokens += record.usage.completion_tokens
        else:
            report.failed += 1
        report.upstream_attempts += record.attempts
        self.writer.add(record, observe.recorded_request(request))
        if self.on_result is not None:
            self.on_result(record)

    def past_deadline(self) -> bool:
        config = self.config
        return (
            config.deadline_seconds is not None and time.monotonic() - self.started > config.deadline_seconds
        )

    async def stop_stopped_batches(self) -> None:
        statuses = await asyncio.to_thread(batch_statuses, self.engine, list(self.batch_tokens))
        for batch_id, status in statuses.items():
            if status in STOPPED_BATCH_STATUSES:
                self.batch_tokens[batch_id].cancel()

    def start(self, requests: Sequence[ClaimedRequest]) -> None:
        for request in requests:
            if request.batch_id not in self.batch_tokens:  # refilled from another batch
                self.batch_tokens[request.batch_id] = CancellationToken()
            self.unfinished[request.id] = request
            self.started_at[request.id] = time.monotonic()
            task = self.running[request.id] = asyncio.create_task(self.run_one(request))
            task.add_done_callback(functools.partial(self.settled, request.id))

    def settled(self, request_id: str, task: asyncio.Task[None]) -> None:
        self.running.pop(request_id, None)
        self.started_at.pop(request_id, None)
        outcome = None if task.cancelled() else task.exception()
        if outcome is not None:
            _logger.error("request handler failed", exc_info=outcome)
        if not self.running:
            self.all_settled.set()

    async def run_one(self, request: ClaimedRequest) -> None:
        batch_token = self.batch_tokens.setdefault(request.batch_id, CancellationToken())
        await self.gate.acquire(self.tags.pop(request.id, 0.0))
        try:
            await self.run_admitted(request, batch_token)
        finally:
            self.gate.release()

    async def run_admitted(self, request: ClaimedRequest, batch_token: CancellationToken) -> None:
        if batch_token.is_cancelled():
            self.to_cancel.append(request.id)
            return
        # Its own token, fired by its batch's cancel or by the loss of its lease.
        token = self.request_tokens[request.id] = CancellationToken()
        batch_token.add_callback(token.cancel)
        observe.started(request)
        try:
            with observe.request_span(request):
                await self.run_claimed(request, token)
        finally:
            observe.ended(request)
            batch_token.remove_callback(token.cancel)
            self.request_tokens.pop(request.id, None)

    async def run_claimed(self, request: ClaimedRequest, token: CancellationToken) -> None:
        if self.past_deadline():
            return  # left in ``unfinished``: released in ``wind_down``
        handler = self.handlers.get(request.kind)
        if handler is None:
            error = ModelClientError(f"this worker has no handler for {request.kind.value} requests")
            self.finish(failed_record(request.id, error, attempts=0))
            return
        # This task's own context: the budget applies to this request's calls only.
        RATE_LIMIT_DEADLINE.set(request.retry_deadline)
        try:
            record = await handler(request, self.pipeline, token)
        except RequestCancelled as cancelled:
            self.to_cancel.append(request.id)
            if cancelled.spent is not None:
                self.cancelled_spend.append(cancelled.spent)
            return
        except RetryLater as later:
            await self.hand_back(request, later)
            return
        except Exception:
            # A handler that broke (its rate limiter out of reach, a bug) does not keep its
            # request leased, idle, until the chunk ends (minutes, behind a slow call): back
            # in line now, as a delivery that did not finish (max_deliveries ends a request
            # that always breaks).
            _logger.exception("the handler of request %s failed; it goes back in line", request.id)
            self.report.released += await asyncio.to_thread(
                release_requests, self.engine, [request.id], self.config.owner
            )
            self.unfinished.pop(request.id, None)
            return
        if request.handed_back_attempts:
            record = dataclasses.replace(record, attempts=record.attempts + request.handed_back_attempts)
        self.finish(record)

    async def hand_back(self, request: ClaimedRequest, later: RetryLater) -> None:
        # Back in line for later; the slot serves other requests meanwhile.
        config = self.config
        request_id = request.id
        self.unfinished.pop(request_id, None)
        not_before, deadline = hand_back_times(later, config.rate_limit_retry_seconds, request.retry_deadline)
        released = await asyncio.to_thread(
            functools.partial(
                release_requests,
                self.engine,
                [request_id],
                config.owner,
                str(later),
                not_before,
                handed_back=True,
                upstream_attempts=later.attempts,
                retry_deadline=deadline,
            )
        )
        self.report.handed_back += released
        spent = later.spent if isinstance(later, RequestHandedBack) else None
        if released and spent is not None:  # not when another worker holds it now: it bills them
            await asyncio.to_thread(record_handed_back_spend, self.engine, [spent])

    def lose(self, lost: set[str]) -> None:
        """On the loop: another worker took these over. Ours stop as a cancel stops them: no
        more waits or retries, but a call already sent upstream runs to its end, because the
        provider bills that answer; its record then loses to the other worker's (first writer
        wins) and is billed as a discarded answer. Hanging up would lose a paid answer."""
        for request_id in lost:
            if self.unfinished.pop(request_id, None) is None:
                continue  # finished meanwhile: its result row ended the lease
            token = self.request_tokens.get(request_id)
            if token is not None:
                token.cancel()
            elif (task := self.running.get(request_id)) is not None:
                task.cancel()  # not started: nothing paid yet

    def leased(self) -> list[str]:
        # From the keeper's thread. ``list(dict)`` copies in C without letting the loop's
        # thread run, so it never sees the dict change size.
        running_ids = [request_id for request_id in list(self.unfinished) if request_id not in self.overdue]
        return running_ids + self.writer.unwritten_ids()

    async def give_up_overdue(self) -> None:
        config = self.config
        assert config.max_request_seconds is not None
        while True:
            await asyncio.sleep(max(1.0, config.lease_seconds / 3))
            # A request running this long is stuck, not slow: its lease is left to expire
            # (the sweeper gives it to another worker; first writer wins) and it is cancelled.
            too_old = time.monotonic() - config.max_request_seconds
            for request_id in [i for i, t in self.started_at.items() if t < too_old and i in self.unfinished]:
                self.started_at.pop(request_id)
                self.overdue.add(request_id)
                _logger.error(
                    "request %s ran over %.0f s: given up here", request_id, config.max_request_seconds
                )
                task = self.running.get(request_id)
                if task is not None:
                    task.cancel()

    async def watch_batches(self) -> None:
        while True:
            await asyncio.sleep(self.config.cancel_check_interval)
            # A long refilling chunk meets many batches (every single call is one): watch only
            # those it still runs requests of.
            current = {request.batch_id for request in list(self.unfinished.values())}
            for batch_id in [b for b in self.batch_tokens if b not in current]:
                del self.batch_tokens[batch_id]
            await self.stop_stopped_batches()

    def refilling_allowed(self) -> bool:
        if self.past_deadline():
            return False
        window_end = self.started + self.config.refill_seconds
        if time.monotonic() < window_end:
            return True
        # Past the window the chunk drains; while a request started within it still runs (a slow
        # upstream call), the slots it does not use are filled all the same: they never idle
        # behind it.
        return any(started < window_end for started in list(self.started_at.values()))

    async def refill(self) -> None:
        config = self.config
        wait = config.refill_poll
        while self.refilling_allowed():
            await asyncio.sleep(wait)
            # A window in flight and up to one more claimed behind it, so that a slot that frees
            # starts the next request at once rather than after a poll and a claim. Claimed as
            # soon as there is room, however little: a tenant that just arrived is claimed within
            # a poll and let in first (``FairGate``), not after half a window of completions.
            room = 2 * config.in_flight - len(self.running)
            if self.lane_busy is not None:
                window = self.lane_busy.window(config.in_flight)
                if window < config.in_flight:  # single calls waiting: the batch gives way, and
                    room = window - len(self.running)  # claims nothing ahead (the share is what runs)
            if room < 1:
                wait = config.refill_poll
                continue
            more = await asyncio.to_thread(self.claim_fairly, room)
            if more:
                observe.claimed(more)
                self.report.claimed += len(more)
                self.start(self.deliverable(more))
                wait = config.refill_poll
            elif not self.running:
                return  # nothing waits anywhere and nothing of ours runs: the chunk ends
            else:
                # Nothing waits now: ask less often while the requests of ours still run.
                wait = min(MAX_IDLE_REFILL_POLL, 2 * wait)

    def claim_fairly(self, free: int) -> list[ClaimedRequest]:
        """Claim up to ``free`` requests of the tenants with work waiting, shared by their weights
        (``workers.fair_share``); a tenant with less waiting than its share leaves the rest of
        the slots to the others. Off the loop (the claims are SQL)."""
        config = self.config
        fair = self.fair_share
        queues = {queue.tenant_id: queue for queue in tenant_queues(self.engine)}
        claimed: list[ClaimedRequest] = []
        while free > 0 and queues:
            shares = fair.shares({tenant_id: queue.weight for tenant_id, queue in queues.items()}, free)
            for tenant_id, share in shares.items():
                queue = queues[tenant_id]
                got = claim_in_order(self.engine, queue.batch_ids, config.owner, config.lease_seconds, share)
                self.tags.update(zip((r.id for r in got), fair.charge(tenant_id, len(got)), strict=True))
                claimed += got
                free -= len(got)
                if len(got) < share:
                    del queues[tenant_id]  # nothing more of theirs waits
        return claimed

    async def wind_down(self, helpers: list[asyncio.Task[None]], writing: asyncio.Task[None]) -> None:
        """Stop the helpers, write the last results, then settle what did not finish here."""
        for helper in helpers:
            helper.cancel()
        self.writer.stop()
        await asyncio.gather(*helpers, writing, return_exceptions=True)
        try:
            try:
                await self.writer.flush()  # raises what kept results from the ledger
            finally:
                # Not before: the results in that last write keep their leases while it lasts.
                await asyncio.to_thread(self.keeper.stop)
        finally:
            await self.settle_unfinished()

    async def settle_unfinished(self) -> None:
        config = self.config
        for request_id in self.to_cancel:
            self.unfinished.pop(request_id, None)
        if self.to_cancel:
            self.report.cancelled = await asyncio.to_thread(
                cancel_claimed, self.engine, self.to_cancel, config.owner
            )
        if self.cancelled_spend:
            # After the cancel: only a request that ended cancelled bills them this way.
            await asyncio.to_thread(record_cancelled_spend, self.engine, self.cancelled_spend)
        if self.unfinished:
            # Not started (deadline) or broken by a bug: hand back for another delivery.
            self.report.released = await asyncio.to_thread(
                release_requests, self.engine, list(self.unfinished), config.owner
            )
