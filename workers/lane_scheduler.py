"""Which tenant's single call a worker process's interactive lane takes next.

The lane has ``slots`` calls in flight at most (``lane_in_flight_per_process``). Single calls wait
on one Redis list per tenant (``workers.lane_transport``), and a free slot goes to the tenant with
the least service per unit of weight (``workers.fair_share``: the clocks the chunks' runner shares
its slots by, here the lane's own), among those holding fewer than ``tenant_cap(slots)`` of the
lane's slots. So one tenant's calls, however many and however slow, leave slots for another's,
and while two tenants' calls wait, the calls taken are in the ratio of their weights.

The choice costs no polling: a take is one BRPOP on the tenants' lists in fair order (Redis pops
from the first that has a message, or wakes on the first push), behind two lists of news that
make the order stale: ``lane:arrivals`` (a tenant it does not know sent a call) and its own wake
list (a slot of a tenant it left out, at its cap, freed while it was blocked).

A consumer killed between a take and its claim loses no call: the message's dispatch marker
outlives it, and once the marker lapses the sweeper sends the request again (``workers.dispatch``).
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter

from redis.exceptions import RedisError

from workers.fair_share import FairShare
from workers.lane_transport import LaneMessage, LaneTransport

__all__ = ["LaneScheduler", "tenant_cap"]

# How often the known tenants (and their weights) are read again without news of an arrival: the
# arrival is told to one consumer; the others learn of it this late at most.
REFRESH_SECONDS = 1.0
# A tenant with nothing queued that sent nothing for this long is forgotten (its list is not
# blocked on); its next call brings it back as an arrival.
FORGET_IDLE_SECONDS = 300.0


def tenant_cap(slots: int) -> int:
    """The most of a lane's ``slots`` one tenant may hold: an eighth (at least one) stays for the
    others, so a tenant's slow calls can never hold the whole lane while another's wait."""
    return max(1, slots - max(1, slots // 8))


class LaneScheduler:
    """One lane consumer's choice of the next call; on its event loop."""

    def __init__(self, transport: LaneTransport, owner: str, slots: int) -> None:
        self.transport = transport
        self.owner = owner
        self.cap = tenant_cap(slots)
        self.holding: Counter[str] = Counter()
        self._fair_share = FairShare()
        self._weights: dict[str, float] = {}
        self._refreshed_at = -REFRESH_SECONDS
        # While a take is blocked: the tenants it left out (at their cap), whose slot freeing
        # must wake it.
        self._left_out: set[str] = set()

    async def refresh(self) -> None:
        self._weights = await self.transport.tenants(FORGET_IDLE_SECONDS)
        self._refreshed_at = time.monotonic()

    async def take(self, wait_seconds: float) -> tuple[str, LaneMessage] | None:
        """The next call to run and its tenant (charged a slot until ``done``), waiting up to
        ``wait_seconds``; None if none came, or news came first (take again). Raises Redis errors."""
        if time.monotonic() - self._refreshed_at >= REFRESH_SECONDS:
            await self.refresh()
        eligible = {t: w for t, w in self._weights.items() if self.holding[t] < self.cap}
        self._left_out = set(self._weights) - set(eligible)
        try:
            taken = await self.transport.take(self._fair_share.order(eligible), self.owner, wait_seconds)
        finally:
            self._left_out = set()
        if taken is None:
            return None
        if taken.message is None or taken.tenant_id is None:
            if taken.arrived:
                await self.refresh()
            return None
        tenant_id = taken.tenant_id
        self.holding[tenant_id] += 1
        [tag] = self._fair_share.charge(tenant_id, 1)
        self._fair_share.admitted(tag)  # no backlog in the lane: it runs now
        return tenant_id, taken.message

    async def done(self, tenant_id: str) -> None:
        """A call of ``tenant_id``'s ended: its slot is free."""
        self.holding[tenant_id] -= 1
        if self.holding[tenant_id] <= 0:
            del self.holding[tenant_id]
        if tenant_id in self._left_out:
            self._left_out.discard(tenant_id)  # one wake per blocked take
            # Lost, the take ends at its timeout instead.
            with contextlib.suppress(RedisError, OSError):
                await self.transport.wake(self.owner)
