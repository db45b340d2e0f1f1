"""The Celery application: broker settings chosen for long, I/O-bound LLM work.

``celery -A workers.app worker`` and ``tokenmill worker`` load ``app`` from here. Every setting
below carries one line of why; the broker behaviour behind them is in
``docs/celery-on-redis.md``. Tasks live in ``workers.tasks`` (imported on worker
start through ``include``), so importing this module stays cheap for producers.

One SQLAlchemy engine per worker process, created after the fork (``worker_process_init``):
pooled connections must never be shared between a parent and its children.
"""

from __future__ import annotations

import gc
from typing import Any

from celery import Celery
from celery.signals import worker_process_init, worker_process_shutdown

from config import Settings, get_settings
from workers.constants import DEFAULT_QUEUE

__all__ = ["app", "celery_config", "make_celery"]

# Used only when no broker is configured, so that ``workers.app`` imports anywhere; a worker
# started that way fails to connect and says where it tried.
_FALLBACK_BROKER = "redis://127.0.0.1:6379/0"


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings for ``settings``; each line says why."""
    transport_options: dict[str, Any] = {
        # Above the longest chunk (the runner stops starting requests at half of it), else a
        # chunk still running is delivered a second time (celery #5935).
        "visibility_timeout": settings.visibility_timeout_seconds,
        # kombu scans for unacked messages of dead workers every interval (default ~100 s);
        # a throttle of 1 makes the interval the only knob.
        "unacked_restore_interval": settings.unacked_restore_interval_seconds,
        "unacked_restore_throttle": 1,
        # Notice a broker that vanished without closing the socket (failover, NAT) in seconds.
        "health_check_interval": 10,
        "socket_timeout": 30,
        "socket_connect_timeout": 10,
    }
    if settings.broker_key_prefix:
        # Lets several deployments, or tests, share one Redis without seeing each other.
        transport_options["global_keyprefix"] = settings.broker_key_prefix
    return {
        "broker_url": settings.broker_url or _FALLBACK_BROKER,
        "broker_transport_options": transport_options,
        # Retry the broker at startup too (Celery 6 stops doing it implicitly).
        "broker_connection_retry_on_startup": True,
        # Ack after the chunk ran: a worker that dies mid-chunk leaves its message to be redone.
        "task_acks_late": True,
        # ...and when only the pool child dies, requeue instead of acking a WorkerLostError.
        "task_reject_on_worker_lost": True,
        # One reserved chunk per process: the others stay in the queue for idle workers.
        "worker_prefetch_multiplier": 1,
        # Results go to SQL; a result backend would only cost a round trip per chunk.
        "task_ignore_result": True,
        "result_backend": None,
        # Flower needs task events, and the "sent" event to show queued chunks.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        # SIGTERM: stop taking chunks, give running ones this long, then requeue them (the
        # cache and the ledger make the redo cheap).
        "worker_soft_shutdown_timeout": 10.0,
        "worker_enable_soft_shutdown_on_idle": True,
        # After a broker reconnect the unacked chunk will be redelivered; stop our copy.
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        # Messages carry ids and counts only; JSON keeps them readable and safe.
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_default_queue": DEFAULT_QUEUE,
        # Retries happen inside the chunk's event loop (honouring Retry-After), never as
        # Celery ETA messages, which loop past the visibility timeout (kombu #337).
        "task_default_retry_delay": 0,
        # A chunk may legitimately run for minutes under rate limits: no hard time limit;
        # leases and the runner's own deadline bound it instead.
        "task_time_limit": None,
        "worker_hijack_root_logger": False,
        # workers.agent_host: the distributed agent runtime's task (tokenmill.agent_message).
        "include": ["workers.tasks", "workers.agent_host"],
        "timezone": "UTC",
    }


def make_celery(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    celery = Celery("tokenmill")
    celery.conf.update(celery_config(settings))
    return celery


app = make_celery()


@worker_process_init.connect  # type: ignore[untyped-decorator, unused-ignore]
def _open_process_resources(**_: Any) -> None:
    # Imported here, not at the top: producers (workers.enqueue) import this module for the app
    # alone, without the worker's model clients.
    from workers import context

    # The parent may have built an engine before forking; its pooled sockets are the parent's.
    context.reset_after_fork()
    # Single calls get capacity of their own in every process (workers.lane): a process busy
    # with a chunk takes no other Celery message until it ends.
    from workers import lane

    lane.start_in_background()
    # Everything loaded so far (Celery, SQLAlchemy, pydantic, the SDK) lives as long as the process:
    # out of the collector's sight, a full collection scans only what chunks allocate. Measured on
    # the throughput bench, full collections stalled the event loop ~180 ms every few seconds.
    gc.freeze()


@worker_process_shutdown.connect  # type: ignore[untyped-decorator, unused-ignore]
def _close_process_resources(**_: Any) -> None:
    from workers import context, lane

    lane.stop()
    context.close()
