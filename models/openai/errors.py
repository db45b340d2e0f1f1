"""The ``openai`` SDK's exceptions (and those of the ``httpx``/``httpx2`` transport below it), and
what the clients' own aiohttp transport meets (a status, an ``aiohttp`` exception), mapped onto
tokenmill's one error tree (``models.errors``) alike."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import aiohttp
import openai

from models.errors import (
    AuthenticationFailed,
    BadRequest,
    ContextWindowExceeded,
    InvalidProviderResponse,
    ModelClientError,
    ModelNotFound,
    ProviderTimeout,
    ProviderUnavailable,
    QuotaExceeded,
    RateLimited,
    StreamInterrupted,
    parse_retry_after,
)
from models.openai.results import unreadable_answer

__all__ = ["from_aiohttp_error", "from_openai_error", "from_status"]


_CONTEXT_CODES = frozenset({"context_length_exceeded", "string_above_max_length"})
_CONTEXT_PHRASES = ("maximum context length", "context length", "context window", "too many tokens")


def _error_code_and_message(body: object, fallback: str) -> tuple[str | None, str]:
    """The provider's error code and message; OpenAI nests them under "error", some servers don't."""
    if isinstance(body, Mapping):
        inner = body.get("error", body)
        if isinstance(inner, Mapping):
            code = inner.get("code") or inner.get("type")
            message = inner.get("message")
            return (str(code) if code is not None else None, str(message) if message else fallback)
        if isinstance(inner, str):
            return None, inner
    return None, fallback


def _by_status(status: int, code: str | None, message: str) -> type[ModelClientError]:
    if status == 429:
        return QuotaExceeded if code == "insufficient_quota" else RateLimited
    if status in (401, 403):
        return AuthenticationFailed
    if status == 404:
        return ModelNotFound
    if status in (408, 504):
        return ProviderTimeout
    if status == 409 or status >= 500:
        return ProviderUnavailable
    if status in (400, 413, 422):
        lowered = message.lower()
        if code in _CONTEXT_CODES or any(phrase in lowered for phrase in _CONTEXT_PHRASES):
            return ContextWindowExceeded
        return BadRequest
    return BadRequest if 400 <= status < 500 else ProviderUnavailable


def _is_transport_timeout(exc: BaseException) -> bool:
    return any(cls.__name__ == "TimeoutException" for cls in type(exc).__mro__)


def _is_transport_error(exc: BaseException) -> bool:
    # httpx and httpx2 (which openai >= 3 uses) have parallel, unrelated class trees.
    return any(
        cls.__name__ in ("TransportError", "StreamError", "RemoteProtocolError")
        and cls.__module__.split(".")[0] in ("httpx", "httpx2")
        for cls in type(exc).__mro__
    )


def _from_error_data(
    status: int,
    headers: Mapping[str, str],
    data: object,
    err_msg: str,
    request_id: str | None,
    where: dict[str, Any],
) -> ModelClientError:
    """The one mapping of a non-2xx answer, on what the SDK's ``APIStatusError`` is built from:
    ``data`` is the body's ``error`` member (or the body itself when it has none, or its text when
    it is no JSON) and ``err_msg`` the SDK's exception text. Code and type are read from ``data``
    only, as ``APIError`` reads them: a top-level ``code`` beside an ``error`` object is ignored,
    and an ``error`` that is a bare string has neither (its text is not the message either)."""
    code: str | None = None
    param: str | None = None
    message = err_msg
    if isinstance(data, Mapping):
        raw_param = data.get("param")
        param = raw_param if isinstance(raw_param, str) and raw_param else None
        raw_code = data.get("code")
        raw_type = data.get("type")
        code = (str(raw_code) if raw_code is not None else None) or (
            str(raw_type) if raw_type is not None else None
        )
        raw_message = data.get("message")
        if raw_message:
            message = str(raw_message)
    cls = _by_status(status, code, message)
    fields: dict[str, Any] = {
        **where,
        "status_code": status,
        "request_id": request_id,
        "code": code,
        "param": param,
    }
    if issubclass(cls, RateLimited | ProviderUnavailable):
        return cls(message, retry_after=parse_retry_after(headers), **fields)
    return cls(message, **fields)


def _sdk_error_data(status: int, content: bytes) -> tuple[object, str]:
    """``data`` and ``err_msg`` as the SDK's ``_make_status_error_from_response`` builds them from
    the same bytes: the stripped text parsed with the stdlib (which, unlike orjson, takes NaN and
    lone surrogates), the ``error`` member if the body is an object, the message appended to
    ``Error code: N`` only when it is a non-empty string."""
    err_msg = f"Error code: {status}"
    text = content.decode("utf-8", errors="replace").strip()
    try:
        body: object = json.loads(text)
    except (ValueError, RecursionError):  # what the SDK's bare `except Exception` meets here
        return text, err_msg
    data = body.get("error", body) if isinstance(body, Mapping) else body
    message = data.get("message") if isinstance(data, Mapping) else None
    if isinstance(message, str) and message:
        err_msg += f" - {message}"
    return data, err_msg


def from_status(
    status: int, headers: Mapping[str, str], content: bytes, *, provider: str | None, model: str | None
) -> ModelClientError:
    """A non-2xx answer (status, headers, body bytes) mapped by the same function that maps the
    SDK's ``APIStatusError`` for the same answer (``from_openai_error``): code, type and message
    from the body's ``error`` member as the SDK reads them, ``retry-after`` read for a 429, the
    ``x-request-id`` kept."""
    data, err_msg = _sdk_error_data(status, content)
    return _from_error_data(
        status, headers, data, err_msg, headers.get("x-request-id"), {"provider": provider, "model": model}
    )


def from_aiohttp_error(exc: BaseException, *, provider: str | None, model: str | None) -> ModelClientError:
    """What the clients' aiohttp transport raises, mapped as the SDK's aiohttp transport's
    exceptions are: a timeout (connect or read) is ``ProviderTimeout``; a refused, reset or
    dropped connection, a proxy that failed, a body cut short or a URL it cannot reach is
    ``ProviderUnavailable``; anything else a non-retryable ``ModelClientError``."""
    where: dict[str, Any] = {"provider": provider, "model": model}
    if isinstance(exc, TimeoutError):  # aiohttp's ServerTimeoutError is one
        return ProviderTimeout(f"request timed out: {type(exc).__name__}: {exc}", **where)
    if isinstance(exc, aiohttp.ClientError | OSError):
        return ProviderUnavailable(f"connection failed: {type(exc).__name__}: {exc}", **where)
    return ModelClientError(f"{type(exc).__name__}: {exc}", **where)


def from_openai_error(exc: BaseException, *, provider: str | None, model: str | None) -> ModelClientError:
    """Map an exception from the ``openai`` SDK or its HTTP transport onto our tree.

    The caller raises the result ``from exc``. An unknown exception becomes a non-retryable
    ``ModelClientError`` rather than being guessed retryable.
    """
    if isinstance(exc, ModelClientError):
        return exc
    where: dict[str, Any] = {"provider": provider, "model": model}
    refused = (
        _connection_failure_behind(exc)
        if isinstance(exc, openai.APIConnectionError) or _is_transport_error(exc)
        else None
    )
    if refused is not None:
        return ProviderUnavailable(f"connection failed: {type(refused).__name__}: {refused}", **where)
    if isinstance(exc, openai.APITimeoutError) or _is_transport_timeout(exc):
        return ProviderTimeout(f"request timed out: {exc}", **where)
    if isinstance(exc, openai.APIConnectionError):
        return ProviderUnavailable(f"connection failed: {exc.__cause__ or exc}", **where)
    if isinstance(exc, openai.APIStatusError):
        # ``exc.body`` is the SDK's ``data`` and ``exc.message`` its ``err_msg``: the same inputs
        # ``from_status`` derives from the bytes, through the same mapping.
        return _from_error_data(
            exc.status_code, exc.response.headers, exc.body, exc.message, exc.request_id, where
        )
    if isinstance(exc, openai.APIResponseValidationError):
        # A 2xx the SDK could not read: answered, so billed; asking again would pay again (the
        # SDK itself never retries it). The own transport's reading of such a body says the same.
        unreadable = unreadable_answer(exc.message)
        return InvalidProviderResponse(
            unreadable.message,
            code=unreadable.code,
            request_id=exc.response.headers.get("x-request-id"),
            **where,
        )
    if isinstance(exc, openai.APIError):
        # A mid-stream error event (the SDK raises a bare APIError); the status was 200.
        code, message = _error_code_and_message(exc.body, exc.message)
        return StreamInterrupted(message, code=exc.code or code, **where)
    status_error = _status_error_of(exc)
    if status_error is not None:
        status, status_headers, text = status_error
        cls = _by_status(status, None, text)
        fields: dict[str, Any] = {
            **where,
            "status_code": status,
            "request_id": status_headers.get("x-request-id"),
        }
        if issubclass(cls, RateLimited | ProviderUnavailable):
            return cls(text, retry_after=parse_retry_after(status_headers), **fields)
        return cls(text, **fields)
    if _is_transport_error(exc):
        return ProviderUnavailable(f"connection failed: {type(exc).__name__}: {exc}", **where)
    if isinstance(exc, openai.OpenAIError):
        # e.g. the SDK's own "api_key must be set" check.
        return (
            AuthenticationFailed(str(exc), **where)
            if "api_key" in str(exc)
            else ModelClientError(str(exc), **where)
        )
    return ModelClientError(f"{type(exc).__name__}: {exc}", **where)


def _connection_failure_behind(exc: BaseException) -> BaseException | None:
    """The refused, reset or dropped connection that caused ``exc``, if that is what did.

    The SDK's aiohttp transport reports every ``aiohttp.ClientConnectionError`` (a refused
    connection, a server that hung up) as a connect *timeout*; the cause chain says what it was.
    A real timeout anywhere in the chain wins.
    """
    seen: set[int] = set()
    current: BaseException | None = exc.__cause__ or exc.__context__
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, TimeoutError):
            return None
        if isinstance(current, OSError) or type(current).__name__ == "ServerDisconnectedError":
            return current
        current = current.__cause__ or current.__context__
    return None


def _status_error_of(exc: BaseException) -> tuple[int, Mapping[str, str], str] | None:
    """Status, headers and message of an ``httpx``/``httpx2`` ``HTTPStatusError``."""
    if type(exc).__name__ != "HTTPStatusError":
        return None
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    if not isinstance(status, int):
        return None
    headers: Mapping[str, str] = getattr(response, "headers", {}) or {}
    return status, headers, str(exc)
