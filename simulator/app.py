"""The simulator's ASGI application: OpenAI's chat-completions and models endpoints plus ``/_sim/*`` controls.

A raw ASGI callable rather than a framework's router: it is the upstream of throughput benchmarks on small
machines, so every microsecond per request is the benchmark's, not ours.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from simulator.completion import (
    ChatRequest,
    Reply,
    build_reply,
    content_parts,
    parse_request,
    reply_chunks,
    with_content_parts,
)
from simulator.config import CONFIG_ENV, SimConfig
from simulator.errors import ApiError, ConfigError
from simulator.peers import PEERS_ENV, PeerLink, merge_stats
from simulator.stats import Stats

__all__ = ["SimulatorApp", "app_from_environment"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

DEFAULT_MODELS = ("sim-small", "sim-large", "gpt-4o-mini", "gpt-4o")
_DROPPED_RESPONSE_LOG = "ASGI callable returned without completing response."
_JSON = (b"content-type", b"application/json")


class _QuietDrops(logging.Filter):
    """Hides uvicorn's complaint about the responses we cut short on purpose (broken streams, timeouts)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != _DROPPED_RESPONSE_LOG


logging.getLogger("uvicorn.error").addFilter(_QuietDrops())


class _Dropped(Exception):
    """The response was cut off on purpose; the connection closes."""


