"""OpenTelemetry spans (``telemetry.tracing``), caught with the SDK's in-memory exporter, against
real PostgreSQL, Redis and the simulator over HTTP. The API and the worker's lane consumer (or
chunk runner) run in this process, so that their spans come back here; what crosses between them
is what crosses in production: a Redis lane message, a Celery message on the Redis broker.

* a chat completion is one trace: API -> lane request -> model call (GenAI attributes, the
  ledger's token counts) and ledger write;
* a batch line's spans are under its batch's trace: the dispatch's ``traceparent`` rides in the
  Celery message's headers, the chunk continues it;
* no span attribute holds the prompt, nor the answer.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import httpx
import pytest
import redis
import sqlalchemy as sa
from celery.app.task import Context
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import store
from api.app import create_app
from config import Settings
from simulator.testing import SimulatorServer
from store.tables import Result
from telemetry import tracing
from telemetry.model_events import install_model_event_metrics
from tests import services
from tests.workers.support import Ledger, add_batch, ledger, serving_lane
from workers.app import make_celery
from workers.clients import build_pipeline
from workers.constants import DEFAULT_QUEUE
from workers.dispatch import Dispatcher
from workers.enqueue import enqueue_batch
from workers.lane_transport import LaneMessage
from workers.runner import ChunkRunner, RunnerConfig
from workers.tasks import _traceparent

GEN_AI_ATTRIBUTES = (
    "gen_ai.operation.name",
    "gen_ai.request.model",
    "gen_ai.response.model",
    "gen_ai.usage.input_tokens",
    "gen_ai.usage.output_tokens",
    "gen_ai.provider.name",
    "gen_ai.system",
)


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    install_model_event_metrics()  # the model call's span is built from its event
    tracing.install(provider)
    try:
        yield exporter
    finally:
        tracing.uninstall()
        provider.shutdown()


@pytest.fixture
def led(postgres_url: str) -> Iterator[Ledger]:
    made = ledger(postgres_url)
    try:
        yield made
    finally:
        made.engine.dispose()


def settings_for(postgres_url: str, redis_url: str, redis_prefix: str) -> Settings:
    return Settings(
        database_url=postgres_url,
        broker_url=redis_url,
        cache_url=redis_url,
        cache_prefix=f"{redis_prefix}cache:",
        key_prefix=redis_prefix,
    )


def named(finished: Sequence[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [span for span in finished if span.name == name]


def the_one(finished: Sequence[ReadableSpan], name: str) -> ReadableSpan:
    found = named(finished, name)
    assert len(found) == 1, [span.name for span in finished]
    return found[0]


def model_calls(finished: Sequence[ReadableSpan]) -> list[ReadableSpan]:
    return [span for span in finished if (span.attributes or {}).get("gen_ai.operation.name") == "chat"]


def parent_id(span: ReadableSpan) -> int | None:
    return None if span.parent is None else span.parent.span_id


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.span_id


def trace_ids(finished: Sequence[ReadableSpan]) -> set[int]:
    return {span.context.trace_id for span in finished if span.context is not None}


def assert_no_text(finished: Sequence[ReadableSpan], *texts: str) -> None:
    for span in finished:
        for key, value in (span.attributes or {}).items():
            for text in texts:
                assert text not in str(value), (span.name, key)


def ledger_tokens(engine: sa.Engine, request_id: str) -> tuple[int, int]:
    with engine.connect() as conn:
        row = conn.execute(
            sa.select(Result.prompt_tokens, Result.completion_tokens).where(Result.request_id == request_id)
        ).one()
    return row.prompt_tokens, row.completion_tokens


async def test_a_chat_completion_is_one_trace_from_the_api_to_the_ledger(
    spans: InMemorySpanExporter,
    led: Ledger,
    postgres_url: str,
    redis_url: str,
    redis_prefix: str,
    simulator: SimulatorServer,
) -> None:
    settings = settings_for(postgres_url, redis_url, redis_prefix)
    key = store.create_api_key(led.engine, led.tenant_id)
    app = create_app(settings, dispatch=lambda engine, batch_id: None)
    prompt = f"a secret prompt {uuid.uuid4().hex}"
    try:
        # The consumer ends once the calls it serves have ended (their spans too).
        async with (
            serving_lane(led.engine, settings, simulator, "tracing-lane"),
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://api", timeout=60
            ) as client,
        ):
            response = await client.post(
                "/v1/chat/completions",
                json={"model": "sim-model", "messages": [{"role": "user", "content": prompt}]},
                headers={"Authorization": f"Bearer {key}"},
            )
        assert response.status_code == 200, response.text
    finally:
        await app.state.lane_transport.client.aclose()
        app.state.engine.dispose()
    finished = spans.get_finished_spans()

    assert len(trace_ids(finished)) == 1  # one trace for the call
    api = the_one(finished, "tokenmill chat.completions")
    lane = the_one(finished, "tokenmill lane request")
    write = the_one(finished, "tokenmill ledger write")
    [model] = model_calls([span for span in finished if span is not api])
    assert api.parent is None
    assert parent_id(lane) == span_id(api)
    assert parent_id(model) == span_id(lane)
    assert parent_id(write) == span_id(lane)
    request_id = str((lane.attributes or {})["tokenmill.request_id"])
    assert (api.attributes or {})["tokenmill.request_id"] == request_id

    attributes = model.attributes or {}
    assert set(GEN_AI_ATTRIBUTES) <= set(attributes)
    assert attributes["gen_ai.request.model"] == "sim-model"
    assert attributes["gen_ai.response.model"] == response.json()["model"]
    assert (
        attributes["gen_ai.usage.input_tokens"],
        attributes["gen_ai.usage.output_tokens"],
    ) == ledger_tokens(led.engine, request_id)
    assert int(str(attributes["gen_ai.usage.output_tokens"])) > 0
    answer = response.json()["choices"][0]["message"]["content"]
    assert_no_text(finished, prompt, answer, key)


async def test_a_batch_line_has_its_spans_under_the_batch_trace(
    request: pytest.FixtureRequest,
    spans: InMemorySpanExporter,
    led: Ledger,
    postgres_url: str,
    redis_url: str,
    redis_prefix: str,
    simulator: SimulatorServer,
) -> None:
    broker_url = services.private_database_url(redis_url, "cluster")
    broker = redis.Redis.from_url(broker_url)
    broker.flushdb()
    request.addfinalizer(broker.close)
    settings = Settings(database_url=postgres_url, broker_url=broker_url, key_prefix=redis_prefix)
    prompts = [f"secret line {n} {uuid.uuid4().hex}" for n in range(3)]
    batch_id, ids = add_batch(led, prompts)
    dispatcher = Dispatcher(
        celery=make_celery(settings),
        engine=led.engine,
        redis_client=broker,
        key_prefix=redis_prefix,
        chunk_size=50,
    )
    with tracing.span("tokenmill batch dispatch", {"tokenmill.batch_id": batch_id}):
        enqueue_batch(dispatcher, batch_id)
    dispatch = the_one(spans.get_finished_spans(), "tokenmill batch dispatch")

    # What the worker gets: the Celery message on the broker, its traceparent in the headers.
    [raw] = broker.lrange(DEFAULT_QUEUE, 0, -1)
    message: dict[str, Any] = json.loads(raw)
    headers: dict[str, Any] = message["headers"]
    [chunk_ids, _dispatch_id], _, _ = json.loads(base64.b64decode(message["body"]))
    assert chunk_ids == ids
    traceparent = _traceparent(Context(headers))  # as Celery hands the headers to the task
    assert traceparent is not None
    assert traceparent.split("-")[1] == f"{dispatch.context.trace_id:032x}"  # type: ignore[union-attr]

    pipeline = build_pipeline(
        settings, cache=False, client_env={"OPENAI_BASE_URL": simulator.base_url, "OPENAI_API_KEY": "sim"}
    )
    try:
        report = await ChunkRunner(led.engine, pipeline, RunnerConfig(owner="tracing-worker")).run(
            chunk_ids, traceparent=traceparent
        )
    finally:
        await pipeline.close()
    assert report.succeeded == len(ids)
    finished = spans.get_finished_spans()

    assert trace_ids(finished) == trace_ids([dispatch])  # every span in the batch's trace
    chunk = the_one(finished, "tokenmill chunk")
    assert parent_id(chunk) == span_id(dispatch)
    requests = {
        str((span.attributes or {})["tokenmill.request_id"]): span
        for span in named(finished, "tokenmill request")
    }
    assert set(requests) == set(ids)
    assert all(parent_id(span) == span_id(chunk) for span in requests.values())
    calls = model_calls(finished)
    assert len(calls) == len(ids)
    for call in calls:
        [owner] = [request_id for request_id, span in requests.items() if span_id(span) == parent_id(call)]
        attributes = call.attributes or {}
        tokens = (attributes["gen_ai.usage.input_tokens"], attributes["gen_ai.usage.output_tokens"])
        assert tokens == ledger_tokens(led.engine, owner)
    writes = named(finished, "tokenmill ledger write")
    assert writes
    assert all(parent_id(write) == span_id(chunk) for write in writes)
    linked = {link.context.span_id for write in writes for link in write.links}
    assert linked == {span_id(span) for span in requests.values()}  # each request, by its flush
    assert_no_text(finished, *prompts)


def test_a_lane_message_carries_its_traceparent_and_reads_without_one() -> None:
    traceparent = f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01"
    for stream in (False, True):
        message = LaneMessage("req_0123abc", stream, traceparent)
        assert LaneMessage.decode(message.encode().encode()) == message
        plain = LaneMessage("req_0123abc", stream)
        assert LaneMessage.decode(plain.encode()) == plain
