from __future__ import annotations

import threading

from sqlalchemy.engine import Engine

import store
from tests.store.conftest import IngestFn


def test_claim_leases_queued_requests_once(engine: Engine, ingest: IngestFn) -> None:
    batch = ingest(3)
    ids = store.pending_request_ids(engine, batch.batch_id)
    first = store.claim_requests(engine, ids, "w1", 60, now=1000)
    assert [c.attempts for c in first] == [1, 1, 1]
    assert all(c.lease_expires_at == 1060 for c in first)
    assert store.claim_requests(engine, ids, "w2", 60, now=1010) == []
    assert store.batch_progress(engine, batch.batch_id).running == 3


def test_an_expired_lease_can_be_claimed_again(engine: Engine, ingest: IngestFn) -> None:
    ids = store.pending_request_ids(engine, ingest(2).batch_id)
    store.claim_requests(engine, ids, "w1", 60, now=1000)
    assert store.extend_leases(engine, ids[:1], "w1", 60, now=1050) == ids[:1]  # lease to 1110
    again = store.claim_requests(engine, ids, "w2", 60, now=1070)
    assert [c.id for c in again] == ids[1:]
    assert again[0].attempts == 2
    # w1 lost ids[1]: extending it no longer works
    assert store.extend_leases(engine, ids, "w1", 60, now=1080) == ids[:1]


def test_release_requeues_with_backoff(engine: Engine, ingest: IngestFn) -> None:
    ids = store.pending_request_ids(engine, ingest(1).batch_id)
    store.claim_requests(engine, ids, "w1", 60, now=1000)
    assert store.release_requests(engine, ids, "other-worker") == 0
    assert store.release_requests(engine, ids, "w1", error="429 slow down", not_before=1100) == 1
    assert store.claim_requests(engine, ids, "w2", 60, now=1050) == []
    assert [c.attempts for c in store.claim_requests(engine, ids, "w2", 60, now=1100)] == [2]


def test_finished_requests_are_never_claimed(engine: Engine, ingest: IngestFn) -> None:
    ids = store.pending_request_ids(engine, ingest(1).batch_id)
    store.claim_requests(engine, ids, "w1", 60, now=1000)
    store.record_results(engine, [store.ResultRecord(ids[0], store.RequestStatus.SUCCEEDED, {"ok": True})])
    assert store.claim_requests(engine, ids, "w2", 60, now=5000) == []


def test_two_concurrent_claimers_never_get_the_same_request(engine: Engine, ingest: IngestFn) -> None:
    ids = store.pending_request_ids(engine, ingest(200).batch_id)
    start = threading.Barrier(2)
    got: dict[str, list[str]] = {}

    def claimer(owner: str) -> None:
        start.wait()
        mine: list[str] = []
        for offset in range(0, len(ids), 20):  # both walk the same ids in the same order
            mine += [c.id for c in store.claim_requests(engine, ids[offset : offset + 20], owner, 60)]
        got[owner] = mine

    threads = [threading.Thread(target=claimer, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not set(got["a"]) & set(got["b"])
    assert sorted(got["a"] + got["b"]) == sorted(ids)


def test_what_the_sweeper_finds_to_dispatch_again(engine: Engine, ingest: IngestFn) -> None:
    ids = store.pending_request_ids(engine, ingest(5, now=900).batch_id)
    store.mark_dispatched(engine, ids[:2], "msg-1", now=1000)
    store.mark_dispatched(engine, ids[2:4], "msg-2", now=1000)
    store.claim_requests(engine, ids[:1], "w1", 60, now=1000)  # lease to 1060, then its worker dies
    store.claim_requests(engine, ids[3:4], "w2", 60, now=1000)
    store.record_results(engine, [store.ResultRecord(ids[3], store.RequestStatus.SUCCEEDED, {"ok": True})])
    # ids[4] was never dispatched; ids[1] waits in msg-1; ids[2] in msg-2; ids[3] is done
    assert store.unsettled_dispatch_ids(engine, now=1010, settled_before=1001) == ["msg-1", "msg-2"]

    def redispatch(now: int, dead: list[str], limit: int = 100) -> set[str]:
        rows = store.requests_to_redispatch(
            engine, now=now, settled_before=now - 60, dead_dispatch_ids=dead, limit=limit
        )
        return {request_id for request_id, _ in rows}

    assert redispatch(1010, []) == {ids[4]}  # the live lease and live messages are left alone
    assert redispatch(1100, []) == {ids[0], ids[4]}  # the lease expired after its dispatch
    assert redispatch(1100, ["msg-2"]) == {ids[0], ids[2], ids[4]}  # msg-2 was lost
    assert len(redispatch(1100, ["msg-1", "msg-2"], limit=2)) == 2


def test_mark_dispatched_skips_finished_requests(engine: Engine, ingest: IngestFn) -> None:
    ids = store.pending_request_ids(engine, ingest(2).batch_id)
    store.record_results(engine, [store.ResultRecord(ids[0], store.RequestStatus.FAILED, error_code="x")])
    assert store.mark_dispatched(engine, ids, "m") == 1


def test_claim_queued_takes_queued_requests_of_the_batches_in_line_order(
    engine: Engine, ingest: IngestFn
) -> None:
    batch = ingest(6).batch_id
    other = ingest(3).batch_id
    ids = store.pending_request_ids(engine, batch)
    store.claim_requests(engine, ids[:2], "w1", 60, now=1000)  # leased: not taken again
    taken = store.claim_queued(engine, [batch], "w2", 60, limit=3, now=1001)
    assert [c.id for c in taken] == ids[2:5]
    assert all(c.batch_id == batch for c in taken)
    assert [c.id for c in store.claim_queued(engine, [batch], "w2", 60, limit=10, now=1002)] == ids[5:]
    assert store.claim_queued(engine, [batch], "w3", 60, limit=10, now=1003) == []
    assert store.batch_progress(engine, other).queued == 3


def test_claim_queued_adopts_requests_whose_lease_expired(engine: Engine, ingest: IngestFn) -> None:
    batch = ingest(3).batch_id
    ids = store.pending_request_ids(engine, batch)
    store.claim_requests(engine, ids, "dead-worker", 20, now=1000)
    assert store.claim_queued(engine, [batch], "w2", 20, limit=10, now=1019) == []
    adopted = store.claim_queued(engine, [batch], "w2", 20, limit=10, now=1021)
    assert [c.id for c in adopted] == ids
    assert all(c.attempts == 2 for c in adopted)


def test_concurrent_claim_queued_never_share_a_request(engine: Engine, ingest: IngestFn) -> None:
    batch = ingest(200).batch_id
    start = threading.Barrier(2)
    got: dict[str, list[str]] = {}

    def claimer(owner: str) -> None:
        start.wait()
        mine: list[str] = []
        while taken := store.claim_queued(engine, [batch], owner, 60, limit=15):
            mine += [c.id for c in taken]
        got[owner] = mine

    threads = [threading.Thread(target=claimer, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not set(got["a"]) & set(got["b"])
    assert len(got["a"]) + len(got["b"]) == 200
