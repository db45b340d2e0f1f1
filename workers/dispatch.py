"""Sending work: chunks of request ids as Celery messages, after their rows are committed.

Knowing which messages are in flight, in a way that survives the broker losing everything: each
chunk message ``D`` has a *marker* key ``{key_prefix}dispatch:D`` in the broker's own Redis, and a
sequence number ``s`` (``INCRBY dispatch-seq:sent``: the broker's queue is first in, first out).

1. ``SET marker pending:s EX 60``: a dispatcher that dies from here on leaves a marker that expires
   soon, so its requests are seen as undelivered within a minute;
2. ``mark_dispatched(ids, D)`` in SQL (the rows now name their message);
3. publish the message;
4. ``sent:s`` replaces ``pending:s`` *only if the marker still reads pending:s* (one Lua script), for
   ``MARKER_SENT_SECONDS``.

A worker that takes the message claims its requests (leases now cover them) and then *settles*
the marker: deletes it and raises ``dispatch-seq:taken`` to ``s``. A worker that refills (fair
scheduling, ``workers.runner``) claims only a window's worth of them at first and the rest in
turn with every tenant's work: it *holds* the marker instead (raises ``taken`` to ``s`` and keeps
the marker ``MARKER_HELD_SECONDS`` at a time, renewed from its lease heartbeat) and settles it
when the chunk ends; a worker killed meanwhile stops renewing it, so the ids it named and nobody
claimed are sent again within that time. A chunk that fails for any
reason (the database unreachable, a bug) settles it too, in a ``finally``: its requests, still
queued or handed back, are then seen by the sweeper within its grace. Because step 4 is a
compare-and-set, a marker once settled is never brought back by a late ``sent`` write (a dispatcher
or sweeper that stalled between publishing and step 4 while a worker ran the chunk).

Hence, for the sweeper: a request still queued whose dispatch has no marker has no message that
will run it; one running under an expired lease is covered by nothing (its worker died), whatever
the marker says. ``FLUSHALL`` (or a broker restarted without persistence) removes messages and
markers together, so the requests they named show up as such.

How long a ``sent`` marker is trusted. A message can sit in the queue for hours (a 100k-line batch
behind a rate limit), so a short fixed TTL would have the sweeper re-send every still-queued request
once per TTL: a queue flooded with copies that each cost a claim. A long fixed TTL (it was 2 days)
strands for days the requests of a message lost without its marker. So ``sent`` lives
``MARKER_SENT_SECONDS`` (minutes), and each sweep renews it while the message is provably still
waiting: its ``s`` is above the highest number a worker has taken (FIFO: nothing after it was
taken either) and the broker's queue is not empty. A message taken but never settled (its worker
died between the take and the claim) stops being renewed as soon as a later message is taken,
and its requests are re-sent at most ``MARKER_SENT_SECONDS`` later. If the sweeper itself stops
for longer than that, the queued requests of the markers that expired meanwhile get one copy each
when it comes back (harmless: a claim skips what is finished or leased to a live worker).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery
from sqlalchemy.engine import Engine

from store import mark_dispatched
from store.ids import new_id
from telemetry import tracing
from workers.constants import (
    COMPLETE_CHUNK_TASK,
    DEFAULT_QUEUE,
    dispatch_marker_key,
    dispatch_sequence_keys,
)

__all__ = [
    "MARKER_HELD_SECONDS",
    "MARKER_PENDING_SECONDS",
    "MARKER_SENT_SECONDS",
    "Dispatcher",
    "chunk_length",
    "chunked",
    "new_dispatch_id",
]

MARKER_PENDING_SECONDS = 60
# Renewed by every sweep while the message provably waits in the queue (module docstring).
MARKER_SENT_SECONDS = 300
# A marker held by the worker running its message lives this long past the worker's last renewal.
MARKER_HELD_SECONDS = 60
# Chunks whose markers are written and published together: the pending markers of a group expire
# long after its last message is published, however many chunks one dispatch makes.
PUBLISH_GROUP = 64

# Step 4: pending:s -> sent:s, and only from pending:s (a settled marker stays settled).
_SENT_IF_PENDING = """
for i, key in ipairs(KEYS) do
  local seq = ARGV[i + 1]
  if redis.call('GET', key) == 'pending:' .. seq then
    redis.call('SET', key, 'sent:' .. seq, 'EX', ARGV[1])
  end
