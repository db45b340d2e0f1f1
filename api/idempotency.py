"""``Idempotency-Key`` on every POST: a client that retries (a timeout, a dropped connection, a
503) with the same key gets the first answer again, and nothing runs or is billed twice.

The key is scoped to the tenant. The request is identified by its method, path, query and body
(a JSON body compared as parsed, a multipart body without its random boundary). The same key with
another request is refused (422 ``idempotency_key_reused``); while the first request with a key is
being answered, another one is refused (409 ``idempotency_key_in_use``: retry later). Answers
below 500 (but 429 and redirects) are kept ``TOKENMILL_IDEMPOTENCY_RETENTION_SECONDS`` and replayed
with the header ``Idempotent-Replayed: true``, and so is a 5xx bound to work that goes on (it names it in
``Tokenmill-Bound-To``: a wait that timed out, a cancel that could not stop a call already
upstream), and so is a stream cut off mid-way (its client gone, its call goes on: a bound 503
is kept in its place, ``_CapturingSend.interrupted``). Any other 5xx means nothing was done that a
retry would repeat at a cost (see ``api.routes.chat``, which cancels a call the broker could not
take), so the key is freed for the retry.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import IO, Any

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import store
from api.deps import scope_tenant
from api.errors import (
    BOUND_TO_HEADER,
    CLIENT_CLOSED_REQUEST,
    SHOULD_RETRY_HEADER,
    APIError,
    Conflict,
    InvalidRequest,
    ServiceUnavailable,
    Unauthenticated,
    not_stored,
)
from store.clock import now_seconds

__all__ = ["IdempotencyKeyReused", "IdempotencyKeys", "request_hash"]

_VALID_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")
_SPOOL_IN_MEMORY = 1024 * 1024  # bodies above this are spooled to disk while being hashed
_CHUNK = 64 * 1024
# Answers above this are passed on but not kept (a retry then runs afresh); chat completions and
# batch objects are far smaller.
_MAX_STORED_RESPONSE = 8 * 1024 * 1024
_PURGE_EVERY_SECONDS = 60


class IdempotencyKeyReused(APIError):
    status_code = 422
    type = "invalid_request_error"
    default_code = "idempotency_key_reused"


def _digest_without(source: IO[bytes], token: bytes, digest: Any) -> None:
    """Feed ``source`` to ``digest`` with every occurrence of ``token`` left out, in bounded memory."""
    keep = max(0, len(token) - 1)
    pending = b""
    while chunk := source.read(1024 * 1024):
        pending = pending + chunk
        if token:
            pending = pending.replace(token, b"")
        if len(pending) > keep:
            digest.update(pending[: len(pending) - keep])
            pending = pending[len(pending) - keep :]
    digest.update(pending)


def request_hash(
    method: str, path: str, query: bytes, content_type: str, body: IO[bytes], *, json_limit: int
) -> str:
    """What identifies a request for its idempotency key. A JSON body of at most ``json_limit``
    bytes (the JSON routes' body limit) counts as parsed; a larger one (only the upload path takes
    one) counts as sent: parsing it held the GIL and some 30 times its size in memory (48 MB of
    ``[{},...]``: 1.3 GB), for a body its route refuses."""
    digest = hashlib.sha256(f"{method} {path}?".encode() + query + b"\n")
    size = body.seek(0, 2)
    body.seek(0)
    media_type = content_type.split(";")[0].strip().lower()
    if media_type == "application/json" and size <= json_limit:
        raw = body.read()
        try:
            canonical = json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":")).encode()
        except (ValueError, RecursionError):
            canonical = raw
        digest.update(canonical)
    else:
        boundary = (
            re.search(r"boundary=\"?([^\";]+)\"?", content_type)
            if media_type.startswith("multipart/")
            else None
        )
        _digest_without(body, boundary.group(1).encode() if boundary else b"", digest)
    body.seek(0)
    return digest.hexdigest()


class _CapturingSend:
    """Passes the answer on and keeps a copy of it (up to ``_MAX_STORED_RESPONSE``); hands it to
    ``keep`` once complete, before its last chunk goes out."""

    def __init__(self, send: Send, keep: Callable[[store.StoredResponse], Awaitable[None]]) -> None:
        self._send = send
        self._keep = keep
        self.kept = False
        self.status_code: int | None = None
        self.headers: list[tuple[str, str]] = []
        self.chunks: list[bytes] = []
        self.size = 0
        self.complete = False

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status_code = int(message["status"])
            self.headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", [])]
        elif message["type"] == "http.response.body":
            chunk = bytes(message.get("body", b""))
            self.size += len(chunk)
            if self.size <= _MAX_STORED_RESPONSE:
                self.chunks.append(chunk)
            # Complete before it is passed on: a client gone by now gets it on its retry.
            self.complete = not message.get("more_body", False)
            answer = self.stored() if self.complete else None
            if answer is not None:
                # Kept now, not when the app returns: Starlette runs background tasks (a large
                # file's validation) inside the response call, and a retry meanwhile must replay.
                await self._keep(answer)
                self.kept = True
        await self._send(message)

    def stored(self) -> store.StoredResponse | None:
        """The answer to keep, or None (incomplete, too large, a 401 or a 429, a redirect, or a 5xx
        not bound to work)."""
        if not self.complete or self.status_code is None:
            return None
        bound = any(name.lower() == BOUND_TO_HEADER.lower() for name, _ in self.headers)
        if self.status_code >= 500 and not bound:
            return None
        if self.status_code in (401, 429):
            # A 401 here is a key revoked after this middleware looked it up: the caller's
            # credentials, not the operation's outcome (a retry with a new key must run it).
            return None
        if 300 <= self.status_code < 400 or self.status_code == CLIENT_CLOSED_REQUEST:
            # A redirect (a trailing slash's 307) is not the operation's outcome: kept, it would
            # burn the key for the very request it points to. Nor is a client gone mid-body.
            return None
        if self.size > _MAX_STORED_RESPONSE:
            return None
        return store.StoredResponse(self.status_code, self.headers, b"".join(self.chunks))

    def interrupted(self) -> store.StoredResponse | None:
        """For an answer that started, bound to work (a streamed chat call), but never completed
        (its client went away mid-stream): a 503 bound to that work to keep in its place, since
        the work goes on and is billed, and a retry must not run it again. None otherwise."""
        if self.complete or self.status_code is None or self.status_code >= 300:
            return None
        bound = next((value for name, value in self.headers if name.lower() == BOUND_TO_HEADER.lower()), None)
        if bound is None:
            return None
        error = ServiceUnavailable(
            f"the answer was interrupted before it was complete; {bound} went on and is billed, "
            "and is not run again for this Idempotency-Key",
            code="stream_interrupted",
            bound_to=bound,
        )
        headers = [
            ("content-type", "application/json"),
            (BOUND_TO_HEADER, bound),
            (SHOULD_RETRY_HEADER, "false"),
        ]
        return store.StoredResponse(error.status_code, headers, json.dumps(error.body()).encode())


class IdempotencyKeys:
    """ASGI middleware; runs inside the body size limit, so what it reads is bounded."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._last_purge = 0.0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        key = headers.get("idempotency-key")
        if key is None:
            await self.app(scope, receive, send)
            return
        if not _VALID_KEY.match(key):
            invalid = InvalidRequest(
                "Idempotency-Key must be 1 to 255 visible ASCII characters",
                param="Idempotency-Key",
                code="invalid_idempotency_key",
            )
            await _answer_error(invalid, scope, receive, send)
            return
        engine = scope["app"].state.engine
        settings = scope["app"].state.settings
        try:
            tenant = await scope_tenant(scope)
        except Unauthenticated:
            await self.app(scope, receive, send)  # the route answers 401 as usual
            return
        with tempfile.SpooledTemporaryFile(max_size=_SPOOL_IN_MEMORY) as body:
            try:
                more_body = True
                while more_body:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return
                    body.write(message.get("body", b""))
                    more_body = message.get("more_body", False)
            except APIError as e:  # over the size limit
                await _answer_error(e, scope, receive, send)
                return
            except OSError as e:  # the temporary disk is full: as the upload's own spool answers
                await _answer_error(not_stored(e, "a temporary file"), scope, receive, send)
                return
            size = body.tell()
            digest = await run_in_threadpool(
                request_hash,
                scope["method"],
                scope["path"],
                scope.get("query_string", b""),
                headers.get("content-type", ""),
                body,
                json_limit=settings.max_request_body_bytes,
            )
            now = now_seconds()  # the ledger's clock, as every expiry it keeps (store.clock)
            retention = settings.idempotency_retention_seconds
            claim = await run_in_threadpool(
                store.claim_idempotency_key,
                engine,
                tenant.id,
                key,
                digest,
                now=now,
                expired_before=now - retention,
                # A request answered by a process that died is taken over after the longest wait.
                stale_before=now - int(settings.sync_timeout_seconds) - 60,
            )
            if time.monotonic() - self._last_purge > _PURGE_EVERY_SECONDS:
                self._last_purge = time.monotonic()
                await run_in_threadpool(store.purge_idempotency_keys, engine, older_than=now - retention)
            if claim.outcome is store.IdempotencyOutcome.REPLAY:
                assert claim.response is not None
                await _replay(claim.response, scope, receive, send)
                return
            refusal = _refusal(claim.outcome, key)
            if refusal is not None:
                await _answer_error(refusal, scope, receive, send)
                return

            async def keep(answer: store.StoredResponse) -> None:
                await run_in_threadpool(store.store_idempotent_response, engine, tenant.id, key, answer)

            capture = _CapturingSend(send, keep)
            try:
                await self.app(scope, _replaying(body, size, receive), capture)
            finally:
                interrupted = None if capture.kept else capture.interrupted()
                if interrupted is not None:
                    await keep(interrupted)
                elif not capture.kept:
                    await run_in_threadpool(store.abandon_idempotency_key, engine, tenant.id, key)


