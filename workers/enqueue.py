"""The enqueue side: how a batch's queued requests become messages for the workers, for every
producer (the API, ``tokenmill submit`` and ``tokenmill run``, the workers' own sweeper).

Like arq's ``connections.py`` it imports no task, runner or model client: messages are published
by task name (``workers.constants``), so a producer loads Celery's client, the broker's Redis and
the ledger, not the worker.

One policy for a broker that does not answer or refuses writes (``BROKER_UNREACHABLE``): the
requests are committed in the ledger before any message names them, and stay queued; the sweeper
(``tokenmill beat``) sends them once the broker is back. So a producer answers with the batch's
id, never with an error for the batch, and says that it waits for the broker.
"""

from __future__ import annotations

import functools
from typing import Any

import kombu.exceptions
import redis
from celery import Celery
from sqlalchemy.engine import Engine

from config import Settings, get_settings
from store import pending_request_pages
from workers.dispatch import PUBLISH_GROUP, Dispatcher

__all__ = ["BROKER_UNREACHABLE", "enqueue_batch", "make_dispatcher", "producer_dispatcher"]

# What a broker that does not answer raises, from its Redis client (the dispatch markers) or from
# Celery's publisher; and one that answers but refuses writes (``maxmemory`` reached under
# ``noeviction``: OOM; a replica after a failover: READONLY; a disk it cannot save to: MISCONF),
# which is as good as down: the batch is in the ledger either way, and the sweeper sends it.
BROKER_UNREACHABLE: tuple[type[Exception], ...] = (
    redis.exceptions.RedisError,
    kombu.exceptions.OperationalError,
)


def make_dispatcher(
    celery: Celery,
    engine: Engine,
    redis_client: redis.Redis[Any],  # type: ignore[type-arg, unused-ignore]
    settings: Settings,
) -> Dispatcher:
    """The one way a ``Dispatcher`` is made from the settings (its key prefix and chunk size)."""
    return Dispatcher(
        celery=celery,
        engine=engine,
        redis_client=redis_client,
        key_prefix=settings.key_prefix,
        chunk_size=settings.chunk_size,
    )


@functools.cache
def _broker_redis(url: str) -> redis.Redis[Any]:  # type: ignore[type-arg, unused-ignore]
    """One client (one connection pool) per broker and process."""
    return redis.Redis.from_url(url)


def producer_dispatcher(engine: Engine) -> Dispatcher:
    """A dispatcher on this process's producer connections: the Celery app of ``workers.app`` and
    one Redis client of the broker named by the settings; ``engine`` is the producer's ledger."""
    from workers.app import app

    settings = get_settings()
    if settings.broker_url is None:
        raise RuntimeError("no broker configured (TOKENMILL_BROKER_URL): embedded mode has no workers")
    return make_dispatcher(app, engine, _broker_redis(settings.broker_url), settings)


def enqueue_batch(dispatcher: Dispatcher, batch_id: str) -> list[str]:
    """Send the batch's queued requests (committed rows, in line order) to the workers; returns the
    dispatch ids. Raises one of ``BROKER_UNREACHABLE`` when the broker does not answer: the requests
    then stay queued for the sweeper. Sending twice is harmless (a claim skips what is taken)."""
    # A page of ids at a time (a group of full chunks): memory stays a page for any batch.
    page = dispatcher.chunk_size * PUBLISH_GROUP
    return [
        dispatch_id
        for ids in pending_request_pages(dispatcher.engine, batch_id, page)
        for dispatch_id in dispatcher.dispatch(ids)
    ]
