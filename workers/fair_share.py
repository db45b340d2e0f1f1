"""Sharing a worker process's free slots between tenants by weight.

Deficit round robin in its virtual-time form: each tenant has a clock that advances by
``1 / weight`` per request started for it, and a free slot goes to the tenant with work waiting
whose clock is lowest. While tenants A and B both have work, the requests started for them are in
the ratio of their weights, within one request. A tenant with nothing waiting banks no credit:
when it has work again its clock starts at the lowest clock among the tenants that kept theirs
busy (as DRR resets an emptied queue's deficit), so it cannot take a burst of slots for the time
it was idle, nor is it held back for what it had before.

Each worker process shares its own slots this way (``workers.runner`` refills a chunk's window
through it); since every process does, the workers together share by weight too. Within a tenant
the order is the ledger's (``store.claim_in_order``): higher ``priority`` first, then the earliest
end of the completion window, then line order.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping

__all__ = ["FairShare"]


class FairShare:
    """The tenants' clocks of one worker process. Not thread-safe: used from its event loop."""

    def __init__(self) -> None:
        self._clocks: dict[str, float] = {}
        self._weights: dict[str, float] = {}  # the last weight seen of each tenant
        # The lowest clock among tenants that had work at the last sharing; never goes back.
        self._floor = 0.0

    def _clock(self, tenant_id: str) -> float:
        return max(self._clocks.get(tenant_id, self._floor), self._floor)

    def shares(self, weights: Mapping[str, float], slots: int) -> dict[str, int]:
        """How many of ``slots`` each tenant of ``weights`` (the tenants with work waiting, and
        their weights) should get now; nothing is charged until ``charge``."""
        self._weights.update(weights)
        heap = [(self._clock(tenant_id), tenant_id) for tenant_id in weights]
        heapq.heapify(heap)
        given: dict[str, int] = {}
        for _ in range(slots if heap else 0):
            clock, tenant_id = heapq.heappop(heap)
            given[tenant_id] = given.get(tenant_id, 0) + 1
            heapq.heappush(heap, (clock + 1 / weights[tenant_id], tenant_id))
        return given

    def charge(self, tenant_id: str, started: int) -> None:
        """``started`` requests of the tenant took slots (at its last weight seen, else 1)."""
        if started:
            weight = self._weights.get(tenant_id, 1.0)
            self._clocks[tenant_id] = self._clock(tenant_id) + started / weight

    def settle(self, busy: Mapping[str, float]) -> None:
        """After a sharing: ``busy`` are the tenants that still have work waiting. A tenant not
        among them will start again from the lowest of their clocks."""
        if busy:
            self._floor = max(self._floor, min(self._clock(tenant_id) for tenant_id in busy))
        # Clocks at or below the floor say nothing more than the floor does.
        self._clocks = {t: c for t, c in self._clocks.items() if c > self._floor}
