"""Fixtures shared by every test folder: real services, each test with its own keys and database."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from simulator.testing import SimulatorServer
from tests import services
from tests.cluster import cluster  # noqa: F401 - the fixture: real worker and beat subprocesses


@pytest.fixture(scope="session")
def redis_url() -> str:
    return services.redis_url()


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A Redis key prefix owned by this test; its keys are deleted when the test ends."""
    with services.redis_key_prefix(redis_url) as prefix:
        yield prefix


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """An empty PostgreSQL database owned by this test, dropped when it ends."""
    with services.fresh_postgres_database() as url:
        yield url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'tokenmill.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str:
    """Run the test on both databases tokenmill supports, each empty and its own."""
    name = "sqlite_url" if request.param == "sqlite" else "postgres_url"
    return str(request.getfixturevalue(name))


@pytest.fixture(scope="session")
def simulator_server() -> Iterator[SimulatorServer]:
    """One simulator subprocess for the whole session; use ``simulator``, which resets it per test."""
    with SimulatorServer() as server:
        yield server


@pytest.fixture
def simulator(simulator_server: SimulatorServer) -> SimulatorServer:
    """The session's simulator, stats zeroed and config back to defaults; ``.base_url`` is for the SDK.

    A request an earlier test abandoned (its worker killed, a client timeout) may still be running
    in the server, for as long as that test's latency (60 s in some): it counts in the stats of
    before the reset, not in this test's (``SimulatorApp.reset``), so nothing waits for it here."""
    simulator_server.reset()
    return simulator_server