class SimulatorApp:
    """One server's state: the start config, the live config, the fault stream and the stats."""

    def __init__(self, config: SimConfig | None = None) -> None:
        self.start_config = config or SimConfig()
        self.config = self.start_config
        self.stats = Stats()
        self.faults = random.Random(self.config.seed)
        self.recent: deque[float] = deque()  # arrival times within the rpm window
        self.seen: Counter[tuple[bytes, str]] = Counter()  # (request, fault) -> times hit, for times=N
        folder = os.environ.get(PEERS_ENV)
        self.peers = PeerLink(folder, self._peer_command) if folder else None

    def configure(self, changes: dict[str, Any]) -> None:
        updated = self.config.updated(changes)
        if updated.seed != self.config.seed:
            self.faults = random.Random(updated.seed)
        self.config = updated

    def reset(self) -> None:
        self.config = self.start_config
        self.faults = random.Random(self.config.seed)
        self.recent.clear()
        self.seen.clear()
        # A fresh Stats, not the old one zeroed: a request still running from before the reset
        # (its client gone, say, after a long latency) counts in the Stats it arrived in, so it can
        # neither add an answer to the new period nor take one off its in_flight.
        self.stats = Stats()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        method: str = scope["method"]
        if path.startswith("/v1/"):
            path = path[3:]
        if path == "/chat/completions" and method == "POST":
            await self.chat_completions(scope, receive, send)
        elif path.startswith("/_sim/"):
            await self.control(path, method, receive, send)
        elif path == "/models" and method == "GET":
            models = self.config.known_models or list(DEFAULT_MODELS)
            await _send_json(send, 200, {"object": "list", "data": [_model_entry(m) for m in models]})
        elif path.startswith("/models/") and method == "GET":
            name = path.removeprefix("/models/")
            if self.config.known_models is not None and name not in self.config.known_models:
                await _send_error(send, _model_not_found(name))
            else:
                await _send_json(send, 200, _model_entry(name))
        else:
            await _send_error(send, ApiError(404, f"Unknown request URL: {method} {scope['path']}."))

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                if self.peers is not None:
                    await self.peers.start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.peers is not None:
                    await self.peers.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _peer_command(self, command: dict[str, Any]) -> Any:
        """A control request forwarded by a sibling worker."""
        if command["op"] == "stats":
            return self.stats.snapshot()
        if command["op"] == "config":
            self.configure(command["changes"])
        elif command["op"] == "reset":
            self.reset()
        return True

    async def _everywhere(self, command: dict[str, Any]) -> list[Any]:
        return [] if self.peers is None else await self.peers.broadcast(command)

    async def control(self, path: str, method: str, receive: Receive, send: Send) -> None:
        if path == "/_sim/health":
            await _send_json(send, 200, {"ok": True, "pid": os.getpid()})
        elif path == "/_sim/stats" and method == "GET":
            parts = [self.stats.snapshot(), *await self._everywhere({"op": "stats"})]
            await _send_json(send, 200, merge_stats(parts))
        elif path == "/_sim/config" and method == "GET":
            await _send_json(send, 200, self.config.public())
        elif path == "/_sim/config" and method == "POST":
            try:
                changes = json.loads(await _read_body(receive) or b"{}")
                if not isinstance(changes, dict):
                    raise ConfigError("the config must be a JSON object")
                self.configure(changes)
            except (ValueError, ConfigError) as e:
                await _send_error(send, ApiError(400, str(e)))
                return
            await self._everywhere({"op": "config", "changes": changes})
            await _send_json(send, 200, self.config.public())
        elif path == "/_sim/reset" and method == "POST":
            await _read_body(receive)
            self.reset()
            await self._everywhere({"op": "reset"})
            await _send_json(send, 200, {"ok": True})
        else:
            await _send_error(send, ApiError(404, f"Unknown simulator control: {method} {path}."))

    async def chat_completions(self, scope: Scope, receive: Receive, send: Send) -> None:
        arrival = time.time()
        stats = self.stats
        client = scope.get("client")
        stats.arrived(arrival, (client[0], client[1]) if client else None)
        stats.completions += 1
        status: int | str = 500
        try:
            status = await self._complete(scope, receive, send, arrival, stats)
        except ApiError as e:
            status = e.status
            await _send_error(send, e)
        except _Dropped:
            # Headers, then nothing: the connection closes with the body unfinished.
            status = "timeout"
            stats.timeouts += 1
            start = {
                "type": "http.response.start",
                "status": 200,
                "headers": [_JSON, (b"content-length", b"2")],
            }
            await send(start)
        finally:
            stats.finished(status)

    async def _complete(
        self, scope: Scope, receive: Receive, send: Send, arrival: float, stats: Stats
    ) -> int:
        config = self.config
        if config.require_api_key is not None and _bearer(scope) != config.require_api_key:
            raise ApiError(
                401,
                "Incorrect API key provided. You can find your API key at https://platform.openai.com/account/api-keys.",
                code="invalid_api_key",
            )
        try:
            body = json.loads(await _read_body(receive))
        except ValueError as e:
            raise ApiError(400, f"We could not parse the JSON body of your request: {e}") from e
        request = parse_request(body)
        stats.by_model[request.model] += 1
        if config.known_models is not None and request.model not in config.known_models:
            raise _model_not_found(request.model)
        directives = request.directives
        if directives.delay_s and self._hits(request, "delay"):
            await asyncio.sleep(directives.delay_s)
        if directives.status is not None and self._hits(request, "status"):
            raise _status_error(directives.status, directives.retry_after_s)
        limit = config.max_context_tokens
        if (directives.context_length and self._hits(request, "context_length")) or (
            limit is not None and request.prompt_tokens > limit
        ):
            raise _context_length_error(limit or 128_000, request.prompt_tokens)
        await self._draw_faults(config, arrival)
        delay_ms = config.latency_ms + config.latency_jitter_ms * self.faults.random()
        reply = build_reply(
            request, reply_words=config.reply_words, answered_model_suffix=config.answered_model_suffix
        )
        if not request.stream:
            delay_ms += config.latency_per_token_ms * reply.completion_tokens
        if delay_ms > 0:
            await asyncio.sleep(delay_ms / 1000)
        if directives.garbage and self._hits(request, "garbage"):
            return await _send_garbage(send, request, reply, stats, shape=directives.garbage_shape)
        if request.stream:
            return await self._stream(request, reply, send, arrival, stats)
        usage = reply.usage()
        answer = reply.to_json()
        if directives.content_parts is not None:
            for choice in answer["choices"]:
                text = choice["message"]["content"]
                if text:
                    choice["message"]["content"] = content_parts(text, directives.content_parts)
        await _send_json(send, 200, answer, _request_headers())
        stats.accepted(arrival, usage)
        return 200

    def _hits(self, request: ChatRequest, fault: str) -> bool:
        """Whether a directive's fault applies this time (``times=N``: only the first N times)."""
        times = request.directives.times.get(fault)
        if times is None:
            return True
        key = (request.digest, fault)
        self.seen[key] += 1
        return self.seen[key] <= times

    async def _draw_faults(self, config: SimConfig, arrival: float) -> None:
        draw = self.faults.random()
        if draw < config.rate_429:
            raise _status_error(429, config.retry_after_s)
        draw -= config.rate_429
        if draw < config.rate_500:
            raise _status_error(500, None)
        draw -= config.rate_500
        if draw < config.rate_timeout:
            await asyncio.sleep(config.timeout_s)
            raise _Dropped()
        if config.rpm_limit is not None:
            while self.recent and self.recent[0] <= arrival - 60:
                self.recent.popleft()
            if len(self.recent) >= config.rpm_limit:
                wait = max(0.001, self.recent[0] + 60 - arrival)
                raise _status_error(429, round(wait, 3))
            self.recent.append(arrival)

    async def _stream(
        self, request: ChatRequest, reply: Reply, send: Send, arrival: float, stats: Stats
    ) -> int:
        config = self.config
        stats.streams += 1
        directives = request.directives
        break_after = directives.break_stream_after
        if break_after is not None and not self._hits(request, "break_stream"):
            break_after = None
        elif break_after is None:
            break_after = config.break_stream_after
        chunks = list(
            reply_chunks(
                reply,
                include_usage=request.include_usage,
                chunk_chars=config.stream_chunk_chars,
                empty_chunks=config.empty_chunks or directives.empty_chunks,
            )
        )
        if directives.content_parts is not None:
            chunks = with_content_parts(chunks, directives.content_parts)
        events = [b"data: " + json.dumps(chunk).encode() + b"\n\n" for chunk in chunks]
        events.append(b"data: [DONE]\n\n")
        headers = [(b"content-type", b"text/event-stream; charset=utf-8"), *_request_headers()]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        if break_after is not None and break_after < len(events) - 1:
            # Cut the stream: send some chunks, then return with the body unfinished so the server
            # closes the connection, as a provider's dropped stream looks to the client.
            await send(
                {"type": "http.response.body", "body": b"".join(events[:break_after]), "more_body": True}
            )
            stats.broken_streams += 1
            return 200
        gap = config.stream_chunk_delay_ms + config.latency_per_token_ms * reply.completion_tokens / max(
            1, len(events)
        )
        if gap > 0:
            for event in events[:-1]:
                await send({"type": "http.response.body", "body": event, "more_body": True})
                await asyncio.sleep(gap / 1000)
            await send({"type": "http.response.body", "body": events[-1]})
        else:
            await send({"type": "http.response.body", "body": b"".join(events)})
        stats.accepted(arrival, reply.usage())
        return 200


