"""``POST /v1/chat/completions`` on the workers' interactive lane, against a live API, real worker
and beat processes, Redis, PostgreSQL and the simulator over HTTP: single calls leave no files nor
batches behind, do not wait behind a busy chunk, stream as the provider streams, say when they are
cache hits, and survive (or report) the death of their worker."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import sqlalchemy as sa

import store
from simulator.testing import SimulatorServer
from store.tables import Request, Result
from tests.api.conftest import start_api, stop_api
from tests.cluster import Cluster, kill_group, run_cli

pytestmark = pytest.mark.slow


@dataclass
class Lane:
    cluster: Cluster
    root: str
    key: str
    engine: sa.Engine

    @property
    def sdk(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.root}/v1", api_key=self.key, max_retries=0, timeout=120)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def requests(self) -> list[Any]:
        with self.engine.connect() as conn:
            return list(conn.execute(sa.select(Request).order_by(Request.created_at)).all())


@pytest.fixture
def lane(cluster: Callable[..., Cluster], tmp_path: Path) -> Iterator[Lane]:
    c = cluster()
    c.env["TOKENMILL_FILES_DIR"] = str(tmp_path / "files")
    assert run_cli(c.env, "db", "upgrade").returncode == 0
    created = run_cli(c.env, "keys", "create", "lane")
    assert created.returncode == 0, created.stderr
    process, root = start_api(c.env, tmp_path / "api.log")
    engine = store.make_engine(c.env["TOKENMILL_DATABASE_URL"])
    try:
        yield Lane(c, root, created.stdout.strip(), engine)
    finally:
        stop_api(process)
        engine.dispose()


def ask(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": "lane-model", "messages": [{"role": "user", "content": content}], **extra}


def wait_until(condition: Callable[[], object], what: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def sse_events(response: httpx.Response) -> Iterator[dict[str, Any]]:
    for line in response.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line.removeprefix("data: "))


def test_a_single_call_leaves_no_file_and_no_batch_and_is_billed(lane: Lane) -> None:
    lane.cluster.worker("w1")
    sdk = lane.sdk
    answer = sdk.chat.completions.with_raw_response.create(**ask("no files please"))
    completion = answer.parse()
    assert completion.choices[0].message.content
    assert answer.headers["tokenmill-cache"] == "miss"
    assert sdk.files.list().data == []
    assert sdk.batches.list().data == []
    [row] = lane.requests()
    with pytest.raises(openai.NotFoundError):
        sdk.batches.retrieve(row.batch_id)
    with pytest.raises(openai.NotFoundError):
        sdk.batches.cancel(row.batch_id)
    usage = httpx.get(f"{lane.root}/v1/usage", headers=lane.headers, params={"group_by": "model"}).json()
    [billed] = usage["data"]
    assert completion.usage is not None
    assert billed["billed"]["prompt_tokens"] == completion.usage.prompt_tokens > 0
    assert billed["billed"]["completion_tokens"] == completion.usage.completion_tokens > 0


def test_a_single_call_does_not_wait_behind_a_busy_chunk(lane: Lane, simulator: SimulatorServer) -> None:
    """One worker process, its chunk busy with slow batch lines: the single call is answered
    while they are still with the provider."""
    lane.cluster.worker("w1", processes=1, concurrency=4)
    sdk = lane.sdk
    lines = [
        json.dumps(
            {
                "custom_id": f"slow-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": ask(f"[[delay 20]] slow {i}"),
            }
        )
        for i in range(4)
    ]
    uploaded = sdk.files.create(file=("slow.jsonl", "\n".join(lines).encode()), purpose="batch")
    batch = sdk.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    wait_until(lambda: simulator.stats()["in_flight"] == 4, "the batch lines never reached the provider")
    completion = sdk.chat.completions.create(**ask("quick one"))
    assert completion.choices[0].message.content
    assert simulator.stats()["in_flight"] == 4  # the batch's calls are still upstream
    assert sdk.batches.retrieve(batch.id).status == "in_progress"


def test_a_stream_is_relayed_as_the_provider_sends_it(lane: Lane, simulator: SimulatorServer) -> None:
    lane.cluster.worker("w1")
    simulator.configure(stream_chunk_delay_ms=200, stream_chunk_chars=8)
    with httpx.stream(
        "POST",
        f"{lane.root}/v1/chat/completions",
        headers=lane.headers,
        json=ask("[[words 30]] stream me", stream=True),
        timeout=120,
    ) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["tokenmill-cache"] == "miss"
        events = sse_events(response)
        opening = next(events)  # OpenAI's first chunk: the role, empty content
        assert opening["choices"][0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
        first = next(events)
        # The first chunk is here while the provider is still sending the rest.
        assert simulator.stats()["in_flight"] == 1
        assert first["choices"][0]["delta"]["content"]
        rest = list(events)
    text = first["choices"][0]["delta"]["content"] + "".join(
        event["choices"][0]["delta"].get("content") or "" for event in rest if event.get("choices")
    )
    assert len(rest) > 3
    assert all("usage" not in event or event["usage"] is None for event in rest)  # not asked for
    assert rest[-1]["tokenmill"] == {"cached": False, "request_id": lane.requests()[0].id}
    plain = lane.sdk.chat.completions.create(**ask("[[words 30]] stream me"))
    assert plain.choices[0].message.content == text


def test_usage_chunk_only_when_asked_and_cache_hits_are_marked(
    lane: Lane, simulator: SimulatorServer
) -> None:
    lane.cluster.worker("w1")
    sdk = lane.sdk
    first = sdk.chat.completions.with_raw_response.create(**ask("twice"))
    again = sdk.chat.completions.with_raw_response.create(**ask("twice"))
    assert (first.headers["tokenmill-cache"], again.headers["tokenmill-cache"]) == ("miss", "hit")
    assert json.loads(again.text)["tokenmill"]["cached"] is True
    assert simulator.stats()["completions"] == 1
    plain = list(sdk.chat.completions.create(**ask("twice"), stream=True))
    assert all(chunk.usage is None for chunk in plain)
    assert plain[-1].model_extra is not None
    assert plain[-1].model_extra["tokenmill"]["cached"] is True
    with_usage = list(
        sdk.chat.completions.create(**ask("twice"), stream=True, stream_options={"include_usage": True})
    )
    assert with_usage[-1].choices == []
    assert with_usage[-1].usage is not None
    assert with_usage[-1].usage.prompt_tokens == first.parse().usage.prompt_tokens  # type: ignore[union-attr]
    with httpx.stream(
        "POST",
        f"{lane.root}/v1/chat/completions",
        headers=lane.headers,
        json=ask("twice", stream=True),
        timeout=60,
    ) as streamed:
        assert streamed.headers["tokenmill-cache"] == "hit"
        streamed.read()
    assert simulator.stats()["completions"] == 1


def test_a_worker_killed_mid_stream_ends_the_stream_with_an_error_and_the_ledger_says_so(
    lane: Lane, simulator: SimulatorServer
) -> None:
    worker = lane.cluster.worker("w1")
    simulator.configure(stream_chunk_delay_ms=500, stream_chunk_chars=4)
    stream = lane.sdk.chat.completions.create(**ask("[[words 40]] long", stream=True))
    chunks = iter(stream)
    assert next(chunks).choices[0].delta.role == "assistant"  # the opening chunk, then the text
    assert next(chunks).choices[0].delta.content
    kill_group(worker)
    with pytest.raises(openai.APIError, match="stopped mid-stream"):
        for _ in chunks:
            pass
    [row] = lane.requests()
    assert row.status == store.RequestStatus.CANCELLED
    assert row.last_error.startswith("worker_lost")


def test_the_sweeper_reruns_a_single_call_whose_worker_died(lane: Lane, simulator: SimulatorServer) -> None:
    worker = lane.cluster.worker("w1")
    lane.cluster.beat()
    answers: list[Any] = []

    def call() -> None:
        body = {**ask("[[delay 10]] stranded"), "model": "stranded-model"}
        answers.append(lane.sdk.chat.completions.create(**body))

    import threading

    caller = threading.Thread(target=call)
    caller.start()
    # By model: an earlier test's stream may still be winding down in the simulator.
    wait_until(
        lambda: simulator.stats()["by_model"].get("stranded-model") == 1, "the call never went upstream"
    )
    kill_group(worker)
    lane.cluster.worker("w2")
    caller.join(120)
    assert not caller.is_alive()
    [completion] = answers
    assert completion.choices[0].message.content
    [row] = lane.requests()
    assert row.status == store.RequestStatus.SUCCEEDED
    assert row.attempts == 2
    assert simulator.stats()["by_model"]["stranded-model"] == 2  # the killed call, then the rerun


def test_a_stream_cancelled_mid_call_is_read_to_its_end_and_billed(
    lane: Lane, simulator: SimulatorServer, tmp_path: Path
) -> None:
    """The API's wait runs out while the provider is still streaming: the request is cancelled,
    but the call already with the provider is read to its end (the provider bills it whether or
    not we hang up) and recorded and billed, as a batch line's call is after a cancel (invariant
    "bill follows the payer"). It used to be cut off mid-stream and billed nothing."""
    lane.cluster.worker("w1")
    simulator.configure(stream_chunk_delay_ms=100, stream_chunk_chars=8)
    process, root = start_api(
        {**lane.cluster.env, "TOKENMILL_SYNC_TIMEOUT_SECONDS": "2"}, tmp_path / "api2.log"
    )
    try:
        with httpx.stream(
            "POST",
            f"{root}/v1/chat/completions",
            headers=lane.headers,
            json=ask("[[words 60]] a long one", stream=True),
            timeout=120,
        ) as response:
            assert response.status_code == 200, response.read()
            events = list(sse_events(response))
    finally:
        stop_api(process)
    assert "error" in events[-1]  # the stream ended with the timeout's error event
    wait_until(lambda: lane.requests()[0].status in ("succeeded", "cancelled"), "the request never ended")
    wait_until(lambda: simulator.stats()["in_flight"] == 0, "the provider never finished the call")
    stats = simulator.stats()
    delivered = (stats["prompt_tokens"], stats["completion_tokens"])
    assert delivered[1] > 0  # the call was read to its end, not cut off

    def billed() -> tuple[int, int]:
        rows = store.usage_report(lane.engine, lane.requests()[0].tenant_id, group_by=())
        return (
            sum(row.billed_prompt_tokens for row in rows),
            sum(row.billed_completion_tokens for row in rows),
        )

    wait_until(lambda: billed() == delivered, f"billed {billed()} != delivered {delivered}", seconds=60)


def test_single_calls_are_counted_in_the_workers_metrics_as_the_ledger_bills_them(lane: Lane) -> None:
    """The lane's calls reach the metrics as a chunk's requests do, counted once the ledger kept
    them: one paid call and one cache hit (they used to count nothing: found in review)."""
    from tests import services
    from tests.telemetry.test_metrics_match_the_ledger import TOKEN, scrape, total

    port = services.free_port()
    lane.cluster.env.update({"TOKENMILL_METRICS_TOKEN": TOKEN, "TOKENMILL_WORKER_METRICS_PORT": str(port)})
    lane.cluster.worker("w1")
    sdk = lane.sdk
    paid = sdk.chat.completions.create(**ask("count me"))
    sdk.chat.completions.create(**ask("count me"))  # the same prompt: a hit
    assert paid.usage is not None

    def finished(outcome: str) -> float:
        try:
            samples = scrape(f"http://127.0.0.1:{port}/metrics")
        except httpx.TransportError:
            return -1  # the exporter is not serving yet
        return total(samples, "tokenmill_requests_finished_total", outcome=outcome)

    wait_until(
        lambda: finished("succeeded") == 1 and finished("cache_hit") == 1, "the calls were not counted"
    )
    samples = scrape(f"http://127.0.0.1:{port}/metrics")
    assert (
        total(samples, "gen_ai_client_token_usage_sum", gen_ai_token_type="input") == paid.usage.prompt_tokens
    )
    assert (
        total(samples, "gen_ai_client_token_usage_sum", gen_ai_token_type="output")
        == paid.usage.completion_tokens
    )


RESPONSE_INVALID = "upstream_response_invalid"
USAGE_INVALID = "upstream_usage_invalid"


def failing_call(lane: Lane, content: str, model: str, code: str, says: str, *, stream: bool = False) -> None:
    """With a worker and beat running, one call to ``model`` (streamed or not) that fails before
    anything is relayed: a 502 ``upstream_error`` of ``code`` whose message says ``says``."""
    lane.cluster.worker("w1")
    lane.cluster.beat()
    with httpx.stream(
        "POST",
        f"{lane.root}/v1/chat/completions",
        headers=lane.headers,
        json={**ask(content, **({"stream": True} if stream else {})), "model": model},
        timeout=90,
    ) as response:
        body = response.read()
    assert response.status_code == 502, body
    error = json.loads(body)["error"]
    assert (error["type"], error["code"]) == ("upstream_error", code)
    assert says in error["message"], error


def assert_failed_once(lane: Lane, simulator: SimulatorServer, model: str, code: str) -> Any:
    """The ledger holds the one call, failed with ``code`` after a single attempt, and it is not run
    again: a rerun (the sweeper's) would have reached the provider again within 3 s. Its result."""
    [row] = lane.requests()
    assert row.status == store.RequestStatus.FAILED
    assert row.attempts == 1
    with lane.engine.connect() as conn:
        [result] = conn.execute(sa.select(Result).where(Result.request_id == row.id)).all()
    assert (result.status, result.error_code) == (store.RequestStatus.FAILED, code)
    time.sleep(3)  # a rerun (the sweeper's) would reach the provider again by now
    assert simulator.stats()["by_model"][model] == 1
    return result


@pytest.mark.parametrize(
    "reasoning",
    [2**64 - 1, 9223372036854775000],  # past any integer column; past int64 once summed
    ids=["2^64-1", "just-under-2^63"],
)
def test_absurd_usage_fails_the_call_once_and_is_not_run_again(
    lane: Lane, simulator: SimulatorServer, reasoning: int
) -> None:
    """The provider answered (and billed) with usage the ledger cannot hold: a 502 naming the
    field, once; the ledger keeps the failure with 0 tokens; the provider saw one request. It
    used to fail the client's usage check, go back in line and be paid again until it timed out
    (503) or ended as result_not_recordable."""
    model = f"absurd-usage-{reasoning}"
    failing_call(
        lane, f"count this [[reasoning {reasoning}]]", model, USAGE_INVALID, "usage.completion_tokens"
    )
    result = assert_failed_once(lane, simulator, model, USAGE_INVALID)
    assert (result.prompt_tokens, result.completion_tokens, result.reasoning_tokens) == (0, 0, 0)


def test_a_stream_with_absurd_usage_ends_in_an_error_once(lane: Lane, simulator: SimulatorServer) -> None:
    """The streamed twin: the text already relayed, the stream ends with the error, the ledger
    keeps the failure, and the provider saw one request."""
    lane.cluster.worker("w1")
    lane.cluster.beat()
    model = "absurd-usage-stream"
    with httpx.stream(
        "POST",
        f"{lane.root}/v1/chat/completions",
        headers=lane.headers,
        json={**ask(f"stream me [[reasoning {2**64 - 1}]]", stream=True), "model": model},
        timeout=90,
    ) as response:
        assert response.status_code == 200, response.read()
        events = list(sse_events(response))
    errors = [event["error"] for event in events if "error" in event]
    assert [error["code"] for error in errors] == [USAGE_INVALID], events
    assert_failed_once(lane, simulator, model, USAGE_INVALID)


def test_an_unreadable_answer_fails_the_call_once_and_is_not_run_again(
    lane: Lane, simulator: SimulatorServer
) -> None:
    """The provider answered 200 (and billed) with a body that arrived whole but is no JSON: a 502
    ``upstream_response_invalid``, once; the ledger keeps the failure; the provider saw one
    request. It used to be the retryable "malformed provider response": the worker asked again,
    and paid again, for every retry."""
    model = "unreadable-answer"
    failing_call(lane, "answer me [[garbage]]", model, RESPONSE_INVALID, "cannot be read")
    result = assert_failed_once(lane, simulator, model, RESPONSE_INVALID)
    assert (result.upstream_request_id or "").startswith("req_"), "the answer's id, to trace it upstream"
    assert (result.prompt_tokens, result.completion_tokens) == (0, 0)


def test_an_answer_of_the_wrong_shape_fails_the_call_once_and_is_not_run_again(
    lane: Lane, simulator: SimulatorServer
) -> None:
    """The provider answered 200 (and billed) with a whole JSON object of the wrong shape (its
    ``choices[0].message`` a string): a 502 ``upstream_response_invalid`` naming what was wrong,
    once; the provider saw one request. Reading it used to raise a bare AttributeError, which the
    lane took for a crash: the call went back in line and the provider was asked (and paid) again."""
    model = "wrong-shape-answer"
    failing_call(lane, "answer me [[garbage shape]]", model, RESPONSE_INVALID, "choices[0].message")
    result = assert_failed_once(lane, simulator, model, RESPONSE_INVALID)
    assert (result.upstream_request_id or "").startswith("chatcmpl-"), "the answer's id, to trace it upstream"


def test_a_stream_whose_first_chunk_has_the_wrong_shape_ends_in_an_error_once(
    lane: Lane, simulator: SimulatorServer
) -> None:
    """The streamed twin of the wrong shape: a first chunk whose ``choices[0].delta`` is a string,
    nothing relayed yet: 502 ``upstream_response_invalid``, and the provider saw one request."""
    model = "wrong-shape-stream"
    failing_call(
        lane,
        "stream me [[garbage shape]]",
        model,
        RESPONSE_INVALID,
        "stream chunk 1: choices[0].delta",
        stream=True,
    )
    assert_failed_once(lane, simulator, model, RESPONSE_INVALID)


def test_a_stream_whose_first_event_is_unreadable_ends_in_an_error_once(
    lane: Lane, simulator: SimulatorServer
) -> None:
    """The streamed twin: a 200 stream whose first event is no JSON, nothing relayed yet: the same
    502 as a plain call (as any stream failing before its first chunk), the ledger keeps the
    failure, and the provider saw one request."""
    model = "unreadable-stream"
    failing_call(
        lane, "stream me [[garbage]]", model, RESPONSE_INVALID, "stream event 1 is not JSON", stream=True
    )
    assert_failed_once(lane, simulator, model, RESPONSE_INVALID)


def parts_text(simulator: SimulatorServer, content: str) -> str:
    """The text parts the simulator answers ``content`` with (``[[content_parts ...]]``), joined."""
    answer = httpx.post(f"{simulator.base_url}/chat/completions", json=ask(content), timeout=30).json()
    text = "".join(p["text"] for p in answer["choices"][0]["message"]["content"] if p.get("type") == "text")
    assert text
    return text


def streamed_text(sdk: openai.OpenAI, content: str) -> str:
    return "".join(
        chunk.choices[0].delta.content or ""
        for chunk in sdk.chat.completions.create(**ask(content), stream=True)
        if chunk.choices
    )


def test_an_answer_in_content_parts_is_its_text_plain_streamed_and_cached(
    lane: Lane, simulator: SimulatorServer
) -> None:
    """The provider sent its text as a list of content parts (Mistral, some OpenAI-compatible
    servers): OpenAI's SDK reads it as the answer's text, a string, plain and streamed, and a cache
    hit replays the same text. It used to read as no text: an empty answer, billed."""
    lane.cluster.worker("w1")
    sdk = lane.sdk
    plain_prompt, stream_prompt = "in parts [[content_parts image]]", "streamed in parts [[content_parts]]"
    expected_plain, expected_streamed = (
        parts_text(simulator, plain_prompt),
        parts_text(simulator, stream_prompt),
    )
    paid = sdk.chat.completions.with_raw_response.create(**ask(plain_prompt))
    hit = sdk.chat.completions.with_raw_response.create(**ask(plain_prompt))
    assert (paid.headers["tokenmill-cache"], hit.headers["tokenmill-cache"]) == ("miss", "hit")
    for answer in (paid, hit):
        message = answer.parse().choices[0].message
        assert message.content == expected_plain
        assert message.model_extra is not None
        assert [part["type"] for part in message.model_extra["tokenmill_non_text_parts"]] == ["image_url"]
    usage = paid.parse().usage
    assert usage is not None
    assert usage.completion_tokens > 0
    replayed = list(sdk.chat.completions.create(**ask(plain_prompt), stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in replayed if c.choices) == expected_plain
    last_delta = replayed[-1].choices[0].delta.model_extra
    assert last_delta is not None
    assert [part["type"] for part in last_delta["tokenmill_non_text_parts"]] == ["image_url"]
    assert streamed_text(sdk, stream_prompt) == expected_streamed, "relayed as the provider streamed it"
    assert streamed_text(sdk, stream_prompt) == expected_streamed, "a stream's cached answer"
    assert sdk.chat.completions.create(**ask(stream_prompt)).choices[0].message.content == expected_streamed
    assert simulator.stats()["completions"] == 2 + 2, "the direct looks, then one paid call per prompt"


def test_a_content_part_of_the_wrong_shape_fails_the_call_once(
    lane: Lane, simulator: SimulatorServer
) -> None:
    """A text part whose ``text`` is a number: a 502 ``upstream_response_invalid`` naming the
    part, once; the provider saw one request (it was billed)."""
    model = "wrong-part"
    where = "choices[0].message.content[2].text is a number"
    failing_call(lane, "answer me [[content_parts bad]]", model, RESPONSE_INVALID, where)
    assert_failed_once(lane, simulator, model, RESPONSE_INVALID)


def test_a_stream_with_a_content_part_of_the_wrong_shape_ends_in_an_error_once(
    lane: Lane, simulator: SimulatorServer
) -> None:
    """The streamed twin (its last text delta's part is of the wrong shape): the text before it
    relayed, the stream ends with the error, the ledger keeps the failure, one upstream request."""
    lane.cluster.worker("w1")
    lane.cluster.beat()
    model = "wrong-part-stream"
    with httpx.stream(
        "POST",
        f"{lane.root}/v1/chat/completions",
        headers=lane.headers,
        json={**ask("stream me [[words 30]] [[content_parts bad]]", stream=True), "model": model},
        timeout=90,
    ) as response:
        assert response.status_code == 200, response.read()
        events = list(sse_events(response))
    assert any(event.get("choices") and event["choices"][0]["delta"].get("content") for event in events)
    errors = [event["error"] for event in events if "error" in event]
    assert [error["code"] for error in errors] == [RESPONSE_INVALID], events
    assert ".delta.content[" in errors[0]["message"]
    assert "].text is a number" in errors[0]["message"]
    assert_failed_once(lane, simulator, model, RESPONSE_INVALID)
