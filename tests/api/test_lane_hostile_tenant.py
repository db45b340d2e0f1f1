"""``POST /v1/chat/completions`` against a tenant who sends what the lane did not expect. Live
API, worker and beat processes, PostgreSQL, Redis and the simulator over HTTP.

- A chat body the API admits but the workers cannot read (ingest checks only ``model`` and the
  messages' roles) is the client's mistake: a 400 naming it, from one delivery. Before, a body whose
  ``tool_choice.function`` was a string, or whose image part had an odd ``detail``, broke the
  handler (AttributeError, pydantic error): its request went back in line, ran again on every sweep
  until ``max_deliveries`` failed it, and its caller got a 502 ("the model provider failed")
  minutes later; a body the handler did refuse was a 502 as well (its refusal carried no status).
- A streamed call whose client goes away mid-stream goes on upstream and is billed; before, its
  Idempotency-Key was freed (only complete answers were kept), so the retry the key exists for ran
  and billed the call again.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

import store
from simulator.testing import SimulatorServer
from store.tables import Request, Result
from tests.api.conftest import start_api, stop_api
from tests.cluster import Cluster, run_cli

pytestmark = pytest.mark.slow

# Short enough that a body stuck in redeliveries fails the test in reasonable time.
_SYNC_TIMEOUT_SECONDS = 30


@pytest.fixture
def lane_api(cluster: Callable[..., Cluster], tmp_path: Path) -> Iterator[tuple[Cluster, str, str]]:
    c = cluster()
    c.env["TOKENMILL_FILES_DIR"] = str(tmp_path / "files")
    c.env["TOKENMILL_SYNC_TIMEOUT_SECONDS"] = str(_SYNC_TIMEOUT_SECONDS)
    assert run_cli(c.env, "db", "upgrade").returncode == 0
    created = run_cli(c.env, "keys", "create", "bad-bodies")
    assert created.returncode == 0, created.stderr
    process, root = start_api(c.env, tmp_path / "api.log")
    try:
        yield c, root, created.stdout.strip()
    finally:
        stop_api(process)


def _user(content: Any) -> list[dict[str, Any]]:
    return [{"role": "user", "content": content}]


_TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}

BAD_BODIES: dict[str, dict[str, Any]] = {
    "tool_choice_function_not_an_object": {
        "messages": _user("hi"),
        "tools": [_TOOL],
        "tool_choice": {"type": "function", "function": "lookup"},
    },
    "image_detail_not_a_detail": {
        "messages": _user([{"type": "image_url", "image_url": {"url": "https://x.test/a.png", "detail": 5}}]),
    },
    "tool_choice_names_no_tool_offered": {
        "messages": _user("hi"),
        "tools": [_TOOL],
        "tool_choice": {"type": "function", "function": {"name": "elsewhere"}},
    },
}


@pytest.mark.parametrize("case", sorted(BAD_BODIES))
def test_a_body_the_workers_cannot_read_is_a_400_from_one_delivery(
    lane_api: tuple[Cluster, str, str], case: str
) -> None:
    c, root, key = lane_api
    c.worker("w1")
    c.beat()
    body = {"model": "lane-model", **BAD_BODIES[case]}
    answer = httpx.post(
        f"{root}/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json=body,
        timeout=_SYNC_TIMEOUT_SECONDS + 30,
    )
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["code"]
    engine = store.make_engine(c.env["TOKENMILL_DATABASE_URL"])
    try:
        with engine.connect() as conn:
            [row] = conn.execute(sa.select(Request.status, Request.attempts)).all()
            [result] = conn.execute(sa.select(Result.status, Result.status_code)).all()
    finally:
        engine.dispose()
    # Failed by its first delivery, not redelivered until max_deliveries.
    assert row.attempts == 1
    assert (result.status, result.status_code) == (store.RequestStatus.FAILED, 400)


def test_a_retried_stream_whose_client_went_away_is_not_run_and_billed_twice(
    lane_api: tuple[Cluster, str, str], simulator: SimulatorServer
) -> None:
    c, root, key = lane_api
    c.worker("w1")
    simulator.configure(stream_chunk_delay_ms=200, stream_chunk_chars=8)
    headers = {"Authorization": f"Bearer {key}", "Idempotency-Key": "stream-once"}
    body = {"model": "lane-model", "messages": _user("[[words 30]] stream me"), "stream": True}
    with httpx.stream(
        "POST", f"{root}/v1/chat/completions", headers=headers, json=body, timeout=60
    ) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                break  # the first chunk came: the call is upstream; the client goes away
    engine = store.make_engine(c.env["TOKENMILL_DATABASE_URL"])

    def ended() -> list[Any]:
        with engine.connect() as conn:
            return list(conn.execute(sa.select(Result.request_id)).all())

    try:
        deadline = time.monotonic() + 60
        while not ended():
            assert time.monotonic() < deadline, "the abandoned stream's call never ended"
            time.sleep(0.05)
        retry = httpx.post(f"{root}/v1/chat/completions", headers=headers, json=body, timeout=60)
        with engine.connect() as conn:
            calls = conn.execute(sa.select(sa.func.count()).select_from(Request)).scalar_one()
    finally:
        engine.dispose()
    assert calls == 1, f"the retry ran the call again ({retry.status_code})"
    # The retry is told what became of its call, bound to it, as a timed-out wait is.
    assert retry.status_code == 503, retry.text
    assert retry.headers["idempotent-replayed"] == "true"
    assert retry.json()["error"]["code"] == "stream_interrupted"
    assert retry.headers["tokenmill-bound-to"] == response.headers["x-request-id"]
    assert simulator.stats()["completions"] == 1


def test_one_tenants_slow_calls_do_not_hold_another_tenants_call(
    lane_api: tuple[Cluster, str, str], simulator: SimulatorServer
) -> None:
    c, root, _ = lane_api
    # One tenant may hold 3 of the 4 slots (workers.lane_scheduler.tenant_cap).
    c.env["TOKENMILL_LANE_IN_FLIGHT_PER_PROCESS"] = "4"
    c.worker("w1", processes=1)
    created = run_cli(c.env, "keys", "create", "patient")
    assert created.returncode == 0, created.stderr
    other_key = created.stdout.strip()
    hog_key = lane_api[2]

    def chat(key: str, content: str) -> httpx.Response:
        return httpx.post(
            f"{root}/v1/chat/completions",
            headers={"Authorization": f"Bearer {key}"},
            json={"model": "lane-model", "messages": _user(content)},
            timeout=_SYNC_TIMEOUT_SECONDS + 30,
        )

    # One slow call more than the lane has slots: before, they took every slot.
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        hogs = [pool.submit(chat, hog_key, f"[[delay 10]] hog {i}") for i in range(4)]
        deadline = time.monotonic() + 60
        while simulator.stats()["in_flight"] < 3:
            assert time.monotonic() < deadline, "the slow calls never reached the provider"
            time.sleep(0.05)
        answer = chat(other_key, "quick one")
        assert answer.status_code == 200, answer.text
        # Answered while the other tenant's calls are still with the provider.
        assert simulator.stats()["in_flight"] >= 3
        # The hog's call left waiting runs once a slot of its own frees: none is lost.
        for hog in hogs:
            assert hog.result().status_code == 200


@pytest.mark.parametrize("stream", ["false", "true", 0, 1, [], {}])
def test_a_stream_flag_that_is_not_a_boolean_is_a_400_and_queues_nothing(
    lane_api: tuple[Cluster, str, str], stream: Any
) -> None:
    """``"stream": "false"`` was truthy: the caller who meant no stream got one (and a client
    library reading JSON got an event stream). OpenAI refuses a non-boolean; so do we, first."""
    c, root, key = lane_api
    answer = httpx.post(
        f"{root}/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": "lane-model", "messages": _user("hi"), "stream": stream},
        timeout=30,
    )
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", "stream")
    assert error["code"] == "invalid_type"
    engine = store.make_engine(c.env["TOKENMILL_DATABASE_URL"])
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(Request)).scalar_one() == 0
    finally:
        engine.dispose()
