"""Completion webhooks against a real local HTTP receiver, on both databases."""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import pytest

import store
from models import RequestUsage
from workers.webhooks import deliver_due_webhooks


class Receiver:
    def __init__(self) -> None:
        self.events: list[tuple[dict[str, str], dict[str, Any]]] = []
        self.fail_next = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if receiver.fail_next:
                    receiver.fail_next -= 1
                    self.send_response(503)
                else:
                    receiver.events.append((dict(self.headers), body))
                    self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                return

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    made = Receiver()
    yield made
    made.server.shutdown()
    made.server.server_close()


def finished_batch(database_url: str, webhook_url: str) -> tuple[Any, str]:
    store.upgrade_to_head(database_url)
    engine = store.make_engine(database_url)
    tenant = store.create_tenant(engine, "t")
    report = store.ingest_batch(
        engine,
        io.BytesIO(b'{"custom_id": "a", "prompt": "hi"}\n'),
        tenant_id=tenant.id,
        defaults={"model": "m"},
        webhook_url=webhook_url,
    )
    (request_id,) = store.pending_request_ids(engine, report.batch_id)
    store.record_results(
        engine,
        [
            store.ResultRecord(
                request_id=request_id,
                status=store.RequestStatus.SUCCEEDED,
                response_body={"ok": True},
                status_code=200,
                model="m",
                usage=RequestUsage(prompt_tokens=3, completion_tokens=2),
            )
        ],
    )
    return engine, report.batch_id


def test_an_ended_batch_posts_its_event_once(database_url: str, receiver: Receiver) -> None:
    engine, batch_id = finished_batch(database_url, receiver.url)
    assert deliver_due_webhooks(engine) == (1, 0)
    assert deliver_due_webhooks(engine) == (0, 0)  # delivered: never sent again
    ((headers, event),) = receiver.events
    assert event["type"] == "batch.completed"
    assert event["data"]["id"] == batch_id
    assert event["data"]["request_counts"] == {"total": 1, "completed": 1, "failed": 0}
    assert headers["webhook-id"] == event["id"]
    engine.dispose()


def test_a_failed_delivery_is_retried_after_its_backoff(database_url: str, receiver: Receiver) -> None:
    engine, batch_id = finished_batch(database_url, receiver.url)
    receiver.fail_next = 1
    assert deliver_due_webhooks(engine) == (0, 1)
    assert deliver_due_webhooks(engine) == (0, 0)  # not due again yet
    batch = store.get_batch(engine, batch_id)
    assert batch is not None
    assert batch.webhook_last_error == "HTTP 503"
    assert batch.webhook_next_at is not None
    assert deliver_due_webhooks(engine, now=batch.webhook_next_at) == (1, 0)
    assert [event["data"]["id"] for _, event in receiver.events] == [batch_id]
    assert deliver_due_webhooks(engine, now=batch.webhook_next_at + 10**6) == (0, 0)
    engine.dispose()
