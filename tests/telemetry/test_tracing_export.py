"""Tracing on in a live deployment (API and worker subprocesses, Redis, PostgreSQL, the simulator):
their spans reach an OTLP/HTTP collector, configured by the standard ``OTEL_*`` variables only.
A chat completion's spans from both processes share one trace across the lane; a batch line's
worker spans continue its dispatch's trace through the Celery message's headers."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import openai
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from tests.api.conftest import start_api
from tests.cluster import Cluster, run_cli

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class ExportedSpan:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, str]


class Collector:
    """An OTLP/HTTP trace receiver on a free local port: keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[ExportedSpan] = []
        self.lock = threading.Lock()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                request = ExportTraceServiceRequest()
                request.ParseFromString(self.rfile.read(int(self.headers["Content-Length"])))
                collector.receive(request)
                body = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def receive(self, request: ExportTraceServiceRequest) -> None:
        received = []
        for resource_spans in request.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    received.append(
                        ExportedSpan(
                            resource.get("service.name", ""),
                            span.name,
                            span.trace_id.hex(),
                            span.span_id.hex(),
                            span.parent_span_id.hex(),
                            {
                                a.key: str(getattr(a.value, a.value.WhichOneof("value") or "string_value"))
                                for a in span.attributes
                            },
                        )
                    )
        with self.lock:
            self.spans.extend(received)

    def named(self, name: str) -> list[ExportedSpan]:
        with self.lock:
            return [span for span in self.spans if span.name == name]


@pytest.fixture
def collector() -> Iterator[Collector]:
    made = Collector()
    made.thread.start()
    try:
        yield made
    finally:
        made.server.shutdown()
        made.server.server_close()


def wait_until(condition: Callable[[], object], what: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_a_live_deployment_exports_one_trace_per_call_and_the_batch_trace(
    cluster: Callable[..., Cluster], collector: Collector, tmp_path: Path
) -> None:
    c = cluster()
    c.env.update(
        TOKENMILL_FILES_DIR=str(tmp_path / "files"),
        TOKENMILL_TRACING="1",
        OTEL_EXPORTER_OTLP_ENDPOINT=collector.endpoint,
        OTEL_BSP_SCHEDULE_DELAY="100",
    )
    assert run_cli(c.env, "db", "upgrade").returncode == 0
    created = run_cli(c.env, "keys", "create", "traced")
    assert created.returncode == 0, created.stderr
    api, root = start_api(c.env, tmp_path / "api.log")
    try:
        c.worker("w1")
        key = created.stdout.strip()
        client = openai.OpenAI(base_url=f"{root}/v1", api_key=key, max_retries=0, timeout=120)
        prompt = f"a secret prompt {uuid.uuid4().hex}"
        client.chat.completions.create(model="sim-model", messages=[{"role": "user", "content": prompt}])
        wait_until(lambda: collector.named("tokenmill chat.completions"), "the API's span")
        [call] = collector.named("tokenmill chat.completions")
        wait_until(
            lambda: [s for s in collector.named("tokenmill lane request") if s.trace_id == call.trace_id],
            "the worker's spans of the call",
        )
        lines = [
            json.dumps(
                {
                    "custom_id": f"r{n}",
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": {
                        "model": "sim-model",
                        "messages": [{"role": "user", "content": f"{prompt} {n}"}],
                    },
                }
            ).encode()
            for n in range(2)
        ]
        uploaded = client.files.create(file=("lines.jsonl", b"\n".join(lines) + b"\n"), purpose="batch")
        batch = client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        wait_until(lambda: collector.named("tokenmill batch dispatch"), "the batch's dispatch span")
        [dispatch] = collector.named("tokenmill batch dispatch")
        wait_until(
            lambda: [s for s in collector.named("tokenmill chunk") if s.trace_id == dispatch.trace_id],
            "the batch's chunk span (it ends after its lines)",
        )
    finally:
        api.terminate()
        api.wait(timeout=10)

    in_call = [span for span in collector.spans if span.trace_id == call.trace_id]
    by_id = {span.span_id: span for span in in_call}
    lane = next(span for span in in_call if span.name == "tokenmill lane request")
    assert (call.service, lane.service) == ("tokenmill-api", "tokenmill-worker")
    assert lane.parent_span_id == call.span_id  # across the lane, in one trace
    [model] = [span for span in in_call if span.name.startswith("chat ")]
    assert model.attributes["gen_ai.operation.name"] == "chat"
    assert int(model.attributes["gen_ai.usage.output_tokens"]) > 0
    assert by_id[model.parent_span_id] is lane
    assert by_id[next(s for s in in_call if s.name == "tokenmill ledger write").parent_span_id] is lane
    in_batch = [span for span in collector.spans if span.trace_id == dispatch.trace_id]
    [chunk] = [span for span in in_batch if span.name == "tokenmill chunk"]
    assert chunk.parent_span_id == dispatch.span_id  # through the Celery message's headers
    assert len([span for span in in_batch if span.name == "tokenmill request"]) == len(lines)
    assert len([span for span in in_batch if span.name.startswith("chat ")]) == len(lines)
    assert dispatch.attributes["tokenmill.batch_id"] == batch.id
    for span in collector.spans:
        assert all(prompt not in value and key not in value for value in span.attributes.values()), span.name
