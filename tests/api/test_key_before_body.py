"""A caller with no valid key hears its 401 before the API reads its body: against a live
``tokenmill api`` with generous limits (1 MiB bodies, 64 MiB uploads), over raw sockets that
declare a large body and send only its start. The body never completes, so an answer proves the
API did not wait for it (nor read, spool or parse it)."""

from __future__ import annotations

import json
import socket
from urllib.parse import urlsplit

import httpx
import pytest

from tests.api.test_api_ingest_bounds import BigAPI, big_api  # noqa: F401 - the fixture
from tests.cluster import run_cli

# A safety net only: an API that waits for the body never answers, and the test fails here.
ANSWER_WAIT_SECONDS = 15
UNKNOWN_KEY = "tm-" + "x" * 40

CHAT = json.dumps({"model": "sim-model", "messages": [{"role": "user", "content": "hi " * 200}]})
BATCH = json.dumps({"input_file_id": "file-abc", "endpoint": "/v1/chat/completions", "metadata": {"a": "b"}})
AGENT_RUN = json.dumps({"model": "sim-model", "input": "What is 2+2? " * 50})
BOUNDARY = "tokenmillboundary"
UPLOAD_START = (
    f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
    f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="in.jsonl"\r\n'
    "Content-Type: application/octet-stream\r\n\r\n" + '{"custom_id": "c0", "prompt": "hi"}\n' * 20
)

# (path, content type, declared length, the start of the body that is sent)
LARGE_BODIES = [
    ("/v1/chat/completions", "application/json", 900_000, CHAT),
    ("/v1/batches", "application/json", 900_000, BATCH),
    ("/v1/agent_runs", "application/json", 900_000, AGENT_RUN),
    ("/v1/files", f"multipart/form-data; boundary={BOUNDARY}", 50_000_000, UPLOAD_START),
]


def _answer_to_a_body_that_never_ends(
    root: str, path: str, authorization: str | None, content_type: str, declared: int, start: str
) -> tuple[int, dict[str, object]]:
    """(status, JSON body) of the answer to a POST that declares ``declared`` bytes and sends
    ``start`` only, the connection kept open."""
    address = urlsplit(root)
    assert address.hostname is not None
    assert address.port is not None
    head = [
        f"POST {path} HTTP/1.1",
        f"Host: {address.hostname}:{address.port}",
        f"Content-Type: {content_type}",
        f"Content-Length: {declared}",
    ]
    if authorization is not None:
        head.append(f"Authorization: {authorization}")
    sent = ("\r\n".join(head) + "\r\n\r\n").encode() + start.encode()
    assert len(sent) < declared
    with socket.create_connection((address.hostname, address.port), timeout=ANSWER_WAIT_SECONDS) as sock:
        sock.sendall(sent)
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = sock.recv(65536)  # socket.timeout here: the API waited for the body
            assert chunk, f"the API closed the connection without an answer: {received!r}"
            received += chunk
        header, _, content = received.partition(b"\r\n\r\n")
        lines = header.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        length = next(
            int(line.split(":", 1)[1]) for line in lines if line.lower().startswith("content-length:")
        )
        while len(content) < length:
            chunk = sock.recv(65536)
            assert chunk, "the answer was cut short"
            content += chunk
    answer: dict[str, object] = json.loads(content[:length])
    return status, answer


@pytest.mark.parametrize(
    ("path", "content_type", "declared", "start"), LARGE_BODIES, ids=[path for path, *_ in LARGE_BODIES]
)
@pytest.mark.parametrize("authorization", [f"Bearer {UNKNOWN_KEY}", None], ids=["unknown-key", "no-key"])
def test_a_caller_without_a_valid_key_hears_401_before_its_large_body_is_read(
    big_api: BigAPI,  # noqa: F811
    path: str,
    content_type: str,
    declared: int,
    start: str,
    authorization: str | None,
) -> None:
    """A body is read only once its key is known. ``POST /v1/batches`` (any caller) and
    ``POST /v1/chat/completions`` (a key the ledger does not know) read and parsed the whole body
    first: a caller with no valid key could make the API read and parse up to 1 MiB of JSON per
    request at no cost of its own, and a body that never ended held the request open. Uploads and
    agent runs read theirs after the key already; kept so."""
    status, answer = _answer_to_a_body_that_never_ends(
        big_api.base_url.removesuffix("/v1"), path, authorization, content_type, declared, start
    )
    assert status == 401, answer
    error = answer["error"]
    assert isinstance(error, dict)
    assert error["code"] == ("invalid_api_key" if authorization else "missing_api_key"), error


def test_a_valid_key_still_has_its_large_body_read(big_api: BigAPI) -> None:  # noqa: F811
    """The key checked first, the body is read as before: an upload of a declared size past the
    check, a batch created from it (the tenant found once reused by the route)."""
    created = run_cli(big_api.env, "keys", "create", "roomy", timeout=60)
    assert created.returncode == 0, created.stderr
    headers = {"Authorization": f"Bearer {created.stdout.strip()}"}
    content = b"".join(
        json.dumps({"custom_id": f"c{i}", "prompt": "hi " * 100}).encode() + b"\n" for i in range(500)
    )
    assert len(content) > 64 * 1024
    uploaded = httpx.post(
        f"{big_api.base_url.removesuffix('/v1')}/v1/files",
        headers=headers,
        files={"file": ("in.jsonl", content)},
        data={"purpose": "batch"},
        timeout=60,
    )
    assert uploaded.status_code == 200, uploaded.text
    assert uploaded.json()["bytes"] == len(content)
    batch = httpx.post(
        f"{big_api.base_url.removesuffix('/v1')}/v1/batches",
        headers=headers,
        json={
            "input_file_id": uploaded.json()["id"],
            "endpoint": "/v1/chat/completions",
            "model": "sim-model",
            "metadata": {"padding": "p" * 70_000},
        },
        timeout=60,
    )
    # The metadata's value is refused by the batch's own checks (512 characters at most), after
    # the key: a body over the size that triggers the early check still gets its route's answer.
    assert batch.status_code == 400, batch.text
    assert str(batch.json()["error"]["param"]).startswith("metadata"), batch.text