async def _send_garbage(
    send: Send, request: ChatRequest, reply: Reply, stats: Stats, *, shape: bool = False
) -> int:
    """``[[garbage]]``: a 200 whose body arrives whole (its Content-Length, or a stream's last
    event) but cannot be read: the reply's JSON cut in half, as ``application/json``; for a stream,
    a first event of such data, then ``[DONE]``. ``[[garbage shape]]``: whole JSON, but the first
    choice's ``message`` (a stream's ``delta``) is a string. Not ``accepted`` (no usage can be read
    from it)."""
    answer = reply.to_json()
    if shape:
        # Whole JSON of the wrong shape: the first choice's message (a stream: its delta) is the
        # reply's text, a string, not an object.
        choice = answer["choices"][0]
        text = choice.pop("message")["content"] or ""
        if request.stream:
            answer["object"] = "chat.completion.chunk"
            answer.pop("usage", None)
            choice["delta"] = text
        else:
            choice["message"] = text
        unreadable = json.dumps(answer).encode()
    else:
        whole = json.dumps(answer).encode()
        unreadable = whole[: len(whole) // 2]
    if request.stream:
        stats.streams += 1
        body = b"data: " + unreadable + b"\n\ndata: [DONE]\n\n"
        content_type = (b"content-type", b"text/event-stream; charset=utf-8")
    else:
        body, content_type = unreadable, _JSON
    headers = [content_type, (b"content-length", str(len(body)).encode()), *_request_headers()]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})
    return 200


def app_from_environment() -> SimulatorApp:
    """The app uvicorn's workers build: its config comes as JSON in ``SIMULATOR_CONFIG_JSON``."""
    return SimulatorApp(SimConfig.parse(json.loads(os.environ.get(CONFIG_ENV) or "{}")))


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    return b"".join(chunks)


def _bearer(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            text = value.decode("latin-1")
            return text[7:] if text.startswith("Bearer ") else None
    return None


def _request_headers() -> list[tuple[bytes, bytes]]:
    # x-sim-worker: which server process answered (with --workers N, tests check each one did).
    return [
        (b"x-request-id", f"req_{uuid.uuid4().hex}".encode()),
        (b"x-sim-worker", str(os.getpid()).encode()),
    ]


async def _send_json(
    send: Send, status: int, payload: Any, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [_JSON, (b"content-length", str(len(body)).encode()), *(headers or [])],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _send_error(send: Send, error: ApiError) -> None:
    headers = [(name.encode(), value.encode()) for name, value in error.headers.items()]
    headers += _request_headers()
    await _send_json(send, error.status, error.body(), headers)


def _model_entry(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 1_700_000_000, "owned_by": "tokenmill-simulator"}


def _model_not_found(model: str) -> ApiError:
    return ApiError(
        404,
        f"The model `{model}` does not exist or you do not have access to it.",
        code="model_not_found",
    )


def _context_length_error(limit: int, tokens: int) -> ApiError:
    return ApiError(
        400,
        f"This model's maximum context length is {limit} tokens. However, your messages resulted in "
        f"{max(tokens, limit + 1)} tokens. Please reduce the length of the messages.",
        param="messages",
        code="context_length_exceeded",
    )


_STATUS_ERRORS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Simulated bad request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: ("permission_error", None, "You are not allowed to sample from this model."),
    404: (
        "invalid_request_error",
        "model_not_found",
        "The model does not exist or you do not have access to it.",
    ),
    409: ("invalid_request_error", None, "Simulated conflict."),
    422: ("invalid_request_error", None, "Simulated unprocessable request."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests. Please try again later."),
    500: ("server_error", None, "The server had an error while processing your request. Sorry about that!"),
    502: ("server_error", None, "Bad gateway."),
    503: ("server_error", None, "The engine is currently overloaded, please try again later."),
    504: ("server_error", None, "Gateway timeout."),
}


def _status_error(status: int, retry_after_s: float | None) -> ApiError:
    kind, code, message = _STATUS_ERRORS.get(
        status,
        ("server_error" if status >= 500 else "invalid_request_error", None, f"Simulated error {status}."),
    )
    headers = {}
    if retry_after_s is not None:
        headers["retry-after"] = f"{retry_after_s:g}"
        headers["retry-after-ms"] = str(round(retry_after_s * 1000))
    return ApiError(status, message, type=kind, code=code, headers=headers)
