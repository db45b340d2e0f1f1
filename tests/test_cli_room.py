"""The commands have one room, ``cli``: every command it registers loads, and no other part imports
it (``python -m simulator``, an entry like ``tokenmill`` itself, is the one exception)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from cli import main as cli_main

ROOT = Path(__file__).resolve().parent.parent
ENTRIES = {ROOT / "simulator" / "__main__.py"}
PARTS = ("config", "models", "store", "workers", "api", "agents", "simulator", "migrations")


@pytest.mark.parametrize("target", [target for _, target in cli_main._COMMANDS + cli_main._GROUPS])
def test_every_registered_command_loads_from_the_cli_package(target: str) -> None:
    assert target.startswith("cli.")
    assert cli_main._load(target) is not None


def test_tokenmill_help_lists_every_command() -> None:
    shown = subprocess.run(
        [sys.executable, "-c", "from cli.main import main; main()", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    for name, _ in cli_main._COMMANDS + cli_main._GROUPS:
        assert f" {name} " in shown, name


def imported_modules(path: Path) -> set[str]:
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
        elif isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
    return modules


def test_no_other_part_imports_the_commands() -> None:
    importers = [
        str(path.relative_to(ROOT))
        for part in PARTS
        for path in sorted((ROOT / part).rglob("*.py"))
        if path not in ENTRIES
        and any(module == "cli" or module.startswith("cli.") for module in imported_modules(path))
    ]
    assert importers == []
