"""Chat-completion clients for OpenAI, Azure OpenAI, Gemini and any OpenAI-compatible server.

One ``create`` is one upstream attempt (the SDK's own retries are off) unless the client was given
a ``retry_policy``.

``create`` POSTs over the clients' own aiohttp transport (``models.openai.transport``): the URL
and the headers an upstream acts on that the SDK sends (auth, organization, project,
``default_headers``, its ``User-Agent``; Azure's deployment URL, ``api-version`` and ``api-key`` or
AD token), but not the SDK's ``X-Stainless-*`` telemetry headers; the body serialized with orjson
(with the SDK's own encoder for what orjson refuses: ints beyond 64 bits, pydantic objects), the
reply read with orjson (the stdlib for what orjson refuses: NaN, Infinity, lone surrogate escapes)
into the dict kept as ``raw_response``, every failure mapped by the same functions as the SDK's
(``models.openai.errors``). The SDK's request building and response handling were 41% of a
worker's CPU per request (``bench/throughput.py``).

``create_stream``, and ``create`` when an ``http_client`` is given or the environment's proxy for
the client's URL is not an ``http://`` one (aiohttp cannot speak TLS to an ``https://`` proxy), go
through the SDK's ``AsyncOpenAI``, made lazily inside the running event loop and remade when the
loop changes (an async HTTP client must not cross loops; a worker process keeps one loop, but
embedded runs and tests may use several), on its aiohttp transport (``DefaultAioHttpClient``)
unless that ``http_client`` is given. Proxies from the environment (``HTTP_PROXY``,
``HTTPS_PROXY``, ``ALL_PROXY``, lower or upper case, and ``NO_PROXY``) are chosen for the client's
URL by ``httpx2``'s rules on both paths, as with the SDK's default client.

When ``AsyncCompletions.create`` is no longer the SDK's own function (a test suite written for
AutoGen's clients stubbed it with ``monkeypatch.setattr``), both calls go through the SDK client's
``chat.completions.create`` instead, so the stub answers: its ``ChatCompletion`` (or chunks) are
read as the JSON the provider would have sent, its exceptions mapped as the SDK's are.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import time
from abc import abstractmethod
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import urlencode, urlsplit

import httpx
import httpx2
import openai
import orjson
from openai import AsyncAzureOpenAI, AsyncOpenAI, AsyncStream, DefaultAioHttpClient
from openai._base_client import make_request_options
from openai._constants import RAW_RESPONSE_HEADER
from openai._utils._json import openapi_dumps
from openai.resources.chat.completions import AsyncCompletions
from pydantic import BaseModel

from models.base import ChatCompletionClient
from models.cancellation import CancellationToken
from models.errors import (
    AuthenticationFailed,
    BadRequest,
    InvalidProviderResponse,
    ModelClientError,
    ProviderTimeout,
    StreamInterrupted,
)
from models.events import LLMCall, LLMStreamEnd, LLMStreamStart, emit, event_logger
from models.openai.errors import from_openai_error
from models.openai.messages import to_openai_messages, to_openai_tool_choice, to_openai_tools
from models.openai.model_info import resolve_model_info
from models.openai.response_format import ResponseFormat, as_response_format, resolve_response_format
from models.openai.results import (
    StreamAccumulator,
    oversized_answer,
    result_from_completion,
    unreadable_answer,
)
from models.openai.transport import MAX_ANSWER_BYTES, SDK_USER_AGENT, ChatTransport
from models.retry import RetryPolicy
from models.tokens import estimate_tokens
from models.types import (
    CreateResult,
    Image,
    LLMMessage,
    ModelInfo,
    RequestUsage,
    Tool,
    ToolChoice,
    ToolSchema,
    UserMessage,
)

__all__ = [
    "GEMINI_BASE_URL",
    "AzureOpenAIChatCompletionClient",
    "BaseOpenAIChatCompletionClient",
    "OpenAIChatCompletionClient",
]

T = TypeVar("T")

GEMINI_BASE_URL = "https://generativelanguage.googleapis.com/v1beta/openai/"
OPENAI_BASE_URL = "https://api.openai.com/v1"
_CHAT_PATH = "/chat/completions"
_TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (openai.OpenAIError, httpx2.HTTPError, httpx.HTTPError)
_STREAM_ERRORS: tuple[type[BaseException], ...] = (
    *_TRANSPORT_ERRORS,
    TimeoutError,
)  # TimeoutError: the stream's deadline passed
_INFO = logging.INFO

# The SDK's own ``AsyncCompletions.create``, as imported. Test suites written for AutoGen's clients
# (and their users') stub the provider by replacing it on the class; when it is not this function
# any more, calls go through the SDK client's ``chat.completions.create`` so the stub answers
# instead of the network. One identity check per call when nothing is patched.
_SDK_CREATE = AsyncCompletions.create
_SDK_CREATE_PARAMETERS = frozenset(inspect.signature(_SDK_CREATE).parameters) - {
    "self",
    "extra_headers",
    "extra_query",
    "extra_body",
    "timeout",
}


def _normalize_url(url: str) -> str:
    parts = urlsplit(url.strip())
    path = parts.path.rstrip("/")
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}{path}"


def _host_of(url: str) -> str | None:
    return urlsplit(url).hostname


def _json_ready(value: Any) -> Any:
    """A create arg as plain JSON (pydantic classes as their response_format schema)."""
    if isinstance(value, type) and issubclass(value, BaseModel):
        return as_response_format(value)
    return value


def _sdk_create_kwargs(body: Mapping[str, Any]) -> dict[str, Any]:
    """The body as ``chat.completions.create`` keyword arguments: the parameters its signature
    names, the rest (provider extensions) in ``extra_body``."""
    kwargs: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, value in body.items():
        (kwargs if key in _SDK_CREATE_PARAMETERS else extra)[key] = value
    if extra:
        kwargs["extra_body"] = extra
    return kwargs


def _as_dict(value: Any) -> Any:
    """An SDK model (what a stub of ``AsyncCompletions.create`` returns) as the JSON dict the
    provider would have sent; anything else as it is."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    return value


