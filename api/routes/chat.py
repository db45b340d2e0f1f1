"""``POST /v1/chat/completions``: OpenAI-compatible, served by the workers' interactive lane.

The call is one request row (``store.interactive``: a hidden batch of its own, no files, never
listed), committed before its id goes on the lane's queue ("ledger first", docs/design.md). A
worker's lane (``workers.lane``) runs it through the same cache, limits, retries and ledger as a
batch line and pushes the outcome here through Redis (``workers.lane_transport``) once the ledger
holds it; with ``stream: true`` each chunk is relayed as the provider sends it. The ledger stays
the truth: when no answer comes (the message was lost, the sweeper ran the request elsewhere), it
is read there. Cache hits say so: ``tokenmill-cache: hit`` and the body's (or the last chunk's)
``tokenmill`` object.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import orjson
import redis.asyncio as aioredis
from fastapi import APIRouter, Header, Request
from fastapi.responses import Response, StreamingResponse
from redis.exceptions import RedisError
from sqlalchemy.engine import Engine
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

import store
from api.deps import (
    EngineDep,
    SettingsDep,
    bearer_key,
    declares_a_small_body,
    raise_unknown_key,
    tenant_of_key,
)
from api.errors import (
    BOUND_TO_HEADER,
    APIError,
    InvalidRequest,
    RateLimitExceeded,
    ServiceUnavailable,
    UpstreamFailed,
    api_error_response,
    database_unavailable,
    over_quota,
)
from api.routes.single_request import json_object_body
from config import Settings
from models.openai.results import NON_TEXT_PARTS, RESPONSE_INVALID, RESPONSE_TOO_LARGE, USAGE_INVALID
from store.engine import again_if_disconnected
from store.ids import new_id
from store.interactive import (
    InteractiveOutcome,
    InteractiveRequest,
    KeyedSubmission,
    interactive_outcome,
    lease_lapsed,
    submit_interactive_for_key,
)
from store.log_redaction import redacted_error_text
from store.results import UNRECORDABLE
from telemetry import tracing
from workers.lane_transport import LaneMessage, LaneTransport, StreamEntry, lane_dispatch_id

__all__ = ["CHAT_COMPLETIONS_PATH", "ChatCompletionsFastPath", "router"]

logger = logging.getLogger("tokenmill.api")
router = APIRouter(tags=["chat"])
SYNC_METADATA = {"tokenmill_source": "chat.completions"}
CACHE_HEADER = "tokenmill-cache"
# How long one wait on Redis lasts before the ledger (and the client's connection) is looked at.
_WAIT_SLICE_SECONDS = 1.0
WORKER_LOST = "worker_lost"


def _transport(request: Request, settings: Settings) -> LaneTransport:
    """This API process's lane transport (one connection pool to the broker)."""
    state = request.app.state
    transport: LaneTransport | None = getattr(state, "lane_transport", None)
    if transport is None:
        if settings.broker_url is None:
            raise ServiceUnavailable("no workers: TOKENMILL_BROKER_URL is not set", code="broker_unavailable")
        client = aioredis.Redis.from_url(settings.broker_url, socket_connect_timeout=5)
        transport = state.lane_transport = LaneTransport(client, settings.key_prefix)
    return transport


# The provider's refusal of tokenmill's own credentials (store.UPSTREAM_AUTHENTICATION_FAILED):
# relayed as such it would read as "your key is invalid" (a 401 raises AuthenticationError in
# OpenAI's SDK), so it is a 502 naming the provider.


def _upstream_refused(outcome: InteractiveOutcome) -> UpstreamFailed | None:
    """The 502 for a call the provider refused on tokenmill's credentials (401/403), else None."""
    if outcome.status_code not in store.UPSTREAM_AUTHENTICATION_STATUSES:
        return None
    message = outcome.error_message or "the request was refused"
    refused = UpstreamFailed(
        f"the model provider refused tokenmill's credentials (HTTP {outcome.status_code}); your API key "
        f"is not in question, the operator's access to the provider is: {message}",
        code=store.UPSTREAM_AUTHENTICATION_FAILED,
    )
    refused.final = True  # until the operator mends the credentials, every retry is refused too
    return refused


