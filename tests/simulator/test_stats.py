"""Stats counting, reset, and the peak-rate helpers."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from simulator.testing import SimulatorServer, peak_count, peak_rate


@pytest.fixture
def client(simulator: SimulatorServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=simulator.base_url, api_key="sim", max_retries=0, timeout=10) as client:
        yield client


def test_stats_count_requests_statuses_models_and_tokens(
    client: openai.OpenAI, simulator: SimulatorServer
) -> None:
    replies = [
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": f"q{i}"}])
        for i, model in enumerate(["a", "a", "b"])
    ]
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="b", messages=[{"role": "user", "content": "[[status 500]]"}])
    list(client.chat.completions.create(model="a", messages=[{"role": "user", "content": "s"}], stream=True))
    stats = simulator.stats()
    assert stats["requests"] == stats["completions"] == 5
    assert stats["streams"] == 1
    assert stats["accepted"] == 4
    assert stats["by_status"] == {"200": 4, "500": 1}
    assert stats["by_model"] == {"a": 3, "b": 2}
    usage = [r.usage for r in replies if r.usage is not None]
    assert stats["prompt_tokens"] >= sum(u.prompt_tokens for u in usage)
    assert stats["completion_tokens"] > sum(u.completion_tokens for u in usage)  # plus the stream's
    assert stats["total_tokens"] == stats["prompt_tokens"] + stats["completion_tokens"]
    assert len(stats["request_times"]) == 5
    assert len(stats["accepted_times"]) == 4
    assert stats["in_flight"] == 0


def test_reset_zeroes_stats_and_restores_config(client: openai.OpenAI, simulator: SimulatorServer) -> None:
    simulator.configure(rate_500=1.0)
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    simulator.reset()
    stats = simulator.stats()
    assert stats["requests"] == 0
    assert stats["by_status"] == {}
    assert stats["accepted_times"] == []
    client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert simulator.stats()["by_status"] == {"200": 1}


def test_a_request_running_across_a_reset_counts_in_neither_period(
    client: openai.OpenAI, simulator: SimulatorServer
) -> None:
    """An answer to a request that arrived before a reset (an earlier test's call, its client gone,
    still sleeping out a long latency) is not the new period's: counted there, it made a later
    test's ledger look one answer short per straggler of what the simulator delivered
    (``test_a_cache_redis_frozen_then_killed_mid_batch`` after a test with 60 s latency)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        answer = pool.submit(
            client.chat.completions.create,
            model="m",
            messages=[{"role": "user", "content": "from before the reset [[delay 3]]"}],
        )
        deadline = time.monotonic() + 10
        while simulator.stats()["in_flight"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert simulator.stats()["in_flight"] == 1, "the request never reached the simulator"
        simulator.reset()
        assert not answer.done(), "the reset came after the reply; nothing was tested"
        reply = answer.result()
    assert reply.usage is not None
    assert reply.usage.total_tokens > 0  # it was answered in full
    stats = simulator.stats()
    assert stats["accepted"] == stats["requests"] == 0
    assert stats["prompt_tokens"] == stats["completion_tokens"] == 0
    assert stats["in_flight"] == 0
    assert stats["by_status"] == {}


def test_peak_in_flight_sees_concurrency(client: openai.OpenAI, simulator: SimulatorServer) -> None:
    simulator.configure(latency_ms=300)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(
            pool.map(
                lambda i: client.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": str(i)}]
                ),
                range(4),
            )
        )
    assert simulator.stats()["peak_in_flight"] == 4


def test_peak_rate_over_a_window(client: openai.OpenAI, simulator: SimulatorServer) -> None:
    started = time.time()
    for i in range(10):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": str(i)}])
    elapsed = time.time() - started
    stats = simulator.stats()
    assert peak_count(stats["accepted_times"], window_s=elapsed + 1) == 10
    assert peak_rate(stats, window_s=10) == pytest.approx(1.0)
    assert peak_rate(stats, window_s=elapsed + 1) == pytest.approx(10 / (elapsed + 1))


def test_peak_count_finds_the_densest_window() -> None:
    times = [0.0, 0.1, 0.2, 5.0, 5.05, 5.1, 5.15, 9.0]
    assert peak_count(times, window_s=1.0) == 4
    assert peak_count(times, window_s=0.1) == 2
    assert peak_count(times, window_s=10.0) == 8
    assert peak_count([], window_s=1.0) == 0


def test_peak_rate_from_buckets_when_timestamps_were_truncated() -> None:
    stats = {
        "accepted_times": [],
        "timestamps_truncated": True,
        "accepted_per_second": {"100": 5, "101": 7, "102": 1, "110": 30},
    }
    assert peak_rate(stats, window_s=2) == pytest.approx(15.0)
    assert peak_rate(stats, window_s=3) == pytest.approx(13 / 3 if 13 > 30 else 10.0)


def test_several_workers_act_as_one() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    with SimulatorServer(workers=2) as server:
        server.configure(rate_500=1.0)
        pids: set[str] = set()
        answered: list[int] = []
        # A fresh connection each time, so the kernel hands them to both workers.
        while len(pids) < 2 and len(answered) < 200:
            answer = httpx.post(f"{server.base_url}/chat/completions", json=body)
            answered.append(answer.status_code)
            pids.add(answer.headers["x-sim-worker"])
        assert len(pids) == 2
        assert set(answered) == {500}  # the config change reached every worker
        stats = server.stats()
        assert stats["workers"] == 2
        assert stats["by_status"] == {"500": len(answered)}
        server.reset()
        assert httpx.post(f"{server.base_url}/chat/completions", json=body).status_code == 200
        stats = server.stats()
        assert stats["by_status"] == {"200": 1}
        assert len(stats["accepted_times"]) == 1
