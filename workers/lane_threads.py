"""The threads the interactive lane runs its ledger calls on, with a cheaper hop than
``asyncio.to_thread``.

A single call makes two ledger calls (its claim, its result) on threads, and at a few hundred
calls a second the hop itself showed in the lane's profile: ``ThreadPoolExecutor.submit`` takes
a Python-level semaphore and builds a ``concurrent.futures.Future`` (a ``Condition`` of its own,
notified under a lock), which ``run_in_executor`` then chains to an asyncio future. Here a call is
one ``SimpleQueue.put`` (C, no Python lock) to threads started up front, and its outcome comes
back with one ``call_soon_threadsafe`` onto the asyncio future the caller awaits. The function
runs in a copy of the caller's context; a caller cancelled meanwhile does not stop it, its outcome
is dropped (both as with ``to_thread``).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["LaneThreads"]

T = TypeVar("T")

_Work = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", Callable[[], Any]] | None


def _resolve(future: asyncio.Future[Any], error: BaseException | None, result: Any) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class LaneThreads:
    """``count`` daemon threads named ``name``; ``run`` from their event loop, ``stop`` once."""

    def __init__(self, count: int, name: str) -> None:
        self._work: queue.SimpleQueue[_Work] = queue.SimpleQueue()
        self._stopped = False
        self._threads = [
            threading.Thread(target=self._serve, name=f"{name}_{n}", daemon=True) for n in range(count)
        ]
        for thread in self._threads:
            thread.start()

    async def run(self, function: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        if self._stopped:  # no thread would ever take it: its caller would wait forever
            raise RuntimeError("LaneThreads.run after stop")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        context = contextvars.copy_context()
        self._work.put((loop, future, functools.partial(context.run, function, *args, **kwargs)))
        return await future

    def _serve(self) -> None:
        while True:
            work = self._work.get()
            if work is None:
                return
            loop, future, call = work
            try:
                result, error = call(), None
            except BaseException as e:  # handed to the caller, as to_thread does
                result, error = None, e
            with contextlib.suppress(RuntimeError):  # its loop closed: nobody waits
                loop.call_soon_threadsafe(_resolve, future, error, result)
            # An idle thread must not keep its last call's arguments, result or traceback alive.
            del work, loop, future, call, result, error

    def stop(self, timeout: float | None = None) -> None:
        """Let the threads end once the calls queued before this one ran; wait at most
        ``timeout`` seconds in all for them."""
        self._stopped = True
        for _ in self._threads:
            self._work.put(None)
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