# The provider's 429 for the operator's account out of credit (models.errors.QuotaExceeded):
# billing, not load, and not the caller's quota: a 502 naming the provider, as a refusal of
# tokenmill's credentials is, never the caller's own 429.
_PROVIDER_OUT_OF_CREDIT = "insufficient_quota"
_FINAL_FAILURES = frozenset(
    {RESPONSE_INVALID, RESPONSE_TOO_LARGE, USAGE_INVALID, UNRECORDABLE, _PROVIDER_OUT_OF_CREDIT}
)


def _error_for(outcome: InteractiveOutcome) -> APIError:
    error = _error_of(outcome)
    error.request_id = outcome.request_id
    return error


def _error_of(outcome: InteractiveOutcome) -> APIError:
    status_code = outcome.status_code or 0
    message = outcome.error_message or "the request failed"
    refused = _upstream_refused(outcome)
    if refused is not None:
        return refused
    if status_code == 429 and outcome.error_code != _PROVIDER_OUT_OF_CREDIT:
        # The provider's refusal for load, past the call's retry budget: as the provider said it,
        # with its Retry-After, so that a client's retries wait as the provider asked rather than
        # come back in half a second, each to spend another budget of a worker's retries.
        limited = RateLimitExceeded(message, code=outcome.error_code)
        limited.retry_after = outcome.retry_after
        return limited
    if 400 <= status_code < 500 and status_code != 429:
        failure = APIError(message, param=outcome.error_param, code=outcome.error_code)
        failure.status_code = status_code
        failure.type = "invalid_request_error"
        return failure
    failed = UpstreamFailed(f"the model provider failed: {message}", code=outcome.error_code)
    # An answer the provider billed but that cannot be read or recorded: asked again, it is paid
    # again. The operator's provider account out of credit: refused again until the operator pays.
    failed.final = outcome.error_code in _FINAL_FAILURES
    if not failed.final:
        # The provider's Retry-After (a 503 "overloaded"): a client's retries wait as it asked,
        # as they would called directly, rather than after the SDK's half-second backoff.
        failed.retry_after = outcome.retry_after
    return failed


def _succeeded(outcome: InteractiveOutcome) -> bool:
    return (
        outcome.status is store.RequestStatus.SUCCEEDED and outcome.status_code == 200 and bool(outcome.body)
    )


def _headers(outcome_id: str, cached: bool) -> dict[str, str]:
    return {"x-request-id": outcome_id, CACHE_HEADER: "hit" if cached else "miss"}


def _stream_headers(outcome_id: str, cached: bool) -> dict[str, str]:
    """A stream is bound to its call from its first byte: a client gone mid-stream leaves the
    call running (and billed), so its Idempotency-Key must not be freed for a rerun
    (``api.idempotency`` keeps a bound 503 in its place)."""
    return {**_headers(outcome_id, cached), BOUND_TO_HEADER: outcome_id}


def _authenticated_submit(engine: Engine, key: str, body: dict[str, Any], request_id: str) -> KeyedSubmission:
    """The key's tenant and its call's rows: one thread hop for both (each hop costs the event
    loop a thread wake-up and a GIL hand-over, which at 16 concurrent calls was a millisecond of
    the loop's time apiece: py-spy, bench/sync_latency.py), and one statement for a tenant
    without a quota (``store.submit_interactive_for_key``)."""
    keyed = submit_interactive_for_key(
        engine,
        key,
        body,
        endpoint="/v1/chat/completions",
        dispatch_id=lane_dispatch_id(request_id),
        metadata=SYNC_METADATA,
        request_id=request_id,
    )
    if keyed is None:
        raise_unknown_key()
    return keyed


class _NotWaited:
    """No wait for the reply was made yet (``_submit`` without ``wait_seconds``)."""


_NOT_WAITED = _NotWaited()
FirstReply = dict[str, Any] | None | _NotWaited


