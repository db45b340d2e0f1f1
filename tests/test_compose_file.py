"""docker-compose.yml, read as compose reads it (without docker): what issue 14 found wrong when it
was first brought up stays fixed. scripts/compose-check runs the file for real.

The Redis settings are checked on a real redis-server started with the compose file's own flags."""

from __future__ import annotations

import re
import subprocess
import tempfile
import time
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from simulator.testing import free_port
from tests import services

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
TOKENMILL_IMAGE = "${TOKENMILL_IMAGE:-tokenmill:local}"
# Runs once and exits; every other service is long-running.
ONE_SHOT = {"migrate"}

# Who may receive each secret: the services that use it, and no other.
SECRET_USERS = {
    "POSTGRES_PASSWORD": {"postgres", "migrate", "api", "worker", "beat"},
    "TOKENMILL_FLOWER_BASIC_AUTH": {"flower"},
    "OPENAI_API_KEY": {"worker"},
    "AZURE_OPENAI_API_KEY": {"worker"},
    "GEMINI_API_KEY": {"worker"},
}

_VARIABLE = re.compile(r"\$\{(\w+)(?::([-?])([^}]*))?\}")


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?error}``."""

    def value(match: re.Match[str]) -> str:
        name, kind, rest = match.groups()
        if env.get(name):
            return env[name]
        if kind == "?":
            raise KeyError(f"{name}: {rest}")
        return rest if kind == "-" else ""

    return _VARIABLE.sub(value, text)


def variables_in(value: object) -> set[str]:
    if isinstance(value, str):
        return {match.group(1) for match in _VARIABLE.finditer(value)}
    if isinstance(value, Mapping):
        return set().union(*(variables_in(v) for v in value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*(variables_in(v) for v in value)) if value else set()
    return set()


def received(service: dict[str, Any]) -> set[str]:
    """Variables of the host (or .env) that reach a service's containers: ``${VAR}`` in its
    environment, and keys without a value, which compose passes from the host."""
    if "env_file" in service:
        return set(SECRET_USERS)  # the whole file: every secret in it
    environment = service.get("environment") or {}
    assert isinstance(environment, dict), "environment as a mapping, so that merges stay readable"
    passed = {key for key, value in environment.items() if value is None}
    return passed | variables_in(environment)


def test_no_service_gets_a_whole_env_file() -> None:
    assert [name for name, s in SERVICES.items() if "env_file" in s] == []


@pytest.mark.parametrize("secret", sorted(SECRET_USERS))
def test_a_secret_reaches_only_the_services_that_use_it(secret: str) -> None:
    given = {name for name, service in SERVICES.items() if secret in received(service)}
    assert given == SECRET_USERS[secret]


def test_the_ledger_password_is_given_apart_from_its_url() -> None:
    """Pasted into the URL, ``@``, ``/`` or ``:`` in it broke the URL; config.Settings escapes it."""
    for name in SECRET_USERS["POSTGRES_PASSWORD"] - {"postgres"}:
        environment = SERVICES[name]["environment"]
        assert "POSTGRES_PASSWORD" not in variables_in(environment["TOKENMILL_DATABASE_URL"]), name
        assert variables_in(environment["TOKENMILL_DATABASE_PASSWORD"]) == {"POSTGRES_PASSWORD"}, name


def published(name: str, env: Mapping[str, str]) -> list[tuple[str, str, str]]:
    """(host address, host port, container port) of each port a service publishes."""
    out = []
    for entry in SERVICES[name].get("ports", []):
        address, host_port, container_port = interpolate(entry, env).rsplit(":", 2)
        out.append((address, host_port, container_port))
    return out


def test_published_ports_bind_loopback_unless_told_and_are_set_by_the_environment() -> None:
    publishing = [name for name in SERVICES if SERVICES[name].get("ports")]
    assert publishing  # the API and Flower at least
    for name in publishing:
        for address, host_port, container_port in published(name, {}):
            assert address == "127.0.0.1", name
            assert host_port.isdigit(), name
            assert container_port.isdigit(), name
        # Each host port and the address come from a variable of their own.
        (entry,) = SERVICES[name]["ports"]
        address_var, port_var = _two_variables(entry)
        moved = published(name, {address_var: "0.0.0.0", port_var: "40123"})
        assert [(a, p) for a, p, _ in moved] == [("0.0.0.0", "40123")], name
    ports = [published(name, {})[0][1] for name in publishing]
    assert len(set(ports)) == len(ports), "two services would publish the same default port"


def _two_variables(entry: str) -> tuple[str, str]:
    """The variables of a port entry, address first: ``${ADDRESS:-...}:${PORT:-...}:PORT``."""
    address_var, port_var = (match.group(1) for match in _VARIABLE.finditer(entry))
    return address_var, port_var


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_a_long_running_service_restarts(name: str) -> None:
    expected = {"no"} if name in ONE_SHOT else {"always", "unless-stopped", "on-failure"}
    assert SERVICES[name].get("restart") in expected


def test_one_tokenmill_image_built_once() -> None:
    tokenmill = {name for name, s in SERVICES.items() if s.get("image") == TOKENMILL_IMAGE}
    # Every service that runs the tokenmill command line runs the one image.
    assert {"migrate", "api", "worker", "beat", "flower"} <= tokenmill
    builders = [name for name in tokenmill if "build" in SERVICES[name]]
    assert builders == ["migrate"]  # the first to run; the others use what it built
    for name, service in SERVICES.items():
        build = service.get("build")
        if build is not None:
            assert "image" in service, f"{name} builds an untagged image"
            assert variables_in(build["args"]["BASE_IMAGE"]) == {"TOKENMILL_BASE_IMAGE"}, name


def test_every_volume_is_named() -> None:
    """An anonymous volume (the cache's was) outlives `down` and is found by nobody. A bind mount
    of a file of this repository (a server's configuration) is a path, and fine."""
    declared = set(COMPOSE["volumes"])
    for name, service in SERVICES.items():
        for mount in service.get("volumes", []):
            assert ":" in mount, f"{name}: anonymous volume {mount}"
            source = mount.split(":", 1)[0]
            assert source.startswith((".", "/")) or source in declared, f"{name}: {mount}"
    assert {mount.split(":")[0] for mount in SERVICES["cache"]["volumes"]} == {"cache-data"}


def test_postgres_is_healthy_only_over_tcp_after_a_start_period() -> None:
    check = SERVICES["postgres"]["healthcheck"]
    test = check["test"]
    assert test[:2] == ["CMD", "pg_isready"]
    assert test[test.index("--host") + 1] == "127.0.0.1"  # TCP, not the Unix socket
    assert "start_period" in check


def test_flower_binds_every_interface_and_is_probed_as_the_host_reaches_it() -> None:
    flower = SERVICES["flower"]
    command = flower["command"]
    assert command[command.index("--address") + 1] == "0.0.0.0"
    probe = " ".join(flower["healthcheck"]["test"])
    assert "gethostbyname(socket.gethostname())" in probe
    assert "127.0.0.1" not in probe
    assert "localhost" not in probe


def test_the_build_context_leaves_out_history_secrets_and_tests() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip()}
    assert {".git", ".env", "tests", ".venv"} <= ignored
    assert "/.env" in (ROOT / ".gitignore").read_text().splitlines()


def redis_flags(name: str, maxmemory: str) -> list[str]:
    """The service's redis-server flags, its maxmemory replaced (the default is gigabytes)."""
    flags = [interpolate(str(flag), {}) for flag in SERVICES[name]["command"]]
    flags[flags.index("--maxmemory") + 1] = maxmemory
    return flags


@pytest.fixture
def start_redis() -> Iterator[Any]:
    started: list[subprocess.Popen[bytes]] = []

    def start(flags: list[str]) -> redis.Redis:
        binary = services.redis_server_binary()
        port = free_port()
        workdir = tempfile.mkdtemp(prefix="tokenmill-compose-redis-")
        proc = subprocess.Popen(
            [binary, *flags, "--port", str(port), "--bind", "127.0.0.1", "--dir", workdir],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        started.append(proc)
        client = redis.Redis(port=port, socket_connect_timeout=1)
        deadline = time.monotonic() + 10
        while True:
            try:
                if int(client.info("server")["process_id"]) == proc.pid:
                    return client
            except redis.ConnectionError:
                pass
            assert proc.poll() is None, "redis-server exited"
            assert time.monotonic() < deadline, "redis-server did not answer within 10 s"
            time.sleep(0.05)

    yield start
    for proc in started:
        proc.kill()
        proc.wait()


def test_a_full_broker_refuses_new_messages_and_keeps_the_old(start_redis: Any) -> None:
    broker = start_redis(redis_flags("broker", "4mb"))
    value = b"x" * 16384
    written = 0
    refused: redis.exceptions.ResponseError | None = None
    while refused is None and written < 100_000:
        try:
            broker.rpush("queue", value)
        except redis.exceptions.ResponseError as e:
            refused = e
        else:
            written += 1
    assert refused is not None, "the broker took 1.6 GB into a 4 MB maxmemory"
    assert "maxmemory" in str(refused)
    assert written > 0
    assert broker.llen("queue") == written  # nothing was evicted to make room


def test_a_full_cache_drops_old_entries_and_keeps_answering(start_redis: Any) -> None:
    cache = start_redis(redis_flags("cache", "4mb"))
    value = b"x" * 16384
    for i in range(2000):  # ~32 MB into 4
        cache.set(f"answer:{i}", value)
    assert cache.exists("answer:1999")
    assert cache.dbsize() < 2000
    assert cache.info("stats")["evicted_keys"] > 0


def test_the_image_holds_every_package_the_project_installs() -> None:
    """The build stage copies package folders one by one (to keep the build context lean): a
    package added to pyproject.toml but not copied made every worker container die at start with
    ModuleNotFoundError (found by compose-check after telemetry/ was added)."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {name.rstrip("*") for name in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    copied = set(re.findall(r"^COPY (\w+) /src/\1$", (ROOT / "Dockerfile").read_text(), flags=re.M))
    assert packages <= copied, f"not copied into the image: {sorted(packages - copied)}"
