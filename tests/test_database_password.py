"""TOKENMILL_DATABASE_PASSWORD: the ledger's password given apart from its URL, so that any character
works (issue 14: docker-compose.yml pasted POSTGRES_PASSWORD into the URL, and ``@``, ``/`` or ``:``
broke it). What the driver receives is checked here; scripts/compose-check logs in with such a
password on a PostgreSQL that demands it (scram-sha-256 over TCP)."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from pydantic import ValidationError

from config import Settings, url_with_password

HOSTILE = ["p@ss/w:rd", "%40", "a#b?c&d=e", "sp ace+plus", "ü-ñ-€", "]]>[[", "''\"\\"]


def connect_args(url: str) -> dict[str, object]:
    """The keyword arguments SQLAlchemy hands psycopg for ``url``."""
    engine = sa.create_engine(url)
    try:
        _args, kwargs = engine.dialect.create_connect_args(sa.make_url(url))
    finally:
        engine.dispose()
    return dict(kwargs)


@pytest.mark.parametrize("password", HOSTILE)
def test_the_driver_gets_the_password_unchanged(password: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENMILL_DATABASE_URL", "postgresql+psycopg://tokenmill@postgres:5432/tokenmill")
    monkeypatch.setenv("TOKENMILL_DATABASE_PASSWORD", password)
    args = connect_args(Settings().database_url)
    assert args["password"] == password
    assert (args["user"], args["host"], args["port"], args["dbname"]) == (
        "tokenmill",
        "postgres",
        5432,
        "tokenmill",
    )


def test_pasted_into_the_url_the_same_password_breaks_it() -> None:
    """Why the password is given apart: the old compose file's URL, with such a password."""
    args = connect_args("postgresql+psycopg://tokenmill:p@ss/w:rd@postgres:5432/tokenmill")
    assert (args["password"], args["host"]) == ("p", "ss")


def test_it_replaces_a_password_written_in_the_url() -> None:
    url = url_with_password("postgresql+psycopg://tokenmill:old@db/tokenmill?sslmode=require", "n:ew")
    assert connect_args(url)["password"] == "n:ew"
    assert sa.make_url(url).query == {"sslmode": "require"}


def test_without_it_the_url_is_left_as_given() -> None:
    url = "postgresql+psycopg://u:p%40x@db:5433/ledger"
    assert Settings(database_url=url).database_url == url


@pytest.mark.parametrize("url", ["sqlite:///./tokenmill.db", "postgresql+psycopg:///tokenmill"])
def test_a_url_with_no_user_to_give_it_to_is_refused_by_name(url: str) -> None:
    with pytest.raises(
        ValidationError, match="TOKENMILL_DATABASE_PASSWORD is set but TOKENMILL_DATABASE_URL"
    ):
        Settings(database_url=url, database_password="secret")