async def _submit(
    request: Request,
    engine: Engine,
    transport: LaneTransport,
    key: str,
    body: dict[str, Any],
    stream: bool,
    wait_seconds: float | None = None,
) -> tuple[InteractiveRequest, FirstReply]:
    """The call's rows, then its lane message; with ``wait_seconds``, the message and the first
    wait for its reply in one round trip to the broker (the reply, or None: none came)."""
    request_id = new_id("batch_req_")
    try:
        keyed = await run_in_threadpool(_authenticated_submit, engine, key, body, request_id)
    except store.InvalidArgument as e:
        raise InvalidRequest(str(e), param=e.param, code=e.code) from e
    except store.QuotaExceeded as e:
        raise over_quota(e) from e
    tenant_id, weight, submitted = keyed.tenant_id, keyed.weight, keyed.submitted
    reply: FirstReply = _NOT_WAITED
    try:
        message = LaneMessage(request_id, stream, tracing.current_traceparent())
        # The tenant's weight travels with its calls: the lanes share their slots by it.
        if wait_seconds is None:
            await transport.send(message, tenant_id, weight)
        else:
            reply = await transport.send_and_wait_reply(message, tenant_id, weight, wait_seconds)
    except (RedisError, OSError) as e:
        # Its answer carries no id to come back for: cancel it, so that nothing runs (and nothing
        # is billed) on the strength of a 503 that tells the client to retry.
        batch = await _cancel_or_bind(engine, submitted, "could not reach the workers' broker")
        if batch.status == store.BatchStatus.CANCELLED:
            raise ServiceUnavailable(
                "could not reach the workers' broker; nothing was run, retry later", code="broker_unavailable"
            ) from e
        reply = _NOT_WAITED  # sent after all, and taken: its outcome comes as any call's
    return submitted, reply


async def _cancel_or_bind(engine: Engine, submitted: InteractiveRequest, why: str) -> store.Batch:
    """Cancel a submitted call; a ``ServiceUnavailable`` bound to it when the ledger is out of
    reach: not cancelled, it may be (or be sent by the sweeper) with the provider, and billed, so
    that a retry with the same Idempotency-Key replays this rather than pays again."""
    try:
        return await run_in_threadpool(store.cancel_batch, engine, submitted.batch_id)
    except Exception as error:
        if database_unavailable(error) is None:
            raise
        raise ServiceUnavailable(
            f"{why}, and the ledger is out of reach: request {submitted.request_id} may be sent to the "
            "model provider, and is then billed",
            code="database_unavailable",
            bound_to=submitted.batch_id,
        ) from error


async def _cancel_after_timeout(
    engine: Engine, submitted: InteractiveRequest, seconds: float
) -> InteractiveOutcome:
    """Cancel a call not answered in time. Raises ``ServiceUnavailable``: freeing the
    Idempotency-Key when nothing ran, bound to the call when one already upstream goes on (and is
    billed), so that a retry replays this answer rather than paying again. Returns the outcome
    when the call ended by itself meanwhile."""
    batch = await _cancel_or_bind(engine, submitted, f"no result within {seconds:.0f} s")
    if batch.status == store.BatchStatus.CANCELLED:
        outcome = await run_in_threadpool(interactive_outcome, engine, submitted.request_id)
        if outcome is not None and outcome.status is not store.RequestStatus.CANCELLED:
            return outcome
        raise ServiceUnavailable(
            f"no result within {seconds:.0f} s; the request was cancelled before it ran", code="timeout"
        )
    outcome = await run_in_threadpool(interactive_outcome, engine, submitted.request_id)
    if outcome is None:
        raise ServiceUnavailable(
            f"no result within {seconds:.0f} s; request {submitted.request_id} is cancelled, but its call "
            "already sent to the model provider finishes and is billed",
            code="timeout",
            bound_to=submitted.batch_id,
        )
    return outcome


async def _outcome_while_running(engine: Engine, request_id: str) -> InteractiveOutcome | None:
    """The ledger's outcome of a call sent to the lane; None while it runs, and while the ledger
    is out of reach (a restart, a failover): the call goes on meanwhile, with the provider and
    billed, so the wait goes on too, and its worker's reply or a later read tells how it ended (an
    error here freed the caller's Idempotency-Key, and its retry paid again). A read whose
    connection died under it goes once more at once."""
    try:
        return await run_in_threadpool(again_if_disconnected, interactive_outcome, engine, request_id)
    except Exception as error:
        if database_unavailable(error) is None:
            raise
        logger.warning(
            "the ledger is out of reach while request %s runs: %s", request_id, redacted_error_text(error)
        )
        return None


