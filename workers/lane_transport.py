"""The interactive lane's messages, on the broker's Redis: single calls to the workers, their
answers and their streamed chunks back to the API that waits.

Both sides use it: the API (``send``, ``wait_reply``, ``read_stream``) and a worker's lane consumer
(``take``, ``settle``, ``reply``, ``append``). Like ``workers.enqueue`` it imports no worker code.

* ``lane:queue:{tenant_id}`` (a list per tenant, LPUSH / BRPOP: first in, first out within the
  tenant) carries request ids, and whether the caller streams, never prompts ("ledger first",
  "secrets stay secret": docs/design.md): the request's row is committed before ``send``. Which
  tenant's call a lane takes next is its ``workers.lane_scheduler``'s choice: ``take`` blocks on the
  tenants' lists in the order it gives (one BRPOP: a call to an idle lane is taken at once).
* ``lane:tenants`` (a hash: tenant id -> ``weight|sent at``) names the tenants that sent calls
  lately, so that the lanes know whose lists to block on; a tenant new to it is also pushed on
  ``lane:arrivals``, which every take blocks on first, so that a blocked lane learns of it at once.
  A lane forgets a tenant (``tenants``) once its list is empty and it sent nothing for a while.
* ``lane:busy`` lives ``LANE_BUSY_MS`` after each call sent: while it does, the chunks start fewer
  requests (``workers.lane_pressure``).
* ``lane:wake:{owner}`` wakes one consumer's blocked take when the order it blocked with is stale
  (a slot of a tenant it had left out freed).
* Each message has a dispatch marker (``workers.dispatch``), written with it and removed once a
  worker claimed the request (a streamed call's at once, a plain call's with its reply, or as
  soon as the claim fails or the request goes back in line): while it lives, the sweeper leaves
  the queued request alone; once it is gone (a consumer died between take and claim, the broker
  was flushed) the sweeper sends the request again, through the chunk queue. It lives
  ``MARKER_PENDING_SECONDS``, so a message waiting longer than that (every lane busy) gets a copy
  on the chunk queue too: harmless, a claim decides.
* ``lane:reply:{id}`` (a list the API BLPOPs) gets the outcome once it is in the ledger, or
  ``{"ledger": true}`` when the ledger holds another outcome than this worker's (read it there);
  the reply settles the message too (its marker goes in the same round trip), so a plain call's
  marker lives while it runs: harmless, as the sweeper sends a request running under an expired
  lease again whatever its marker (the worker died), and a live lease keeps it from claims.
* ``lane:stream:{id}`` (a Redis stream the API XREADs) gets each chunk as the provider sends it,
  then the outcome. Replies and streams expire after ``REPLY_SECONDS``: a caller gone leaves
  nothing behind for long.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from workers.constants import (
    dispatch_marker_key,
    lane_arrivals_key,
    lane_busy_key,
    lane_queue_key,
    lane_reply_key,
    lane_stream_key,
    lane_tenants_key,
    lane_wake_key,
)
from workers.dispatch import MARKER_PENDING_SECONDS
from workers.lane_pressure import LANE_BUSY_MS

__all__ = ["REPLY_SECONDS", "LaneMessage", "LaneTake", "LaneTransport", "StreamEntry", "lane_dispatch_id"]

REPLY_SECONDS = 300
# A wake left for a consumer that died before reading it is gone after this.
_WAKE_SECONDS = 60

# KEYS: the marker, the tenant's list, lane:tenants, lane:arrivals, lane:busy.
# ARGV: the marker's seconds, the message, the tenant id, "weight|sent at", lane:busy's ms.
_SEND = """
redis.call('SET', KEYS[1], 'lane', 'EX', ARGV[1])
redis.call('LPUSH', KEYS[2], ARGV[2])
if redis.call('HSET', KEYS[3], ARGV[3], ARGV[4]) == 1 then
  redis.call('LPUSH', KEYS[4], ARGV[3])
