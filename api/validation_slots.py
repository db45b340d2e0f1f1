"""Slots for the background validations of one API process, shared between tenants in turn.

A process reads at most ``max_background_ingests`` input files at once (each holds an API thread
and up to ~64 MB); the rest wait, still ``validating``. Handed out in arrival order, the slots went
to whichever tenant had created the most batches: its queue held every other tenant's batches
behind it. Here a freed slot goes to the next tenant in turn (round robin over the tenants that
are waiting), and to that tenant's oldest waiting validation.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator

__all__ = ["TenantFairSlots"]


class TenantFairSlots:
    """``capacity`` slots; ``async with slots.slot(tenant_id):`` holds one."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.held = 0
        # Tenants in their turn's order, each with its waiters (oldest first).
        self._waiting: dict[str, deque[asyncio.Future[None]]] = {}

    @property
    def waiting(self) -> int:
        return sum(len(queue) for queue in self._waiting.values())

    @contextlib.asynccontextmanager
    async def slot(self, tenant_id: str) -> AsyncIterator[None]:
        if self.held < self.capacity and not self._waiting:
            self.held += 1
        else:
            await self._wait(tenant_id)
        try:
            yield
        finally:
            self._release()

    async def _wait(self, tenant_id: str) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(tenant_id, deque()).append(waiter)
        try:
            await waiter  # a release hands its slot over: ``held`` stays as it was
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release()  # handed a slot as it was cancelled: pass it on
            else:
                self._forget(tenant_id, waiter)
            raise

    def _forget(self, tenant_id: str, waiter: asyncio.Future[None]) -> None:
        queue = self._waiting.get(tenant_id)
        if queue is None:
            return
        with contextlib.suppress(ValueError):
            queue.remove(waiter)
        if not queue:
            del self._waiting[tenant_id]

    def _release(self) -> None:
        """Hand the slot to the first tenant in turn (which then goes to the back of the turn, if
        it has more waiting), or free it."""
        while self._waiting:
            tenant_id = next(iter(self._waiting))
            queue = self._waiting.pop(tenant_id)
            waiter = queue.popleft()
            if queue:
                self._waiting[tenant_id] = queue
            if not waiter.done():
                waiter.set_result(None)
                return
        self.held -= 1
