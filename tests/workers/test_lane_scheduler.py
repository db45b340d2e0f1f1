"""The interactive lane's choice of the next single call (``workers.lane_scheduler``), against a
real Redis: tenants share a lane's slots by weight, one tenant never holds every slot while
another's call waits, and a take blocked on an idle lane returns the moment a call is sent (or a
left-out tenant's slot frees), never at its timeout. Orders are read from the takes, not timings.

Before, every call went on one list (``lane:queue``) taken first in, first out: the takes below
came in the order the calls were sent, whoever sent them."""

from __future__ import annotations

import asyncio
from collections import Counter

import redis.asyncio as aioredis

from tests.models.counting_connection import CountingConnection
from workers.constants import dispatch_marker_key, lane_reply_key
from workers.lane_scheduler import LaneScheduler, tenant_cap
from workers.lane_transport import REPLY_SECONDS, LaneMessage, LaneTransport, lane_dispatch_id

# Long: a take that should return at once but waits for its timeout fails the test (it returns
# None) rather than passing late.
_BLOCKED_TAKE_SECONDS = 30.0


async def send(transport: LaneTransport, tenant_id: str, count: int, weight: float = 1.0) -> None:
    for n in range(count):
        await transport.send(LaneMessage(f"{tenant_id}-{n}", stream=False), tenant_id, weight)


async def take(scheduler: LaneScheduler, wait_seconds: float = 0.05) -> tuple[str, LaneMessage] | None:
    """The next call, taking again past news (an arrival, a wake) as the consumer does."""
    for _ in range(10):
        taken = await scheduler.take(wait_seconds)
        if taken is not None:
            return taken
    return None


def test_a_tenant_may_hold_all_but_an_eighth_of_the_slots_and_at_least_one_stays_free() -> None:
    assert [tenant_cap(slots) for slots in (1, 2, 3, 8, 16, 64)] == [1, 1, 2, 7, 14, 56]


async def test_two_waiting_tenants_are_taken_in_the_ratio_of_their_weights(transport: LaneTransport) -> None:
    await send(transport, "heavy", 40, weight=2)
    await send(transport, "light", 40, weight=1)
    scheduler = LaneScheduler(transport, "lane-1", slots=64)
    takes: list[tuple[str, str]] = []
    for _ in range(30):
        taken = await take(scheduler)
        assert taken is not None
        takes.append((taken[0], taken[1].request_id))
    counts = Counter(tenant_id for tenant_id, _ in takes)
    assert abs(counts["heavy"] - 2 * counts["light"]) <= 2, takes
    # First in, first out within a tenant.
    for tenant_id in ("heavy", "light"):
        ids = [request_id for t, request_id in takes if t == tenant_id]
        assert ids == [f"{tenant_id}-{n}" for n in range(counts[tenant_id])]


async def test_one_tenant_at_its_cap_leaves_the_free_slots_to_another(transport: LaneTransport) -> None:
    await send(transport, "hog", 10)
    scheduler = LaneScheduler(transport, "lane-1", slots=3)  # a tenant holds 2 at most
    hogs = [await take(scheduler), await take(scheduler)]
    assert [t for t, _ in filter(None, hogs)] == ["hog", "hog"]
    assert await scheduler.take(0.05) is None  # the hog's third call waits: its cap is reached

    taking = asyncio.create_task(take(scheduler, _BLOCKED_TAKE_SECONDS))
    await send(transport, "patient", 1)
    taken = await taking
    assert taken is not None
    assert (taken[0], taken[1].request_id) == ("patient", "patient-0")


async def test_a_take_blocked_with_a_tenant_left_out_wakes_when_its_slot_frees(
    transport: LaneTransport,
) -> None:
    await send(transport, "hog", 3)
    scheduler = LaneScheduler(transport, "lane-1", slots=2)  # a tenant holds 1 at most
    first = await take(scheduler)
    assert first is not None
    taking = asyncio.create_task(take(scheduler, _BLOCKED_TAKE_SECONDS))
    await asyncio.sleep(0)  # let it block on the lists, the hog's left out
    await scheduler.done("hog")
    taken = await taking
    assert taken is not None
    assert (taken[0], taken[1].request_id) == ("hog", "hog-1")


async def test_a_call_to_an_idle_lane_is_taken_at_once(transport: LaneTransport) -> None:
    await send(transport, "known", 1)
    scheduler = LaneScheduler(transport, "lane-1", slots=4)
    assert await take(scheduler) is not None
    # Blocked with every list empty: a known tenant's call, then a tenant never seen before.
    for tenant_id in ("known", "newcomer"):
        taking = asyncio.create_task(take(scheduler, _BLOCKED_TAKE_SECONDS))
        await asyncio.sleep(0)
        await transport.send(LaneMessage(f"{tenant_id}-late", stream=False), tenant_id)
        taken = await taking
        assert taken is not None
        assert taken[1].request_id == f"{tenant_id}-late"


async def test_a_call_taken_by_another_process_is_not_taken_twice(transport: LaneTransport) -> None:
    await send(transport, "a", 5)
    await send(transport, "b", 5)
    first, second = LaneScheduler(transport, "lane-1", slots=64), LaneScheduler(transport, "lane-2", slots=64)
    ids = []
    for scheduler in (first, second) * 5:
        taken = await take(scheduler)
        assert taken is not None
        ids.append(taken[1].request_id)
    assert sorted(ids) == sorted([f"a-{n}" for n in range(5)] + [f"b-{n}" for n in range(5)])


async def test_a_reply_settles_its_message_in_the_same_round_trip(redis_url: str, redis_prefix: str) -> None:
    """A plain call's answer removes its dispatch marker with it: one round trip, not two."""
    pool = aioredis.ConnectionPool.from_url(redis_url, connection_class=CountingConnection)
    client = aioredis.Redis(connection_pool=pool)
    try:
        transport = LaneTransport(client, redis_prefix)
        await transport.send(LaneMessage("req-1", stream=False), "tenant-a")
        marker = dispatch_marker_key(redis_prefix, lane_dispatch_id("req-1"))
        assert await client.exists(marker)
        await transport.reply("req-1", {"warm": True})  # the script loaded
        await transport.send(LaneMessage("req-2", stream=False), "tenant-a")
        CountingConnection.sent = 0
        await transport.reply("req-2", {"status": "succeeded"})
        trips = CountingConnection.sent
        marker_2 = dispatch_marker_key(redis_prefix, lane_dispatch_id("req-2"))
        assert not await client.exists(marker, marker_2)
        assert await transport.wait_reply("req-2", 1) == {"status": "succeeded"}
        assert 0 < await client.ttl(lane_reply_key(redis_prefix, "req-1")) <= REPLY_SECONDS
    finally:
        await client.aclose()
        await pool.aclose()
    assert trips == 1