class _AnswerTooLarge(Exception):
    """A streamed answer's decoded bytes passed the bound (``_bound_decoded_body``)."""


def _bound_decoded_body(response: httpx2.Response, limit: int) -> None:
    """Make ``response``'s decoded bytes, which the SDK's stream reads its events from, raise
    ``_AnswerTooLarge`` once past ``limit``: counted as they arrive, not per event (one event
    that never ends is read whole before it is yielded) and decoded (a gzipped stream's bytes on
    the wire say nothing of what it inflates to)."""
    decoded_bytes = response.aiter_bytes

    async def bounded(chunk_size: int | None = None) -> AsyncGenerator[bytes, None]:
        read = 0
        async for piece in decoded_bytes(chunk_size):
            read += len(piece)
            if read > limit:
                raise _AnswerTooLarge
            yield piece

    response.aiter_bytes = bounded  # type: ignore[method-assign]


async def _close_stream(stream: Any) -> None:
    if isinstance(stream, AsyncStream):
        await stream.close()
        return
    aclose = getattr(stream, "aclose", None)  # a stub's async generator
    if aclose is not None:
        await aclose()


async def _cancellable(awaitable: Awaitable[T], token: CancellationToken | None) -> T:
    if token is None:
        return await awaitable
    if token.is_cancelled():
        if asyncio.iscoroutine(awaitable):
            awaitable.close()
        raise asyncio.CancelledError("cancelled by its cancellation token")
    future = asyncio.ensure_future(awaitable)
    token.link_future(future)
    return await future


