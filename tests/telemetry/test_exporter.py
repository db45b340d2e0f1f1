"""A worker's exporter: the operator's token or nothing, and the live gauges of dead processes dropped."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx

from telemetry.exporter import start_exporter
from tests.services import free_port


def test_the_exporter_asks_for_the_token_and_forgets_dead_processes_gauges(tmp_path: Path) -> None:
    finished = subprocess.Popen(["true"])
    finished.wait()
    stale = tmp_path / f"gauge_livesum_{finished.pid}.db"
    stale.write_bytes(b"")
    port = free_port()
    server = start_exporter("127.0.0.1", port, "s3cret", tmp_path)
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        assert httpx.get(url, timeout=10).status_code == 401
        assert httpx.get(url, headers={"Authorization": "Bearer wrong"}, timeout=10).status_code == 401
        assert stale.exists()  # nothing read before an authorized scrape
        answer = httpx.get(url, headers={"Authorization": "Bearer s3cret"}, timeout=10)
        assert answer.status_code == 200
        assert not stale.exists()
        assert httpx.get(f"http://127.0.0.1:{port}/other", timeout=10).status_code == 404
    finally:
        server.shutdown()
        server.server_close()
