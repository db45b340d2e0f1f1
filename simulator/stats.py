"""What the simulator served since start or the last reset, for tests and benchmarks to check against."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

__all__ = ["MAX_TIMESTAMPS", "Stats"]

# Timestamps kept per list; past it only the per-second buckets keep counting (about 10 MB at the cap).
MAX_TIMESTAMPS = 300_000


class Stats:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.since = time.time()
        self.requests = 0
        self.completions = 0
        self.streams = 0
        self.by_status: Counter[str] = Counter()
        self.by_model: Counter[str] = Counter()
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cached_tokens = 0
        self.reasoning_tokens = 0
        self.in_flight = 0
        self.peak_in_flight = 0
        self.client_addresses: set[tuple[str, int]] = set()
        self.broken_streams = 0
        self.timeouts = 0
        self.request_times: list[float] = []
        self.accepted_times: list[float] = []
        self.accepted_per_second: Counter[int] = Counter()
        self.timestamps_truncated = False

    def arrived(self, now: float, client: tuple[str, int] | None = None) -> None:
        """A completion request at ``now`` on the connection from ``client`` (host, port)."""
        if client is not None:
            self.client_addresses.add(client)
        self.requests += 1
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        if len(self.request_times) < MAX_TIMESTAMPS:
            self.request_times.append(now)
        else:
            self.timestamps_truncated = True

    def finished(self, status: int | str) -> None:
        self.in_flight -= 1
        self.by_status[str(status)] += 1

    def accepted(self, arrival: float, usage: dict[str, Any]) -> None:
        """A completion answered in full: its arrival time and tokens count."""
        if len(self.accepted_times) < MAX_TIMESTAMPS:
            self.accepted_times.append(arrival)
        else:
            self.timestamps_truncated = True
        self.accepted_per_second[int(arrival)] += 1
        self.prompt_tokens += usage["prompt_tokens"]
        self.completion_tokens += usage["completion_tokens"]
        self.cached_tokens += usage["prompt_tokens_details"]["cached_tokens"]
        self.reasoning_tokens += usage["completion_tokens_details"]["reasoning_tokens"]

    def snapshot(self) -> dict[str, Any]:
        return {
            "since": self.since,
            "now": time.time(),
            "requests": self.requests,
            "completions": self.completions,
            "streams": self.streams,
            "accepted": sum(self.accepted_per_second.values()),
            "by_status": dict(self.by_status),
            "by_model": dict(self.by_model),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "cached_tokens": self.cached_tokens,
            "reasoning_tokens": self.reasoning_tokens,
            "in_flight": self.in_flight,
            "peak_in_flight": self.peak_in_flight,
            "connections": len(self.client_addresses),
            "broken_streams": self.broken_streams,
            "timeouts": self.timeouts,
            "request_times": self.request_times,
            "accepted_times": self.accepted_times,
            "accepted_per_second": {str(k): v for k, v in sorted(self.accepted_per_second.items())},
            "timestamps_truncated": self.timestamps_truncated,
        }
