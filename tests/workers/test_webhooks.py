"""Completion webhooks against a real local HTTP receiver, on both databases. The receiver is on
127.0.0.1, so these tests allow private addresses, as an operator would for an internal receiver
(``TOKENMILL_WEBHOOK_ALLOW_PRIVATE``); without it, the same delivery is refused."""

from __future__ import annotations

import io
import ipaddress
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer, ThreadingHTTPServer
from typing import Any

import openai
import pytest
import sqlalchemy as sa

import store
from models import RequestUsage
from store.tables import Tenant
from tests.cluster import Cluster
from tests.workers.support import Ledger, add_batch
from workers.webhooks import (
    MAX_WEBHOOK_ERROR_CHARS,
    WEBHOOK_RESOLVE_SECONDS,
    WEBHOOK_RESOLVER_THREADS,
    WEBHOOK_RESOLVES_PER_OWNER,
    deliver_due_webhooks,
    is_public_address,
)


class Receiver:
    def __init__(self) -> None:
        self.events: list[tuple[dict[str, str], dict[str, Any]]] = []
        self.raw: list[bytes] = []
        self.fail_next = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                if receiver.fail_next:
                    receiver.fail_next -= 1
                    self.send_response(503)
                else:
                    receiver.events.append((dict(self.headers), json.loads(raw)))
                    receiver.raw.append(raw)
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


