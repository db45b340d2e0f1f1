"""``/v1/agent_runs`` end to end: a live ``tokenmill api``, real ``tokenmill worker`` subprocesses,
PostgreSQL, a Redis broker and the simulator over HTTP."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

import store
from simulator.testing import SimulatorServer
from tests.api.conftest import start_api
from tests.cluster import Cluster, kill_group
from tests.workers.support import Ledger, results_of

pytestmark = pytest.mark.slow

TWO_CALLS = (
    'What is (2+3)*4? [[call calculator {"expression": "2+3"}]] [[then]] '
    '[[call calculator {"expression": "5*4"}]]'
)


@dataclass
class Live:
    cluster: Cluster
    led: Ledger
    http: httpx.Client

    def run(self, body: dict[str, Any], *, wait: bool = True) -> dict[str, Any]:
        answer = self.http.post("/v1/agent_runs", params={"wait": wait}, json=body, timeout=60)
        assert answer.status_code == 200, answer.text
        run: dict[str, Any] = answer.json()
        return run


@pytest.fixture
def live(
    cluster: Callable[..., Cluster], make_ledger: Callable[[str], Ledger], postgres_url: str, tmp_path: Path
) -> Iterator[Live]:
    led = make_ledger(postgres_url)
    c = cluster()
    c.env["TOKENMILL_FILES_DIR"] = str(tmp_path / "files")
    process, root = start_api(c.env, tmp_path / "api.log")
    key = store.create_api_key(led.engine, led.tenant_id)
    http = httpx.Client(base_url=root, headers={"Authorization": f"Bearer {key}"})
    try:
        yield Live(c, led, http)
    finally:
        http.close()
        process.terminate()
        process.wait(timeout=10)


def test_tool_calls_follow_up_bad_tool_and_tenancy(live: Live, simulator: SimulatorServer) -> None:
    live.cluster.worker("w1", concurrency=8)
    body = {
        "model": "gpt-4o-mini",
        "system_message": "Use tools.",
        "tools": ["calculator"],
        "input": TWO_CALLS,
    }
    queued = live.run(body, wait=False)
    assert queued["object"] == "agent_run"
    assert queued["status"] in ("queued", "in_progress", "completed")
    first = live.run(body | {"input": TWO_CALLS + " (again)"})
    assert first["status"] == "completed", first
    assert "calculator=20" in first["output"]
    kinds = [m["type"] for m in first["transcript"]]
    assert kinds.count("FunctionExecutionResultMessage") == 2
    assert len(first["model_calls"]) == 3
    assert (
        first["usage"]["prompt_tokens"] == sum(c["usage"]["prompt_tokens"] for c in first["model_calls"]) > 0
    )

    follow = live.run(
        {
            "model": "gpt-4o-mini",
            "input": "And the result? [[recall]]",
            "conversation_id": first["conversation_id"],
        }
    )
    assert follow["conversation_id"] == first["conversation_id"]
    assert "20" in follow["output"]
    # In SQL: the transcripts of both runs in the conversation, per-call usage in the result rows.
    assert len(store.load_conversation(live.led.engine, first["conversation_id"])) == 8
    rows = {row.request_id: row for row in results_of(live.led.engine, first["batch_id"])}
    stored = rows[first["id"]].response_body
    assert stored is not None
    assert [c["usage"] for c in stored["model_calls"]] == [c["usage"] for c in first["model_calls"]]

    bad = live.run(
        {
            "model": "gpt-4o-mini",
            "tools": ["calculator"],
            "input": '[[call nope {}]] [[call calculator {"expression": "1/0"}]]',
        }
    )
    assert bad["status"] == "completed", bad
    results = [
        r for m in bad["transcript"] if m["type"] == "FunctionExecutionResultMessage" for r in m["content"]
    ]
    assert [r["is_error"] for r in results] == [True, True]

    other_tenant = store.create_tenant(live.led.engine, "other")
    other_key = store.create_api_key(live.led.engine, other_tenant.id)
    foreign = live.http.get(f"/v1/agent_runs/{first['id']}", headers={"Authorization": f"Bearer {other_key}"})
    assert foreign.status_code == 404
    assert foreign.json()["error"]["type"] == "invalid_request_error"
    mine = live.http.get(f"/v1/agent_runs/{first['id']}")
    assert mine.json()["output"] == first["output"]
    stolen = live.http.post(
        "/v1/agent_runs",
        json={"input": "hi", "conversation_id": first["conversation_id"]},
        headers={"Authorization": f"Bearer {other_key}"},
    )
    assert stolen.status_code == 404


def test_a_batch_of_200_agent_runs_sums_its_usage(live: Live) -> None:
    live.cluster.worker("w1", concurrency=64)
    lines = [
        {
            "custom_id": f"r{i}",
            "method": "POST",
            "url": "/v1/agent_runs",
            "body": {
                "model": "gpt-4o-mini",
                "tools": ["calculator"],
                "input": f'Run {i}. [[call calculator {{"expression": "{i}+1"}}]]',
            },
        }
        for i in range(200)
    ]
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    upload = live.http.post(
        "/v1/files", data={"purpose": "batch"}, files={"file": ("runs.jsonl", io.BytesIO(data))}
    )
    assert upload.status_code == 200, upload.text
    created = live.http.post(
        "/v1/batches",
        json={"input_file_id": upload.json()["id"], "endpoint": "/v1/agent_runs", "completion_window": "24h"},
    )
    assert created.status_code == 200, created.text
    batch_id = created.json()["id"]
    deadline = time.monotonic() + 90
    while (batch := live.http.get(f"/v1/batches/{batch_id}").json())["status"] != "completed":
        assert time.monotonic() < deadline, batch
        time.sleep(0.3)
    assert batch["request_counts"] == {"total": 200, "completed": 200, "failed": 0}
    rows = results_of(live.led.engine, batch_id)
    per_call_prompt = sum(
        call["usage"]["prompt_tokens"] for row in rows for call in (row.response_body or {})["model_calls"]
    )
    per_call_completion = sum(
        call["usage"]["completion_tokens"]
        for row in rows
        for call in (row.response_body or {})["model_calls"]
    )
    usage = live.http.get("/v1/usage", params={"group_by": "batch", "batch_id": batch_id}).json()["data"]
    [row] = [r for r in usage if r["batch_id"] == batch_id]
    assert row["requests"] == 200
    assert row["billed"]["prompt_tokens"] == per_call_prompt > 0
    assert row["billed"]["completion_tokens"] == per_call_completion > 0


def test_a_run_whose_worker_is_killed_finishes_elsewhere_without_repeating_calls(
    live: Live, simulator: SimulatorServer
) -> None:
    victim = live.cluster.worker("victim", concurrency=4)
    live.cluster.beat()
    slow = (
        '[[delay 1.5]] [[call calculator {"expression": "6*7"}]] [[then]] '
        '[[call calculator {"expression": "42+1"}]]'
    )
    run = live.run({"model": "gpt-4o-mini", "tools": ["calculator"], "input": slow}, wait=False)
    deadline = time.monotonic() + 30
    while simulator.stats()["accepted"] < 1:  # the first model call finished (and is cached)
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.5)  # the second call is in flight
    kill_group(victim)
    live.cluster.worker("survivor", concurrency=4)
    deadline = time.monotonic() + 60
    while (done := live.http.get(f"/v1/agent_runs/{run['id']}").json())["status"] in (
        "queued",
        "in_progress",
    ):
        assert time.monotonic() < deadline, done
        time.sleep(0.3)
    assert done["status"] == "completed", done
    assert "43" in done["output"]
    calls = done["model_calls"]
    # The first call's answer came from the cache, paid for by this run's killed attempt: billed
    # as the run's call ("bill follows the payer"), not as a free hit; it was not asked upstream again.
    assert [c["cached"] for c in calls] == [False, False, False]
    # Upstream: the first call once, the second twice at most (killed, redone), the third once.
    assert simulator.stats()["completions"] <= 4
    billed = [c for c in calls if not c["cached"]]
    assert done["usage"]["prompt_tokens"] == sum(c["usage"]["prompt_tokens"] for c in billed)
