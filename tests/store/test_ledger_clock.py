"""Leases are times on one clock, the ledger's: a worker whose host clock is behind (a VM resumed,
a host without NTP, a clock stepped back) wrote leases that had already lapsed by every other
worker's clock, so another worker claimed its running requests at once and paid for them again;
one whose clock is ahead wrote leases that held a dead worker's requests for as long. Each
process now reads PostgreSQL's clock when it connects and when it pings an idle connection, and
``now_seconds`` follows it.

The host clock is shifted in this process only (``time.time``): the ledger, PostgreSQL, is real."""

from __future__ import annotations

import time

import pytest

import store
from store import claim_requests, extend_leases
from store.ids import now_seconds
from tests.workers.support import add_batch, ledger

SKEW_SECONDS = 120
LEASE_SECONDS = 20


def test_a_worker_whose_clock_is_behind_keeps_its_leases_from_the_others(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    led = ledger(postgres_url)
    _, [request_id] = add_batch(led, ["hello"])
    true_time = time.time
    monkeypatch.setattr(time, "time", lambda: true_time() - SKEW_SECONDS)
    behind = store.make_engine(postgres_url)  # its first connection reads the ledger's clock
    try:
        [held] = claim_requests(behind, [request_id], "worker-behind", LEASE_SECONDS)
        assert held.lease_expires_at >= int(true_time()) + LEASE_SECONDS - 2
        assert abs(now_seconds() - true_time()) < 2
        monkeypatch.setattr(time, "time", true_time)
        on_time = store.make_engine(postgres_url)
        try:
            assert claim_requests(on_time, [request_id], "worker-on-time", LEASE_SECONDS) == []
            assert extend_leases(on_time, [request_id], "worker-behind", LEASE_SECONDS) == [request_id]
        finally:
            on_time.dispose()
    finally:
        behind.dispose()
        led.engine.dispose()


def test_a_worker_whose_clock_is_ahead_writes_leases_that_lapse_on_time(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    led = ledger(postgres_url)
    _, [request_id] = add_batch(led, ["hello"])
    true_time = time.time
    monkeypatch.setattr(time, "time", lambda: true_time() + SKEW_SECONDS)
    ahead = store.make_engine(postgres_url)
    try:
        [held] = claim_requests(ahead, [request_id], "worker-ahead", LEASE_SECONDS)
        # A dead worker's requests come back a lease later, not a lease plus its clock's lead.
        assert held.lease_expires_at <= int(true_time()) + LEASE_SECONDS + 2
    finally:
        ahead.dispose()
        led.engine.dispose()