def finished_batch(
    database_url: str, webhook_url: str, *, engine: Any = None, tenant_id: str | None = None
) -> tuple[Any, str]:
    if engine is None:
        store.upgrade_to_head(database_url)
        engine = store.make_engine(database_url)
    if tenant_id is None:
        tenant_id = store.create_tenant(engine, "t").id
    report = store.ingest_batch(
        engine,
        io.BytesIO(b'{"custom_id": "a", "prompt": "hi"}\n'),
        tenant_id=tenant_id,
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
    assert deliver_due_webhooks(engine, allow_private=True) == (1, 0)
    assert deliver_due_webhooks(engine, allow_private=True) == (0, 0)  # delivered: never sent again
    ((headers, event),) = receiver.events
    assert event["type"] == "batch.completed"
    assert event["data"]["id"] == batch_id
    assert event["data"]["request_counts"] == {"total": 1, "completed": 1, "failed": 0}
    assert headers["webhook-id"] == event["id"]
    engine.dispose()


def test_the_event_carries_the_batch_object_the_route_shows(database_url: str, receiver: Receiver) -> None:
    """One serializer: the event's data is ``GET /v1/batches/{id}``'s object (store.batch_object),
    usage included; only the delivery's own record (``webhook``) moves on once it is delivered."""
    engine, batch_id = finished_batch(database_url, receiver.url)
    assert deliver_due_webhooks(engine, allow_private=True) == (1, 0)
    ((_, event),) = receiver.events
    batch = store.get_batch(engine, batch_id)
    assert batch is not None
    shown = store.batch_object(engine, batch)
    assert {**event["data"], "webhook": None} == {**shown, "webhook": None}
    assert event["data"]["status"] == "completed"
    assert event["data"]["usage"]["total_tokens"] == 5
    assert event["data"]["webhook"]["url"] == receiver.url
    engine.dispose()


def test_a_failed_delivery_is_retried_after_its_backoff(database_url: str, receiver: Receiver) -> None:
    engine, batch_id = finished_batch(database_url, receiver.url)
    receiver.fail_next = 1
    assert deliver_due_webhooks(engine, allow_private=True) == (0, 1)
    assert deliver_due_webhooks(engine, allow_private=True) == (0, 0)  # not due again yet
    batch = store.get_batch(engine, batch_id)
    assert batch is not None
    assert batch.webhook_last_error == "HTTP 503"
    assert batch.webhook_next_at is not None
    assert deliver_due_webhooks(engine, allow_private=True, now=batch.webhook_next_at) == (1, 0)
    assert [event["data"]["id"] for _, event in receiver.events] == [batch_id]
    assert deliver_due_webhooks(engine, allow_private=True, now=batch.webhook_next_at + 10**6) == (0, 0)
    engine.dispose()


def test_a_private_address_is_refused_again_at_send(database_url: str, receiver: Receiver) -> None:
    """A batch created while its host resolved to a public address, whose name now resolves to
    the inside (DNS rebinding), or written past the API: checked again just before the send."""
    engine, batch_id = finished_batch(database_url, receiver.url)
    assert deliver_due_webhooks(engine) == (0, 1)
    assert receiver.events == []
    batch = store.get_batch(engine, batch_id)
    assert batch is not None
    assert batch.webhook_last_error is not None
    assert batch.webhook_last_error.startswith("refused: ")
    assert "127.0.0.1" in batch.webhook_last_error
    assert len(batch.webhook_last_error) <= MAX_WEBHOOK_ERROR_CHARS
    engine.dispose()


class HostileReceiver:
    """A receiver that keeps a connection open as long as the sender stays: ``stop`` ends it."""

    closed: threading.Event

    def serve(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.closed.set()
        self.server.shutdown()
        self.server.server_close()


class TricklingReceiver(HostileReceiver):
    """Answers one byte at a time, ``interval`` apart, for as long as the sender listens: each read
    gets a byte well within any per-read timeout."""

    def __init__(self, interval: float) -> None:
        self.connections = 0
        self.closed = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                receiver.connections += 1
                self.rfile.read(int(self.headers["Content-Length"]))
                try:
                    self.wfile.write(b"H")
                    self.wfile.flush()
                    for byte in b"TTP/1.1 200 OK\r\nX-Slow: " + b"x" * 10_000:
                        if receiver.closed.wait(interval):
                            return
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                except OSError:  # the sender hung up: what we want
                    return

            def log_message(self, *args: Any) -> None:
                return

        self.serve(Handler)


@pytest.fixture
def trickling_receiver() -> Iterator[TricklingReceiver]:
    made = TricklingReceiver(interval=0.2)
    yield made
    made.stop()


def test_a_trickling_receiver_is_cut_at_the_delivery_deadline(
    postgres_url: str, trickling_receiver: TricklingReceiver, receiver: Receiver
) -> None:
    engine, slow_batch = finished_batch(postgres_url, trickling_receiver.url)
    _, fast_batch = finished_batch(postgres_url, receiver.url, engine=engine)
    started = time.monotonic()
    assert deliver_due_webhooks(engine, allow_private=True, deadline_seconds=2) == (1, 1)
    elapsed = time.monotonic() - started
    assert trickling_receiver.connections == 1
    # The whole exchange had 2 s; allow for a loaded machine, not for the receiver's pace.
    assert elapsed < 8, elapsed
    assert [event["data"]["id"] for _, event in receiver.events] == [fast_batch]
    slow = store.get_batch(engine, slow_batch)
    assert slow is not None
    assert slow.webhook_last_error == "no answer within 2 s"
    engine.dispose()


def test_delivery_connects_to_the_address_checked_and_names_the_host(
    database_url: str, receiver: Receiver
) -> None:
    """The connection goes to the resolved address; the receiver still sees its own host name."""
    url = receiver.url.replace("127.0.0.1", "localhost")
    engine, batch_id = finished_batch(database_url, url)
    assert deliver_due_webhooks(engine, allow_private=True) == (1, 0)
    ((headers, event),) = receiver.events
    assert headers["Host"] == f"localhost:{receiver.server.server_port}"
    assert event["data"]["id"] == batch_id
    engine.dispose()


@pytest.mark.slow
def test_a_trickling_receiver_does_not_delay_the_redispatch_of_other_batches(
    cluster: Callable[..., Cluster],
    make_ledger: Callable[[str], Ledger],
    postgres_url: str,
    trickling_receiver: TricklingReceiver,
) -> None:
    """Deliveries run apart from the sweep: while a receiver holds its delivery (here longer than
    the whole test), a batch whose message was never sent is still dispatched by the sweep."""
    c = cluster()
    c.env["TOKENMILL_WEBHOOK_ALLOW_PRIVATE"] = "true"
    c.env["TOKENMILL_WEBHOOK_TIMEOUT_SECONDS"] = "300"
    led = make_ledger(postgres_url)
    finished_batch(postgres_url, trickling_receiver.url, engine=led.engine)
    c.beat()
    deadline = time.monotonic() + 30
    while trickling_receiver.connections == 0:
        assert time.monotonic() < deadline, (c.logs / "beat.log").read_text()[-2000:]
        time.sleep(0.1)
    batch_id, _ = add_batch(led, ["one", "two"])  # no message names it: only a sweep sends it
    c.worker("w1")
    deadline = time.monotonic() + 45
    while (progress := store.batch_progress(led.engine, batch_id)).finished < progress.total:
        assert time.monotonic() < deadline, (progress, (c.logs / "beat.log").read_text()[-2000:])
        time.sleep(0.2)
    assert trickling_receiver.connections == 1  # still the one delivery, still held


def test_deliveries_are_signed_so_the_openai_sdk_verifies_them(database_url: str, receiver: Receiver) -> None:
    engine, batch_id = finished_batch(database_url, receiver.url)
    batch = store.get_batch(engine, batch_id)
    assert batch is not None
    secret = store.webhook_secret(engine, batch.tenant_id)
    assert secret.startswith("whsec_")
    assert deliver_due_webhooks(engine, allow_private=True) == (1, 0)
    ((headers, _),) = receiver.events
    sdk = openai.OpenAI(api_key="unused")
    event = sdk.webhooks.unwrap(receiver.raw[0], headers, secret=secret)
    assert event.type == "batch.completed"
    assert event.data.id == batch_id
    with pytest.raises(openai.InvalidWebhookSignatureError):
        sdk.webhooks.unwrap(receiver.raw[0], headers, secret=store.new_webhook_secret())
    with pytest.raises(openai.InvalidWebhookSignatureError):  # the body is what was signed
        sdk.webhooks.unwrap(receiver.raw[0].replace(b"completed", b"cancelled"), headers, secret=secret)
    # A rotated secret signs what is sent from then on; the old one no longer verifies it.
    rotated = store.webhook_secret(engine, batch.tenant_id, rotate=True)
    assert rotated != secret
    _, second_batch = finished_batch(database_url, receiver.url, engine=engine, tenant_id=batch.tenant_id)
    assert deliver_due_webhooks(engine, allow_private=True) == (1, 0)
    assert sdk.webhooks.unwrap(receiver.raw[1], receiver.events[1][0], secret=rotated).data.id == second_batch
    with pytest.raises(openai.InvalidWebhookSignatureError):
        sdk.webhooks.unwrap(receiver.raw[1], receiver.events[1][0], secret=secret)
    sdk.close()
    engine.dispose()


class EndlessReceiver(HostileReceiver):
    """Answers 200 at once, then streams a body for as long as the sender reads it (a hostile
    receiver filling the sender's memory)."""

    def __init__(self) -> None:
        self.closed = threading.Event()
        self.sent = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                self.send_response(200)
                self.send_header("Content-Length", str(10**12))
                self.end_headers()
                chunk = b"x" * 65536
                try:
                    while not receiver.closed.is_set():
                        self.wfile.write(chunk)
                        receiver.sent += len(chunk)
                except OSError:  # the sender hung up: what we want
                    return

            def log_message(self, *args: Any) -> None:
                return

        self.serve(Handler)


def test_a_receiver_answering_an_endless_body_is_delivered_without_reading_it(postgres_url: str) -> None:
    """The status is the answer: the body is not read (it was read whole, up to the deadline, in
    memory, for each of the concurrent deliveries)."""
    endless = EndlessReceiver()
    try:
        engine, batch_id = finished_batch(postgres_url, endless.url)
        assert deliver_due_webhooks(engine, allow_private=True, deadline_seconds=5) == (1, 0)
        # Far less than what 5 s of a local stream carries (gigabytes); a socket buffer or two.
        assert endless.sent < 64 * 1024 * 1024, endless.sent
        batch = store.get_batch(engine, batch_id)
        assert batch is not None
        assert batch.webhook_last_error is None
        engine.dispose()
    finally:
        endless.stop()


def test_an_unexpected_failure_is_recorded_and_the_pass_goes_on(
    postgres_url: str, receiver: Receiver
) -> None:
    """A secret that is not base64 (written past the API) fails its own delivery, with the error
    recorded; the other batch of the pass is delivered (one exception aborted the whole pass, with
    no attempt recorded, so it failed the same way forever)."""
    engine, broken_batch = finished_batch(postgres_url, receiver.url)
    broken = store.get_batch(engine, broken_batch)
    assert broken is not None
    with engine.begin() as conn:
        conn.execute(
            sa.update(Tenant).where(Tenant.id == broken.tenant_id).values(webhook_secret="whsec_not*base64")
        )
    _, fine_batch = finished_batch(postgres_url, receiver.url, engine=engine)
    assert deliver_due_webhooks(engine, allow_private=True) == (1, 1)
    assert [event["data"]["id"] for _, event in receiver.events] == [fine_batch]
    broken = store.get_batch(engine, broken_batch)
    assert broken is not None
    assert broken.webhook_last_error is not None
    assert broken.webhook_last_error.startswith("Error: "), broken.webhook_last_error
    assert len(broken.webhook_last_error) <= MAX_WEBHOOK_ERROR_CHARS
    engine.dispose()


# Ranges Python 3.11's ``is_global`` still calls global although nothing public lives there: IETF
# protocol assignments (192.0.0.0/24, e.g. 192.0.0.8), the retired 6to4 relay anycast
# (192.88.99.0/24) and IPv6 site-local (fec0::/10, deprecated but routed inside some networks).
@pytest.mark.parametrize("address", ["192.0.0.8", "192.0.0.170", "192.88.99.1", "fec0::1", "feff::1"])
def test_addresses_python_calls_global_but_are_internal_are_refused(address: str) -> None:
    assert not is_public_address(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["8.8.8.8", "2606:4700::1111", "192.0.1.1"])
def test_public_addresses_stay_public(address: str) -> None:
    assert is_public_address(ipaddress.ip_address(address))


_HANGING_HOST = "hangs.webhooks.invalid"


def hang_dns_of(hanging_host: str, monkeypatch: pytest.MonkeyPatch, *, seconds: float) -> threading.Event:
    """Make ``socket.getaddrinfo`` hang for ``hanging_host`` as glibc's does when a name server
    never answers (until ``seconds``, its own timeout, or the event returned is set), then fail
    with EAI_AGAIN; every other host resolves as before."""
    real = socket.getaddrinfo
    released = threading.Event()

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host == hanging_host:
            released.wait(seconds)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return released


def test_webhook_hosts_whose_name_server_hangs_fail_no_other_tenants_delivery(
    database_url: str, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tenant's webhook host may resolve at create and hang later (its name server is the
    tenant's). Each send resolved the host on the pass's default executor (6 threads on 2 cores):
    a tenant with a few ended batches whose hosts hang held every one of them, and another
    tenant's delivery in the same pass waited behind them until its deadline, failed, and after 8
    such passes was given up. The resolver here hangs for that host as glibc's does when a name
    server never answers: until its own timeout."""
    resolver_timeout = hang_dns_of(_HANGING_HOST, monkeypatch, seconds=8)
    store.upgrade_to_head(database_url)
    engine = store.make_engine(database_url)
    hostile = store.create_tenant(engine, "hangs-dns").id
    for _ in range(12):
        finished_batch(database_url, f"http://{_HANGING_HOST}/hook", engine=engine, tenant_id=hostile)
    _, batch_id = finished_batch(database_url, receiver.url, engine=engine)  # claimed last
    try:
        delivered, failed = deliver_due_webhooks(engine, allow_private=True, deadline_seconds=3)
    finally:
        resolver_timeout.set()
    assert [event["data"]["id"] for _, event in receiver.events] == [batch_id]
    assert (delivered, failed) == (1, 12)
    engine.dispose()


def test_a_delivery_that_got_no_resolver_thread_is_not_counted_as_its_attempt(
    database_url: str, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A few tenants whose name servers hang (each within its share of look-ups) hold every thread
    of the pass's resolver. Another tenant's look-up waited in the queue, was never tried, and its
    delivery failed an attempt for it: its backoff doubled each time, and after 8 such passes its
    webhook was given up. Now it is due again soon, its attempts untouched."""
    released = hang_dns_of(_HANGING_HOST, monkeypatch, seconds=30)
    store.upgrade_to_head(database_url)
    engine = store.make_engine(database_url)
    for index in range(WEBHOOK_RESOLVER_THREADS // WEBHOOK_RESOLVES_PER_OWNER):
        hanging = store.create_tenant(engine, f"dns-outage-{index}").id
        for _ in range(WEBHOOK_RESOLVES_PER_OWNER):
            finished_batch(database_url, f"http://{_HANGING_HOST}/hook", engine=engine, tenant_id=hanging)
    _, batch_id = finished_batch(database_url, receiver.url, engine=engine)  # claimed last
    try:
        deliver_due_webhooks(engine, allow_private=True, deadline_seconds=WEBHOOK_RESOLVE_SECONDS + 3)
    finally:
        released.set()
    with engine.connect() as conn:
        attempts = conn.execute(
            sa.text("select webhook_attempts from batches where id = :id"), {"id": batch_id}
        ).scalar_one()
    assert attempts == 0
    assert receiver.events == []
    engine.dispose()


def test_one_tenants_many_hanging_webhooks_do_not_hold_back_another_tenants(
    postgres_url: str, trickling_receiver: TricklingReceiver, receiver: Receiver
) -> None:
    """A pass claimed the 100 oldest due webhooks, whoever's: a tenant with more than that many
    ended batches (free to make: a batch whose lines all fail validation ends ``failed``) whose
    receiver never answers filled every pass, each lasting 7 rounds of the deadline, so another
    tenant's webhooks waited behind all their attempts (10,000 such batches: hours). A pass now
    takes the tenants' due webhooks in turn, each tenant's oldest first."""
    engine, _ = finished_batch(postgres_url, trickling_receiver.url)
    hostile = store.create_tenant(engine, "hostile").id
    for _ in range(100):
        finished_batch(postgres_url, trickling_receiver.url, engine=engine, tenant_id=hostile)
    _, bystander_batch = finished_batch(postgres_url, receiver.url, engine=engine)
    delivered, failed = deliver_due_webhooks(engine, allow_private=True, deadline_seconds=0.3)
    assert [event["data"]["id"] for _, event in receiver.events] == [bystander_batch]
    assert (delivered, failed) == (1, 99)
    engine.dispose()
