"""Completion webhooks: when a batch ends, POST an event to the URL its producer gave.

At least once: ``tokenmill beat`` runs ``deliver_webhooks_forever`` on a thread of its own, apart
from the sweep, so that no receiver can slow the re-dispatch of lost requests. Each pass claims the
due webhooks in SQL (so two beats never send one event at once) and sends them concurrently, each
within a wall-clock deadline for the whole exchange (a receiver trickling bytes cannot hold it
longer). A failed attempt (refused address, no answer in time, a status other than 2xx) is retried
with exponential backoff up to ``max_attempts``; the last error is kept on the batch.

A webhook may only reach public addresses: the host is resolved and every address checked
(loopback, private, link-local and cloud metadata, multicast, unspecified, reserved; the IPv4
address in a mapped, NAT64 or 6to4 IPv6 one too) when the batch is created and again before each
send, and the connection goes to the address that was checked (a DNS answer that changes in
between cannot redirect it). URLs with credentials are refused. The host's name server is the
tenant's to make slow: hosts are looked up by a ``WebhookResolver``, on threads of its own, at most
two of one tenant at once, each waited for 5 s.
``TOKENMILL_WEBHOOK_ALLOW_PRIVATE`` lifts the address check for deployments whose receivers are
on a private network.

The event follows OpenAI's webhook shape (``batch.completed``, ``batch.failed``,
``batch.cancelled``, ``batch.expired``); its ``data`` is the batch object as ``GET /v1/batches/{id}``
shows it when the attempt is claimed (ids, counts, usage, metadata), never results or keys. It is
signed the Standard Webhooks way with the tenant's secret (``webhook-id``, ``webhook-timestamp``,
``webhook-signature``), so ``openai``'s ``client.webhooks.unwrap(body, headers, secret=...)``
verifies it; ``webhook-id`` is the same on every attempt, so a receiver can drop a duplicate.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
from sqlalchemy.engine import Engine

import store

__all__ = [
    "MAX_WEBHOOK_ATTEMPTS",
    "WEBHOOK_LOOKUPS_BUSY",
    "WEBHOOK_RESOLVER_BUSY",
    "WEBHOOK_RESOLVER_THREADS",
    "WEBHOOK_RESOLVES_PER_OWNER",
    "WEBHOOK_RESOLVE_SECONDS",
    "WebhookResolver",
    "WebhookTarget",
    "WebhookURLRefused",
    "deliver_due_webhooks",
    "deliver_webhooks_forever",
    "resolve_webhook_url",
    "signature_headers",
    "webhook_event",
]

_logger = logging.getLogger(__name__)

MAX_WEBHOOK_ATTEMPTS = 8
_MAX_BACKOFF_SECONDS = 3600
# Deliveries in flight at once in one pass: a handful of slow receivers cannot hold the others.
_CONCURRENT_DELIVERIES = 16
_WEBHOOKS_PER_PASS = 100
# Kept on the batch and shown to its tenant: bounded whatever the receiver answered.
MAX_WEBHOOK_ERROR_CHARS = 300
# A webhook host is the tenant's, and so is its name server, which may answer slowly or never:
# ``WebhookResolver`` looks hosts up on threads of its own, this many at once, at most
# ``WEBHOOK_RESOLVES_PER_OWNER`` for one owner (a tenant), each waited for this long.
WEBHOOK_RESOLVER_THREADS = 8
WEBHOOK_RESOLVES_PER_OWNER = 2
WEBHOOK_RESOLVE_SECONDS = 5.0
WEBHOOK_LOOKUPS_BUSY = "webhook_lookups_busy"
WEBHOOK_RESOLVER_BUSY = "webhook_resolver_busy"
_DEFAULT_PORTS = {"http": 80, "https": 443}
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# Not public although ``is_global`` says so on some Python versions: IETF protocol assignments,
# the retired 6to4 relay anycast, IPv6 site-local (deprecated, still routed inside networks).
_NEVER_PUBLIC = tuple(
    ipaddress.ip_network(network) for network in ("192.0.0.0/24", "192.88.99.0/24", "fec0::/10")
)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class WebhookURLRefused(ValueError):
    """The URL may not receive webhooks; ``code`` names why (the API answers it as a 400)."""

    def __init__(self, message: str, code: str = "invalid_webhook_url") -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class WebhookTarget:
    """A checked URL and the addresses to connect to for it (every one checked)."""

    url: httpx.URL
    addresses: tuple[IPAddress, ...]


def _embedded_ipv4(address: IPAddress) -> IPAddress:
    """The IPv4 address an IPv6 one stands for (mapped ``::ffff:a.b.c.d``, NAT64, 6to4
    ``2002:AABB:CCDD::``: a host with a 6to4 route sends to it), else itself."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address.sixtofour is not None:
            return address.sixtofour
        if address in _NAT64:
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address


