"""Every weight ``store.set_tenant_weight`` accepts (0 < weight <= 1000) keeps the tenants' shares
by weight, in the lanes (``workers.lane_scheduler``, against a real Redis) and in the chunks'
slots (``workers.fair_share``).

Before, a tenant's clock advanced by ``1 / weight``: once two calls of a tenant of weight 1e-20
(or 1e-300) were served, the service's virtual time stood at 1e20 (1e300), where every other
tenant's step (1 / 1000 to 1) rounds to nothing; a chunk's shares went to infinity with 5e-324
(the smallest float above 0). Every clock then compared equal for as long as the process lived,
and the order fell back to the tenant ids: the tenant whose id sorted first took every lane call
before the others', and every free slot of every chunk, whatever the weights."""

from __future__ import annotations

from collections import Counter

import pytest

from workers.fair_share import FairShare
from workers.lane_scheduler import LaneScheduler
from workers.lane_transport import LaneMessage, LaneTransport

# Accepted by store.set_tenant_weight. A step of 1e20 is already past where a step of 1 counts
# (2 ** 53); the smallest float above 0 makes 1 / weight infinite.
TINY_WEIGHTS = [1e-20, 1e-300, 5e-324]


async def send(transport: LaneTransport, tenant_id: str, count: int, weight: float) -> None:
    for n in range(count):
        await transport.send(LaneMessage(f"{tenant_id}-{n}", stream=False), tenant_id, weight)


async def take(scheduler: LaneScheduler) -> tuple[str, LaneMessage]:
    """The next call, taking again past news (an arrival), as the consumer does."""
    for _ in range(10):
        taken = await scheduler.take(0.05)
        if taken is not None:
            return taken
    raise AssertionError("no call taken")


@pytest.mark.parametrize("tiny", TINY_WEIGHTS)
async def test_a_tenant_of_a_tiny_weight_leaves_the_lanes_shared_by_weight(
    transport: LaneTransport, tiny: float
) -> None:
    scheduler = LaneScheduler(transport, "lane-1", slots=64)
    # The tiny tenant's calls run while nobody else's wait: the second is tagged 1 / tiny.
    await send(transport, "background", 2, weight=tiny)
    for _ in range(2):
        tenant_id, _ = await take(scheduler)
        await scheduler.done(tenant_id)
    # Named so that the id order favours the light one.
    await send(transport, "a-light", 40, weight=1)
    await send(transport, "b-heavy", 40, weight=2)
    counts: Counter[str] = Counter()
    for _ in range(30):
        tenant_id, _ = await take(scheduler)
        counts[tenant_id] += 1
        await scheduler.done(tenant_id)
    assert abs(counts["b-heavy"] - 2 * counts["a-light"]) <= 2, counts


@pytest.mark.parametrize("tiny", TINY_WEIGHTS)
def test_a_tenant_of_a_tiny_weight_leaves_the_chunks_slots_shared_by_weight(tiny: float) -> None:
    fair_share = FairShare()
    for tag in fair_share.charge("background", 2) if fair_share.shares({"background": tiny}, 2) else []:
        fair_share.admitted(tag)
    given = fair_share.shares({"a-light": 1, "b-heavy": 2}, 30)
    assert given == {"a-light": 10, "b-heavy": 20}, given
