"""One tenant's uploads in flight are capped per API process (``max_uploads_in_flight_per_tenant``,
4 by default): a fifth is answered 429 ``too_many_uploads_in_flight`` with a Retry-After before a
byte of its body is read, while other tenants' uploads go on; a slot is freed when its upload
ends, however it ends. Before, each upload spooled its body to a temporary file (bounded in size,
not in number): one tenant holding many large or slow uploads open filled the temporary disk (8
held uploads of 20 MiB on 100 MiB: every other tenant's upload answered 507) and held as many
connections.

Against a live ``tokenmill api`` with its temporary directory (TMPDIR) of its own, over raw
sockets: an upload that declares a large body and sends only its start is held open; once past the
cap check, its start (over Starlette's 1 MiB in memory) is spooled to a temporary file, which the
test sees open in the API process."""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import redis

from tests import services
from tests.api.conftest import api_env, start_api, stop_api
from tests.cluster import run_cli

CAP = 4  # the default
WAIT_SECONDS = 30  # a safety net only: every wait ends on its condition
BOUNDARY = "tokenmillboundary"
LINE = b'{"custom_id": "c0", "body": {"model": "m", "messages": []}}\n'
HEAD = (
    f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
    f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="in.jsonl"\r\n'
    "Content-Type: application/octet-stream\r\n\r\n"
).encode()
# Over the 1 MiB that Starlette's form parser (and the Idempotency-Key middleware) keep in memory.
START = HEAD + LINE * (1536 * 1024 // len(LINE))
TAIL = f"\r\n--{BOUNDARY}--\r\n".encode()


@dataclass
class Served:
    root: str
    env: dict[str, str]
    process: subprocess.Popen[bytes]
    temp_dir: Path

    def key(self, tenant: str) -> str:
        created = run_cli(self.env, "keys", "create", tenant, timeout=60)
        assert created.returncode == 0, created.stderr
        return created.stdout.strip()

    def spooled(self) -> int:
        """The temporary files the API process holds open (they are unlinked: seen by its fds)."""
        count = 0
        for fd in Path(f"/proc/{self.process.pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue  # closed meanwhile
            count += target.startswith(str(self.temp_dir))
        return count


@pytest.fixture(scope="module")
def served(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp_path = tmp_path_factory.mktemp("uploads-in-flight")
    temp_dir = tmp_path / "tmp"
    temp_dir.mkdir()
    broker_url = services.private_database_url(redis_url, "api")
    broker = redis.Redis.from_url(broker_url)
    with services.fresh_postgres_database() as postgres_url:
        env = api_env(
            postgres_url,
            broker_url,
            tmp_path,
            TMPDIR=str(temp_dir),
            TOKENMILL_MAX_UPLOAD_BYTES=str(64 * 1024 * 1024),
        )
        migrate = run_cli(env, "db", "upgrade")
        assert migrate.returncode == 0, migrate.stderr
        process, root = start_api(env, tmp_path / "api.log")
        try:
            yield Served(root, env, process, temp_dir)
        finally:
            stop_api(process)
            broker.flushdb()
            broker.close()


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition():
        assert time.monotonic() < deadline, f"not within {WAIT_SECONDS} s: {what}"
        time.sleep(0.02)


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: dict[str, object]

    @property
    def code(self) -> object:
        error = self.body.get("error")
        return error.get("code") if isinstance(error, dict) else None


def read_answer(sock: socket.socket) -> Answer:
    sock.settimeout(WAIT_SECONDS)  # an API that waited for the body never answers: fails here
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = sock.recv(65536)
        assert chunk, f"the API closed the connection without an answer: {received!r}"
        received += chunk
    head, _, content = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {
        name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])
    }
    length = int(headers["content-length"])
    while len(content) < length:
        chunk = sock.recv(65536)
        assert chunk, "the answer was cut short"
        content += chunk
    return Answer(int(lines[0].split()[1]), headers, json.loads(content[:length]) if length else {})


def open_upload(served: Served, key: str, idempotency_key: str | None = None) -> socket.socket:
    """An upload whose body's start (START) is sent and its end (TAIL) held back."""
    address = urlsplit(served.root)
    assert address.hostname is not None
    assert address.port is not None
    head = [
        "POST /v1/files HTTP/1.1",
        f"Host: {address.hostname}:{address.port}",
        f"Authorization: Bearer {key}",
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}",
        f"Content-Length: {len(START) + len(TAIL)}",
    ]
    if idempotency_key is not None:
        head.append(f"Idempotency-Key: {idempotency_key}")
    sock = socket.create_connection((address.hostname, address.port), timeout=WAIT_SECONDS)
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + START)
    return sock