def is_public_address(address: IPAddress) -> bool:
    """Globally routable unicast: not loopback, private, link-local (cloud metadata lives at
    169.254.169.254), shared (100.64/10), multicast, unspecified or reserved."""
    address = _embedded_ipv4(address)
    if any(address in network for network in _NEVER_PUBLIC):
        return False
    return address.is_global and not (address.is_multicast or address.is_reserved or address.is_unspecified)


def resolve_webhook_url(url: str, *, allow_private: bool) -> WebhookTarget:
    """Check ``url`` for a webhook and resolve its host; raises ``WebhookURLRefused``. Every
    address the host resolves to must be public (unless ``allow_private``): a name with one
    private address among public ones would otherwise be a coin toss away from the inside."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as e:
        raise WebhookURLRefused(f"the webhook URL is not a URL: {e}") from e
    if parsed.scheme not in _DEFAULT_PORTS:
        raise WebhookURLRefused("the webhook URL must be http:// or https://")
    if parsed.userinfo:
        raise WebhookURLRefused(
            "the webhook URL may not carry credentials (user:password@)", code="webhook_url_has_credentials"
        )
    if not parsed.host:
        raise WebhookURLRefused("the webhook URL has no host")
    port = parsed.port or _DEFAULT_PORTS[parsed.scheme]
    try:
        infos = socket.getaddrinfo(parsed.host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        raise WebhookURLRefused(
            f"the webhook host {parsed.host!r} does not resolve", code="webhook_host_unresolved"
        ) from e
    addresses = list(dict.fromkeys(ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos))
    if not addresses:
        raise WebhookURLRefused(
            f"the webhook host {parsed.host!r} does not resolve", code="webhook_host_unresolved"
        )
    if not allow_private:
        for address in addresses:
            if not is_public_address(address):
                raise WebhookURLRefused(
                    f"the webhook host {parsed.host!r} resolves to {address}, which is not a public "
                    "address (the operator may allow private ones: TOKENMILL_WEBHOOK_ALLOW_PRIVATE)",
                    code="webhook_url_not_public",
                )
    return WebhookTarget(parsed, tuple(addresses))


class WebhookResolver:
    """``resolve_webhook_url`` for callers that must not wait on a tenant's name server: on
    ``threads`` of its own (never the caller's pool, which serves every tenant), at most
    ``per_owner`` look-ups of one owner running at once (one tenant cannot take them all), each
    waited for ``seconds`` at most. A look-up that outlives its wait still holds its thread and
    its owner's place until the resolver gives up on it."""

    def __init__(
        self,
        *,
        threads: int = WEBHOOK_RESOLVER_THREADS,
        per_owner: int = WEBHOOK_RESOLVES_PER_OWNER,
        seconds: float = WEBHOOK_RESOLVE_SECONDS,
    ) -> None:
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="webhook-dns")
        self._per_owner = per_owner
        self._seconds = seconds
        self._running: Counter[str] = Counter()
        self._lock = threading.Lock()

    def _finished(self, owner: str) -> None:
        with self._lock:
            self._running[owner] -= 1
            if self._running[owner] <= 0:
                del self._running[owner]

    async def resolve(self, url: str, *, allow_private: bool, owner: str) -> WebhookTarget:
        """As ``resolve_webhook_url``; also raises ``WebhookURLRefused`` with code
        ``webhook_host_unresolved`` when the host did not resolve within the wait, and
        ``webhook_lookups_busy`` when ``owner`` has its share of look-ups running already, and
        ``webhook_resolver_busy`` when the look-up never got a thread within the wait (other
        owners' look-ups held them all)."""
        with self._lock:
            if self._running[owner] >= self._per_owner:
                raise WebhookURLRefused(
                    f"{self._per_owner} look-ups of your webhook hosts are still waiting for their "
                    "name servers; retry once they answered",
                    code=WEBHOOK_LOOKUPS_BUSY,
                )
            self._running[owner] += 1
        looked_up = self._pool.submit(resolve_webhook_url, url, allow_private=allow_private)
        looked_up.add_done_callback(lambda _: self._finished(owner))
        try:
            return await asyncio.wait_for(asyncio.wrap_future(looked_up), self._seconds)
        except TimeoutError:
            if looked_up.cancel():  # never started (and now never starts): the threads were taken
                # by other owners' look-ups, so nothing is known of this host: a transient refusal,
                # not "does not resolve" (a final 400 for a host that may well resolve).
                raise WebhookURLRefused(
                    "the webhook host could not be looked up: the look-ups of other webhook hosts "
                    "take every thread; retry shortly",
                    code=WEBHOOK_RESOLVER_BUSY,
                ) from None
            raise WebhookURLRefused(
                f"the webhook host did not resolve within {self._seconds:g} s", code="webhook_host_unresolved"
            ) from None

    def close(self) -> None:
        """Stop taking look-ups; those running end on their own (their threads are not waited for)."""
        self._pool.shutdown(wait=False, cancel_futures=True)