async def _wait(
    request: Request,
    engine: Engine,
    transport: LaneTransport,
    request_id: str,
    deadline: float,
    reply: FirstReply = _NOT_WAITED,
) -> InteractiveOutcome | None:
    """The call's outcome as pushed by its worker, or read from the ledger; None when the
    ``deadline`` (``time.monotonic()``) passes or the client goes away first. ``reply``: what a
    first wait already brought (``_submit``)."""
    while True:
        if isinstance(reply, _NotWaited):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                reply = await transport.wait_reply(request_id, min(_WAIT_SLICE_SECONDS, remaining))
            except (RedisError, OSError):
                reply = None  # the ledger below says what happened
        if reply is not None and not reply.get("ledger"):
            return InteractiveOutcome.from_json(reply)
        outcome = await _outcome_while_running(engine, request_id)
        if outcome is not None:
            return outcome
        if await request.is_disconnected():
            return None
        reply = _NOT_WAITED


CHAT_COMPLETIONS_PATH = "/v1/chat/completions"


@router.post(CHAT_COMPLETIONS_PATH, response_model=None)
async def chat_completions(
    request: Request,
    engine: EngineDep,
    settings: SettingsDep,
    authorization: Annotated[str | None, Header()] = None,
) -> Response:
    """A chat completion, exactly as OpenAI's endpoint takes and answers it."""
    # Served by ChatCompletionsFastPath before the routing; this route describes it in the OpenAPI
    # schema, and serves it under FastAPI's own request telemetry.
    return await _serve(request, engine, settings, authorization)


