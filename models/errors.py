"""Errors a model client raises, one tree whatever the provider or SDK underneath.

Exception hierarchy::

    ModelClientError                 (message, provider, model, status_code, request_id, code, param,
                                      retryable)
    ├── RateLimited                  429; retryable; ``retry_after`` seconds if the provider said
    │   └── QuotaExceeded            429 ``insufficient_quota``: billing, not load; permanent
    ├── ProviderTimeout              request timed out (client side, 408 or 504); retryable
    ├── ProviderUnavailable          5xx, 409, connection refused/reset; retryable; ``retry_after``
    │                                seconds if the provider said
    ├── StreamInterrupted            a stream broke after it started; retryable
    ├── BadRequest                   400/413/422, the request itself is wrong; permanent
    │   └── ContextWindowExceeded    the prompt (plus max_tokens) does not fit the model
    ├── AuthenticationFailed         401/403 or no API key configured; permanent
    ├── ModelNotFound                404, unknown model or deployment; permanent
    └── InvalidProviderResponse      a 2xx answer that cannot be taken: token usage beyond what
                                     the ledger holds (code ``upstream_usage_invalid``), or a body
                                     that arrived whole but is no JSON object, a stream event
                                     that is no JSON (``upstream_response_invalid``), a body
                                     past the client's bound (``upstream_response_too_large``);
                                     it was billed; permanent (a body cut short by the connection is
                                     ``ProviderUnavailable`` / ``StreamInterrupted``: retryable)

``retryable`` is a class default that an instance may override; ``RetryPolicy`` only retries
errors whose ``retryable`` is true. Each provider's client maps what its SDK raises onto this tree
beside itself (``models.openai.errors.from_openai_error`` for the ``openai`` SDK and the
``httpx``/``httpx2`` transport below it).
"""

from __future__ import annotations

import email.utils
import math
import time
from collections.abc import Mapping
from typing import Any

__all__ = [
    "MAX_RETRY_AFTER_SECONDS",
    "AuthenticationFailed",
    "BadRequest",
    "ContextWindowExceeded",
    "InvalidProviderResponse",
    "ModelClientError",
    "ModelNotFound",
    "ProviderTimeout",
    "ProviderUnavailable",
    "QuotaExceeded",
    "RateLimited",
    "StreamInterrupted",
    "parse_retry_after",
]


class ModelClientError(Exception):
    """Base of every error a model client raises."""

    retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        provider: str | None = None,
        model: str | None = None,
        status_code: int | None = None,
        request_id: str | None = None,
        code: str | None = None,
        param: str | None = None,
        retryable: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.provider = provider
        self.model = model
        self.status_code = status_code
        self.request_id = request_id
        # The provider's machine-readable error code (e.g. "context_length_exceeded"), kept for
        # the batch error file.
        self.code = code
        # The request's field the provider's refusal names (e.g. "messages"), as OpenAI's
        # ``error.param``: relayed to the caller, whose SDK reads it.
        self.param = param
        if retryable is not None:
            self.retryable = retryable

    def _fields(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "model": self.model,
            "status_code": self.status_code,
            "request_id": self.request_id,
            "code": self.code,
            "param": self.param,
            "retryable": self.retryable,
        }

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only constructor arguments are lost by BaseException's default pickling;
        # Celery moves these errors between processes.
        return (_rebuild, (type(self), self.message, self._fields()))

    def __str__(self) -> str:
        where = " ".join(
            part
            for part in (
                self.provider,
                self.model,
                f"HTTP {self.status_code}" if self.status_code is not None else None,
                f"request_id={self.request_id}" if self.request_id else None,
            )
            if part
        )
        return f"{self.message} ({where})" if where else self.message


def _rebuild(cls: type[ModelClientError], message: str, fields: dict[str, Any]) -> ModelClientError:
    error = cls.__new__(cls)
    ModelClientError.__init__(error, message)
    for name, value in fields.items():
        setattr(error, name, value)
    return error


class RateLimited(ModelClientError):
    """The provider refused the call for load (429); wait ``retry_after`` seconds if given."""

    retryable = True

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after

    def _fields(self) -> dict[str, Any]:
        return {**super()._fields(), "retry_after": self.retry_after}


class QuotaExceeded(RateLimited):
    """429 with ``insufficient_quota``: the account is out of credit, waiting does not help."""

    retryable = False


class ProviderTimeout(ModelClientError):
    retryable = True


class ProviderUnavailable(ModelClientError):
    """The provider failed or is overloaded (5xx, 409, no connection); ``retry_after`` seconds
    if it said when to come back (a 503's Retry-After, which OpenAI's SDK honours too)."""

    retryable = True

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after

    def _fields(self) -> dict[str, Any]:
        return {**super()._fields(), "retry_after": self.retry_after}


class StreamInterrupted(ModelClientError):
    retryable = True


class BadRequest(ModelClientError):
    retryable = False


class ContextWindowExceeded(BadRequest):
    pass


class AuthenticationFailed(ModelClientError):
    retryable = False


class ModelNotFound(ModelClientError):
    retryable = False


class InvalidProviderResponse(ModelClientError):
    """The provider answered (2xx, so it billed) with what cannot be taken as it is: ``usage``
    beyond what the ledger can hold, a body that is no JSON object: never retried, asking again
    pays again."""

    retryable = False


# The longest wait a provider's Retry-After is taken at: past an hour the header is more likely
# broken than meant, and a wait without bound would overflow a timestamp or outlive any budget.
MAX_RETRY_AFTER_SECONDS = 3600.0


def _bounded_wait(seconds: float) -> float | None:
    """``seconds`` as a wait: None when not finite (unreadable), else within 0 and the cap."""
    if not math.isfinite(seconds):
        return None
    return min(MAX_RETRY_AFTER_SECONDS, max(0.0, seconds))


def parse_retry_after(headers: Mapping[str, str] | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from ``retry-after-ms`` (OpenAI/Azure) or ``Retry-After`` (seconds or an
    HTTP date), at most ``MAX_RETRY_AFTER_SECONDS``; None when absent or unreadable (``inf`` and
    ``nan`` included)."""
    if not headers:
        return None
    milliseconds = headers.get("retry-after-ms")
    if milliseconds is not None:
        try:
            wait = _bounded_wait(float(milliseconds) / 1000.0)
        except ValueError:
            wait = None
        if wait is not None:
            return wait
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return _bounded_wait(float(value))
    except ValueError:
        pass
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return _bounded_wait(moment.timestamp() - (time.time() if now is None else now))
