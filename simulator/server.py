"""Running the app on uvicorn (uvloop + httptools, no access log)."""

from __future__ import annotations

import json
import os
import signal
import tempfile
import threading
import time

import uvicorn

from simulator.config import CONFIG_ENV, PARENT_ENV, SimConfig
from simulator.peers import PEERS_ENV

__all__ = ["serve"]


def serve(
    config: SimConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 8100,
    workers: int = 1,
    log_level: str = "warning",
) -> None:
    """Serve until interrupted; ``workers > 1`` processes share the port and act as one (see ``peers``)."""
    # Workers are separate processes that build the app themselves; what they need comes by environment.
    os.environ[CONFIG_ENV] = json.dumps(config.model_dump())
    owner = os.environ.pop(PARENT_ENV, None)
    if owner:
        threading.Thread(target=_stop_when_orphaned, args=(int(owner),), daemon=True).start()
    with tempfile.TemporaryDirectory(prefix="tokenmill-sim-peers-") as peers:
        if workers > 1:
            os.environ[PEERS_ENV] = peers
        _run(host, port, workers, log_level)


def _stop_when_orphaned(owner: int) -> None:
    """A test run killed outright (no fixture teardown) must not leave its simulator running."""
    while os.getppid() == owner:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's own graceful shutdown, workers included


def _run(host: str, port: int, workers: int, log_level: str) -> None:
    uvicorn.run(
        "simulator.app:app_from_environment",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_level=log_level,
        timeout_keep_alive=30,
        backlog=4096,
    )
