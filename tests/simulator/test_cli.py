"""``tokenmill simulate`` / ``python -m simulator``."""

from __future__ import annotations

import subprocess
import sys

import typer
from typer.testing import CliRunner

from cli import main as cli_main
from cli.simulate import simulate


def test_registered_as_tokenmill_simulate() -> None:
    assert ("simulate", "cli.simulate:simulate") in cli_main._COMMANDS


def test_help_shows_the_example() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "simulator", "--help"], capture_output=True, text=True, timeout=30, check=True
    )
    assert "tokenmill simulate --port 8100 --latency-ms 200" in result.stdout
    assert "--rate-429" in result.stdout


def test_bad_settings_are_refused_before_serving() -> None:
    app = typer.Typer()
    app.command()(simulate)
    runner = CliRunner()
    assert runner.invoke(app, ["--config", "[1]"]).exit_code == 2
    assert runner.invoke(app, ["--config", '{"rate_429": 5}']).exit_code == 2
    assert runner.invoke(app, ["--rate-500", "1.5"]).exit_code == 2
