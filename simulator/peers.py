"""Keeping several server processes (``--workers N``) acting as one simulator.

Each uvicorn worker owns its state. So that ``/_sim/*`` answers for all of them, every worker also listens
on a Unix socket in a shared folder; the worker that receives a control request applies it to itself and
forwards it to the others (one JSON line each way), and stats are merged. With one worker there is no
folder and nothing of this runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

__all__ = ["PEERS_ENV", "PeerLink", "merge_stats"]

PEERS_ENV = "SIMULATOR_PEERS_DIR"

Handler = Callable[[dict[str, Any]], Awaitable[Any]]


class PeerLink:
    """This process's control socket, and calls to its siblings'."""

    def __init__(self, folder: str, handle: Handler) -> None:
        self.folder = Path(folder)
        self.path = self.folder / f"{os.getpid()}.sock"
        self.handle = handle
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self._serve, path=str(self.path))

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            command = json.loads(await reader.readline())
            writer.write(json.dumps(await self.handle(command)).encode() + b"\n")
            await writer.drain()
        finally:
            writer.close()

    async def broadcast(self, command: dict[str, Any]) -> list[Any]:
        """Send ``command`` to every other live worker; their answers, in no particular order."""
        others = [p for p in self.folder.glob("*.sock") if p != self.path]
        answers = await asyncio.gather(*(self._call(p, command) for p in others))
        return [a for a in answers if a is not None]

    @staticmethod
    async def _call(path: Path, command: dict[str, Any]) -> Any:
        try:
            reader, writer = await asyncio.open_unix_connection(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return None  # a worker that exited (or is restarting): nothing to ask
        try:
            writer.write(json.dumps(command).encode() + b"\n")
            await writer.drain()
            return json.loads(await reader.readline())
        finally:
            writer.close()


def merge_stats(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One stats snapshot from several workers': counts summed, timestamps merged in order.

    ``peak_in_flight`` becomes the sum of the workers' peaks, an upper bound of the true peak.
    """
    merged = dict(parts[0])
    for part in parts[1:]:
        for key, value in part.items():
            if key in ("since", "now"):
                merged[key] = min(merged[key], value) if key == "since" else max(merged[key], value)
            elif key == "timestamps_truncated":
                merged[key] = merged[key] or value
            elif isinstance(value, dict):
                combined = dict(merged[key])
                for name, count in value.items():
                    combined[name] = combined.get(name, 0) + count
                merged[key] = combined
            elif isinstance(value, list):
                merged[key] = merged[key] + value
            else:
                merged[key] = merged[key] + value
    for key in ("request_times", "accepted_times"):
        merged[key] = sorted(merged[key])
    merged["accepted_per_second"] = dict(sorted(merged["accepted_per_second"].items()))
    merged["workers"] = len(parts)
    return merged
