"""The ``tokenmill`` command line.

Each command (or group) is a module of this package; this file only assembles them, importing a
command's module only when the command line is parsed.
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
    ("simulate", "cli.simulate:simulate"),
    ("run", "cli.run:run"),
    ("worker", "cli.worker:worker"),
    ("beat", "cli.beat:beat"),
    ("api", "cli.serve:api"),
    ("submit", "cli.batches:submit"),
    ("status", "cli.batches:status"),
    ("results", "cli.batches:results"),
    ("cancel", "cli.batches:cancel"),
    ("usage", "cli.batches:usage"),
    ("flower", "cli.flower:flower"),
]
_GROUPS: list[tuple[str, str]] = [
    ("db", "cli.db:db_app"),
    ("keys", "cli.keys:keys_app"),
    ("prices", "cli.prices:prices_app"),
    ("agent", "cli.agents:agent_app"),
    ("tenants", "cli.tenants:tenants_app"),
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
