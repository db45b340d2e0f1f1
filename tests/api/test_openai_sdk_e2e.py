"""The official ``openai`` SDK against a live ``tokenmill api`` with real worker and beat
processes, Redis and PostgreSQL, the simulator upstream: the deployment's own commands
(``db upgrade``, ``keys create``, ``api``, ``worker``, ``beat``, ``flower``), as a user drives them."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from simulator.testing import SimulatorServer
from tests import services
from tests.api.conftest import start_api
from tests.cluster import CLI, ROOT, Cluster, kill_group, run_cli

pytestmark = pytest.mark.slow


@dataclass
class Deployment:
    cluster: Cluster
    root: str
    key: str

    @property
    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.root}/v1", api_key=self.key, max_retries=0, timeout=60)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_cli(self.cluster.env, *args)


@pytest.fixture
def deployment(cluster: Callable[..., Cluster], tmp_path: Path) -> Iterator[Deployment]:
    c = cluster()
    c.env["TOKENMILL_FILES_DIR"] = str(tmp_path / "files")
    half = Deployment(c, "", "")
    migrated = half.cli("db", "upgrade")
    assert migrated.returncode == 0, migrated.stderr
    created = half.cli("keys", "create", "acme")
    assert created.returncode == 0, created.stderr
    c.worker("w1", concurrency=64)
    c.beat()
    process, root = start_api(c.env, tmp_path / "api.log")
    try:
        yield Deployment(c, root, created.stdout.strip())
    finally:
        process.terminate()
        process.wait(timeout=10)


def line(custom_id: str, content: str, model: str = "gpt-4o-mini") -> bytes:
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 50}
    return json.dumps(
        {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}
    ).encode()


def wait_for(client: openai.OpenAI, batch_id: str, statuses: set[str], seconds: float = 90) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in statuses:
            return batch
        assert time.monotonic() < deadline, f"batch {batch_id} still {batch.status}: {batch.request_counts}"
        time.sleep(0.25)


def test_upload_create_poll_download_usage_and_list(
    deployment: Deployment, simulator: SimulatorServer
) -> None:
    client = deployment.client
    lines = [line(f"ok-{i}", f"question {i}") for i in range(40)]
    lines += [line(f"bad-{i}", f"question {i} [[status 400]]") for i in range(3)]
    uploaded = client.files.create(file=("prompts.jsonl", b"\n".join(lines) + b"\n"), purpose="batch")
    assert uploaded.purpose == "batch"
    assert uploaded.bytes > 0
    batch = client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"project": "e2e"},
    )
    assert batch.status == "in_progress"
    assert batch.metadata == {"project": "e2e"}
    done = wait_for(client, batch.id, {"completed"})
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (
        43,
        40,
        3,
    )
    assert done.completed_at is not None
    assert done.output_file_id is not None
    assert done.error_file_id is not None

    output = [json.loads(raw) for raw in client.files.content(done.output_file_id).text.splitlines()]
    assert sorted(item["custom_id"] for item in output) == sorted(f"ok-{i}" for i in range(40))
    for item in output:
        assert item["error"] is None
        assert item["response"]["status_code"] == 200
        completion = openai.types.chat.ChatCompletion.model_validate(item["response"]["body"])
        assert completion.choices[0].message.content
    errors = [json.loads(raw) for raw in client.files.content(done.error_file_id).text.splitlines()]
    assert sorted(item["custom_id"] for item in errors) == ["bad-0", "bad-1", "bad-2"]
    assert all(item["error"]["message"] for item in errors)

    # Usage: what the output bodies say was spent is what /v1/usage bills, once.
    spent = sum(item["response"]["body"]["usage"]["prompt_tokens"] for item in output)
    usage = httpx.get(
        f"{deployment.root}/v1/usage",
        params={"group_by": "batch"},
        headers={"Authorization": f"Bearer {deployment.key}"},
    ).json()["data"]
    assert [row["batch_id"] for row in usage] == [batch.id]
    assert usage[0]["billed"]["prompt_tokens"] == spent
    assert usage[0]["cache_hits"]["requests"] == 0
    upstream_before = simulator.stats()["requests"]

    # The same file again: every success is a cache hit, billed nothing, no upstream call for it.
    again = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    again_done = wait_for(client, again.id, {"completed"})
    assert again_done.request_counts is not None
    assert again_done.request_counts.completed == 40
    assert simulator.stats()["requests"] - upstream_before == 3  # only the 400s went upstream again
    assert again_done.usage is not None
    assert again_done.usage.input_tokens == 0

    # List, newest first, paged with after/limit.
    page = client.batches.list(limit=1)
    assert [b.id for b in page.data] == [again.id]
    assert page.has_more
    rest = client.batches.list(limit=10, after=again.id)
    assert [b.id for b in rest.data] == [batch.id]


def test_cancel_stops_a_running_batch_and_keeps_partial_results(deployment: Deployment) -> None:
    client = deployment.client
    lines = [line(f"slow-{i}", f"slow {i} [[delay 0.5]]") for i in range(400)]
    uploaded = client.files.create(file=("slow.jsonl", b"\n".join(lines)), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    partial: list[Any] = []
    deadline = time.monotonic() + 30
    while not partial:  # results are downloadable while the batch runs
        assert time.monotonic() < deadline, "no result line appeared while the batch ran"
        time.sleep(0.2)
        so_far = httpx.get(
            f"{deployment.root}/v1/batches/{batch.id}/output",
            headers={"Authorization": f"Bearer {deployment.key}"},
        )
        assert so_far.status_code == 200
        partial = [json.loads(raw) for raw in so_far.text.splitlines()]
    assert all(item["custom_id"].startswith("slow-") for item in partial)
    assert client.batches.retrieve(batch.id).status == "in_progress"
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    cancelled = wait_for(client, batch.id, {"cancelled"}, seconds=30)
    assert cancelled.cancelled_at is not None
    assert cancelled.request_counts is not None
    finished = cancelled.request_counts.completed
    assert 0 < finished < 400
    assert cancelled.output_file_id is not None
    output = client.files.content(cancelled.output_file_id).text.splitlines()
    assert len(output) == finished
    assert client.batches.cancel(batch.id).status == "cancelled"  # cancelling an ended batch changes nothing


def test_chat_completions_through_the_workers(deployment: Deployment, simulator: SimulatorServer) -> None:
    client = deployment.client
    messages: list[Any] = [{"role": "user", "content": "Say hello"}]
    first = client.chat.completions.create(model="gpt-4o-mini", messages=messages)
    assert first.choices[0].message.content
    assert first.usage is not None
    assert first.usage.prompt_tokens > 0
    calls = simulator.stats()["requests"]
    streamed = client.chat.completions.create(model="gpt-4o-mini", messages=messages, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices)
    assert text == first.choices[0].message.content
    assert simulator.stats()["requests"] == calls  # the second was a cache hit
    assert client.batches.list().data == []  # single requests are not listed as batches
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "[[context_length]]"}]
        )


def test_lines_a_worker_would_choke_on_never_reach_one(
    deployment: Deployment, simulator: SimulatorServer
) -> None:
    # A lone surrogate was accepted, then failed every delivery (a 2-line batch took 270 s);
    # NaN was a 500. Now they are line errors, and the good lines of the file run at once.
    client = deployment.client
    good = [line(f"ok-{i}", f"question {i}") for i in range(3)]
    poisoned = [
        line("surrogate", "half a pair: @").replace(b"@", b"\\ud800"),
        line("nan", "n").replace(b'"max_tokens": 50', b'"max_tokens": 50, "temperature": NaN'),
        line("nul", "z", model="gpt-4o-mini@").replace(b"@", b"\\u0000"),
    ]
    uploaded = client.files.create(file=("mixed.jsonl", b"\n".join([*good, *poisoned])), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        extra_body={"skip_invalid": True},
    )
    assert batch.errors is not None
    assert batch.errors.data is not None
    assert [(e.line, e.code) for e in batch.errors.data] == [
        (4, "lone_surrogate"),
        (5, "non_finite_number"),
        (6, "nul_character"),
    ]
    done = wait_for(client, batch.id, {"completed"}, seconds=60)
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (3, 3, 0)
    headers = {"Authorization": f"Bearer {deployment.key}", "Content-Type": "application/json"}
    answer = httpx.post(
        f"{deployment.root}/v1/chat/completions",
        headers=headers,
        content=b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "\\udfff"}]}',
        timeout=30,
    )
    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "lone_surrogate"


def test_flower_shows_the_running_worker(deployment: Deployment) -> None:
    refused = deployment.cli("flower", "--port", str(services.free_port()))
    assert refused.returncode != 0
    assert "TOKENMILL_FLOWER_BASIC_AUTH" in refused.stderr
    port = services.free_port()
    env = {**deployment.cluster.env, "TOKENMILL_FLOWER_BASIC_AUTH": "ops:s3cret"}
    flower = subprocess.Popen(
        [*CLI, "flower", "--port", str(port)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        workers: dict[str, Any] = {}
        while not any(name.startswith("w1@") for name in workers):
            assert time.monotonic() < deadline, f"Flower never listed worker w1: {workers}"
            time.sleep(0.5)
            try:
                answer = httpx.get(f"{url}/api/workers", auth=("ops", "s3cret"), params={"refresh": "true"})
            except httpx.TransportError:
                continue
            if answer.status_code == 200:
                workers = answer.json()
        assert httpx.get(f"{url}/api/workers").status_code == 401
        assert httpx.get(f"{url}/api/workers", auth=("ops", "wrong")).status_code == 401
        assert "s3cret" not in Path(f"/proc/{flower.pid}/cmdline").read_text()
    finally:
        kill_group(flower)
        flower.wait(timeout=10)