def signature_headers(secret: str, message_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """Standard Webhooks headers: ``webhook-signature`` is ``v1,`` and the base64 HMAC-SHA256, keyed
    by the secret's bytes, of ``{id}.{timestamp}.{body}`` (what ``openai``'s ``webhooks.unwrap``
    and every Standard Webhooks library verify)."""
    key = base64.b64decode(secret.removeprefix(store.WEBHOOK_SECRET_PREFIX))
    signed = f"{message_id}.{timestamp}.".encode() + body
    signature = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": f"v1,{signature}",
    }


def webhook_event(batch: dict[str, Any]) -> dict[str, Any]:
    """The event for an ended batch, given as its batch object (``store.batch_object``, what
    ``GET /v1/batches/{id}`` answers): that object is the event's ``data``."""
    return {
        "object": "event",
        "id": f"evt_{batch['id']}_{batch['status']}",
        "type": f"batch.{batch['status']}",
        "created_at": int(time.time()),
        "data": batch,
    }


class _NotDelivered(Exception):
    """The receiver answered, but not with a 2xx."""


async def _post_to_checked_address(
    http: httpx.AsyncClient, webhook: store.DueWebhook, *, allow_private: bool, lookups: _PassLookups
) -> None:
    """Resolve and check again (the DNS answer may have changed since the batch was created), then
    POST to the address checked, naming the host in ``Host`` and TLS SNI. Raises on failure."""
    target = await lookups.resolve(webhook, allow_private=allow_private)
    event = webhook_event(webhook.batch)
    body = json.dumps(event, separators=(",", ":")).encode()
    signed = signature_headers(webhook.secret, event["id"], int(time.time()), body)
    host = target.url.host
    host_header = host if target.url.port is None else f"{host}:{target.url.port}"
    unreachable: httpx.ConnectError | None = None
    for address in target.addresses:  # in the resolver's order, as a client connecting by name would
        try:
            # Streamed, and its body never read: the status is the answer, and a receiver may
            # send an endless body (held in memory, for each concurrent delivery, until the
            # deadline, had it been read).
            async with http.stream(
                "POST",
                target.url.copy_with(host=str(address)),
                content=body,
                headers={"Host": host_header, "Content-Type": "application/json", **signed},
                extensions={"sni_hostname": host},
            ) as answer:
                status_code = answer.status_code
        except httpx.ConnectError as e:
            unreachable = e
            continue
        if not 200 <= status_code < 300:
            raise _NotDelivered(f"HTTP {status_code}")
        return
    assert unreachable is not None
    raise unreachable


class _PassLookups:
    """One pass's look-ups through the process's resolver. A tenant's wait for their turn, as many
    at once as the resolver allows one owner: a tenant with many deliveries due is refused none of
    them, and only its look-ups still hanging from earlier attempts make the resolver refuse it."""

    def __init__(self, resolver: WebhookResolver) -> None:
        self._resolver = resolver
        self._turns: dict[str, asyncio.Semaphore] = {}

    async def resolve(self, webhook: store.DueWebhook, *, allow_private: bool) -> WebhookTarget:
        turn = self._turns.setdefault(webhook.tenant_id, asyncio.Semaphore(WEBHOOK_RESOLVES_PER_OWNER))
        async with turn:
            return await self._resolver.resolve(
                webhook.url, allow_private=allow_private, owner=webhook.tenant_id
            )


class _Postponed(str):
    """A delivery never attempted: its host's look-up got no thread of the resolver within the
    wait (other tenants' look-ups held them all). Not its attempt: due again soon, its count and
    backoff as they were, so that other tenants' name servers cannot use up its attempts."""


# A postponed delivery (``_Postponed``) is due again this many seconds later.
_POSTPONED_SECONDS = 10