class BaseOpenAIChatCompletionClient(ChatCompletionClient):
    """What the OpenAI-protocol clients share; subclasses say how to build the SDK client."""

    provider: str = "openai"
    _timeout: float | None = None  # one call's, the subclass's

    def __init__(
        self,
        *,
        model: str,
        base_url: str,
        model_info: ModelInfo | None,
        response_format: ResponseFormat | None,
        include_name_in_message: bool,
        retry_policy: RetryPolicy | None,
        create_args: Mapping[str, Any],
        http_client: httpx2.AsyncClient | None = None,
        identity_extra: Mapping[str, Any] | None = None,
    ) -> None:
        if "model" in create_args:
            raise ValueError("model is the client's own argument, not a create argument")
        self._model = model
        self._base_url = base_url
        self._endpoint = _host_of(base_url)
        self._model_info = resolve_model_info(model, model_info)
        self._response_format = as_response_format(response_format) if response_format is not None else None
        self._include_name = include_name_in_message
        self._retry_policy = retry_policy
        self._create_args = {
            key: _json_ready(value) for key, value in create_args.items() if value is not None
        }
        self._options = make_request_options(security={"bearer_auth": True})
        # The SDK's way for a plain answer: its body left unread by the SDK, for ``_post`` to read
        # within the bound.
        self._unread_options = make_request_options(
            security={"bearer_auth": True}, extra_headers={RAW_RESPONSE_HEADER: "stream"}
        )
        self._given_http_client = http_client
        self._sdk_client: AsyncOpenAI | None = None
        self._sdk_loop: asyncio.AbstractEventLoop | None = None
        self._transport: ChatTransport | None = None
        self._usage = RequestUsage()
        default_args = dict(self._create_args)
        if self._response_format is not None:
            default_args["response_format"] = self._response_format
        self._cache_identity: dict[str, Any] = {
            "provider": self.provider,
            "base_url": _normalize_url(base_url),
            "model": model,
            **(identity_extra or {}),
            "create_args": default_args,
        }

    # --- the SDK client, one per event loop ------------------------------------------------

    @abstractmethod
    def _make_sdk_client(self) -> AsyncOpenAI:
        """A new SDK client with the SDK's retries off; called once per event loop."""

    def _http_client_for_loop(self) -> httpx2.AsyncClient:
        """The caller's ``http_client``, else a new aiohttp-backed one for this loop (the SDK
        closes it with itself)."""
        return self._given_http_client or DefaultAioHttpClient()

    def _sdk(self) -> AsyncOpenAI:
        loop = asyncio.get_running_loop()
        if self._sdk_client is None or self._sdk_loop is not loop:
            self._sdk_client = self._make_sdk_client()
            self._sdk_loop = loop
        return self._sdk_client

    @abstractmethod
    def _make_transport(self) -> ChatTransport:
        """The transport ``create`` POSTs with when no ``http_client`` was given: the SDK's URL and
        headers for this client (less its ``X-Stainless-*`` telemetry)."""

    def _direct(self) -> ChatTransport | None:
        """The own transport, or None when the caller's ``http_client`` must carry the call."""
        if self._given_http_client is not None:
            return None
        if self._transport is None:
            self._transport = self._make_transport()
        # A proxy aiohttp cannot speak to (https://, socks5://) goes by the SDK's client, as
        # streams do, rather than around the proxy.
        return self._transport if self._transport.carries_its_proxy else None

    async def close(self) -> None:
        if self._transport is not None:
            await self._transport.close()
        client, self._sdk_client = self._sdk_client, None
        loop, self._sdk_loop = self._sdk_loop, None
        if client is not None and loop is asyncio.get_running_loop():
            await client.close()

    # --- request building --------------------------------------------------------------------

    def _check_capabilities(
        self,
        messages: Sequence[LLMMessage],
        tools: Sequence[Tool | ToolSchema],
        json_output: bool | type[BaseModel] | None,
    ) -> None:
        info = self._model_info
        if tools and not info.get("function_calling", True):
            raise BadRequest(f"model {self._model} does not support function calling", model=self._model)
        if json_output and not info.get("json_output", True):
            raise BadRequest(f"model {self._model} does not support JSON output", model=self._model)
        if not info.get("vision", True):
            for message in messages:
                if (
                    isinstance(message, UserMessage)
                    and not isinstance(message.content, str)
                    and any(isinstance(part, Image) for part in message.content)
                ):
                    raise BadRequest(f"model {self._model} does not accept images", model=self._model)

    def _build_body(
        self,
        messages: Sequence[LLMMessage],
        tools: Sequence[Tool | ToolSchema],
        tool_choice: ToolChoice,
        json_output: bool | type[BaseModel] | None,
        extra_create_args: Mapping[str, Any],
    ) -> dict[str, Any]:
        self._check_capabilities(messages, tools, json_output)
        body: dict[str, Any] = {
            "model": self._model,
            "messages": to_openai_messages(messages, include_name=self._include_name),
        }
        if self._create_args:
            body.update(self._create_args)
        request_format: object | None = None
        if extra_create_args:
            if "model" in extra_create_args:
                raise BadRequest("extra_create_args may not set model; it is the client's", model=self._model)
            for key, value in extra_create_args.items():
                if key == "response_format":
                    request_format = value
                elif key == "stream":
                    continue  # create() and create_stream() decide
                else:
                    body[key] = value
        if tools:
            body["tools"] = to_openai_tools(tools)
            choice = to_openai_tool_choice(tool_choice, tools)
            if choice is not None:
                body["tool_choice"] = choice
        elif not isinstance(tool_choice, str):
            raise BadRequest("tool_choice names a tool but no tools were given", model=self._model)
        response_format = resolve_response_format(json_output, request_format, self._response_format)
        if response_format is not None:
            if response_format.get("type") == "json_schema" and not self._model_info.get(
                "structured_output", True
            ):
                raise BadRequest(f"model {self._model} does not support structured output", model=self._model)
            body["response_format"] = response_format
        return body

    def request_body(
        self,
        messages: Sequence[LLMMessage],
        *,
        tools: Sequence[Tool | ToolSchema] = (),
        tool_choice: ToolChoice = "auto",
        json_output: bool | type[BaseModel] | None = None,
        extra_create_args: Mapping[str, Any] = {},
    ) -> dict[str, Any]:
        """The JSON body ``create`` would send (for inspection, logs without secrets, tests)."""
        return self._build_body(messages, tools, tool_choice, json_output, extra_create_args)

    # --- calls ---------------------------------------------------------------------------------

    def _count(self, usage: RequestUsage) -> None:
        self._usage = self._usage + usage

    def _answered_invalid(self, error: InvalidProviderResponse, request_id: Any) -> InvalidProviderResponse:
        """``error`` (raised where the answer is read, which knows no client) naming this client's
        provider and model, and the answer's request id."""
        return InvalidProviderResponse(
            error.message,
            provider=self.provider,
            model=self._model,
            request_id=request_id if isinstance(request_id, str) and request_id else None,
            code=error.code,
        )

    def _unreadable(self, reason: str, request_id: Any) -> InvalidProviderResponse:
        """A 2xx answer that cannot be read (billed: not retried), naming this client and the
        answer's request id."""
        return self._answered_invalid(unreadable_answer(reason), request_id)

    def _error(self, exc: BaseException) -> ModelClientError:
        return from_openai_error(exc, provider=self.provider, model=self._model)

    def _call_error(self, exc: BaseException) -> ModelClientError:
        """A transport error, or the call's deadline (``TimeoutError``) passed."""
        if isinstance(exc, TimeoutError):
            return ProviderTimeout(
                f"request timed out: the call ran past its {self._timeout} s",
                provider=self.provider,
                model=self._model,
            )
        return self._error(exc)

    async def _post(self, body: dict[str, Any]) -> tuple[bytes, Mapping[str, str]]:
        """The 2xx answer's body and headers, through the own transport unless an
        ``http_client`` was given (then the SDK's, whose exceptions the caller maps)."""
        transport = self._direct()
        if transport is not None:
            return await transport.post(self._encoded(body))
        try:
            # The SDK's timeout is per read: its deadline for the whole exchange is kept here.
            async with asyncio.timeout(self._timeout):
                response: httpx2.Response = await self._sdk().post(
                    _CHAT_PATH, cast_to=httpx2.Response, body=body, options=self._unread_options
                )
                try:
                    content = await self._read_bounded(response)
                finally:
                    await response.aclose()
        except TimeoutError as e:
            raise self._call_error(e) from e
        return content, response.headers

    async def _read_bounded(self, response: httpx2.Response) -> bytes:
        """A 2xx answer's decoded body, up to ``MAX_ANSWER_BYTES`` (as the own transport reads it);
        past it ``InvalidProviderResponse`` (billed: not asked again)."""
        content = bytearray()
        async for piece in response.aiter_bytes():
            content += piece
            if len(content) > MAX_ANSWER_BYTES:
                raise self._answered_invalid(
                    oversized_answer(MAX_ANSWER_BYTES), response.headers.get("x-request-id")
                )
        return bytes(content)

    async def _sdk_create(self, body: Mapping[str, Any]) -> Any:
        """What ``chat.completions.create`` returns for this body: only called when
        ``AsyncCompletions.create`` was replaced (a test's stub), which then answers."""
        create: Callable[..., Any] = self._sdk().chat.completions.create
        answer = create(**_sdk_create_kwargs(body))
        if inspect.isawaitable(answer):  # stubs are coroutines, or return an async generator
            answer = await answer
        return answer

    def _encoded(self, body: dict[str, Any]) -> bytes:
        """``body`` as JSON bytes: orjson's, or, for what orjson refuses (an int beyond 64 bits, a
        pydantic object in ``extra_create_args``), the SDK's own encoding of it; what neither can
        encode is the caller's ``BadRequest``, never a bare TypeError (a handler bug, redelivered)."""
        try:
            return orjson.dumps(body)
        except orjson.JSONEncodeError:
            pass
        try:
            return openapi_dumps(body)
        except (TypeError, ValueError) as e:
            raise BadRequest(
                f"the request body cannot be sent as JSON: {e}", provider=self.provider, model=self._model
            ) from e

    async def _create_once(
        self, body: dict[str, Any], attempt: int, cancellation_token: CancellationToken | None
    ) -> CreateResult:
        started = time.perf_counter()
        headers: Mapping[str, str] = {}
        try:
            if AsyncCompletions.create is _SDK_CREATE:
                content, headers = await _cancellable(self._post(body), cancellation_token)
                try:
                    data = orjson.loads(content)
                except orjson.JSONDecodeError:
                    # What orjson refuses and the stdlib takes (NaN, Infinity, a lone surrogate
                    # escape): the SDK read it, and the provider billed for it.
                    data = json.loads(content)
            else:
                data = _as_dict(await _cancellable(self._sdk_create(body), cancellation_token))
            if not isinstance(data, dict):
                raise ValueError("the body is not a JSON object")
        except ModelClientError as mapped:  # the own transport's, mapped already
            self._emit_failure(started, attempt, mapped)
            raise
        except _TRANSPORT_ERRORS as e:
            error = self._error(e)
            self._emit_failure(started, attempt, error)
            raise error from e
        except ValueError as e:  # a 2xx whose body arrived whole but is no JSON object: billed
            invalid = self._unreadable(str(e), headers.get("x-request-id"))
            self._emit_failure(started, attempt, invalid)
            raise invalid from e
        try:
            result = result_from_completion(data, model=self._model)
        except InvalidProviderResponse as e:  # answered and billed: ends the call, not retried
            answer_id = data.get("id")
            invalid = self._answered_invalid(
                e, answer_id if isinstance(answer_id, str) and answer_id else headers.get("x-request-id")
            )
            self._emit_failure(started, attempt, invalid)
            raise invalid from None
        self._count(result.usage)
        if event_logger.isEnabledFor(_INFO):
            usage = result.usage
            emit(
                LLMCall(
                    model=result.model or self._model,
                    provider=self.provider,
                    endpoint=self._endpoint,
                    latency_ms=(time.perf_counter() - started) * 1000.0,
                    prompt_tokens=usage.prompt_tokens,
                    completion_tokens=usage.completion_tokens,
                    cached_prompt_tokens=usage.cached_prompt_tokens,
                    reasoning_tokens=usage.reasoning_tokens,
                    cached=False,
                    attempt=attempt,
                    request_id=headers.get("x-request-id"),
                    finish_reason=result.finish_reason,
                )
            )
        return result

    def _emit_failure(self, started: float, attempt: int, error: ModelClientError) -> None:
        if event_logger.isEnabledFor(_INFO):
            emit(
                LLMCall(
                    model=self._model,
                    provider=self.provider,
                    endpoint=self._endpoint,
                    latency_ms=(time.perf_counter() - started) * 1000.0,
                    attempt=attempt,
                    request_id=error.request_id,
                    error=f"{type(error).__name__}: {error.message}",
                    status_code=error.status_code,
                )
            )

    async def create(
        self,
        messages: Sequence[LLMMessage],
        *,
        tools: Sequence[Tool | ToolSchema] = (),
        tool_choice: ToolChoice = "auto",
        json_output: bool | type[BaseModel] | None = None,
        extra_create_args: Mapping[str, Any] = {},
        cancellation_token: CancellationToken | None = None,
    ) -> CreateResult:
        body = self._build_body(messages, tools, tool_choice, json_output, extra_create_args)
        if self._retry_policy is None:
            return await self._create_once(body, 1, cancellation_token)
        attempts = 0

        async def attempt() -> CreateResult:
            nonlocal attempts
            attempts += 1
            return await self._create_once(body, attempts, cancellation_token)

        return await self._retry_policy.call(attempt, model=self._model)

    async def create_stream(
        self,
        messages: Sequence[LLMMessage],
        *,
        tools: Sequence[Tool | ToolSchema] = (),
        tool_choice: ToolChoice = "auto",
        json_output: bool | type[BaseModel] | None = None,
        extra_create_args: Mapping[str, Any] = {},
        cancellation_token: CancellationToken | None = None,
        include_usage: bool | None = None,
    ) -> AsyncGenerator[str | CreateResult, None]:
        """Yield text chunks, then one ``CreateResult``. Usage is zero unless asked for with
        ``include_usage=True`` or ``extra_create_args={"stream_options": {"include_usage": True}}``.
        A stream that breaks after it started raises ``StreamInterrupted`` (retryable), unless
        its finish and its usage (the last chunk) had arrived: then its answer is whole; the
        ``Retry`` of a stream is the caller's, since chunks were already handed out. A 2xx stream
        that arrived but cannot be read (an event whose data is no JSON, or a chunk of the wrong
        shape; no event at all and no ``text/event-stream`` content type; more than
        ``MAX_ANSWER_BYTES`` of it) raises ``InvalidProviderResponse`` (billed: not retryable). The
        client's timeout is the whole stream's deadline: past it, ``ProviderTimeout`` before the
        stream started, ``StreamInterrupted`` after."""
        body = self._build_body(messages, tools, tool_choice, json_output, extra_create_args)
        body["stream"] = True
        if include_usage is not None:
            body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": include_usage}
        started = time.perf_counter()
        if event_logger.isEnabledFor(_INFO):
            emit(LLMStreamStart(model=self._model, provider=self.provider, endpoint=self._endpoint))
        stream: Any
        request_id: str | None = None
        content_type: str | None = None  # the answer's, when it came over HTTP (not a stub's)
        response: httpx2.Response | None = None
        # The timeout is the whole stream's deadline too (the SDK's is per read): keep-alive
        # comments or a trickle each within it held the call, and its rate-limit lease, unbounded.
        deadline = None if self._timeout is None else asyncio.get_running_loop().time() + self._timeout
        try:
            async with asyncio.timeout_at(deadline):
                if AsyncCompletions.create is _SDK_CREATE:
                    stream = await _cancellable(
                        self._sdk().post(
                            _CHAT_PATH,
                            cast_to=object,
                            body=body,
                            options=self._options,
                            stream=True,
                            stream_cls=AsyncStream[object],
                        ),
                        cancellation_token,
                    )
                    response = stream.response
                    _bound_decoded_body(response, MAX_ANSWER_BYTES)
                    request_id = stream.response.headers.get("x-request-id")
                    content_type = stream.response.headers.get("content-type", "")
                else:  # a stub's async iterable of chunks (models, or dicts)
                    stream = await _cancellable(self._sdk_create(body), cancellation_token)
        except _STREAM_ERRORS as e:
            error = self._call_error(e)
            self._emit_stream_end(started, None, error)
            raise error from e
        accumulator = StreamAccumulator(self._model)
        first_chunk_at: float | None = None
        try:
            iterator = stream.__aiter__()
            while True:
                try:
                    async with asyncio.timeout_at(deadline):
                        chunk = await _cancellable(iterator.__anext__(), cancellation_token)
                except StopAsyncIteration:
                    break
                except ValueError as e:
                    # An event that arrived whole (a cut connection is a transport error, below)
                    # with data that is no JSON: the 2xx answer cannot be read, and was billed.
                    invalid = self._unreadable(
                        f"stream event {accumulator.chunks + 1} is not JSON: {e}",
                        accumulator.response_id or request_id,
                    )
                    self._emit_stream_end(started, accumulator, invalid, first_chunk_at=first_chunk_at)
                    raise invalid from e
                except _AnswerTooLarge:
                    # Every chunk is held until the result is built: an endless stream is not.
                    oversized = self._answered_invalid(
                        oversized_answer(MAX_ANSWER_BYTES), accumulator.response_id or request_id
                    )
                    self._emit_stream_end(started, accumulator, oversized, first_chunk_at=first_chunk_at)
                    raise oversized from None
                if not isinstance(chunk, Mapping):
                    if not isinstance(chunk, BaseModel):
                        continue
                    chunk = chunk.model_dump(mode="json")  # a stub's ChatCompletionChunk
                try:
                    text = accumulator.add(chunk)
                except InvalidProviderResponse as e:  # a chunk of the wrong shape: billed
                    invalid = self._answered_invalid(e, accumulator.response_id or request_id)
                    self._emit_stream_end(started, accumulator, invalid, first_chunk_at=first_chunk_at)
                    raise invalid from None
                if text:
                    if first_chunk_at is None:
                        first_chunk_at = time.perf_counter()
                    yield text
        except _STREAM_ERRORS as e:
            # Usage is the last chunk a stream sends: a break after it (and every choice's finish)
            # lost the terminator only, and the whole answer, billed, is kept rather than paid for
            # again.
            if not accumulator.ended:
                mapped = self._call_error(e)
                interrupted = StreamInterrupted(
                    f"stream broke after {accumulator.chunks} chunks: {mapped.message}",
                    provider=self.provider,
                    model=self._model,
                    status_code=mapped.status_code,
                    request_id=request_id,
                    code=mapped.code,
                )
                self._emit_stream_end(started, accumulator, interrupted, first_chunk_at=first_chunk_at)
                raise interrupted from e
        finally:
            await _close_stream(stream)
        if (
            accumulator.chunks == 0
            and content_type is not None
            and not content_type.lower().startswith("text/event-stream")
        ):
            # The body arrived whole (a cut one raises above) with not one event in it, and it
            # says it is no event stream (an HTML page, a completion that ignored "stream"):
            # the 2xx answer cannot be read, and was billed.
            invalid = self._unreadable(
                f"the answer to a stream request is no event stream (content-type {content_type!r})",
                request_id,
            )
            self._emit_stream_end(started, accumulator, invalid, first_chunk_at=first_chunk_at)
            raise invalid
        if accumulator.finish_reason is None:
            interrupted = StreamInterrupted(
                f"stream ended after {accumulator.chunks} chunks without a finish_reason",
                provider=self.provider,
                model=self._model,
                request_id=request_id,
            )
            self._emit_stream_end(started, accumulator, interrupted, first_chunk_at=first_chunk_at)
            raise interrupted
        try:
            result = accumulator.result()
        except InvalidProviderResponse as e:  # answered and billed: ends the call, not retried
            invalid = self._answered_invalid(e, accumulator.response_id or request_id)
            self._emit_stream_end(started, accumulator, invalid, first_chunk_at=first_chunk_at)
            raise invalid from None
        self._count(result.usage)
        self._emit_stream_end(started, accumulator, None, result, request_id, first_chunk_at=first_chunk_at)
        yield result

    def _emit_stream_end(
        self,
        started: float,
        accumulator: StreamAccumulator | None,
        error: ModelClientError | None,
        result: CreateResult | None = None,
        request_id: str | None = None,
        *,
        first_chunk_at: float | None = None,
    ) -> None:
        if not event_logger.isEnabledFor(_INFO):
            return
        usage = result.usage if result is not None else RequestUsage()
        emit(
            LLMStreamEnd(
                model=(result.model if result is not None else None) or self._model,
                provider=self.provider,
                endpoint=self._endpoint,
                latency_ms=(time.perf_counter() - started) * 1000.0,
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                cached_prompt_tokens=usage.cached_prompt_tokens,
                reasoning_tokens=usage.reasoning_tokens,
                request_id=request_id or (error.request_id if error is not None else None),
                finish_reason=result.finish_reason if result is not None else None,
                error=f"{type(error).__name__}: {error.message}" if error is not None else None,
                chunks=accumulator.chunks if accumulator is not None else 0,
                status_code=error.status_code if error is not None else None,
                first_chunk_ms=None if first_chunk_at is None else (first_chunk_at - started) * 1000.0,
            )
        )

    # --- usage, tokens, identity ----------------------------------------------------------------

    def actual_usage(self) -> RequestUsage:
        return self._usage

    def total_usage(self) -> RequestUsage:
        # Nothing here is served from a cache, so what the results represent is what was spent.
        return self.actual_usage()

    def count_tokens(self, messages: Sequence[LLMMessage], *, tools: Sequence[Tool | ToolSchema] = ()) -> int:
        return estimate_tokens(messages, tools)

    def remaining_tokens(
        self, messages: Sequence[LLMMessage], *, tools: Sequence[Tool | ToolSchema] = ()
    ) -> int:
        window = self._model_info.get("context_window", 128_000)
        return window - self.count_tokens(messages, tools=tools)

    @property
    def model_info(self) -> ModelInfo:
        return self._model_info

    @property
    def model(self) -> str:
        return self._model

    @property
    def base_url(self) -> str:
        return self._base_url

    @property
    def cache_identity(self) -> Mapping[str, Any]:
        return self._cache_identity


