"""Cancelling a batch while its calls are in flight upstream, with real ``tokenmill worker``
subprocesses, the Redis broker, PostgreSQL and the simulator over HTTP: as OpenAI's cancel does,
what reached the provider (and so is billed) finishes into the ledger and the output file."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest

from simulator.testing import SimulatorServer
from store import BatchStatus, RequestStatus, cancel_batch, get_batch, iter_output_lines
from tests.cluster import Cluster
from tests.workers.support import Ledger, add_batch, results_of, statuses

pytestmark = pytest.mark.slow


def test_a_cancel_keeps_what_the_provider_answered(
    cluster: Callable[..., Cluster],
    make_ledger: Callable[[str], Ledger],
    postgres_url: str,
    simulator: SimulatorServer,
) -> None:
    simulator.configure(latency_ms=2000)
    c = cluster()
    led = make_ledger(postgres_url)
    batch_id, ids = add_batch(led, [f"in flight {i}" for i in range(300)])
    c.worker("w1", processes=2, concurrency=32)
    c.dispatcher.dispatch(ids)
    deadline = time.monotonic() + 60
    while simulator.stats()["in_flight"] < 32:
        assert time.monotonic() < deadline, "the calls never reached the simulator"
        time.sleep(0.05)
    assert cancel_batch(led.engine, batch_id).status == BatchStatus.CANCELLING
    deadline = time.monotonic() + 60
    while (batch := get_batch(led.engine, batch_id)) is not None and batch.status != BatchStatus.CANCELLED:
        assert time.monotonic() < deadline, f"still {batch.status}: {statuses(led.engine, batch_id)}"
        time.sleep(0.1)
    stats = simulator.stats()
    answered = stats["completions"]
    assert answered >= 32
    assert stats["in_flight"] == 0
    assert stats["accepted"] == answered  # no call was hung up on
    succeeded = [r for r in results_of(led.engine, batch_id) if r.status == RequestStatus.SUCCEEDED]
    assert len(succeeded) == answered
    assert sum(r.prompt_tokens for r in succeeded) == stats["prompt_tokens"]
    assert sum(r.completion_tokens for r in succeeded) == stats["completion_tokens"]
    assert statuses(led.engine, batch_id) == {"succeeded": answered, "cancelled": len(ids) - answered}
    output = [json.loads(line) for line in iter_output_lines(led.engine, batch_id)]
    assert len(output) == answered
    assert all(line["response"]["status_code"] == 200 for line in output)
