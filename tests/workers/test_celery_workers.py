"""Real ``tokenmill worker`` and ``tokenmill beat`` subprocesses, a real Redis broker, PostgreSQL and
the simulator over HTTP: the issue's "done when" list.

The broker is a Redis logical database of the test process's own (flushed by the FLUSHALL test,
and after each test), so nothing here touches database 0 but the cache keys under the test's own prefix.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa

from simulator.testing import SimulatorServer, peak_count
from store import Batch, RequestStatus, Result, batch_progress
from tests.cluster import CLI, ROOT, Cluster, kill_group
from tests.workers.support import Ledger, add_batch, limiter_admissions
from workers.rate_limits import LimiterTuning

pytestmark = pytest.mark.slow


def wait_finished(led: Ledger, batch_id: str, timeout: float, logs: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        progress = batch_progress(led.engine, batch_id)
        if progress.finished == progress.total:
            return
        time.sleep(0.2)
    tails = {p.name: p.read_text(errors="replace")[-3000:] for p in logs.glob("*.log")}
    raise AssertionError(
        f"batch not finished in {timeout} s: {batch_progress(led.engine, batch_id)}; logs: {tails}"
    )


def wait_done_fraction(led: Ledger, batch_id: str, fraction: float, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        progress = batch_progress(led.engine, batch_id)
        if progress.finished >= progress.total * fraction:
            return
        time.sleep(0.05)
    raise AssertionError(f"batch did not reach {fraction:.0%}: {batch_progress(led.engine, batch_id)}")


def assert_recorded_once(led: Ledger, batch_id: str, ids: list[str]) -> list[Result]:
    with led.engine.connect() as conn:
        results = list(conn.execute(sa.select(Result).where(Result.batch_id == batch_id)).all())
        batch = conn.execute(sa.select(Batch).where(Batch.id == batch_id)).one()
    assert sorted(r.request_id for r in results) == sorted(ids)
    # The batch's counters were moved once per request, by the one result row each.
    assert batch.completed_count + batch.failed_count == len(ids)
    return results  # type: ignore[return-value]


def test_two_thousand_requests_across_two_processes(
    cluster: Callable[..., Cluster], make_ledger: Callable[[str], Ledger], postgres_url: str
) -> None:
    c = cluster()
    led = make_ledger(postgres_url)
    batch_id, ids = add_batch(led, [f"question {i}" for i in range(2000)])
    c.worker("w1", processes=2, concurrency=64)
    c.dispatcher.dispatch(ids)
    wait_finished(led, batch_id, 90, c.logs)
    results = assert_recorded_once(led, batch_id, ids)
    assert all(r.status == RequestStatus.SUCCEEDED for r in results)
    # Nothing left in flight: every chunk's marker is removed when it finished. (Messages whose
    # requests a refilling chunk ran are no-ops that may still be on their way through.)
    deadline = time.monotonic() + 15
    while list(c.broker.scan_iter(match=f"{c.settings.key_prefix}dispatch:*")):
        assert time.monotonic() < deadline, "dispatch markers left behind"
        time.sleep(0.1)


def test_a_worker_process_keeps_its_connections_from_chunk_to_chunk(
    cluster: Callable[..., Cluster],
    make_ledger: Callable[[str], Ledger],
    postgres_url: str,
    simulator: SimulatorServer,
) -> None:
    """One process, three batches one after another: the second and third reuse the first's
    upstream connections (one event loop and one pipeline per process, not one per chunk)."""
    c = cluster()
    led = make_ledger(postgres_url)
    c.worker("w1", processes=1, concurrency=8)
    for round_ in range(3):
        batch_id, ids = add_batch(led, [f"round {round_} question {i}" for i in range(8)])
        c.dispatcher.dispatch(ids)
        wait_finished(led, batch_id, 60, c.logs)
    stats = simulator.stats()
    assert stats["requests"] == 24
    assert stats["connections"] <= 8, stats["connections"]


def test_run_with_a_broker_hands_the_batch_to_the_workers(
    cluster: Callable[..., Cluster], simulator: SimulatorServer, tmp_path: Path
) -> None:
    """``tokenmill run`` with TOKENMILL_BROKER_URL set submits, follows the workers and writes the
    output; it needs no provider key of its own (it has none here, and a dead OPENAI_BASE_URL)."""
    c = cluster()
    source = tmp_path / "in.jsonl"
    source.write_text(
        "".join(json.dumps({"custom_id": f"q{i}", "prompt": f"hello {i}"}) + "\n" for i in range(30))
    )
    output = tmp_path / "out.jsonl"
    env = {**c.env, "OPENAI_BASE_URL": "http://127.0.0.1:9/v1"}
    env.pop("OPENAI_API_KEY")
    stderr = (tmp_path / "run.err").open("wb")
    run = subprocess.Popen(
        [*CLI, "run", str(source), "-o", str(output)], env=env, cwd=ROOT, stderr=stderr, stdout=stderr
    )
    stderr.close()
    try:
        deadline = time.monotonic() + 30
        while b"no worker answered" not in (tmp_path / "run.err").read_bytes():
            assert run.poll() is None, (tmp_path / "run.err").read_text()
            assert time.monotonic() < deadline
            time.sleep(0.1)
        c.worker("w1", concurrency=8)
        assert run.wait(timeout=60) == 0, (tmp_path / "run.err").read_text()
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert sorted(line["custom_id"] for line in lines) == sorted(f"q{i}" for i in range(30))
    assert all(line["response"]["status_code"] == 200 for line in lines)
    assert simulator.stats()["completions"] == 30


def test_kill_9_of_a_worker_mid_batch(
    cluster: Callable[..., Cluster],
    make_ledger: Callable[[str], Ledger],
    postgres_url: str,
    simulator: SimulatorServer,
) -> None:
    simulator.configure(latency_ms=100)
    c = cluster()
    led = make_ledger(postgres_url)
    batch_id, ids = add_batch(led, [f"question {i}" for i in range(400)])
    victim = c.worker("victim", concurrency=8)
    c.worker("survivor", concurrency=8)
    c.beat()
    c.dispatcher.dispatch(ids)
    wait_done_fraction(led, batch_id, 0.25)
    kill_group(victim)
    wait_finished(led, batch_id, 60, c.logs)
    results = assert_recorded_once(led, batch_id, ids)
    assert all(r.status == RequestStatus.SUCCEEDED for r in results)
    billed = [r for r in results if not r.cached]
    # Usage counted once: the batch's billed tokens are those of one result per request, and
    # every billed result was an upstream answer.
    assert len(billed) <= simulator.stats()["accepted"]
    assert sum(r.prompt_tokens for r in results) > 0


def test_broker_flushed_mid_batch(
    cluster: Callable[..., Cluster],
    make_ledger: Callable[[str], Ledger],
    postgres_url: str,
    simulator: SimulatorServer,
) -> None:
    simulator.configure(latency_ms=50)
    c = cluster()
    led = make_ledger(postgres_url)
    batch_id, ids = add_batch(led, [f"question {i}" for i in range(400)])
    c.worker("w1", concurrency=8)
    c.beat()
    c.dispatcher.dispatch(ids)
    wait_done_fraction(led, batch_id, 0.2)
    c.broker.flushdb()  # the broker's whole database: queue, unacked messages, markers
    wait_finished(led, batch_id, 60, c.logs)
    results = assert_recorded_once(led, batch_id, ids)
    assert all(r.status == RequestStatus.SUCCEEDED for r in results)


def test_429s_and_400s_under_a_global_rate_limit(
    cluster: Callable[..., Cluster],
    make_ledger: Callable[[str], Ledger],
    postgres_url: str,
    redis_prefix: str,
    simulator: SimulatorServer,
) -> None:
    rpm = 1200
    simulator.configure(rate_429=0.3, retry_after_s=0.2)
    c = cluster(limits={"sim-model": {"rpm": rpm}})
    led = make_ledger(postgres_url)
    prompts = [f"question {i}" for i in range(100)] + [f"broken {i} [[status 400]]" for i in range(5)]
    batch_id, ids = add_batch(led, prompts)
    paced_rpm = rpm * LimiterTuning().rate_headroom
    with limiter_admissions(c.settings.broker_url, redis_prefix, "sim-model", paced_rpm) as admissions:
        c.worker("w1", concurrency=32)
        c.worker("w2", concurrency=32)
        c.dispatcher.dispatch(ids)
        wait_finished(led, batch_id, 90, c.logs)
    results = assert_recorded_once(led, batch_id, ids)
    failed = [r for r in results if r.status == RequestStatus.FAILED]
    assert len(failed) == 5
    assert all(r.status_code == 400 and r.error_message for r in failed)
    stats = simulator.stats()
    assert stats["by_status"].get("429", 0) > 0
    # The shared limiter granted at most rpm/60 a second over any 2 s window (+1: GCRA lets the
    # first call of an idle bucket go at once), read from its own state in Redis.
    assert peak_count(admissions, 2.0) <= rpm / 60 * 2 + 1
    # Every upstream attempt, refused ones included, left at or after a start it was granted: the
    # k-th arrival at the simulator comes no earlier than the k-th grant (same machine clock; 1 ms
    # for the 6 decimals both are written with). When they arrive later than granted (a busy event
    # loop sends two together) is the machine's, not the limiter's: the 3% headroom of
    # LimiterTuning.rate_headroom absorbs that at a real provider.
    arrivals = sorted(stats["request_times"])
    assert not stats["timestamps_truncated"]
    assert len(arrivals) <= len(admissions)
    granted = sorted(admissions)
    late = [arrival - granted[k] for k, arrival in enumerate(arrivals)]
    assert min(late) >= -0.001, f"a call reached the upstream {-min(late):.3f} s before its grant"
