"""Completion webhooks: when a batch ends, POST an event to the URL its producer gave.

At least once: the sweeper calls ``deliver_due_webhooks`` on every pass; a failed attempt (no
answer, or a status other than 2xx) is retried with exponential backoff up to ``max_attempts``.
The event follows OpenAI's webhook shape (``batch.completed``, ``batch.failed``,
``batch.cancelled``, ``batch.expired``) and carries ids and counts, never results or keys; its
``webhook-id`` header lets a receiver drop a duplicate.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
from sqlalchemy.engine import Engine

import store

__all__ = ["MAX_WEBHOOK_ATTEMPTS", "deliver_due_webhooks", "webhook_event"]

MAX_WEBHOOK_ATTEMPTS = 8
_MAX_BACKOFF_SECONDS = 3600


def webhook_event(batch: store.Batch) -> dict[str, Any]:
    return {
        "object": "event",
        "id": f"evt_{batch.id}_{batch.status}",
        "type": f"batch.{batch.status}",
        "created_at": int(time.time()),
        "data": {
            "id": batch.id,
            "status": str(batch.status),
            "request_counts": {
                "total": batch.total_count,
                "completed": batch.completed_count,
                "failed": batch.failed_count,
            },
            "output_file_id": batch.output_file_id,
            "error_file_id": batch.error_file_id,
        },
    }


def deliver_due_webhooks(
    engine: Engine, *, max_attempts: int = MAX_WEBHOOK_ATTEMPTS, timeout: float = 10.0, now: int | None = None
) -> tuple[int, int]:
    """Try every webhook that is due; returns (delivered, failed) for this pass."""
    delivered = failed = 0
    due = store.due_webhooks(engine, max_attempts=max_attempts, now=now)
    if not due:
        return 0, 0
    with httpx.Client(timeout=timeout, follow_redirects=False) as http:
        for webhook in due:
            event = webhook_event(webhook.batch)
            try:
                answer = http.post(webhook.url, json=event, headers={"webhook-id": event["id"]})
                error = None if answer.is_success else f"HTTP {answer.status_code}"
            except httpx.HTTPError as e:
                error = f"{type(e).__name__}: {e}"
            retry_in = min(_MAX_BACKOFF_SECONDS, 10 * 2**webhook.attempts)
            store.record_webhook_attempt(engine, webhook.batch_id, error=error, retry_in=retry_in, now=now)
            if error is None:
                delivered += 1
            else:
                failed += 1
    return delivered, failed