async def _attempt(
    http: httpx.AsyncClient,
    webhook: store.DueWebhook,
    *,
    allow_private: bool,
    deadline_seconds: float,
    lookups: _PassLookups,
) -> str | None:
    """One delivery within ``deadline_seconds`` of wall clock; the error, or None when delivered
    (a ``_Postponed`` error: it was never attempted)."""
    try:
        async with asyncio.timeout(deadline_seconds):
            await _post_to_checked_address(http, webhook, allow_private=allow_private, lookups=lookups)
    except TimeoutError:
        return f"no answer within {deadline_seconds:g} s"
    except WebhookURLRefused as e:
        if e.code == WEBHOOK_RESOLVER_BUSY:
            return _Postponed(f"not attempted: {e}")
        return f"refused: {e}"
    except _NotDelivered as e:
        return str(e)
    except Exception as e:  # an HTTP error, or any other: it fails this delivery only, recorded
        if not isinstance(e, httpx.HTTPError):
            _logger.exception("webhook delivery for batch %s failed unexpectedly", webhook.batch_id)
        return f"{type(e).__name__}: {str(e)[:MAX_WEBHOOK_ERROR_CHARS]}"
    return None


async def _deliver(
    due: list[store.DueWebhook], *, allow_private: bool, deadline_seconds: float, resolver: WebhookResolver
) -> list[str | None]:
    slots = asyncio.Semaphore(_CONCURRENT_DELIVERIES)
    lookups = _PassLookups(resolver)
    # trust_env=False: a webhook never goes through the environment's proxy (which would connect
    # to the host by name, not to the address checked).
    async with httpx.AsyncClient(follow_redirects=False, trust_env=False, timeout=deadline_seconds) as http:

        async def one(webhook: store.DueWebhook) -> str | None:
            async with slots:
                return await _attempt(
                    http,
                    webhook,
                    allow_private=allow_private,
                    deadline_seconds=deadline_seconds,
                    lookups=lookups,
                )

        return await asyncio.gather(*(one(webhook) for webhook in due))


_pass_resolver: WebhookResolver | None = None
_pass_resolver_lock = threading.Lock()


def _resolver_of_passes() -> WebhookResolver:
    """The look-ups of this process's delivery passes: one resolver for all of them, since a
    look-up that hangs outlives its pass, and still counts against its tenant's share."""
    global _pass_resolver
    with _pass_resolver_lock:
        if _pass_resolver is None:
            _pass_resolver = WebhookResolver()
        return _pass_resolver


def deliver_due_webhooks(
    engine: Engine,
    *,
    allow_private: bool = False,
    max_attempts: int = MAX_WEBHOOK_ATTEMPTS,
    deadline_seconds: float = 10.0,
    now: int | None = None,
) -> tuple[int, int]:
    """Claim and try every webhook that is due; returns (delivered, failed) for this pass. Lasts at
    most about ``deadline_seconds`` per ``_CONCURRENT_DELIVERIES`` webhooks due."""
    # A claim outlives the pass (so no other sender takes the same webhook meanwhile): every round
    # of concurrent deliveries takes at most the deadline. The attempt's record then sets when it
    # is due next.
    rounds = -(-_WEBHOOKS_PER_PASS // _CONCURRENT_DELIVERIES)
    due = store.claim_due_webhooks(
        engine,
        max_attempts=max_attempts,
        claim_seconds=int(deadline_seconds * rounds) + 60,
        now=now,
        limit=_WEBHOOKS_PER_PASS,
    )
    if not due:
        return 0, 0
    errors = asyncio.run(
        _deliver(
            due,
            allow_private=allow_private,
            deadline_seconds=deadline_seconds,
            resolver=_resolver_of_passes(),
        )
    )
    for webhook, error in zip(due, errors, strict=True):
        attempted = not isinstance(error, _Postponed)
        retry_in = min(_MAX_BACKOFF_SECONDS, 10 * 2**webhook.attempts) if attempted else _POSTPONED_SECONDS
        bounded = None if error is None else error[:MAX_WEBHOOK_ERROR_CHARS]
        store.record_webhook_attempt(
            engine, webhook.batch_id, error=bounded, retry_in=retry_in, now=now, counted=attempted
        )
    failed = sum(error is not None for error in errors)
    return len(due) - failed, failed


def deliver_webhooks_forever(
    engine: Engine,
    interval_seconds: float,
    *,
    allow_private: bool,
    deadline_seconds: float,
    should_stop: Callable[[], bool] = lambda: False,
) -> None:
    """The delivery loop of ``tokenmill beat`` (on its own thread, apart from the sweep); a failed
    pass is logged and the next one tries again."""
    while not should_stop():
        started = time.monotonic()
        try:
            deliver_due_webhooks(engine, allow_private=allow_private, deadline_seconds=deadline_seconds)
        except Exception:
            _logger.exception("webhook delivery pass failed; retrying in %.1f s", interval_seconds)
        deadline = started + interval_seconds
        while not should_stop() and time.monotonic() < deadline:
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
