"""The simulator as a subprocess, for tests and benchmarks, and what to compute from its stats.

with SimulatorServer(latency_ms=20, rate_429=0.1) as sim:
    client = openai.OpenAI(base_url=sim.base_url, api_key="sim")
    ...
    assert peak_rate(sim.stats(), window_s=10) <= 5.0
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from simulator.config import CONFIG_ENV, PARENT_ENV, SimConfig
from simulator.errors import SimulatorStartError

__all__ = ["SimulatorServer", "free_port", "peak_count", "peak_rate"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now (it may be taken before the caller binds it)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class SimulatorServer:
    """Starts ``python -m simulator`` on a free port and stops it; a context manager.

    Config arguments are those of ``POST /_sim/config`` (see ``simulator.config.SimConfig``); they are
    validated here, so a misspelt one fails at construction, not in the subprocess.
    """

    def __init__(
        self,
        *,
        latency_ms: float = 0,
        rate_429: float = 0,
        retry_after_s: float = 1,
        rate_500: float = 0,
        seed: int = 0,
        workers: int = 1,
        host: str = "127.0.0.1",
        port: int | None = None,
        startup_timeout_s: float = 20.0,
        **more_config: Any,
    ) -> None:
        self.config = SimConfig.parse(
            {
                "latency_ms": latency_ms,
                "rate_429": rate_429,
                "retry_after_s": retry_after_s,
                "rate_500": rate_500,
                "seed": seed,
                **more_config,
            }
        )
        self.workers = workers
        self.host = host
        self.port = port or 0
        self.startup_timeout_s = startup_timeout_s
        self._process: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    @property
    def url(self) -> str:
        """``http://host:port``, the server root (``/_sim/*`` lives here)."""
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """``http://host:port/v1``: the ``base_url`` for the openai SDK."""
        return f"{self.url}/v1"

    @property
    def pid(self) -> int | None:
        """The server process's pid while it runs (its CPU, for a bench)."""
        return self._process.pid if self.running and self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        if self.running:
            return
        attempts = 1 if self.port else 3
        for attempt in range(attempts):
            if attempts > 1:
                self.port = free_port(self.host)
            try:
                self._spawn()
                return
            except SimulatorStartError:
                if attempt == attempts - 1:
                    raise
                # The free port may have been taken between our probe and the server's bind: try another.

    def _spawn(self) -> None:
        # Kept open for the life of the process (its output, read back if it fails); closed by stop().
        self._log = tempfile.TemporaryFile(prefix="tokenmill-simulator-")  # noqa: SIM115
        command = [
            sys.executable,
            "-m",
            "simulator",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--workers",
            str(self.workers),
        ]
        # The package's own folder first on the path, so the child finds it whatever the caller's cwd is.
        root = str(Path(__file__).resolve().parent.parent)
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
            # By environment, not argv: a required API key must not show in the process list.
            CONFIG_ENV: json.dumps(self.config.model_dump()),
            PARENT_ENV: str(os.getpid()),
        }
        self._process = subprocess.Popen(
            command,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            code = self._process.poll()
            if code is not None:
                output = self._output()
                self.stop()
                raise SimulatorStartError(f"simulator exited with code {code}: {output[-2000:]}")
            try:
                # Ready once every worker answers: a config change must reach all of them.
                if self._call("GET", "/_sim/stats", timeout=1)["workers"] >= self.workers:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        output = self._output()
        self.stop()
        raise SimulatorStartError(
            f"simulator did not answer within {self.startup_timeout_s} s: {output[-2000:]}"
        )

    def _output(self) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        return str(self._log.read().decode(errors="replace"))

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            # Its own session: signal the group so uvicorn's worker processes go too.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=5)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _call(self, method: str, path: str, body: Any = None, *, timeout: float = 10) -> Any:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            payload = None if body is None else json.dumps(body).encode()
            headers = {"content-type": "application/json"} if payload is not None else {}
            connection.request(method, path, body=payload, headers=headers)
            response = connection.getresponse()
            data = json.loads(response.read() or b"null")
            if response.status != 200:
                raise SimulatorStartError(f"{method} {path} answered {response.status}: {data}")
            return data
        finally:
            connection.close()

    def stats(self) -> dict[str, Any]:
        """``GET /_sim/stats``: counts since start or the last reset (see ``simulator.stats.Stats``)."""
        return dict(self._call("GET", "/_sim/stats"))

    def configure(self, **config: Any) -> None:
        """Change settings at runtime (``POST /_sim/config``); unknown or invalid ones raise ConfigError."""
        self.config.updated(config)  # validate here, so the error is raised in the caller
        self._call("POST", "/_sim/config", config)

    def reset(self) -> None:
        """Stats zeroed, config back to the constructor's values, fault draws restarted from the seed."""
        self._call("POST", "/_sim/reset", {})


def peak_count(times: Sequence[float], window_s: float) -> int:
    """The most timestamps inside any window ``[t, t + window_s)``."""
    ordered = sorted(times)
    best = 0
    for index, start in enumerate(ordered):
        best = max(best, bisect_right(ordered, start + window_s - 1e-9) - index)
    return best


def peak_rate(stats: Mapping[str, Any], window_s: float = 10.0, *, accepted_only: bool = True) -> float:
    """The highest request rate (per second) over any ``window_s`` window, from ``stats()``.

    ``accepted_only``: count completions answered in full (the rate the provider served), else every
    completion request that arrived, refused ones included.
    """
    times = stats["accepted_times" if accepted_only else "request_times"]
    if stats.get("timestamps_truncated") and accepted_only:
        # Per-second buckets: a window of whole seconds, an upper bound within one second's count.
        buckets = {int(k): int(v) for k, v in stats["accepted_per_second"].items()}
        span = max(1, round(window_s))
        best = max((sum(buckets.get(s + i, 0) for i in range(span)) for s in buckets), default=0)
        return best / span
    return peak_count(times, window_s) / window_s