end
redis.call('SET', KEYS[5], '1', 'PX', ARGV[5])
"""

# KEYS: lane:tenants. ARGV: the tenants' lists' key prefix, forget those idle since before this.
# Atomic with _SEND: a tenant is never forgotten with a call in its list.
_TENANTS = """
local found = {}
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local tenant, value = all[i], all[i + 1]
  local weight, sent = string.match(value, '^([^|]*)|(.*)$')
  if (sent == nil or tonumber(sent) < tonumber(ARGV[2]))
      and redis.call('LLEN', ARGV[1] .. tenant) == 0 then
    redis.call('HDEL', KEYS[1], tenant)
  else
    found[#found + 1] = tenant
    found[#found + 1] = weight or '1'
  end
end
return found
"""
# KEYS: the reply's list, the message's dispatch marker. ARGV: the reply, its seconds.
# The answer and the settle in one round trip: the marker of a plain call is removed only here.
_REPLY = """
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('DEL', KEYS[2])
"""
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


@dataclass(frozen=True, slots=True)
class LaneTake:
    """What a take brought: a tenant's message, or (``message`` None) news that the order it
    blocked with is stale: a tenant arrived (``arrived``), or its consumer was woken."""

    tenant_id: str | None = None
    message: LaneMessage | None = None
    arrived: bool = False


class LaneTransport:
    """The lane's keys under ``key_prefix`` on ``client`` (an asyncio Redis client of the broker)."""

    def __init__(self, client: aioredis.Redis, key_prefix: str) -> None:
        self.client = client
        self.key_prefix = key_prefix
        self._send = client.register_script(_SEND)
        self._tenants = client.register_script(_TENANTS)
        self._reply = client.register_script(_REPLY)
        self._queue_prefix = lane_queue_key(key_prefix, "")

    # --- the API's side ---------------------------------------------------------------------

    def _send_keys_and_args(
        self, message: LaneMessage, tenant_id: str, weight: float
    ) -> tuple[list[str], list[str | int]]:
        marker = dispatch_marker_key(self.key_prefix, lane_dispatch_id(message.request_id))
        keys = [
            marker,
            lane_queue_key(self.key_prefix, tenant_id),
            lane_tenants_key(self.key_prefix),
            lane_arrivals_key(self.key_prefix),
            lane_busy_key(self.key_prefix),
        ]
        args: list[str | int] = [
            MARKER_PENDING_SECONDS,
            message.encode(),
            tenant_id,
            f"{weight!r}|{time.time():.0f}",
            LANE_BUSY_MS,
        ]
        return keys, args

    async def send(self, message: LaneMessage, tenant_id: str, weight: float = 1.0) -> None:
        """Queue ``message`` on ``tenant_id``'s list with its marker, in one round trip; ``weight``
        is the tenant's share of the lanes (``workers.fair_share``). Raises Redis errors."""
        keys, args = self._send_keys_and_args(message, tenant_id, weight)
        await self._send(keys=keys, args=args)

    async def send_and_wait_reply(
        self, message: LaneMessage, tenant_id: str, weight: float, wait_seconds: float
    ) -> dict[str, Any] | None:
        """``send``, then ``wait_reply`` up to ``wait_seconds``, both in one round trip (one write
        and one wake-up of the API's event loop fewer per call). Raises Redis errors when the
        message may not have been sent; an error of the wait alone is None, as no reply is."""
        keys, args = self._send_keys_and_args(message, tenant_id, weight)
        pipe = self.client.pipeline(transaction=False)
        # EVAL, not EVALSHA: a script the server lost (restarted, flushed) would fail the send
        # while the wait queued behind it blocked for nothing. The server caches it by its SHA.
        pipe.eval(_SEND, len(keys), *keys, *args)
        pipe.blpop([lane_reply_key(self.key_prefix, message.request_id)], timeout=wait_seconds)
        sent, answer = await pipe.execute(raise_on_error=False)
        if isinstance(sent, Exception):
            raise sent
        if answer is None or isinstance(answer, Exception):
            return None
        return _reply(answer[1])

    async def wait_reply(self, request_id: str, wait_seconds: float) -> dict[str, Any] | None:
        """The reply of ``request_id``, waiting up to ``wait_seconds``; None if none came."""
        key = lane_reply_key(self.key_prefix, request_id)
        answer = await self.client.blpop([key], timeout=wait_seconds)
        if answer is None:
            return None
        return _reply(answer[1])

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

    async def tenants(self, forget_idle_seconds: float) -> dict[str, float]:
        """The tenants that sent calls lately, and their weights; forgets those whose list is
        empty and who sent nothing for ``forget_idle_seconds``."""
        found: list[bytes] = await self._tenants(
            keys=[lane_tenants_key(self.key_prefix)],
            args=[self._queue_prefix, f"{time.time() - forget_idle_seconds:.0f}"],
        )
        return {found[n].decode(): _weight(found[n + 1].decode()) for n in range(0, len(found), 2)}

    async def take(self, tenant_order: Sequence[str], owner: str, wait_seconds: float) -> LaneTake | None:
        """The first message of the first tenant in ``tenant_order`` with one, waiting up to
        ``wait_seconds`` for one; news first (an arrival, a wake of ``owner``'s), None if none."""
        arrivals = lane_arrivals_key(self.key_prefix)
        wake = lane_wake_key(self.key_prefix, owner)
        keys = [wake, arrivals, *(self._queue_prefix + tenant_id for tenant_id in tenant_order)]
        answer = await self.client.brpop(keys, timeout=wait_seconds)
        if answer is None:
            return None
        key, value = _text(answer[0]), answer[1]
        if key == arrivals:
            return LaneTake(_text(value), arrived=True)
        if key == wake:
            return LaneTake()
        return LaneTake(key.removeprefix(self._queue_prefix), LaneMessage.decode(value))

    async def wake(self, owner: str) -> None:
        """Wake ``owner``'s blocked take."""
        key = lane_wake_key(self.key_prefix, owner)
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.lpush(key, "1")
            pipe.expire(key, _WAKE_SECONDS)
            await pipe.execute()

    async def settle(self, request_id: str) -> None:
        """The request is claimed (or was not claimable): its marker covers nothing any more."""
        await self.client.delete(dispatch_marker_key(self.key_prefix, lane_dispatch_id(request_id)))

    async def reply(self, request_id: str, reply: dict[str, Any]) -> None:
        """Push ``reply`` for the waiting API and settle the request (``settle``), in one trip."""
        keys = [
            lane_reply_key(self.key_prefix, request_id),
            dispatch_marker_key(self.key_prefix, lane_dispatch_id(request_id)),
        ]
        await self._reply(keys=keys, args=[json.dumps(reply), REPLY_SECONDS])

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


def _reply(raw: bytes | str) -> dict[str, Any]:
    reply: dict[str, Any] = json.loads(raw)
    return reply


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def _weight(text: str) -> float:
    try:
        weight = float(text)
    except ValueError:
        return 1.0
    return weight if weight > 0 else 1.0


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
