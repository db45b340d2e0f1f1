"""The lane's ledger threads (``workers.lane_threads``): a call's result or exception comes back
to its caller, in the caller's context, off the event loop's thread; a caller cancelled meanwhile
leaves the call to finish, and the threads serve on."""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time

import pytest

from workers.lane_threads import LaneThreads

_seen: contextvars.ContextVar[str] = contextvars.ContextVar("seen", default="none")


async def test_results_exceptions_and_context_come_back_from_another_thread() -> None:
    threads = LaneThreads(2, "test ledger")
    try:
        _seen.set("the caller's")
        loop_thread = threading.get_ident()

        def work(a: int, *, b: int) -> tuple[int, str, bool]:
            return a + b, _seen.get(), threading.get_ident() != loop_thread

        assert await threads.run(work, 1, b=2) == (3, "the caller's", True)

        def fail() -> None:
            raise LookupError("no such row")

        with pytest.raises(LookupError, match="no such row"):
            await threads.run(fail)
        many = await asyncio.gather(*(threads.run(work, n, b=0) for n in range(20)))
        assert [result[0] for result in many] == list(range(20))
    finally:
        threads.stop(5)


async def test_a_cancelled_caller_leaves_its_call_to_finish_and_the_threads_serve_on() -> None:
    threads = LaneThreads(1, "test ledger")
    release = threading.Event()
    finished = threading.Event()

    def slow() -> str:
        release.wait(5)
        finished.set()
        return "done"

    try:
        call = asyncio.ensure_future(threads.run(slow))
        await asyncio.sleep(0.01)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        release.set()
        assert await threads.run(lambda: "next") == "next"  # after the slow one, on the one thread
        assert finished.is_set()
    finally:
        threads.stop(5)


async def test_stop_waits_its_timeout_in_all_and_a_call_after_it_is_refused() -> None:
    threads = LaneThreads(4, "test ledger")
    release = threading.Event()
    busy = [asyncio.ensure_future(threads.run(release.wait, 10)) for _ in range(4)]
    try:
        await asyncio.sleep(0.05)  # every thread holds a call
        started = time.monotonic()
        await asyncio.to_thread(threads.stop, 0.3)
        # One deadline for all four stuck threads, not 0.3 s each.
        assert time.monotonic() - started < 0.9
        with pytest.raises(RuntimeError, match="after stop"):
            await threads.run(lambda: "never taken")
    finally:
        release.set()
        await asyncio.gather(*busy)
