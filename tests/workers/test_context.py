"""A worker process's one event loop (``workers.context.run_in_loop``)."""

from __future__ import annotations

import asyncio

from workers import context


async def current_loop() -> asyncio.AbstractEventLoop:
    return asyncio.get_running_loop()


def test_tasks_share_the_process_loop_until_it_is_closed() -> None:
    first = context.run_in_loop(current_loop())
    assert context.run_in_loop(current_loop()) is first
    context.close()
    assert first.is_closed()
    second = context.run_in_loop(current_loop())
    assert second is not first
    context.close()


def test_closing_from_inside_the_loop_waits_for_the_chunk() -> None:
    """A shutdown signal may land mid-chunk: the chunk finishes, then the loop is closed."""
    seen: list[asyncio.AbstractEventLoop] = []

    async def close_midway() -> str:
        seen.append(asyncio.get_running_loop())
        context.close()
        await asyncio.sleep(0.01)  # the loop still runs this chunk
        return "finished"

    assert context.run_in_loop(close_midway()) == "finished"
    assert seen[0].is_closed()
    assert context.run_in_loop(current_loop()) is not seen[0]  # the next task gets a new loop
    context.close()
