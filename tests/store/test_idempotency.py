"""Idempotency keys in the ledger, on both databases: claim, refuse, replay, take over, expire."""

from __future__ import annotations

import store
from store import IdempotencyOutcome as Outcome


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
