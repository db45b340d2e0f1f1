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