class ChatCompletionsFastPath:
    """ASGI middleware, innermost of the app's own: ``POST /v1/chat/completions`` goes to its
    handler straight, past FastAPI's routing, dependency solving and exception middleware (at 16
    concurrent calls they were a tenth of the API's CPU, with a thread hop per plain-function
    dependency: py-spy, bench/sync_latency.py). The middlewares outside it apply as on every route:
    the body size limit, Idempotency-Key, the 500 of an unexpected error; an ``APIError`` is
    answered here as ``api.errors`` answers it everywhere else. Under FastAPI's own request
    telemetry the call takes the routed way, so that its span names its route."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] != "POST"
            or scope["path"] != CHAT_COMPLETIONS_PATH
            or scope.get("fastapi.telemetry") is not None
        ):
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        state = request.app.state
        authorization = request.headers.get("authorization")
        response: Response
        try:
            response = await _serve(request, state.engine, state.settings, authorization)
        except APIError as e:
            response = api_error_response(e)
        except ClientDisconnect:
            # Gone before its body was read: nothing was queued, and nobody is left to answer.
            # Not an error of ours (any client could flood the error log with them).
            logger.debug("client disconnected before its chat completion body was read")
            return
        await response(scope, receive, send)


async def _serve(request: Request, engine: Engine, settings: Settings, authorization: str | None) -> Response:
    # The key is looked up with the call's submit, in one thread hop (_authenticated_submit); a
    # missing or malformed one is refused here, before the body is read, as on every route. A body
    # not declared small is read only once the key is known: a caller with no valid key made the
    # API read and parse up to a whole body's limit (1 MiB), or wait on a body that never ended.
    key = bearer_key(authorization)
    if not declares_a_small_body(request):
        await run_in_threadpool(tenant_of_key, engine, key)
    try:
        body = await json_object_body(request)
        stream, include_usage = _stream_options(body)
    except APIError:
        # An unknown key hears 401, not what is wrong with its body, as on every route.
        await run_in_threadpool(tenant_of_key, engine, key)
        raise
    # The root of the call's trace (telemetry.tracing); a stream's span ends at its first entry.
    with tracing.span("tokenmill chat.completions", {"gen_ai.operation.name": "chat"}) as span:
        return await _chat_completion(request, key, engine, settings, body, span, stream, include_usage)


def _stream_options(body: dict[str, Any]) -> tuple[bool, bool]:
    """Whether the caller streams, and asks for the usage chunk; both taken out of ``body``."""
    stream = body.pop("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):  # "false" is truthy: never guess which the caller meant
        raise InvalidRequest("'stream' must be true or false", param="stream", code="invalid_type")
    stream_options = body.pop("stream_options", None)
    include_usage = isinstance(stream_options, dict) and stream_options.get("include_usage") is True
    return stream, include_usage


async def _chat_completion(
    request: Request,
    key: str,
    engine: Engine,
    settings: Settings,
    body: dict[str, Any],
    span: Any,
    stream: bool,
    include_usage: bool,
) -> Response:
    body.setdefault("model", settings.default_model)
    transport = _transport(request, settings)
    seconds = settings.sync_timeout_seconds
    deadline = time.monotonic() + seconds
    first_wait = None if stream else min(_WAIT_SLICE_SECONDS, seconds)
    submitted, reply = await _submit(request, engine, transport, key, body, stream, first_wait)
    if span is not None:
        span.set_attribute("tokenmill.request_id", submitted.request_id)
    if stream:
        writer = _ChunkWriter(submitted.request_id, str(body["model"]), include_usage)
        return await _streamed(request, engine, transport, submitted, settings, writer)
    outcome = await _wait(request, engine, transport, submitted.request_id, deadline, reply)
    if outcome is None:
        outcome = await _cancel_after_timeout(engine, submitted, settings.sync_timeout_seconds)
    if not _succeeded(outcome):
        raise _error_for(outcome)
    assert outcome.body is not None
    return _CompletionResponse(outcome.body, headers=_headers(outcome.request_id, outcome.cached))


class _CompletionResponse(Response):
    """A completion as JSON, encoded by orjson (what Starlette's ``JSONResponse`` writes, faster)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        try:
            return orjson.dumps(content)
        except TypeError:  # an integer beyond 64 bits, a lone surrogate: as JSONResponse would
            return json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


# --- streaming -----------------------------------------------------------------------------------


def _sse(data: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(data)}\n\n".encode()


class _ChunkWriter:
    """``chat.completion.chunk`` events for one call: text deltas as they come, then the end (tool
    calls, finish reason and the ``tokenmill`` object), the usage chunk only when asked for."""

    def __init__(self, request_id: str, model: str, include_usage: bool) -> None:
        self.base = {
            "id": f"chatcmpl-{request_id}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
        }
        self.request_id = request_id
        self.include_usage = include_usage
        self.sent_text = ""
        self.started = False

    def _opening(self) -> bytes:
        """OpenAI's first chunk of an answer in text: the role, the content empty (clients yield it
        as a chunk of its own: LangChain's stream began one chunk short of the provider's)."""
        self.started = True
        delta = {"role": "assistant", "content": "", "refusal": None}
        return _sse({**self.base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})

    def text(self, text: str) -> bytes:
        opening = b"" if self.started else self._opening()
        self.sent_text += text
        delta = {"content": text}
        return opening + _sse({**self.base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})

    def end(self, outcome: InteractiveOutcome) -> list[bytes]:
        """The last events of a call that succeeded; the text the ledger holds beyond what was
        relayed (a call run elsewhere, whose chunks never came) is sent first."""
        # Every chunk of a stream names one model, as OpenAI's do: the one asked for, which the
        # relayed chunks named before the answer named its own (kept in its body, and a plain
        # call's). The end chunks used to name the answer's.
        completion = outcome.body or {}
        base = self.base
        if isinstance(completion.get("system_fingerprint"), str):
            # OpenAI's chunks carry it; known here, at the end: the relayed chunks went out
            # before it (clients keep the last chunk's, as LangChain's response_metadata does).
            base = {**base, "system_fingerprint": completion["system_fingerprint"]}
        events: list[bytes] = []
        choices = completion.get("choices") or [{}]
        if not self.started and isinstance((choices[0].get("message") or {}).get("content"), str):
            events.append(self._opening())  # a replayed answer in text opens as a relayed one
        for choice in choices:
            message = choice.get("message") or {}
            index = choice.get("index", 0)
            content = message.get("content")
            delta: dict[str, Any] = {} if self.started else {"role": "assistant"}
            if index == 0 and isinstance(content, str) and (content != self.sent_text or not self.started):
                # An empty answer is said too, as OpenAI's stream says it first (``content: ""``):
                # clients add the deltas up to the string a plain call's body holds.
                delta["content"] = content.removeprefix(self.sent_text)
            elif index != 0:
                delta = {"role": "assistant", "content": content}
            if message.get("refusal"):  # not relayed as it came: all of it here
                delta["refusal"] = message["refusal"]
            if message.get(NON_TEXT_PARTS):  # content parts that are no text: said once, at the end
                delta[NON_TEXT_PARTS] = message[NON_TEXT_PARTS]
            if message.get("tool_calls"):
                delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]
            self.started = True
            end = {"index": index, "delta": delta, "finish_reason": choice.get("finish_reason") or "stop"}
            if choice.get("logprobs"):
                # The relayed chunks carry text only: the logprobs the answer holds come here, at
                # its end (clients add up every chunk's).
                end["logprobs"] = choice["logprobs"]
            last = index == choices[-1].get("index", 0) if choices else True
            event: dict[str, Any] = {**base, "choices": [end]}
            if last:
                event["tokenmill"] = {"cached": outcome.cached, "request_id": self.request_id}
            events.append(_sse(event))
        if self.include_usage and completion.get("usage") is not None:
            events.append(_sse({**base, "choices": [], "usage": completion["usage"]}))
        events.append(b"data: [DONE]\n\n")
        return events

    def resumable(self, outcome: InteractiveOutcome) -> bool:
        """Whether the ledger's answer continues what was relayed (else the relay ends in error)."""
        choices = (outcome.body or {}).get("choices") or [{}]
        content = (choices[0].get("message") or {}).get("content")
        return not self.sent_text or (isinstance(content, str) and content.startswith(self.sent_text))