def _key_from(api_key: str | None, env_var: str, *, provider: str, model: str) -> str:
    key = api_key if api_key is not None else os.environ.get(env_var)
    if not key:
        raise AuthenticationFailed(
            f"no API key for {provider}: pass api_key= or set the {env_var} environment variable",
            provider=provider,
            model=model,
        )
    return key


class OpenAIChatCompletionClient(BaseOpenAIChatCompletionClient):
    """OpenAI, Gemini (model names ``gemini-*``, through its OpenAI-compatible endpoint) and any
    OpenAI-compatible server (vLLM, llama.cpp, Ollama: give ``base_url``).

    The key comes from ``api_key`` or ``OPENAI_API_KEY`` (``GEMINI_API_KEY`` for Gemini models when
    no ``base_url`` is given); the URL from ``base_url`` or ``OPENAI_BASE_URL``. Other keyword
    arguments (temperature, max_tokens, seed, top_p, stop, ...) are default create args.
    ``max_retries`` is accepted for AutoGen compatibility and ignored: retries are ``retry_policy``'s.
    """

    def __init__(
        self,
        *,
        model: str,
        api_key: str | None = None,
        base_url: str | None = None,
        organization: str | None = None,
        timeout: float | None = 60.0,
        model_info: ModelInfo | None = None,
        response_format: ResponseFormat | None = None,
        max_retries: int | None = None,
        default_headers: Mapping[str, str] | None = None,
        http_client: httpx2.AsyncClient | None = None,
        include_name_in_message: bool = True,
        retry_policy: RetryPolicy | None = None,
        **create_args: Any,
    ) -> None:
        del max_retries  # the SDK never retries behind our back
        gemini = model.startswith("gemini-") and base_url is None
        if gemini:
            self.provider = "gemini"
            resolved_url = GEMINI_BASE_URL
            key_env = "GEMINI_API_KEY"
        else:
            resolved_url = base_url or os.environ.get("OPENAI_BASE_URL") or OPENAI_BASE_URL
            key_env = "OPENAI_API_KEY"
            if _host_of(resolved_url) != "api.openai.com":
                self.provider = (
                    "gemini"
                    if _host_of(resolved_url) == "generativelanguage.googleapis.com"
                    else "openai-compatible"
                )
        self._api_key = _key_from(api_key, key_env, provider=self.provider, model=model)
        self._organization = organization
        self._timeout = timeout
        self._default_headers = dict(default_headers) if default_headers else None
        super().__init__(
            model=model,
            base_url=resolved_url,
            model_info=model_info,
            response_format=response_format,
            include_name_in_message=include_name_in_message,
            retry_policy=retry_policy,
            create_args=create_args,
            http_client=http_client,
        )

    def _make_transport(self) -> ChatTransport:
        # As AsyncOpenAI would: organization and project fall back to their variables, and the
        # caller's default_headers override the SDK's own.
        organization = self._organization or os.environ.get("OPENAI_ORG_ID")
        project = os.environ.get("OPENAI_PROJECT_ID")
        headers = {"User-Agent": SDK_USER_AGENT, "Authorization": f"Bearer {self._api_key}"}
        if organization is not None:
            headers["OpenAI-Organization"] = organization
        if project is not None:
            headers["OpenAI-Project"] = project
        headers.update(self._default_headers or {})
        return ChatTransport(
            f"{self._base_url.rstrip('/')}{_CHAT_PATH}",
            headers,
            timeout=self._timeout,
            provider=self.provider,
            model=self._model,
        )

    def _make_sdk_client(self) -> AsyncOpenAI:
        return AsyncOpenAI(
            api_key=self._api_key,
            organization=self._organization,
            base_url=self._base_url,
            timeout=self._timeout,
            max_retries=0,
            default_headers=self._default_headers,
            http_client=self._http_client_for_loop(),
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={self._model!r}, base_url={self._base_url!r})"


