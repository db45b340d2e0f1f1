"""Rate-limit faults end to end: real ``tokenmill worker`` (and ``beat``) subprocesses, the Redis
broker, PostgreSQL and the simulator over HTTP. One tenant's request must not freeze a shared
limit; a 429 storm must not fail lines for good."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa

from simulator.testing import SimulatorServer
from store import Request, RequestStatus, create_tenant, ingest_batch, pending_request_ids
from tests.cluster import Cluster
from tests.workers.support import Ledger, results_of, statuses
from tests.workers.test_celery_workers import assert_recorded_once, wait_finished

pytestmark = pytest.mark.slow

MODEL = "sim-model"


def add_lines(led: Ledger, tenant_id: str, lines: list[dict[str, Any]]) -> tuple[str, list[str]]:
    """A batch of short-form lines (``prompt`` plus any body parameter) for ``tenant_id``."""
    text = "\n".join(json.dumps(line) for line in lines)
    report = ingest_batch(
        led.engine, io.BytesIO(text.encode()), tenant_id=tenant_id, defaults={"model": MODEL}
    )
    assert report.accepted == len(lines), report
    return report.batch_id, pending_request_ids(led.engine, report.batch_id)


def test_a_huge_max_tokens_does_not_freeze_a_shared_token_limit(
    cluster: Callable[..., Cluster],
    make_ledger: Callable[[str], Ledger],
    postgres_url: str,
    simulator: SimulatorServer,
) -> None:
    """max_tokens=10**12 on a tpm-limited model books at most the limit (and gives back what it
    did not use), so another tenant's request beside it completes promptly; a prompt larger than
    the whole limit fails at once, by name, without an upstream call."""
    tpm = 20_000
    c = cluster(limits={MODEL: {"tpm": tpm}})
    led = make_ledger(postgres_url)
    other_tenant = create_tenant(led.engine, "other").id
    huge_batch, huge_ids = add_lines(
        led, led.tenant_id, [{"custom_id": "huge", "prompt": "write a lot [[delay 3]]", "max_tokens": 10**12}]
    )
    normal_batch, normal_ids = add_lines(led, other_tenant, [{"custom_id": "normal", "prompt": "hello"}])
    c.worker("w1", processes=2, concurrency=8)
    c.dispatcher.dispatch(huge_ids)
    deadline = time.monotonic() + 30
    # The huge one is in flight upstream (3 s) when the other tenant's request asks for tokens.
    while simulator.stats()["in_flight"] < 1:
        assert time.monotonic() < deadline, "the huge request never reached the simulator"
        time.sleep(0.05)
    started = time.monotonic()
    c.dispatcher.dispatch(normal_ids)
    wait_finished(led, normal_batch, 30, c.logs)
    took = time.monotonic() - started
    [normal] = results_of(led.engine, normal_batch)
    assert normal.status == RequestStatus.SUCCEEDED
    assert took < 15, f"the other tenant's request took {took:.1f} s"
    wait_finished(led, huge_batch, 30, c.logs)
    [huge] = results_of(led.engine, huge_batch)
    assert huge.status == RequestStatus.SUCCEEDED
    too_big_batch, too_big_ids = add_lines(
        led, led.tenant_id, [{"custom_id": "too-big", "prompt": "word " * (tpm + 1000)}]
    )
    c.dispatcher.dispatch(too_big_ids)
    wait_finished(led, too_big_batch, 30, c.logs)
    [too_big] = results_of(led.engine, too_big_batch)
    assert too_big.status == RequestStatus.FAILED
    assert too_big.error_code == "request_exceeds_token_limit"
    assert too_big.attempts == 0
    assert simulator.stats()["completions"] == 2  # the refused one never went upstream


def test_a_short_429_storm_fails_no_line(
    cluster: Callable[..., Cluster],
    make_ledger: Callable[[str], Ledger],
    postgres_url: str,
    simulator: SimulatorServer,
) -> None:
    """The upstream answers every call 429 (Retry-After 1 s) for 15 s, then recovers: every line
    succeeds (rate limits are retried by time, and handed back to the queue past
    hand_back_after_seconds, not failed after a count of attempts), Retry-After is honoured, and
    a 400 still fails at once."""
    storm_seconds, retry_after = 15.0, 1.0
    simulator.configure(rate_429=1.0, retry_after_s=retry_after)
    c = cluster()
    c.env["TOKENMILL_HAND_BACK_AFTER_SECONDS"] = "5"
    led = make_ledger(postgres_url)
    prompts = [f"storm {i}" for i in range(200)] + [f"broken {i} [[status 400]]" for i in range(3)]
    batch_id, ids = add_lines(
        led, led.tenant_id, [{"custom_id": f"r{i}", "prompt": p} for i, p in enumerate(prompts)]
    )
    c.worker("w1", processes=2, concurrency=32)
    c.beat()  # brings back what was handed back once its chunk has ended
    c.dispatcher.dispatch(ids)
    deadline = time.monotonic() + 30
    while not simulator.stats()["by_status"].get("429"):
        assert time.monotonic() < deadline, "the storm never started"
        time.sleep(0.05)
    storm_started = time.monotonic()
    while time.monotonic() - storm_started < storm_seconds:  # the storm's length is the scenario
        time.sleep(0.2)
    simulator.configure(rate_429=0.0)
    storm = time.monotonic() - storm_started
    wait_finished(led, batch_id, 120, c.logs)
    results = assert_recorded_once(led, batch_id, ids)
    failed = [r for r in results if r.status == RequestStatus.FAILED]
    assert len(failed) == 3, [(r.error_code, r.error_message) for r in failed]
    assert all(r.status_code == 400 for r in failed)
    assert statuses(led.engine, batch_id) == {"succeeded": 200, "failed": 3}
    stats = simulator.stats()
    refused = stats["by_status"]["429"]
    # Every upstream attempt is counted in the results, those of handed-back deliveries too.
    assert sum(r.attempts for r in results) == stats["completions"]
    assert refused > len(prompts)  # the storm was felt by (nearly) every line, more than once
    # Retry-After honoured: no line asked again sooner than it said.
    assert refused <= len(prompts) * (storm / retry_after + 2)
    with led.engine.connect() as conn:
        handed_back = conn.execute(
            sa.select(sa.func.count()).where(
                Request.batch_id == batch_id, Request.last_error.like("retry in %")
            )
        ).scalar_one()
    assert handed_back > 0  # lines outlasting hand_back_after went back in line, slots freed
