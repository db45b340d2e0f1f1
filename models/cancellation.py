"""A cancellation token: callers cancel, callees register what to stop."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["CancellationToken"]


class CancellationToken:
    """Cancel pending work: futures linked to the token are cancelled, callbacks are called.

    Thread-safe, so a Celery control thread or a signal handler may cancel a token that an event
    loop is waiting on.
    """

    def __init__(self) -> None:
        self._cancelled = False
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []

    def cancel(self) -> None:
        with self._lock:
            if self._cancelled:
                return
            self._cancelled = True
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()

    def is_cancelled(self) -> bool:
        return self._cancelled

    def add_callback(self, callback: Callable[[], None]) -> None:
        with self._lock:
            if not self._cancelled:
                self._callbacks.append(callback)
                return
        callback()

    def remove_callback(self, callback: Callable[[], None]) -> None:
        """Forget ``callback`` (if still registered): a waiter that ended without a cancel, so that a
        long-lived token does not collect one callback per wait."""
        with self._lock, contextlib.suppress(ValueError):
            self._callbacks.remove(callback)

    def link_future(self, future: asyncio.Future[Any]) -> asyncio.Future[Any]:
        """Cancel ``future`` (from its own loop's thread) when the token is cancelled."""
        loop = future.get_loop()

        def cancel_future() -> None:
            if not future.done():
                loop.call_soon_threadsafe(future.cancel)

        self.add_callback(cancel_future)
        return future