class AzureOpenAIChatCompletionClient(BaseOpenAIChatCompletionClient):
    """Azure OpenAI: ``azure_endpoint`` (or ``AZURE_OPENAI_ENDPOINT``), ``azure_deployment``
    (defaults to ``model``), ``api_version`` (or ``OPENAI_API_VERSION``), and ``api_key`` (or
    ``AZURE_OPENAI_API_KEY``) unless an ``azure_ad_token_provider`` is given. ``model`` names the
    underlying model, for ``model_info``."""

    provider = "azure"

    def __init__(
        self,
        *,
        model: str,
        azure_endpoint: str | None = None,
        azure_deployment: str | None = None,
        api_version: str | None = None,
        api_key: str | None = None,
        azure_ad_token_provider: Callable[[], str | Awaitable[str]] | None = None,
        timeout: float | None = 60.0,
        model_info: ModelInfo | None = None,
        response_format: ResponseFormat | None = None,
        max_retries: int | None = None,
        default_headers: Mapping[str, str] | None = None,
        http_client: httpx2.AsyncClient | None = None,
        include_name_in_message: bool = True,
        retry_policy: RetryPolicy | None = None,
        **create_args: Any,
    ) -> None:
        del max_retries
        endpoint = azure_endpoint or os.environ.get("AZURE_OPENAI_ENDPOINT")
        if not endpoint:
            raise ValueError("no Azure endpoint: pass azure_endpoint= or set AZURE_OPENAI_ENDPOINT")
        version = api_version or os.environ.get("OPENAI_API_VERSION")
        if not version:
            raise ValueError("no Azure API version: pass api_version= or set OPENAI_API_VERSION")
        self._api_key: str | None = None
        if azure_ad_token_provider is None:
            self._api_key = _key_from(api_key, "AZURE_OPENAI_API_KEY", provider=self.provider, model=model)
        self._azure_endpoint = endpoint
        self._azure_deployment = azure_deployment or model
        self._api_version = version
        self._token_provider = azure_ad_token_provider
        self._timeout = timeout
        self._default_headers = dict(default_headers) if default_headers else None
        super().__init__(
            model=model,
            base_url=f"{endpoint.rstrip('/')}/openai/deployments/{self._azure_deployment}",
            model_info=model_info,
            response_format=response_format,
            include_name_in_message=include_name_in_message,
            retry_policy=retry_policy,
            create_args=create_args,
            http_client=http_client,
            identity_extra={"azure_deployment": self._azure_deployment, "api_version": version},
        )

    def _make_transport(self) -> ChatTransport:
        headers = {"User-Agent": SDK_USER_AGENT}
        if self._api_key is not None:
            headers["api-key"] = self._api_key
        headers.update(self._default_headers or {})
        return ChatTransport(
            f"{self._base_url.rstrip('/')}{_CHAT_PATH}?{urlencode({'api-version': self._api_version})}",
            headers,
            timeout=self._timeout,
            provider=self.provider,
            model=self._model,
            extra_headers=self._ad_token_header if self._token_provider is not None else None,
        )

    async def _ad_token_header(self) -> Mapping[str, str]:
        """The AD token, asked of its provider per request as the SDK did (the provider caches)."""
        return {"Authorization": f"Bearer {await self._ad_token()}"}

    async def _ad_token(self) -> str:
        """The token provider's answer; one that fails or is no non-empty string is a credentials
        failure (``AuthenticationFailed``), not a provider's malformed answer nor a bare exception
        the runner would take for a handler bug. Both paths ask through here."""
        assert self._token_provider is not None
        try:
            token = self._token_provider()
            if inspect.isawaitable(token):
                token = await token
        except ModelClientError:
            raise
        except Exception as e:
            raise AuthenticationFailed(
                f"azure_ad_token_provider failed: {type(e).__name__}: {e}",
                provider=self.provider,
                model=self._model,
            ) from e
        if not isinstance(token, str) or not token:
            raise AuthenticationFailed(
                f"azure_ad_token_provider returned {type(token).__name__} {token!r}, not a token string",
                provider=self.provider,
                model=self._model,
            )
        return token

    def _make_sdk_client(self) -> AsyncOpenAI:
        return AsyncAzureOpenAI(
            azure_endpoint=self._azure_endpoint,
            azure_deployment=self._azure_deployment,
            api_version=self._api_version,
            api_key=self._api_key,
            azure_ad_token_provider=self._ad_token if self._token_provider is not None else None,
            timeout=self._timeout,
            max_retries=0,
            default_headers=self._default_headers,
            http_client=self._http_client_for_loop(),
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(model={self._model!r}, azure_endpoint={self._azure_endpoint!r}, "
            f"azure_deployment={self._azure_deployment!r})"
        )
