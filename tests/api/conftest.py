"""A live ``tokenmill api`` subprocess on its own PostgreSQL database and broker database."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests import services
from tests.cluster import CLI, ROOT, run_cli


@dataclass
class LiveAPI:
    base_url: str  # ".../v1", for the openai SDK
    root: str
    env: dict[str, str]
    database_url: str

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run ``tokenmill ARGS`` against the same database and broker."""
        return run_cli(self.env, *args, timeout=60)

    def new_key(self, tenant: str) -> str:
        done = self.cli("keys", "create", tenant)
        assert done.returncode == 0, done.stderr
        key = done.stdout.strip()
        assert key
        assert "\n" not in key
        return key


def start_api(env: dict[str, str], log: Path, timeout: float = 60) -> tuple[subprocess.Popen[bytes], str]:
    port = services.free_port()
    with log.open("wb") as out:
        process = subprocess.Popen(
            # The command docker-compose.yml runs, on a free port.
            [*CLI, "api", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    root = f"http://127.0.0.1:{port}"
    # 60 s by default: on a machine busy with other suites, imports alone have taken 6 s and startup over 30.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"tokenmill api exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{root}/healthz", timeout=1).status_code == 200:
                return process, root
        except httpx.TransportError:
            time.sleep(0.1)
    process.kill()
    process.wait(timeout=10)  # reaped, or the Popen's ResourceWarning fails the next test
    raise RuntimeError(f"tokenmill api did not answer within {timeout:.0f} s: {log.read_text()[-2000:]}")


def stop_api(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM (a graceful stop), then SIGKILL if it has not exited within 10 s; reaped either way."""
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def api_env(database_url: str, broker_url: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "TOKENMILL_DATABASE_URL": database_url,
        "TOKENMILL_BROKER_URL": broker_url,
        "TOKENMILL_FILES_DIR": str(tmp_path / "files"),
        **extra,
    }


@pytest.fixture(scope="module")
def live_api(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveAPI]:
    """The API with no workers (batches are accepted and stay queued), one per test module; each
    test uses tenants of its own."""
    with services.fresh_postgres_database() as postgres_url:
        yield from _serve(postgres_url, redis_url, tmp_path_factory.mktemp("api"))


def _serve(postgres_url: str, redis_url: str, tmp_path: Path) -> Iterator[LiveAPI]:
    broker_url = services.private_database_url(redis_url, "api")
    broker = redis.Redis.from_url(broker_url)
    broker.flushdb()
    env = api_env(
        postgres_url,
        broker_url,
        tmp_path,
        TOKENMILL_MAX_UPLOAD_BYTES=str(64 * 1024),
        TOKENMILL_MAX_REQUEST_BODY_BYTES=str(8 * 1024),
        TOKENMILL_SYNC_TIMEOUT_SECONDS="5",
    )
    migrate = run_cli(env, "db", "upgrade")
    assert migrate.returncode == 0, migrate.stderr
    process, root = start_api(env, tmp_path / "api.log")
    try:
        yield LiveAPI(base_url=f"{root}/v1", root=root, env=env, database_url=postgres_url)
    finally:
        stop_api(process)
        broker.flushdb()
        broker.close()


def submit_batch(
    root: str, key: str, lines: list[dict[str, Any]], metadata: dict[str, str] | None = None
) -> str:
    """Upload ``lines`` as a JSONL file and create a chat-completions batch of it over plain HTTP, as
    a client would; returns the batch id."""
    auth = {"Authorization": f"Bearer {key}"}
    content = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    uploaded = httpx.post(
        f"{root}/v1/files",
        headers=auth,
        files={"file": ("in.jsonl", content)},
        data={"purpose": "batch"},
        timeout=30,
    )
    assert uploaded.status_code == 200, uploaded.text
    created = httpx.post(
        f"{root}/v1/batches",
        headers=auth,
        json={
            "input_file_id": uploaded.json()["id"],
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
            "metadata": metadata or {},
        },
        timeout=30,
    )
    assert created.status_code == 200, created.text
    return str(created.json()["id"])
