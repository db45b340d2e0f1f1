"""The ``tokenmill`` command line.

Each command lives in the module of the part it drives; this file only assembles them.
"""

from __future__ import annotations

import importlib
from typing import Any

import typer

__all__ = ["app", "main"]

app = typer.Typer(
    name="tokenmill",
    help="Run large batches of LLM requests reliably and cheaply, and see what they cost.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# (command name, "module:function", or "module:typer_app" for a group). Add a line per command.
_COMMANDS: list[tuple[str, str]] = [
    ("simulate", "simulator.cli:simulate"),
    ("run", "workers.cli:run"),
    ("worker", "workers.cli:worker"),
    ("beat", "workers.cli:beat"),
    ("api", "api.commands:api"),
    ("submit", "api.commands:submit"),
    ("status", "api.commands:status"),
    ("results", "api.commands:results"),
    ("cancel", "api.commands:cancel"),
    ("usage", "api.commands:usage"),
    ("flower", "api.flower:flower"),
]
_GROUPS: list[tuple[str, str]] = [
    ("db", "api.db_commands:db_app"),
    ("keys", "api.commands:keys_app"),
    ("prices", "api.commands:prices_app"),
    ("agent", "api.agent_commands:agent_app"),
]


def _load(target: str) -> Any:
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


def _register() -> None:
    for name, target in _COMMANDS:
        app.command(name)(_load(target))
    for name, target in _GROUPS:
        app.add_typer(_load(target), name=name)


def main() -> None:
    _register()
    app()
