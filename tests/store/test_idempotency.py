"""Idempotency keys in the ledger, on both databases: claim, refuse, replay, take over, expire."""

from __future__ import annotations

import threading
import time

import sqlalchemy as sa

import store
from store import IdempotencyOutcome as Outcome
from store.tables import IdempotencyKey


def test_a_key_is_claimed_once_answered_once_and_replayed(database_url: str) -> None:
    store.upgrade_to_head(database_url)
    engine = store.make_engine(database_url)
    tenant = store.create_tenant(engine, "t").id
    other = store.create_tenant(engine, "u").id

    def claim(key: str, digest: str, now: int, tenant_id: str = tenant) -> store.IdempotencyClaim:
        return store.claim_idempotency_key(
            engine, tenant_id, key, digest, now=now, expired_before=now - 1000, stale_before=now - 100
        )

    assert claim("k", "h1", 10_000).outcome is Outcome.PROCEED
    assert claim("k", "h1", 10_001).outcome is Outcome.IN_PROGRESS
    assert claim("k", "h2", 10_001).outcome is Outcome.MISMATCH
    assert claim("k", "h2", 10_001, tenant_id=other).outcome is Outcome.PROCEED  # keys are per tenant
    answer = store.StoredResponse(200, [("content-type", "application/json")], b'{"id": "batch_1"}')
    store.store_idempotent_response(engine, tenant, "k", answer)
    replay = claim("k", "h1", 10_002)
    assert (replay.outcome, replay.response) == (Outcome.REPLAY, answer)
    assert claim("k", "h2", 10_002).outcome is Outcome.MISMATCH
    # An answer is kept for the retention; past it the key is new again.
    assert claim("k", "h2", 11_001).outcome is Outcome.PROCEED
    # A request whose process died (no answer for longer than any wait) is taken over.
    assert claim("k", "h2", 11_050).outcome is Outcome.IN_PROGRESS
    assert claim("k", "h2", 11_102).outcome is Outcome.PROCEED
    # An abandoned key (a 5xx: nothing done) is free for the retry.
    store.abandon_idempotency_key(engine, tenant, "k")
    assert claim("k", "h3", 11_103).outcome is Outcome.PROCEED
    assert store.purge_idempotency_keys(engine, older_than=11_103) == 1  # the other tenant's, at 10_001
    engine.dispose()


def test_a_key_abandoned_while_being_claimed_is_claimed_afresh(postgres_url: str) -> None:
    """The claim's insert finds the row; before it locks it, the first request abandons it (a 5xx):
    the claim found nothing to lock and raised (a 500). It must claim the key afresh."""
    store.upgrade_to_head(postgres_url)
    engine = store.make_engine(postgres_url)
    tenant = store.create_tenant(engine, "t").id
    at_10, at_11 = ({"now": now, "expired_before": 0, "stale_before": 0} for now in (10, 11))
    assert store.claim_idempotency_key(engine, tenant, "k", "h", **at_10).outcome is Outcome.PROCEED
    claims: list[store.IdempotencyClaim | BaseException] = []

    def claim() -> None:
        try:
            claims.append(store.claim_idempotency_key(engine, tenant, "k", "h", **at_11))
        except BaseException as e:
            claims.append(e)

    waiting_for_a_lock = sa.text(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE wait_event_type = 'Lock' AND datname = current_database()"
    )
    with engine.connect() as holder, holder.begin():
        # Hold the row's lock so that the claim stops between its insert and its own lock.
        holder.execute(sa.select(IdempotencyKey).where(IdempotencyKey.key == "k").with_for_update())
        claimer = threading.Thread(target=claim)
        claimer.start()
        deadline = time.monotonic() + 30
        # Polled from a connection of its own: pg_stat_activity is read once per transaction.
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as watcher:
            while not watcher.execute(waiting_for_a_lock).scalar_one():
                assert time.monotonic() < deadline, f"the claim never waited for the row's lock: {claims}"
                time.sleep(0.01)
        holder.execute(sa.delete(IdempotencyKey).where(IdempotencyKey.key == "k"))
    claimer.join(timeout=30)
    engine.dispose()
    assert len(claims) == 1
    assert isinstance(claims[0], store.IdempotencyClaim), repr(claims[0])
    assert claims[0].outcome is Outcome.PROCEED
