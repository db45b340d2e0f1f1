"""Sending work: chunks of request ids as Celery messages, after their rows are committed.

Knowing which messages are in flight, in a way that survives the broker losing everything: each
chunk message ``D`` has a *marker* key ``{key_prefix}dispatch:D`` in the broker's own Redis.

1. ``SET marker pending EX 60``: a dispatcher that dies from here on leaves a marker that expires
   soon, so its requests are seen as undelivered within a minute;
2. ``mark_dispatched(ids, D)`` in SQL (the rows now name their message);
3. publish the message;
4. ``SET marker sent EX 2 days`` (longer than a batch's 24 h window: the queue may be long).

The worker deletes the marker when it has finished the chunk. Hence, for the sweeper: a request
still queued whose dispatch has no marker has no message that will run it. ``FLUSHALL`` (or a
broker restarted without persistence) removes messages and markers together, so the requests they
named show up as such; nothing else is needed to notice the loss.
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
from workers.constants import COMPLETE_CHUNK_TASK, DEFAULT_QUEUE, dispatch_marker_key

__all__ = [
    "MARKER_PENDING_SECONDS",
    "MARKER_SENT_SECONDS",
    "Dispatcher",
    "chunk_length",
    "chunked",
    "new_dispatch_id",
]

MARKER_PENDING_SECONDS = 60
MARKER_SENT_SECONDS = 2 * 24 * 3600


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
        (invariant 1: a message never names a request the ledger does not hold)."""
        ids = list(request_ids)
        size = chunk_length(len(ids), self.chunk_size)
        chunks = [(new_dispatch_id(), chunk) for chunk in chunked(ids, size)]
        if not chunks:
            return []
        with self.redis_client.pipeline(transaction=False) as pipe:
            for dispatch_id, _ in chunks:
                pipe.set(
                    dispatch_marker_key(self.key_prefix, dispatch_id), b"pending", ex=MARKER_PENDING_SECONDS
                )
            pipe.execute()
        for dispatch_id, chunk in chunks:
            mark_dispatched(self.engine, chunk, dispatch_id)
        with self.celery.producer_or_acquire() as producer:
            for dispatch_id, chunk in chunks:
                self.celery.send_task(
                    COMPLETE_CHUNK_TASK,
                    args=[chunk, dispatch_id],
                    # Flower shows this instead of the id list.
                    argsrepr=f"[{len(chunk)} request ids]",
                    kwargsrepr="{}",
                    queue=self.queue,
                    producer=producer,
                    ignore_result=True,
                )
        with self.redis_client.pipeline(transaction=False) as pipe:
            for dispatch_id, _ in chunks:
                pipe.set(dispatch_marker_key(self.key_prefix, dispatch_id), b"sent", ex=MARKER_SENT_SECONDS)
            pipe.execute()
        return [dispatch_id for dispatch_id, _ in chunks]

    def finished(self, dispatch_id: str) -> None:
        """The chunk's work is done (or handed back): its message no longer covers anything."""
        self.redis_client.delete(dispatch_marker_key(self.key_prefix, dispatch_id))

    def live_dispatches(self, dispatch_ids: Sequence[str]) -> set[str]:
        """Those of ``dispatch_ids`` whose marker exists."""
        if not dispatch_ids:
            return set()
        with self.redis_client.pipeline(transaction=False) as pipe:
            for dispatch_id in dispatch_ids:
                pipe.exists(dispatch_marker_key(self.key_prefix, dispatch_id))
            answers = pipe.execute()
        return {dispatch_id for dispatch_id, exists in zip(dispatch_ids, answers, strict=True) if exists}
