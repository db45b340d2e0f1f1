"""``tokenmill simulate`` and ``python -m simulator``: run the OpenAI-compatible fake upstream."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from simulator.config import CONFIG_ENV, SimConfig
from simulator.errors import ConfigError
from simulator.server import serve

__all__ = ["main", "simulate"]


def simulate(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8100,
    latency_ms: Annotated[float, typer.Option(help="Delay before every reply.")] = 0.0,
    latency_jitter_ms: Annotated[float, typer.Option(help="Extra uniform random delay, up to this.")] = 0.0,
    rate_429: Annotated[float, typer.Option(help="Fraction of completions answered 429.")] = 0.0,
    retry_after_s: Annotated[float, typer.Option(help="Retry-After sent with a 429.")] = 1.0,
    rate_500: Annotated[float, typer.Option(help="Fraction of completions answered 500.")] = 0.0,
    rate_timeout: Annotated[float, typer.Option(help="Fraction that hang --timeout-s, then drop.")] = 0.0,
    timeout_s: Annotated[float, typer.Option(help="How long a simulated timeout hangs.")] = 30.0,
    seed: Annotated[int, typer.Option(help="Seed of the fault and latency draws.")] = 0,
    empty_chunks: Annotated[bool, typer.Option(help="Interleave empty chunks in streams.")] = False,
    known_models: Annotated[
        str | None, typer.Option(help="Comma-separated models to accept; others get 404. Default: any.")
    ] = None,
    require_api_key: Annotated[
        str | None, typer.Option(help="Only this Bearer key is accepted; others get 401. Default: any.")
    ] = None,
    rpm_limit: Annotated[int | None, typer.Option(help="Requests per rolling minute; beyond it 429.")] = None,
    config: Annotated[
        str | None,
        typer.Option(
            help="More settings as a JSON object (the keys of POST /_sim/config).", envvar=CONFIG_ENV
        ),
    ] = None,
    workers: Annotated[int, typer.Option(help="Server processes (each keeps its own stats and config).")] = 1,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "warning",
) -> None:
    """Run an OpenAI-compatible fake model server: deterministic replies, scripted tool calls, faults.

    Replies are derived from a hash of the request, so the same request gets the same answer. Directives in
    double square brackets in the last user message script a run: call NAME {json}, then, recall,
    status 429 retry_after=2, context_length, delay 1.5, break_stream 3 (see the simulator package
    docstring). Settings change at runtime with POST /_sim/config; GET /_sim/stats counts what was served.

    Example:

        tokenmill simulate --port 8100 --latency-ms 200

        OPENAI_BASE_URL=http://127.0.0.1:8100/v1 OPENAI_API_KEY=sim tokenmill run ...
    """
    try:
        settings = json.loads(config) if config else {}
    except ValueError as e:
        raise typer.BadParameter(f"--config is not JSON: {e}") from e
    if not isinstance(settings, dict):
        raise typer.BadParameter("--config must be a JSON object")
    flags = {
        "latency_ms": latency_ms,
        "latency_jitter_ms": latency_jitter_ms,
        "rate_429": rate_429,
        "retry_after_s": retry_after_s,
        "rate_500": rate_500,
        "rate_timeout": rate_timeout,
        "timeout_s": timeout_s,
        "seed": seed,
        "empty_chunks": empty_chunks,
        "known_models": [m.strip() for m in known_models.split(",") if m.strip()] if known_models else None,
        "require_api_key": require_api_key,
        "rpm_limit": rpm_limit,
    }
    defaults = SimConfig().model_dump()
    # A flag left at its default does not override the same key given in --config.
    changed = {key: value for key, value in flags.items() if value != defaults[key]}
    try:
        sim_config = SimConfig.parse({**settings, **changed})
    except ConfigError as e:
        raise typer.BadParameter(str(e)) from e
    serve(sim_config, host=host, port=port, workers=workers, log_level=log_level)


def main() -> None:
    typer.run(simulate)
