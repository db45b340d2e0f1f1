"""Sharing a worker process's slots between tenants by weight.

Start-time fair queueing, the virtual-time form of deficit round robin: each tenant has a clock
that advances by ``1 / weight`` per request claimed for it, and each request claimed is tagged
with its tenant's clock as it was claimed. Free slots are shared out by the lowest clocks when
claiming (``shares``), and a request waiting in the window's backlog is let into a slot by the
lowest tag (``FairGate``), so a tenant that just arrived does not wait behind another's backlog.
While tenants A and B both have work, the requests started for them are in the ratio of their
weights, within one request. A tenant with nothing waiting banks no credit: its clock starts
again at the tag of the request last let in (the service's virtual time, as DRR resets an
emptied queue's deficit), so it cannot take a burst of slots for the time it was idle.

Each worker process shares its own slots this way (``workers.runner``; its interactive lane's in
``workers.lane_scheduler``); since every process does, the workers together share by weight too.
Within a tenant the order is the ledger's (``store.claim_in_order``): higher ``priority`` first,
then the earliest end of the completion window, then line order.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Mapping

from store.tenants import MIN_TENANT_WEIGHT

__all__ = ["MIN_STEP_WEIGHT", "FairGate", "FairShare"]

# The least weight a clock steps by: the ledger's least (``store.tenants``), also for rows written
# before it was checked. A clock steps by ``1 / weight``: a weight of 1e-300 stepped the service's
# virtual time to 1e300 (5e-324, to infinity), where every other tenant's step rounds to nothing,
# and every clock then compared equal for the process's life (the order fell back to tenant ids,
# whatever the weights).
MIN_STEP_WEIGHT = MIN_TENANT_WEIGHT


def _step(weight: float) -> float:
    return 1 / max(weight, MIN_STEP_WEIGHT)


class FairShare:
    """The tenants' clocks of one worker process: claimed on one thread at a time, admitted on
    the event loop."""

    def __init__(self) -> None:
        self._clocks: dict[str, float] = {}
        self._weights: dict[str, float] = {}  # the last weight seen of each tenant
        # The tag of the request last let into a slot; never goes back.
        self._now = 0.0

    def _clock(self, tenant_id: str) -> float:
        return max(self._clocks.get(tenant_id, self._now), self._now)

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
            heapq.heappush(heap, (clock + _step(weights[tenant_id]), tenant_id))
        return given

    def order(self, weights: Mapping[str, float]) -> list[str]:
        """The tenants of ``weights`` (those whose work may be waiting, and their weights), the one
        the next free slot should go to first; nothing is charged until ``charge``."""
        self._weights.update(weights)
        return sorted(weights, key=lambda tenant_id: (self._clock(tenant_id), tenant_id))

    def charge(self, tenant_id: str, claimed: int) -> list[float]:
        """``claimed`` requests of the tenant were claimed (at its last weight seen, else 1);
        returns their tags, in order."""
        step = _step(self._weights.get(tenant_id, 1.0))
        start = self._clock(tenant_id)
        tags = [start + n * step for n in range(claimed)]
        if claimed:
            self._clocks[tenant_id] = start + claimed * step
        return tags

    def admitted(self, tag: float) -> None:
        """A request tagged ``tag`` got a slot: the service's virtual time is at least that."""
        if tag > self._now:
            self._now = tag
            # Clocks at or below it say nothing more than it does. (``list`` copies in C: a claim
            # on another thread may charge meanwhile.)
            self._clocks = {t: c for t, c in list(self._clocks.items()) if c > tag}


class FairGate:
    """The window's slots: a request waiting for one is let in by the lowest tag, not by arrival.
    On one event loop."""

    def __init__(self, slots: int, fair_share: FairShare) -> None:
        self._free = slots
        self._fair_share = fair_share
        self._waiting: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    async def acquire(self, tag: float) -> None:
        if self._free > 0 and not self._waiting:
            self._free -= 1
        else:
            turn = asyncio.get_running_loop().create_future()
            heapq.heappush(self._waiting, (tag, next(self._order), turn))
            try:
                await turn
            except asyncio.CancelledError:
                if turn.done() and not turn.cancelled():
                    self.release()  # let in as it was cancelled: the slot goes to the next one
                raise
        self._fair_share.admitted(tag)

    def release(self) -> None:
        while self._waiting:
            _, _, turn = heapq.heappop(self._waiting)
            if not turn.done():  # a cancelled waiter's turn is skipped
                turn.set_result(None)
                return
        self._free += 1
