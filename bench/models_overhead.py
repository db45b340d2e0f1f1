"""CPU cost of ``OpenAIChatCompletionClient.create`` against the raw ``openai`` SDK call.

Both sides send the same request to the same simulator (a separate process, so its CPU is not
counted) with the same concurrency; ``time.process_time()`` measures this process only. The two
sides alternate over several rounds and the best round of each is compared, which damps noise
from other work on the machine. Run by hand:

    .venv/bin/python -m bench.models_overhead [--calls 2000] [--concurrency 16] [--rounds 3]

The target is a ratio <= 1.10 (ours / raw SDK). Then it prints cache hits per second from Redis
in one process (target >= 5,000/s), measured by ``bench.cache_hits``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable

from openai import AsyncOpenAI

from bench.cache_hits import bench_redis
from models import OpenAIChatCompletionClient, UserMessage
from simulator import SimulatorServer

PROMPT = "Summarize the plot of a short story about a lighthouse keeper."
KEY = "sk-bench"


async def _drive(call: Callable[[int], Awaitable[object]], calls: int, concurrency: int) -> float:
    """Process CPU seconds to make ``calls`` calls, ``concurrency`` at a time."""
    queue = iter(range(calls))

    async def worker() -> None:
        for index in queue:
            await call(index)

    started = time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.process_time() - started


async def raw_sdk(base_url: str, calls: int, concurrency: int) -> float:
    client = AsyncOpenAI(api_key=KEY, base_url=base_url, max_retries=0)

    async def call(index: int) -> object:
        response = await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": f"{PROMPT} #{index % 50}"}]
        )
        return response.choices[0].message.content

    try:
        await _drive(call, 50, concurrency)  # warm-up: connections, imports, caches
        return await _drive(call, calls, concurrency)
    finally:
        await client.close()


async def ours(base_url: str, calls: int, concurrency: int) -> float:
    client = OpenAIChatCompletionClient(model="gpt-4o-mini", api_key=KEY, base_url=base_url)

    async def call(index: int) -> object:
        result = await client.create([UserMessage(content=f"{PROMPT} #{index % 50}", source="user")])
        return result.content

    try:
        await _drive(call, 50, concurrency)
        return await _drive(call, calls, concurrency)
    finally:
        await client.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--redis-url", default=os.environ.get("TOKENMILL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    args = parser.parse_args()
    # As deployed: the event logger exists but nobody listens at INFO.
    logging.getLogger("tokenmill.models.events").setLevel(logging.WARNING)

    raw_times: list[float] = []
    our_times: list[float] = []
    with SimulatorServer(workers=2) as simulator:
        for round_number in range(1, args.rounds + 1):
            raw_times.append(asyncio.run(raw_sdk(simulator.base_url, args.calls, args.concurrency)))
            our_times.append(asyncio.run(ours(simulator.base_url, args.calls, args.concurrency)))
            print(
                f"round {round_number}: raw SDK {raw_times[-1]:.3f} s CPU, "
                f"tokenmill {our_times[-1]:.3f} s CPU ({args.calls} calls, concurrency {args.concurrency})"
            )
    raw_best, our_best = min(raw_times), min(our_times)
    print(f"raw SDK   best: {raw_best:.3f} s CPU = {raw_best / args.calls * 1e6:.0f} us/call")
    print(f"tokenmill best: {our_best:.3f} s CPU = {our_best / args.calls * 1e6:.0f} us/call")
    print(f"ratio tokenmill / raw SDK: {our_best / raw_best:.3f} (target <= 1.10)")
    # The second figure: cache hits per second from Redis in one process (target >= 5,000/s).
    asyncio.run(bench_redis(args.redis_url, seconds=3.0, concurrency=32))


if __name__ == "__main__":
    main()
