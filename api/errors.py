"""Errors of the producers' API, all answered in OpenAI's error shape.

Every error body is ``{"error": {"message", "type", "param", "code"}}`` with the HTTP status the
official ``openai`` SDK maps to its own exception classes, and a message that names the problem.

    APIError
    ├── InvalidRequest        400  invalid_request_error (also an upload over the stored-bytes cap)
    ├── Unauthenticated       401  invalid_api_key / missing_api_key
    ├── NotFound              404  (another tenant's id answers this too)
    ├── Conflict              409  (e.g. cancelling a finished batch)
    ├── PayloadTooLarge       413
    ├── RateLimitExceeded     429  (also a tenant's quota: ``over_quota``)
    ├── UpstreamFailed        502  (the model provider failed for a synchronous request)
    └── ServiceUnavailable    503  (database behind its schema or out of reach, broker unreachable)
"""

from __future__ import annotations

import errno
import logging
import math
from typing import Any

import psycopg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from store.errors import QuotaExceeded
from store.ingest import MAX_ERROR_MESSAGE_CHARS
from store.input_checks import bounded_text
from store.log_redaction import redacted_error_text
from store.quotas import DAILY_BUDGET_EXCEEDED, FILE_STORAGE_QUOTA_EXCEEDED, seconds_to_next_budget_day

__all__ = [
    "BOUND_TO_HEADER",
    "CLIENT_CLOSED_REQUEST",
    "SHOULD_RETRY_HEADER",
    "APIError",
    "Conflict",
    "InvalidRequest",
    "NotFound",
    "PayloadTooLarge",
    "RateLimitExceeded",
    "ServiceUnavailable",
    "Unauthenticated",
    "UpstreamFailed",
    "api_error_response",
    "database_unavailable",
    "error_body",
    "install_error_handlers",
    "not_stored",
    "over_quota",
]

logger = logging.getLogger("tokenmill.api")

# Names the batch or run a 5xx answer is bound to (work that goes on, or was billed): the
# The status answered (to nobody) when the client went away before its request's body was read
# (nginx's "client closed request"): below 500, so not a failure of ours in any count or log.
CLIENT_CLOSED_REQUEST = 499

# Idempotency-Key middleware keeps such an answer, so that a retry replays it instead of running
# (and billing) the work again.
BOUND_TO_HEADER = "Tokenmill-Bound-To"

# The openai SDK's own retry switch (it retries every 5xx, 408, 409 and 429 unless told): "false"
# on an answer that asking again cannot mend, so that a client's retries pay no provider again.
SHOULD_RETRY_HEADER = "x-should-retry"


def error_body(
    message: str, type_: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class APIError(Exception):
    status_code = 500
    type = "server_error"
    default_code: str | None = None

    def __init__(
        self, message: str, *, param: str | None = None, code: str | None = None, bound_to: str | None = None
    ) -> None:
        # Bounded whatever a route quoted into it ("everything bounded", docs/design.md); callers
        # quote input with store.quote_input, this is the backstop.
        message = bounded_text(message, 2 * MAX_ERROR_MESSAGE_CHARS)
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code
        self.bound_to = bound_to  # see BOUND_TO_HEADER
        self.final = False  # asking again cannot mend it: see SHOULD_RETRY_HEADER
        self.request_id: str | None = None  # the call it answers, as x-request-id (the SDK's request_id)
        self.retry_after: float | None = None  # seconds until asking again may succeed, if known

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, param=self.param, code=self.code)


class InvalidRequest(APIError):
    status_code = 400
    type = "invalid_request_error"


class Unauthenticated(APIError):
    status_code = 401
    type = "invalid_request_error"
    default_code = "invalid_api_key"


class NotFound(APIError):
    status_code = 404
    type = "invalid_request_error"
    default_code = "not_found"


class Conflict(APIError):
    status_code = 409
    type = "invalid_request_error"
    default_code = "conflict"


class PayloadTooLarge(APIError):
    status_code = 413
    type = "invalid_request_error"
    default_code = "payload_too_large"


class RateLimitExceeded(APIError):
    status_code = 429
    type = "rate_limit_error"
    default_code = "rate_limit_exceeded"


def over_quota(error: QuotaExceeded) -> APIError:
    """A create refused by the tenant's quotas (``store.quotas``): 429, the quota's code
    (``queued_requests_quota_exceeded``, ``queued_tokens_quota_exceeded``, ``daily_budget_exceeded``).
    An upload over the stored-bytes cap is a 400 ``file_storage_quota_exceeded``, as OpenAI answers
    its own storage limit: waiting does not free it (deleting files does), and the SDK retries a
    429, uploading the whole body again each time."""
    if error.code == FILE_STORAGE_QUOTA_EXCEEDED:
        full = InvalidRequest(str(error), param="file", code=error.code)
        full.final = True
        return full
    refused = RateLimitExceeded(str(error), code=error.code)
    if error.code == DAILY_BUDGET_EXCEEDED:
        # Spent until midnight UTC: a client's retries seconds later are refused as well. Said
        # when, for a client that waits (the queued quotas free as work ends: no time to say).
        refused.final = True
        refused.retry_after = seconds_to_next_budget_day()
    return refused