end
return 0
"""
# A worker took the message and runs it for a while: remember its number as taken, and keep the
# marker only as long as the worker renews it.
_HOLD = """
local marker = redis.call('GET', KEYS[1])
if marker then
  local seq = tonumber(string.match(marker, ':(%d+)$'))
  if seq and seq > tonumber(redis.call('GET', KEYS[2]) or '0') then
    redis.call('SET', KEYS[2], seq)
  end
  redis.call('EXPIRE', KEYS[1], ARGV[1])
end
return 0
"""
# A worker took the message: remember its number as taken, drop the marker.
_SETTLE = """
local marker = redis.call('GET', KEYS[1])
if marker then
  local seq = tonumber(string.match(marker, ':(%d+)$'))
  if seq and seq > tonumber(redis.call('GET', KEYS[2]) or '0') then
    redis.call('SET', KEYS[2], seq)
  end
  redis.call('DEL', KEYS[1])
end
return 0
"""
# 1 per live marker; a sent marker of a message still waiting in a non-empty queue is renewed.
_LIVE_AND_RENEW = """
local taken = tonumber(redis.call('GET', KEYS[1]) or '0')
local waiting = redis.call('LLEN', KEYS[2]) > 0
local live = {}
for i = 3, #KEYS do
  local marker = redis.call('GET', KEYS[i])
  if marker then
    live[#live + 1] = 1
    local seq = tonumber(string.match(marker, '^sent:(%d+)$'))
    if waiting and seq and seq > taken then
      redis.call('EXPIRE', KEYS[i], ARGV[1])
    end
  else
    live[#live + 1] = 0
  end
end
return live
"""


def new_dispatch_id() -> str:
    return new_id("dsp_")


def chunked(ids: Sequence[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(ids), size):
        yield list(ids[start : start + size])


# A chunk is the unit a worker process runs with N requests in flight: it must be several times
# N, or the process idles while each chunk's last requests drain. A small dispatch is still spread
# over a few messages so that every process gets some.
SPREAD_OVER_MESSAGES = 8
MIN_CHUNK = 32


def chunk_length(count: int, max_chunk: int) -> int:
    """How many ids go in each message when ``count`` are dispatched at once."""
    return max(1, min(max_chunk, max(MIN_CHUNK, -(-count // SPREAD_OVER_MESSAGES))))


@dataclass
class Dispatcher:
    """Publishes ``tokenmill.complete_chunk`` messages for committed requests."""

    celery: Celery
    engine: Engine
    redis_client: redis.Redis[Any]  # type: ignore[type-arg, unused-ignore]
    key_prefix: str
    chunk_size: int
    queue: str = DEFAULT_QUEUE

    def dispatch(self, request_ids: Iterable[str]) -> list[str]:
        """Send the ids in chunks; returns the dispatch ids. The rows must be committed already
        ("ledger first": a message never names a request the ledger does not hold)."""
        ids = list(request_ids)
        size = chunk_length(len(ids), self.chunk_size)
        chunks = [(new_dispatch_id(), chunk) for chunk in chunked(ids, size)]
        for start in range(0, len(chunks), PUBLISH_GROUP):
            self._publish(chunks[start : start + PUBLISH_GROUP])
        return [dispatch_id for dispatch_id, _ in chunks]

    def _publish(self, chunks: Sequence[tuple[str, list[str]]]) -> None:
        if not chunks:
            return
        last = int(self.redis_client.incrby(self._sequence_keys[0], len(chunks)))
        numbered = [
            (dispatch_id, chunk, last - len(chunks) + 1 + n) for n, (dispatch_id, chunk) in enumerate(chunks)
        ]
        with self.redis_client.pipeline(transaction=False) as pipe:
            for dispatch_id, _, seq in numbered:
                pipe.set(self._marker(dispatch_id), f"pending:{seq}", ex=MARKER_PENDING_SECONDS)
            pipe.execute()
        for dispatch_id, chunk, _ in numbered:
            mark_dispatched(self.engine, chunk, dispatch_id)
        # The dispatch's span (the batch's trace), for the chunks' spans to continue; never a prompt.
        traceparent = tracing.current_traceparent()
        headers = None if traceparent is None else {tracing.TRACEPARENT: traceparent}
        with self.celery.producer_or_acquire() as producer:
            for dispatch_id, chunk, _ in numbered:
                self.celery.send_task(
                    COMPLETE_CHUNK_TASK,
                    args=[chunk, dispatch_id],
                    # Flower shows this instead of the id list.
                    argsrepr=f"[{len(chunk)} request ids]",
                    kwargsrepr="{}",
                    queue=self.queue,
                    producer=producer,
                    ignore_result=True,
                    headers=headers,
                )
        self.published(numbered)

    def published(self, numbered: Sequence[tuple[str, list[str], int]]) -> None:
        """Step 4 for (dispatch id, ids, sequence number) just published: pending becomes sent."""
        self.redis_client.eval(
            _SENT_IF_PENDING,
            len(numbered),
            *[self._marker(dispatch_id) for dispatch_id, _, _ in numbered],
            MARKER_SENT_SECONDS,
            *[seq for _, _, seq in numbered],
        )

    def hold(self, dispatch_id: str) -> None:
        """A worker runs the message and has not claimed all of its requests yet: its number
        counts as taken, and the marker lives ``MARKER_HELD_SECONDS`` more. Idempotent; nothing
        once settled."""
        self.redis_client.eval(
            _HOLD, 2, self._marker(dispatch_id), self._sequence_keys[1], MARKER_HELD_SECONDS
        )

    def settle(self, dispatch_id: str) -> None:
        """A worker took the message and claimed its requests (or its chunk failed): the marker no
        longer covers anything. Idempotent."""
        self.redis_client.eval(_SETTLE, 2, self._marker(dispatch_id), self._sequence_keys[1])

    def live_dispatches(self, dispatch_ids: Sequence[str]) -> set[str]:
        """Those of ``dispatch_ids`` whose marker exists; renews the sent markers of messages still
        waiting in the queue (module docstring)."""
        if not dispatch_ids:
            return set()
        answers = self.redis_client.eval(
            _LIVE_AND_RENEW,
            2 + len(dispatch_ids),
            self._sequence_keys[1],
            self._queue_key,
            *[self._marker(dispatch_id) for dispatch_id in dispatch_ids],
            MARKER_SENT_SECONDS,
        )
        return {dispatch_id for dispatch_id, live in zip(dispatch_ids, answers, strict=True) if live}

    def marker(self, dispatch_id: str) -> str | None:
        """The marker's value (``pending:s`` or ``sent:s``), None when there is none."""
        value = self.redis_client.get(self._marker(dispatch_id))
        if value is None:
            return None
        return value.decode() if isinstance(value, bytes) else str(value)

    def _marker(self, dispatch_id: str) -> str:
        return dispatch_marker_key(self.key_prefix, dispatch_id)

    @property
    def _sequence_keys(self) -> tuple[str, str]:
        return dispatch_sequence_keys(self.key_prefix)

    @property
    def _queue_key(self) -> str:
        """The broker's list of waiting messages (kombu's Redis transport: the queue's name under
        its global key prefix)."""
        options = self.celery.conf.broker_transport_options or {}
        return f"{options.get('global_keyprefix', '')}{self.queue}"