def _error_event(message: str, code: str) -> bytes:
    return _sse({"error": {"message": message, "type": "server_error", "param": None, "code": code}})


class _StreamRelay:
    """Reads a call's Redis stream; falls back on the ledger when it stays silent."""

    def __init__(
        self,
        request: Request,
        engine: Engine,
        transport: LaneTransport,
        submitted: InteractiveRequest,
        seconds: float,
    ) -> None:
        self.request = request
        self.engine = engine
        self.transport = transport
        self.submitted = submitted
        self.deadline = time.monotonic() + seconds
        self.seconds = seconds
        self.after = "0"

    async def next_entries(self) -> list[StreamEntry] | InteractiveOutcome | None:
        """The next entries; else the ledger's outcome (the stream will say nothing more); None
        when the wait is over (deadline, or the client gone)."""
        request_id = self.submitted.request_id
        while (remaining := self.deadline - time.monotonic()) > 0:
            try:
                block = int(1000 * min(_WAIT_SLICE_SECONDS, remaining)) or 1
                entries = await self.transport.read_stream(request_id, self.after, block)
            except (RedisError, OSError):
                entries = []
            if entries:
                self.after = entries[-1].entry_id
                return entries
            outcome = await _outcome_while_running(self.engine, request_id)
            if outcome is not None:
                # Ended in the ledger: whatever the stream still holds came before (ledger first).
                try:
                    entries = await self.transport.read_stream(request_id, self.after, 1)
                except (RedisError, OSError):
                    entries = []
                if entries:
                    self.after = entries[-1].entry_id
                    return entries
                return outcome
            try:
                lost = await run_in_threadpool(_lost, self.engine, self.submitted)
            except Exception as error:
                if database_unavailable(error) is None:
                    raise
                lost = False  # the ledger out of reach: asked again after the next slice
            if lost:
                return InteractiveOutcome(
                    request_id,
                    store.RequestStatus.CANCELLED,
                    None,
                    None,
                    WORKER_LOST,
                    "the worker running this request stopped mid-stream; the request was cancelled",
                    False,
                )
            if await self.request.is_disconnected():
                return None
        return None


def _lost(engine: Engine, submitted: InteractiveRequest) -> bool:
    """The call's worker died (its lease ran out unrenewed): cancel it, saying so in the ledger."""
    if not lease_lapsed(engine, submitted.request_id):
        return False
    batch = store.cancel_batch(
        engine, submitted.batch_id, error=f"{WORKER_LOST}: its worker stopped renewing its lease mid-stream"
    )
    return batch.status == store.BatchStatus.CANCELLED


