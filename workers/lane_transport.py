"""The interactive lane's messages, on the broker's Redis: single calls to the workers, their
answers and their streamed chunks back to the API that waits.

Both sides use it: the API (``send``, ``wait_reply``, ``read_stream``) and a worker's lane consumer
(``take``, ``settle``, ``reply``, ``append``). Like ``workers.enqueue`` it imports no worker code.

* ``lane:queue`` (a list, LPUSH / BRPOP: first in, first out) carries request ids, and whether
  the caller streams, never prompts ("ledger first", "secrets stay secret": docs/design.md): the
  request's row is committed before ``send``.
* Each message has a dispatch marker (``workers.dispatch``), written with it and removed when a
  worker claims the request: while it lives, the sweeper leaves the queued request alone; once it
  is gone (a consumer died between take and claim, the broker was flushed) the sweeper sends the
  request again, through the chunk queue. It lives ``MARKER_PENDING_SECONDS``, so a message waiting
  longer than that (every lane busy) gets a copy on the chunk queue too: harmless, a claim decides.
* ``lane:reply:{id}`` (a list the API BLPOPs) gets the outcome once it is in the ledger, or
  ``{"ledger": true}`` when the ledger holds another outcome than this worker's (read it there).
* ``lane:stream:{id}`` (a Redis stream the API XREADs) gets each chunk as the provider sends it,
  then the outcome. Replies and streams expire after ``REPLY_SECONDS``: a caller gone leaves
  nothing behind for long.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from workers.constants import dispatch_marker_key, lane_queue_key, lane_reply_key, lane_stream_key
from workers.dispatch import MARKER_PENDING_SECONDS

__all__ = ["REPLY_SECONDS", "LaneMessage", "LaneTransport", "StreamEntry", "lane_dispatch_id"]

REPLY_SECONDS = 300
_STREAM_FLAG = ":stream"
_TRACE_SEPARATOR = ";"  # neither in a request id nor in a traceparent (hex digits and dashes)


def lane_dispatch_id(request_id: str) -> str:
    """The dispatch id a single call's row names: its marker is the lane message's."""
    return f"lane-{request_id}"


@dataclass(frozen=True, slots=True)
class LaneMessage:
    """A request id, whether its caller streams, and (tracing on) the W3C ``traceparent`` of the
    API's span, under which the worker's spans go (``telemetry.tracing``)."""

    request_id: str
    stream: bool
    traceparent: str | None = None

    def encode(self) -> str:
        text = self.request_id + (_STREAM_FLAG if self.stream else "")
        return text if self.traceparent is None else f"{text}{_TRACE_SEPARATOR}{self.traceparent}"

    @classmethod
    def decode(cls, raw: bytes | str) -> LaneMessage:
        text = raw.decode() if isinstance(raw, bytes) else raw
        text, _, traceparent = text.partition(_TRACE_SEPARATOR)
        if text.endswith(_STREAM_FLAG):
            return cls(text.removesuffix(_STREAM_FLAG), True, traceparent or None)
        return cls(text, False, traceparent or None)


@dataclass(frozen=True, slots=True)
class StreamEntry:
    """One entry of a call's stream: a chunk of text (``cached`` on the first says whether the
    answer comes from the cache), or the end (``outcome``: the outcome's JSON)."""

    entry_id: str
    text: str | None = None
    cached: bool | None = None
    outcome: dict[str, Any] | None = None


class LaneTransport:
    """The lane's keys under ``key_prefix`` on ``client`` (an asyncio Redis client of the broker)."""

    def __init__(self, client: aioredis.Redis, key_prefix: str) -> None:
        self.client = client
        self.key_prefix = key_prefix

    # --- the API's side ---------------------------------------------------------------------

    async def send(self, message: LaneMessage) -> None:
        """Queue ``message`` with its marker, in one round trip. Raises Redis errors."""
        marker = dispatch_marker_key(self.key_prefix, lane_dispatch_id(message.request_id))
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.set(marker, "lane", ex=MARKER_PENDING_SECONDS)
            pipe.lpush(lane_queue_key(self.key_prefix), message.encode())
            await pipe.execute()

    async def wait_reply(self, request_id: str, wait_seconds: float) -> dict[str, Any] | None:
        """The reply of ``request_id``, waiting up to ``wait_seconds``; None if none came."""
        key = lane_reply_key(self.key_prefix, request_id)
        answer = await self.client.blpop([key], timeout=wait_seconds)
        if answer is None:
            return None
        reply: dict[str, Any] = json.loads(answer[1])
        return reply

    async def read_stream(self, request_id: str, after: str, block_ms: int) -> list[StreamEntry]:
        """The stream's entries after ``after`` ("0" from the start), waiting up to ``block_ms``."""
        key = lane_stream_key(self.key_prefix, request_id)
        answer: Any = await self.client.xread({key: after}, block=block_ms)
        streams: list[tuple[Any, list[tuple[bytes, dict[bytes, bytes]]]]] = answer or []
        entries: list[StreamEntry] = []
        for _, items in streams:
            for entry_id, fields in items:
                entries.append(_entry(entry_id, fields))
        return entries

    async def forget(self, request_id: str) -> None:
        await self.client.delete(
            lane_reply_key(self.key_prefix, request_id), lane_stream_key(self.key_prefix, request_id)
        )

    # --- a worker's side ----------------------------------------------------------------------

    async def take(self, wait_seconds: float) -> LaneMessage | None:
        answer = await self.client.brpop([lane_queue_key(self.key_prefix)], timeout=wait_seconds)
        return None if answer is None else LaneMessage.decode(answer[1])

    async def settle(self, request_id: str) -> None:
        """The request is claimed (or was not claimable): its marker covers nothing any more."""
        await self.client.delete(dispatch_marker_key(self.key_prefix, lane_dispatch_id(request_id)))

    async def reply(self, request_id: str, reply: dict[str, Any]) -> None:
        key = lane_reply_key(self.key_prefix, request_id)
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.rpush(key, json.dumps(reply))
            pipe.expire(key, REPLY_SECONDS)
            await pipe.execute()

    async def append(
        self,
        request_id: str,
        *,
        text: str | None = None,
        cached: bool | None = None,
        outcome: dict[str, Any] | None = None,
    ) -> None:
        fields: dict[str, str] = {}
        if text is not None:
            fields["t"] = text
        if cached is not None:
            fields["c"] = "1" if cached else "0"
        if outcome is not None:
            fields["o"] = json.dumps(outcome)
        key = lane_stream_key(self.key_prefix, request_id)
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.xadd(key, fields)  # type: ignore[arg-type]
            pipe.expire(key, REPLY_SECONDS)
            await pipe.execute()


def _entry(entry_id: bytes | str, fields: dict[bytes, bytes]) -> StreamEntry:
    decoded = {key.decode(): value.decode() for key, value in fields.items()}
    cached = decoded.get("c")
    outcome = decoded.get("o")
    return StreamEntry(
        entry_id=entry_id.decode() if isinstance(entry_id, bytes) else entry_id,
        text=decoded.get("t"),
        cached=None if cached is None else cached == "1",
        outcome=None if outcome is None else json.loads(outcome),
    )
