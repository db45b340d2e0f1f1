"""A worker's ``/metrics``: its main process serves the sum of its pool processes' values
(``telemetry.multiprocess``) over HTTP, on ``TOKENMILL_WORKER_METRICS_HOST`` (127.0.0.1 unless
the operator opens it) and ``TOKENMILL_WORKER_METRICS_PORT``, asking for
``Authorization: Bearer <TOKENMILL_METRICS_TOKEN>`` when a token is set.

Gauges of processes that died (a SIGKILLed pool process's requests in flight) are dropped at each
scrape; counters of dead processes are kept, since what they counted happened.
"""

from __future__ import annotations

import hmac
import os
import re
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIServer, make_server

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess
from prometheus_client.exposition import ThreadingWSGIServer, _SilentHandler

__all__ = ["MetricsApp", "start_exporter"]

_LIVE_GAUGE_FILE = re.compile(r"gauge_live\w+_(\d+)\.db$")

StartResponse = Callable[[str, list[tuple[str, str]]], Any]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def forget_dead_processes(path: Path) -> None:
    """Drop the live gauges of processes that no longer run (their in-flight counts ended with them)."""
    for file in path.iterdir():
        match = _LIVE_GAUGE_FILE.match(file.name)
        if match is not None and not _alive(int(match.group(1))):
            multiprocess.mark_process_dead(int(match.group(1)), str(path))  # type: ignore[no-untyped-call]


class MetricsApp:
    """The WSGI app of ``/metrics`` over ``registry``; ``before`` runs before each scrape."""

    def __init__(
        self, registry: CollectorRegistry, token: str | None, before: Callable[[], None] | None = None
    ) -> None:
        self._registry = registry
        self._expected = None if token is None else f"Bearer {token}".encode()
        self._before = before

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO", "/") not in ("/metrics", "/"):
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found\n"]
        if self._expected is not None:
            given = environ.get("HTTP_AUTHORIZATION", "").encode("latin-1", "replace")
            if not hmac.compare_digest(given, self._expected):
                start_response("401 Unauthorized", [("Content-Type", "text/plain")])
                return [b"metrics need the operator's token\n"]
        if self._before is not None:
            self._before()
        body = generate_latest(self._registry)
        start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST)])
        return [body]


def start_exporter(host: str, port: int, token: str | None, path: Path) -> WSGIServer:
    """Serve the sum of the values in ``path`` on a daemon thread; returns the server."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, str(path))  # type: ignore[no-untyped-call]
    app = MetricsApp(registry, token, before=lambda: forget_dead_processes(path))
    server = make_server(host, port, app, ThreadingWSGIServer, handler_class=_SilentHandler)
    thread = threading.Thread(target=server.serve_forever, name="metrics exporter", daemon=True)
    thread.start()
    return server