async def _ended(engine: Engine, submitted: InteractiveRequest, reply: dict[str, Any]) -> InteractiveOutcome:
    """The outcome an end entry carries, or (``{"ledger": true}``) the ledger's: a read once more
    on a connection that died under it, and while the ledger is out of reach a 503 bound to the
    call, which ended and was billed (unbound, it freed the Idempotency-Key and a retry paid again)."""
    request_id = submitted.request_id
    if not reply.get("ledger"):
        return InteractiveOutcome.from_json(reply)
    try:
        outcome = await run_in_threadpool(again_if_disconnected, interactive_outcome, engine, request_id)
    except Exception as error:
        if database_unavailable(error) is None:
            raise
        raise ServiceUnavailable(
            f"request {request_id} ended, but the ledger that holds its outcome is out of reach",
            code="database_unavailable",
            bound_to=submitted.batch_id,
        ) from error
    if outcome is not None:
        return outcome
    return InteractiveOutcome(
        request_id,
        store.RequestStatus.FAILED,
        None,
        None,
        "request_failed",
        "the request ended unanswered",
        False,
    )


async def _streamed(
    request: Request,
    engine: Engine,
    transport: LaneTransport,
    submitted: InteractiveRequest,
    settings: Settings,
    writer: _ChunkWriter,
) -> Response:
    """Waits for the first entry before answering: a call that fails before its first chunk is
    an HTTP error, as OpenAI answers it; the header says whether the answer is a cache hit."""
    relay = _StreamRelay(request, engine, transport, submitted, settings.sync_timeout_seconds)
    first = await relay.next_entries()
    if first is None:
        first = await _cancel_after_timeout(engine, submitted, settings.sync_timeout_seconds)
    if isinstance(first, list) and first[0].outcome is not None:
        first = await _ended(engine, submitted, first[0].outcome)
    if isinstance(first, InteractiveOutcome):
        if not _succeeded(first):
            raise _error_for(first)
        return StreamingResponse(
            _replay(writer, first),
            media_type="text/event-stream",
            headers=_stream_headers(first.request_id, first.cached),
        )
    return StreamingResponse(
        _relay(writer, relay, first),
        media_type="text/event-stream",
        headers=_stream_headers(submitted.request_id, bool(first[0].cached)),
    )


async def _replay(writer: _ChunkWriter, outcome: InteractiveOutcome) -> AsyncIterator[bytes]:
    for event in writer.end(outcome):
        yield event


async def _relay(writer: _ChunkWriter, relay: _StreamRelay, first: list[StreamEntry]) -> AsyncIterator[bytes]:
    """Relays entries until the call's end, then ends the stream: in full, or with an error event."""
    entries: list[StreamEntry] | InteractiveOutcome | None = first
    outcome: InteractiveOutcome | None = None
    while outcome is None:
        if entries is None:
            # The wait is over (or the client went away): cancelled as a plain call would be.
            try:
                outcome = await _cancel_after_timeout(relay.engine, relay.submitted, relay.seconds)
            except ServiceUnavailable as e:
                yield _error_event(e.message, e.code or "timeout")
                return
        elif isinstance(entries, InteractiveOutcome):
            outcome = entries
        else:
            for entry in entries:
                if entry.text is not None:
                    yield writer.text(entry.text)
                if entry.outcome is not None:
                    outcome = await _ended(relay.engine, relay.submitted, entry.outcome)
            if outcome is None:
                entries = await relay.next_entries()
    if _succeeded(outcome) and writer.resumable(outcome):
        for event in writer.end(outcome):
            yield event
    elif _succeeded(outcome):
        message = f"the stream was interrupted; request {outcome.request_id} was answered in full elsewhere"
        yield _error_event(message, "stream_interrupted")
    elif (refused := _upstream_refused(outcome)) is not None:
        yield _error_event(refused.message, refused.code or store.UPSTREAM_AUTHENTICATION_FAILED)
    else:
        yield _error_event(outcome.error_message or "the request failed", outcome.error_code or "failed")