class UpstreamFailed(APIError):
    status_code = 502
    type = "upstream_error"
    default_code = "upstream_failed"


class ServiceUnavailable(APIError):
    status_code = 503
    type = "server_error"
    default_code = "service_unavailable"


class InsufficientStorage(APIError):
    status_code = 507
    type = "server_error"
    default_code = "insufficient_storage"


# How long a client is told to wait when the ledger is out of reach: a restart or a failover
# takes seconds, and the SDK retries a 503 after that.
DATABASE_RETRY_AFTER_SECONDS = 2.0


def database_unavailable(error: BaseException) -> ServiceUnavailable | None:
    """The answer to ``error`` if it says the ledger is out of reach rather than a bug of ours:
    no connection to be had (refused, pool exhausted), one lost mid-statement (a restart, a
    failover, an operator ending sessions), a statement cancelled or timed out. None otherwise."""
    # The driver's own errors too: a bulk load (COPY) runs on the driver, past SQLAlchemy.
    out_of_reach = (
        sa_exc.OperationalError
        | sa_exc.InterfaceError
        | sa_exc.TimeoutError
        | psycopg.OperationalError
        | psycopg.InterfaceError
    )
    unreachable = isinstance(error, out_of_reach) or (
        isinstance(error, sa_exc.DBAPIError) and error.connection_invalidated
    )
    if not unreachable:
        return None
    answer = ServiceUnavailable("the database is unavailable; retry later", code="database_unavailable")
    answer.retry_after = DATABASE_RETRY_AFTER_SECONDS
    return answer


# What a write that found no room raises: a full disk, a quota, a file size limit.
_NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def not_stored(error: OSError, where: str) -> APIError:
    """The answer to a request body (an upload) the disk could not take, in ``where``: 507 for no
    room (it may come back), 503 for anything else; the operator's paths stay out of it (the log
    has them)."""
    logger.error("a request body could not be written to %s: %s", where, error)
    if error.errno in _NO_ROOM:
        return InsufficientStorage("there is no room to store the file now; try again later")
    return ServiceUnavailable("the file could not be stored now; try again later")


def api_error_response(exc: APIError) -> JSONResponse:
    """The answer to an ``APIError``: its body, its status, ``WWW-Authenticate`` on a 401, the
    work a 5xx is bound to (``BOUND_TO_HEADER``) and, when final or bound, ``x-should-retry:
    false``."""
    headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else {}
    if exc.bound_to is not None:
        headers[BOUND_TO_HEADER] = exc.bound_to
    # A 5xx bound to work that goes on is no more mended by asking again than a final one: a
    # retry with the same Idempotency-Key replays it, one without (the SDK sends none of its own)
    # starts the work again, billed again.
    if exc.final or exc.bound_to is not None:
        headers[SHOULD_RETRY_HEADER] = "false"
    if exc.request_id is not None:
        headers["x-request-id"] = exc.request_id
    if exc.retry_after is not None:
        # As OpenAI sends them: the SDK reads retry-after-ms first, then retry-after (whole
        # seconds here, rounded up: never sooner than said), and waits that long (up to 60 s).
        headers["retry-after"] = str(math.ceil(exc.retry_after))
        headers["retry-after-ms"] = str(round(exc.retry_after * 1000))
    return JSONResponse(exc.body(), status_code=exc.status_code, headers=headers)


def _describe_validation_error(error: dict[str, Any]) -> tuple[str, str | None]:
    # A location holds the producer's own keys: bounded, and made encodable (lone surrogates).
    location = [str(part) for part in error.get("loc", ()) if part not in ("body", "query", "path", "header")]
    param = bounded_text(".".join(location)) or None
    message = bounded_text(str(error.get("msg", "invalid value")), MAX_ERROR_MESSAGE_CHARS)
    return (f"{param}: {message}" if param else message), param


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error, including FastAPI's own 404/405/422, in OpenAI's shape."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return api_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        messages = [_describe_validation_error(error) for error in errors[:10]]
        message = bounded_text("; ".join(text for text, _ in messages), 2 * MAX_ERROR_MESSAGE_CHARS)
        message = message or "invalid request"
        param = messages[0][1] if messages else None
        return JSONResponse(
            error_body(message, "invalid_request_error", param=param, code="invalid_value"), status_code=400
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(
            error_body(str(exc.detail), type_, code=None), status_code=exc.status_code, headers=exc.headers
        )

    @app.exception_handler(ClientDisconnect)
    async def _client_gone(_: Request, exc: ClientDisconnect) -> Response:
        # A client gone mid-body (a route reading it itself: an upload's form) is no error of
        # ours: logged as one, any client could flood the error log. Nothing was done for it.
        # (An Idempotency-Key's middleware reads the body first, and stores nothing then.)
        logger.debug("client disconnected before its request body was read")
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        # Here, not as a handler of its own: the Idempotency-Key middleware's statements fail
        # outside the routes, and only this handler sees those.
        unavailable = database_unavailable(exc)
        if unavailable is not None:
            logger.warning("the database is unavailable: %s", redacted_error_text(exc))
            return api_error_response(unavailable)
        logger.exception("unhandled error in the API", exc_info=exc)
        return JSONResponse(
            error_body("internal error; it has been logged", "server_error", code="internal_error"),
            status_code=500,
        )
