"""``tokenmill agent run``: one assistant run in this process, printed.

Embedded: no broker, no API. The model calls go through the same pipeline as the workers' (cache
-> limiter -> retry) built from the settings, upstream to ``OPENAI_BASE_URL``/``OPENAI_API_KEY``
or, with ``--simulate``, to the bundled simulator. The transcript is kept in the settings'
database as a conversation, so ``--conversation`` continues one.
"""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any

import typer

__all__ = ["agent_app", "run"]

agent_app = typer.Typer(help="Agent runs from the command line.", no_args_is_help=True)


async def _run_once(body: dict[str, Any], client_env: dict[str, str]) -> dict[str, Any]:
    from agents import load_agent_modules, load_tool_modules
    from config import get_settings
    from store import make_engine, upgrade_to_head
    from workers.agent_tasks import parse_agent_run_body, run_agent
    from workers.clients import build_pipeline

    settings = get_settings()
    load_tool_modules(settings.tool_modules)
    load_agent_modules(settings.agent_modules)
    spec = parse_agent_run_body(body)
    await asyncio.to_thread(upgrade_to_head, settings.database_url)
    engine = make_engine(settings.database_url)
    pipeline = build_pipeline(settings, client_env=client_env)
    try:
        outcome = await run_agent(engine, pipeline, spec)
        return outcome.body
    finally:
        await pipeline.close()
        engine.dispose()


@agent_app.command("run")
def run(
    question: Annotated[str, typer.Argument(help="The user's message.")],
    model: Annotated[str | None, typer.Option(help="Model (default: TOKENMILL_DEFAULT_MODEL).")] = None,
    system: Annotated[str | None, typer.Option("--system", help="System message.")] = None,
    tool: Annotated[
        list[str] | None, typer.Option("--tool", help="A tool the model may call (repeat).")
    ] = None,
    max_tool_iterations: Annotated[int | None, typer.Option(min=1, help="Cap on tool-calling turns.")] = None,
    conversation: Annotated[str | None, typer.Option(help="Continue this conversation id.")] = None,
    simulate: Annotated[
        bool, typer.Option(help="Answer from the bundled simulator: no key, no network.")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the whole run: transcript and usage.")
    ] = False,
) -> None:
    """Run one assistant (model + tools) on this machine and print its answer."""
    from agents import AssistantRunError
    from cli.upstream import local_upstream
    from config import get_settings
    from models.errors import ModelClientError

    body: dict[str, Any] = {
        "model": model or get_settings().default_model,
        "input": question,
        "tools": tool or [],
    }
    if system is not None:
        body["system_message"] = system
    if max_tool_iterations is not None:
        body["max_tool_iterations"] = max_tool_iterations
    if conversation is not None:
        body["conversation_id"] = conversation
    with local_upstream(simulate) as client_env:
        try:
            result = asyncio.run(_run_once(body, client_env))
        except ModelClientError as e:
            typer.echo(f"error: {e.message}", err=True)
            raise typer.Exit(1) from e
        except AssistantRunError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(1) from e
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    typer.echo(result["output"] or "")
    usage = result["usage"]
    typer.echo(
        f"[{result['stop_reason']}; {len(result['model_calls'])} model call(s); "
        f"{usage['prompt_tokens']} prompt + {usage['completion_tokens']} completion tokens billed; "
        f"conversation {result['conversation_id']}]",
        err=True,
    )
