"""Where the model calls of a command run on this machine (``run``, ``agent run``) go."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import typer

__all__ = ["local_upstream"]


@contextlib.contextmanager
def local_upstream(simulate: bool) -> Iterator[dict[str, str]]:
    """Where the model calls go: the bundled simulator, or what the SDK's variables say."""
    if simulate:
        from simulator.testing import SimulatorServer

        with SimulatorServer() as server:
            yield {"OPENAI_BASE_URL": server.base_url, "OPENAI_API_KEY": "simulated"}
        return
    if not os.environ.get("OPENAI_API_KEY"):
        typer.echo(
            "No provider key: set OPENAI_API_KEY (and OPENAI_BASE_URL for an OpenAI-compatible "
            "server), or add --simulate to run against the bundled simulator (no key, no network).",
            err=True,
        )
        raise typer.Exit(2)
    yield {}