def hold_or_answer(served: Served, key: str, idempotency_key: str | None = None) -> socket.socket | Answer:
    """An upload opened: held (its socket, once its start is spooled) or answered at once."""
    before = served.spooled()
    sock = open_upload(served, key, idempotency_key)
    wait_until(
        lambda: served.spooled() > before or bool(select.select([sock], [], [], 0)[0]),
        "the upload's start spooled, or an answer",
    )
    if served.spooled() > before:
        return sock
    with sock:
        return read_answer(sock)


def hold_uploads(served: Served, key: str, count: int) -> list[socket.socket]:
    """``count`` uploads held, an upload refused as its tenant's cap is full tried again until a
    slot is freed (a slot is freed just after its upload's answer is sent)."""
    held: list[socket.socket] = []
    deadline = time.monotonic() + WAIT_SECONDS
    while len(held) < count:
        outcome = hold_or_answer(served, key)
        if isinstance(outcome, Answer):
            assert outcome.code == "too_many_uploads_in_flight", outcome
            assert time.monotonic() < deadline, f"only {len(held)} of {count} uploads held: slots not freed"
        else:
            held.append(outcome)
    return held


def upload(served: Served, key: str) -> httpx.Response:
    return httpx.post(
        f"{served.root}/v1/files",
        headers={"Authorization": f"Bearer {key}"},
        files={"file": ("small.jsonl", LINE * 10)},
        data={"purpose": "batch"},
        timeout=WAIT_SECONDS,
    )


def assert_refused(answer: Answer) -> None:
    assert answer.status == 429, answer
    assert answer.body["error"] == {
        "message": answer.body["error"]["message"],  # type: ignore[index]
        "type": "rate_limit_error",
        "param": None,
        "code": "too_many_uploads_in_flight",
    }
    assert answer.headers["retry-after"] == "5", answer.headers
    assert answer.headers["retry-after-ms"] == "5000", answer.headers


def test_a_tenants_fifth_upload_in_flight_is_refused_before_its_body_is_read(served: Served) -> None:
    hostile, other = served.key("hostile"), served.key("other")
    wait_until(lambda: served.spooled() == 0, "no upload in flight")
    held = hold_uploads(served, hostile, CAP)
    try:
        assert served.spooled() == CAP
        # The fifth, plain and with an Idempotency-Key (whose middleware spools the body first):
        # answered while its body is still unsent, nothing of it spooled.
        for idempotency_key in (None, "fifth"):
            fifth = hold_or_answer(served, hostile, idempotency_key)
            assert isinstance(fifth, Answer), "the fifth upload was read and spooled"
            assert_refused(fifth)
            assert served.spooled() == CAP
        # Another tenant's upload goes on meanwhile.
        answered = upload(served, other)
        assert answered.status_code == 200, answered.text
        assert answered.json()["bytes"] == len(LINE * 10)
    finally:
        for sock in held:
            sock.close()


def test_slots_are_freed_when_uploads_end_completed_or_cut_off(served: Served) -> None:
    key = served.key("returning")
    wait_until(lambda: served.spooled() == 0, "no upload in flight")
    held = hold_uploads(served, key, CAP)
    # Each client gone mid-body: its temporary file closed, its slot freed.
    for sock in held:
        sock.close()
    wait_until(lambda: served.spooled() == 0, "the cut-off uploads' temporary files closed")
    held = hold_uploads(served, key, CAP)
    refused = hold_or_answer(served, key)
    assert isinstance(refused, Answer), "the cap no longer held after uploads were cut off"
    assert_refused(refused)
    # Each completed: its file stored, its slot freed.
    for sock in held:
        with sock:
            sock.sendall(TAIL)
            answer = read_answer(sock)
            assert answer.status == 200, answer
            assert answer.body["bytes"] == len(START) - len(HEAD)
    held = hold_uploads(served, key, CAP)
    try:
        refused = hold_or_answer(served, key)
        assert isinstance(refused, Answer), "the cap no longer held after uploads completed"
        assert_refused(refused)
    finally:
        for sock in held:
            sock.close()
