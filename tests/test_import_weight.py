"""Importing the settings, or a package to reach one of its modules, loads no heavy dependency:
the API, the commands and the store read settings without loading Celery, the openai SDK or SQL."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = (
    "celery",
    "kombu",
    "openai",
    "sqlalchemy",
    "fastapi",
    "redis",
    "alembic",
    "prometheus_client",
    "structlog",
)


def modules_loaded_by(statement: str) -> set[str]:
    """The top-level modules a fresh interpreter holds after running ``statement``."""
    report = "print(json.dumps(sorted({name.split('.')[0] for name in sys.modules})))"
    script = f"import json, sys; {statement}; {report}"
    completed = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    return set(json.loads(completed.stdout))


@pytest.mark.parametrize(
    "statement",
    [
        "import config",
        "from config import Settings, get_settings; get_settings()",
        "import models",
        "import workers",
        "import telemetry",
        "import telemetry.context",
        "import telemetry.multiprocess",  # before prometheus_client: it must not import it
    ],
)
def test_importing_loads_none_of_the_heavy_dependencies(statement: str) -> None:
    assert modules_loaded_by(statement) & set(HEAVY) == set()


def test_importing_the_store_loads_no_model_client_or_celery() -> None:
    loaded = modules_loaded_by("import store")
    assert loaded & {"celery", "kombu", "openai", "fastapi", "redis"} == set()


OURS = ("agents", "api", "cli", "config", "models", "store", "telemetry", "workers")


def opentelemetry_importers(statement: str) -> set[str]:
    """The modules that import ``opentelemetry`` while a fresh interpreter runs ``statement``."""
    script = (
        "import builtins, json\n"
        "importers = set()\n"
        "original = builtins.__import__\n"
        "def spy(name, globals=None, *args, **kwargs):\n"
        "    if name.split('.')[0] == 'opentelemetry':\n"
        "        importers.add((globals or {}).get('__name__', '?'))\n"
        "    return original(name, globals, *args, **kwargs)\n"
        "builtins.__import__ = spy\n"
        f"{statement}\n"
        "print(json.dumps(sorted(importers)))\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    return set(json.loads(completed.stdout))


@pytest.mark.parametrize(
    "statement",
    [
        "import api.app",
        "import workers.app",
        "import workers.tasks",
        "import workers.lane",
        "import cli.main",
    ],
)
def test_tracing_off_no_module_of_ours_imports_opentelemetry(statement: str) -> None:
    """``TOKENMILL_TRACING`` is off by default: with the tracing extra installed (it is in the test
    venv) no module of ours imports opentelemetry (telemetry.tracing). Some dependencies do on
    their own when it is installed (redis-py's observability, FastAPI's telemetry): not ours."""
    importers = opentelemetry_importers(statement)
    assert {name for name in importers if name.split(".")[0] in OURS} == set()


def test_tracing_on_is_seen_importing_opentelemetry() -> None:
    """The spy above sees our imports: turned on, the facade imports opentelemetry."""
    statement = "from config import Settings; from telemetry import tracing; tracing.configure(Settings(tracing=True), 'x')"  # noqa: E501
    assert "telemetry.tracing" in opentelemetry_importers(statement)


@pytest.mark.parametrize(
    "statement",
    [
        "import workers.app",
        # The facade's calls, tracing off (the default): each a no-op that imports nothing.
        "from config import Settings; from telemetry import tracing; tracing.configure(Settings(), 'api'); "
        "span = tracing.span('x'); span.__enter__(); span.__exit__(None, None, None); "
        "assert tracing.current_traceparent() is None and tracing.current_span_context() is None",
    ],
)
def test_tracing_off_loads_no_opentelemetry(statement: str) -> None:
    assert "opentelemetry" not in modules_loaded_by(statement)