def _refusal(outcome: store.IdempotencyOutcome, key: str) -> APIError | None:
    if outcome is store.IdempotencyOutcome.MISMATCH:
        return IdempotencyKeyReused(
            f"Idempotency-Key {key!r} was used for another request; use a new key for a new request",
            param="Idempotency-Key",
        )
    if outcome is store.IdempotencyOutcome.IN_PROGRESS:
        return Conflict(
            f"a request with Idempotency-Key {key!r} is still being answered; retry later",
            param="Idempotency-Key",
            code="idempotency_key_in_use",
        )
    return None


def _replaying(body: IO[bytes], size: int, receive: Receive) -> Receive:
    """The request body again, from the spool; then the client's own messages (a disconnect)."""
    body.seek(0)
    finished = False

    async def replay() -> Message:
        nonlocal finished
        if finished:
            return await receive()
        chunk = body.read(_CHUNK)
        finished = body.tell() >= size
        return {"type": "http.request", "body": chunk, "more_body": not finished}

    return replay


async def _replay(answer: store.StoredResponse, scope: Scope, receive: Receive, send: Send) -> None:
    headers = [(k, v) for k, v in answer.headers if k.lower() != "content-length"]
    response = Response(answer.body, status_code=answer.status_code)
    response.raw_headers = [
        *[(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers],
        (b"content-length", str(len(answer.body)).encode()),
        (b"idempotent-replayed", b"true"),
    ]
    await response(scope, receive, send)


async def _answer_error(error: APIError, scope: Scope, receive: Receive, send: Send) -> None:
    await JSONResponse(error.body(), status_code=error.status_code)(scope, receive, send)
