"""Dispatch markers and the sweep against a real Redis broker and PostgreSQL, interleavings driven
directly (no worker process: what a worker does to the ledger and the marker is done here)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import sqlalchemy as sa

from store import Request, claim_requests, release_requests
from tests.cluster import Cluster
from tests.workers.support import Ledger, add_batch, statuses
from workers.dispatch import MARKER_HELD_SECONDS, MARKER_SENT_SECONDS, Dispatcher
from workers.sweeper import sweep


class WorkerRunsBeforeSent(Dispatcher):
    """A dispatcher that stalls between publishing and its ``sent`` write, while a worker takes
    the message, claims its request, hands it back and settles the marker."""

    def published(self, numbered: Sequence[tuple[str, list[str], int]]) -> None:
        for dispatch_id, ids, _ in numbered:
            claimed = claim_requests(self.engine, ids, "worker-1", lease_seconds=30)
            assert [r.id for r in claimed] == ids
            self.settle(dispatch_id)
            assert release_requests(self.engine, ids, "worker-1") == len(ids)
        super().published(numbered)


def test_a_late_sent_write_does_not_bring_a_settled_marker_back(
    cluster: Callable[..., Cluster], make_ledger: Callable[[str], Ledger], postgres_url: str
) -> None:
    c = cluster()
    led = make_ledger(postgres_url)
    batch_id, ids = add_batch(led, ["question"])
    d = c.dispatcher
    racing = WorkerRunsBeforeSent(d.celery, d.engine, d.redis_client, d.key_prefix, d.chunk_size)
    [dispatch_id] = racing.dispatch(ids)
    # The request is queued again and no marker claims a message will run it...
    assert statuses(led.engine, batch_id) == {"queued": 1}
    assert racing.marker(dispatch_id) is None
    # ...so the next sweep past the grace sends it again (it used to sit behind a live 48 h
    # "sent" marker).
    with led.engine.begin() as conn:
        conn.execute(sa.update(Request).values(dispatched_at=Request.dispatched_at - 60))
    report = sweep(d, grace_seconds=30)
    assert report.redispatched == 1


def test_sent_markers_are_renewed_only_while_their_message_waits(
    cluster: Callable[..., Cluster], make_ledger: Callable[[str], Ledger], postgres_url: str
) -> None:
    """No worker runs: the messages stay in the broker's queue. A sent marker is renewed while
    no later message was taken, and left to expire once one was (its own was taken and lost)."""
    c = cluster()
    led = make_ledger(postgres_url)
    _, first_ids = add_batch(led, ["first"])
    _, second_ids = add_batch(led, ["second"])
    d = c.dispatcher
    [first] = d.dispatch(first_ids)
    [second] = d.dispatch(second_ids)
    assert (d.marker(first) or "").startswith("sent:")
    first_key = f"{d.key_prefix}dispatch:{first}"
    assert 0 < c.broker.ttl(first_key) <= MARKER_SENT_SECONDS

    c.broker.expire(first_key, 5)
    assert d.live_dispatches([first, second]) == {first, second}
    assert c.broker.ttl(first_key) > MARKER_SENT_SECONDS - 5, "waiting in the queue: renewed"

    d.settle(second)  # a worker took the later message: the first one was taken before it
    c.broker.expire(first_key, 5)
    assert d.live_dispatches([first, second]) == {first}
    assert c.broker.ttl(first_key) <= 5, "taken but never settled: left to expire"


def test_markers_are_not_renewed_when_the_queue_is_empty(
    cluster: Callable[..., Cluster], make_ledger: Callable[[str], Ledger], postgres_url: str
) -> None:
    c = cluster()
    led = make_ledger(postgres_url)
    _, ids = add_batch(led, ["question"])
    d = c.dispatcher
    [dispatch_id] = d.dispatch(ids)
    queue_key = f"{(d.celery.conf.broker_transport_options or {}).get('global_keyprefix', '')}{d.queue}"
    assert c.broker.llen(queue_key) == 1, "the queue's key is where kombu keeps the messages"
    c.broker.delete(queue_key)  # the message is lost, its marker is not
    marker_key = f"{d.key_prefix}dispatch:{dispatch_id}"
    c.broker.expire(marker_key, 5)
    assert d.live_dispatches([dispatch_id]) == {dispatch_id}
    assert c.broker.ttl(marker_key) <= 5


def test_a_held_marker_lives_while_renewed_and_a_settled_one_stays_settled(
    cluster: Callable[..., Cluster], make_ledger: Callable[[str], Ledger], postgres_url: str
) -> None:
    """A refilling chunk holds its message's marker (its ids are claimed a window at a time): its
    number counts as taken, the marker lives MARKER_HELD_SECONDS past each renewal, so the
    sweeper re-sends nothing of it; its ids come back once the holder stops renewing (killed),
    and a hold after the settle does not bring the marker back."""
    c = cluster()
    led = make_ledger(postgres_url)
    _, ids = add_batch(led, ["held"])
    d = c.dispatcher
    [held] = d.dispatch(ids)
    key = f"{d.key_prefix}dispatch:{held}"
    seq = int((d.marker(held) or "").split(":")[1])
    d.hold(held)
    assert 0 < c.broker.ttl(key) <= MARKER_HELD_SECONDS
    assert int(c.broker.get(f"{d.key_prefix}dispatch-seq:taken") or 0) >= seq
    with led.engine.begin() as conn:
        conn.execute(sa.update(Request).values(dispatched_at=Request.dispatched_at - 60))
    assert sweep(d, grace_seconds=30).redispatched == 0, "held: its chunk claims it in turn"
    c.broker.delete(key)  # the holder died and its last renewal ran out
    assert sweep(d, grace_seconds=30).redispatched == 1
    [settled] = d.dispatch(ids)
    d.settle(settled)
    d.hold(settled)
    assert d.marker(settled) is None
