"""``api.validation_slots``: slots go to waiting tenants in turn, and a waiter cancelled (its
process stopping) neither keeps a slot nor loses one."""

from __future__ import annotations

import asyncio

import pytest

from api.validation_slots import TenantFairSlots


async def _run(slots: TenantFairSlots, tenant: str, order: list[str], release: asyncio.Event) -> None:
    async with slots.slot(tenant):
        order.append(tenant)
        await release.wait()


def test_slots_go_to_waiting_tenants_in_turn() -> None:
    async def scenario() -> list[str]:
        slots = TenantFairSlots(1)
        order: list[str] = []
        release = asyncio.Event()
        tasks = [
            asyncio.create_task(_run(slots, t, order, release)) for t in ["a", "a", "a", "a", "b", "c", "b"]
        ]
        await asyncio.sleep(0)  # each task runs to its slot or its wait
        assert order == ["a"]
        release.set()
        await asyncio.gather(*tasks)
        assert (slots.held, slots.waiting) == (0, 0)
        return order

    assert asyncio.run(scenario()) == ["a", "a", "b", "c", "a", "b", "a"]


def test_a_cancelled_waiter_passes_its_slot_on() -> None:
    async def scenario() -> None:
        slots = TenantFairSlots(1)
        order: list[str] = []
        first, rest = asyncio.Event(), asyncio.Event()
        holder = asyncio.create_task(_run(slots, "a", order, first))
        await asyncio.sleep(0)
        doomed = asyncio.create_task(_run(slots, "b", order, rest))
        waiting = asyncio.create_task(_run(slots, "c", order, rest))
        await asyncio.sleep(0)
        assert slots.waiting == 2
        first.set()  # the slot is handed to b ...
        await asyncio.sleep(0)
        doomed.cancel()  # ... which is cancelled before it runs: c gets it
        rest.set()
        await asyncio.gather(holder, waiting)
        with pytest.raises(asyncio.CancelledError):
            await doomed
        assert order in (["a", "c"], ["a", "b", "c"])
        assert (slots.held, slots.waiting) == (0, 0)

    asyncio.run(scenario())
