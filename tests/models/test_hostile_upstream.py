"""An upstream that answers 2xx but never stops, or stops too slowly: a body of hundreds of MB (or a
gzip bomb that inflates to it, or an HTTP/1.0 body ended by the close), headers or a body trickled a
byte at a time, a stream of endless events or kept alive by SSE comments. Each call ends with a
named error, within the client's timeout for the whole call and holding at most
``MAX_ANSWER_BYTES`` of the answer: before, the worker read the whole body into memory (a 300 KB
gzip body became 80 MB) and a trickle held the call (and its rate-limit lease) for as long as
the upstream liked."""

from __future__ import annotations

import contextlib
import gzip
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from typing import ClassVar

import pytest
from openai import DefaultAioHttpClient

from models import (
    CreateResult,
    InvalidProviderResponse,
    OpenAIChatCompletionClient,
    ProviderTimeout,
    StreamInterrupted,
    UserMessage,
)
from models.openai.results import RESPONSE_TOO_LARGE
from models.openai.transport import MAX_ANSWER_BYTES
from tests.models.local_http import serving

COMPLETION = json.dumps(
    {
        "id": "chatcmpl-hostile",
        "object": "chat.completion",
        "created": 0,
        "model": "gpt-4o",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
).encode()
# Leading whitespace keeps the body valid JSON: read whole, it is an answer like any other.
PADDING = MAX_ANSWER_BYTES + 16 * 1024 * 1024


class _Hostile(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    mode: ClassVar[str] = ""
    stop = threading.Event()

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client gave up
            getattr(self, f"_{self.mode}")()

    def _gzip_bomb(self) -> None:
        compressor = gzip.compress(b" " * PADDING + COMPLETION, compresslevel=9)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Length", str(len(compressor)))
        self.end_headers()
        self.wfile.write(compressor)

    def _endless_chunked(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        piece = b" " * (1024 * 1024)
        sent = 0
        while sent <= PADDING and not self.stop.is_set():
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            sent += len(piece)
        self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(COMPLETION), COMPLETION))

    def _close_delimited(self) -> None:
        # HTTP/1.0 style: no length, the body ends when the connection closes.
        self.wfile.write(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n")
        piece = b" " * (1024 * 1024)
        sent = 0
        while sent <= PADDING and not self.stop.is_set():
            self.wfile.write(piece)
            sent += len(piece)
        self.wfile.write(COMPLETION)
        self.close_connection = True

    def _trickled_body(self) -> None:
        body = b" " * 40 + COMPLETION
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        for i in range(len(body)):  # one byte each 0.2 s: never idle for a whole read timeout
            if self.stop.wait(0.2 if i < 40 else 0):
                return
            self.wfile.write(body[i : i + 1])
            self.wfile.flush()

    def _trickled_headers(self) -> None:
        self.wfile.write(b"HTTP/1.1 200 OK\r\n")
        for i in range(40):
            if self.stop.wait(0.2):
                return
            self.wfile.write(b"X-Slow-%d: x\r\n" % i)
            self.wfile.flush()
        self.wfile.write(b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(COMPLETION))
        self.wfile.write(COMPLETION)


@pytest.fixture
def hostile() -> Iterator[tuple[str, type[_Hostile]]]:
    _Hostile.stop.clear()
    with serving(_Hostile) as url:
        yield url, _Hostile
        _Hostile.stop.set()


async def _call(url: str, upstream_timeout: float = 60.0, *, through_sdk: bool = False) -> None:
    client = OpenAIChatCompletionClient(
        model="gpt-4o",
        api_key="sk-hostile",
        base_url=url,
        timeout=upstream_timeout,
        http_client=DefaultAioHttpClient() if through_sdk else None,
    )
    try:
        await client.create([UserMessage(content="hello", source="user")])
    finally:
        await client.close()


@pytest.mark.parametrize("mode", ["gzip_bomb", "endless_chunked", "close_delimited"])
async def test_an_answer_past_the_cap_is_refused_not_held(
    hostile: tuple[str, type[_Hostile]], mode: str
) -> None:
    url, handler = hostile
    handler.mode = mode
    with pytest.raises(InvalidProviderResponse) as caught:
        await _call(url)
    error = caught.value
    assert error.code == RESPONSE_TOO_LARGE
    assert error.retryable is False  # a 2xx: the provider billed it
    assert str(MAX_ANSWER_BYTES) in error.message


@pytest.mark.parametrize("through_sdk", [False, True], ids=["own-transport", "sdk"])
@pytest.mark.parametrize("mode", ["trickled_body", "trickled_headers"])
async def test_a_trickled_answer_ends_at_the_calls_timeout(
    hostile: tuple[str, type[_Hostile]], mode: str, through_sdk: bool
) -> None:
    url, handler = hostile
    handler.mode = mode
    # The trickle lasts 8 s, never idle for a whole second: an answer means no deadline held.
    with pytest.raises(ProviderTimeout):
        await _call(url, upstream_timeout=1.0, through_sdk=through_sdk)


def _event(content: str, finish: str | None = None) -> bytes:
    chunk = {
        "id": "chatcmpl-hostile",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "gpt-4o",
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


class _HostileStream(_Hostile):
    def _stream_head(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def _send(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _finish(self) -> None:
        self._send(_event("", "stop") + b"data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")

    def _endless_events(self) -> None:
        self._stream_head()
        piece = _event("x" * (1024 * 1024))
        sent = 0
        while sent <= PADDING and not self.stop.is_set():
            self._send(piece)
            sent += len(piece)
        self._finish()

    def _keep_alive_comments(self) -> None:
        # A live-looking stream that never says anything: an SSE comment each 0.2 s for 8 s.
        self._stream_head()
        self._send(_event("hel"))
        for _ in range(40):
            if self.stop.wait(0.2):
                return
            self._send(b": keep-alive\n\n")
        self._send(_event("lo"))
        self._finish()


@pytest.fixture
def hostile_stream() -> Iterator[tuple[str, type[_HostileStream]]]:
    _HostileStream.stop.clear()
    with serving(_HostileStream) as url:
        yield url, _HostileStream
        _HostileStream.stop.set()


async def _stream(url: str, upstream_timeout: float = 60.0) -> None:
    client = OpenAIChatCompletionClient(
        model="gpt-4o", api_key="sk-hostile", base_url=url, timeout=upstream_timeout
    )
    try:
        async for _ in client.create_stream([UserMessage(content="hello", source="user")]):
            pass
    finally:
        await client.close()


async def test_a_stream_past_the_cap_is_refused_not_held(
    hostile_stream: tuple[str, type[_HostileStream]],
) -> None:
    url, handler = hostile_stream
    handler.mode = "endless_events"
    with pytest.raises(InvalidProviderResponse) as caught:
        await _stream(url)
    assert caught.value.code == RESPONSE_TOO_LARGE
    assert caught.value.retryable is False


async def test_a_stream_kept_alive_by_comments_ends_at_the_calls_timeout(
    hostile_stream: tuple[str, type[_HostileStream]],
) -> None:
    url, handler = hostile_stream
    handler.mode = "keep_alive_comments"
    # The comments last 8 s, never idle for a whole second: an answer means no deadline held.
    with pytest.raises(StreamInterrupted) as caught:
        await _stream(url, upstream_timeout=1.0)
    assert caught.value.retryable is True


class _CutAfterUsage(_HostileStream):
    def _usage_then_cut(self) -> None:
        # The whole answer, its finish_reason and its usage (the last chunk OpenAI sends), then the
        # connection drops before ``data: [DONE]`` and the chunked body's end.
        self._stream_head()
        self._send(_event("hello"))
        self._send(_event("", "stop"))
        usage = {
            "id": "chatcmpl-hostile",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": "gpt-4o",
            "choices": [],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
        }
        self._send(b"data: " + json.dumps(usage).encode() + b"\n\n")
        self.close_connection = True


async def test_a_stream_cut_after_its_usage_is_the_whole_answer_not_an_interruption() -> None:
    """Its usage is the last chunk a stream sends: what broke after it is the terminator only. It
    was ``StreamInterrupted`` (retryable): the answer the provider billed thrown away, and paid
    for again by the retry."""
    _CutAfterUsage.mode = "usage_then_cut"
    with serving(_CutAfterUsage) as url:
        client = OpenAIChatCompletionClient(model="gpt-4o", api_key="sk-hostile", base_url=url)
        try:
            items = [
                item
                async for item in client.create_stream(
                    [UserMessage(content="hello", source="user")], include_usage=True
                )
            ]
        finally:
            await client.close()
    result = items[-1]
    assert isinstance(result, CreateResult)
    assert result.content == "hello"
    assert result.finish_reason == "stop"
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (3, 1)


def _choice_event(index: int, content: str, finish: str | None = None, usage: bool = False) -> bytes:
    chunk: dict[str, object] = {
        "id": "chatcmpl-hostile",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "gpt-4o",
        "choices": [{"index": index, "delta": {"content": content}, "finish_reason": finish}],
    }
    if usage:  # as servers that report usage on every chunk do (vLLM's continuous_usage_stats)
        chunk["usage"] = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


class _CutWhileASecondChoiceRuns(_HostileStream):
    def _second_choice_cut(self) -> None:
        # n=2, usage on every chunk: the first choice finished, the second is cut mid-answer.
        self._stream_head()
        self._send(_choice_event(0, "hello", usage=True))
        self._send(_choice_event(1, "half an ans", usage=True))
        self._send(_choice_event(0, "", "stop", usage=True))
        self.close_connection = True


async def test_a_stream_cut_while_another_choice_runs_is_an_interruption_not_a_whole_answer() -> None:
    """A cut after usage and the first choice's finish is whole only if every choice finished:
    with ``n`` > 1 and usage on every chunk, a cut second choice was kept (and served, and billed)
    as whole, its text ending mid-word and its finish_reason None."""
    _CutWhileASecondChoiceRuns.mode = "second_choice_cut"
    with serving(_CutWhileASecondChoiceRuns) as url:
        client = OpenAIChatCompletionClient(model="gpt-4o", api_key="sk-hostile", base_url=url)
        try:
            with pytest.raises(StreamInterrupted):
                async for _ in client.create_stream(
                    [UserMessage(content="hello", source="user")],
                    include_usage=True,
                    extra_create_args={"n": 2},
                ):
                    pass
        finally:
            await client.close()


class _BoundlessEvents(_HostileStream):
    def _gzipped_events(self) -> None:
        # Events of 1 MiB of text each, gzipped: past the bound decoded, a few hundred KB as sent.
        events = b"".join(_event("x" * (1024 * 1024)) for _ in range(PADDING // (1024 * 1024)))
        body = gzip.compress(events + _event("", "stop") + b"data: [DONE]\n\n", compresslevel=9)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _one_endless_event(self) -> None:
        # One event that never ends (no blank line): nothing for the client to yield, ever.
        self._stream_head()
        self._send(b"data: ")
        piece = b" " * (1024 * 1024)
        for _ in range(PADDING // len(piece)):
            if self.stop.is_set():
                return
            self._send(piece)
        self.stop.wait(60)


@pytest.mark.parametrize("mode", ["gzipped_events", "one_endless_event"])
async def test_a_stream_past_the_cap_decoded_or_in_one_event_is_refused_not_held(mode: str) -> None:
    """The stream's bound was its bytes as they came off the wire, checked after each event: a
    gzipped stream was held whole however large it inflated to, and one event that never ended
    was read (and held) until the call's deadline, then retried as an interruption."""
    _BoundlessEvents.mode = mode
    _BoundlessEvents.stop.clear()
    with serving(_BoundlessEvents) as url:
        try:
            with pytest.raises(InvalidProviderResponse) as caught:
                await _stream(url, upstream_timeout=30.0)
        finally:
            _BoundlessEvents.stop.set()
    assert caught.value.code == RESPONSE_TOO_LARGE


@pytest.mark.parametrize("mode", ["gzip_bomb", "endless_chunked"])
async def test_an_answer_past_the_cap_through_the_sdk_is_refused_not_held(
    hostile: tuple[str, type[_Hostile]], mode: str
) -> None:
    """The SDK's way (an ``http_client`` given, or a proxy aiohttp cannot speak to) read the whole
    answer into memory as before: the bound held for the own transport only."""
    url, handler = hostile
    handler.mode = mode
    with pytest.raises(InvalidProviderResponse) as caught:
        await _call(url, through_sdk=True)
    assert caught.value.code == RESPONSE_TOO_LARGE
    assert caught.value.retryable is False
