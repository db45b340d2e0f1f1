"""Statements run on the database driver's own cursor, past SQLAlchemy's execution machinery.

For the few statements every single call makes (its key and rows, its claim, its result): there,
SQLAlchemy's work per execution (a ``Connection``, an execution context, the compiled cache's
look-up, parameter and result processing) cost the API and the workers more CPU than PostgreSQL
spent running the statement, about 120 µs of 200 for a claim (bench/sync_latency.py). The
statement is compiled once, for PostgreSQL; each run takes a pooled connection (the engine's pool,
its checkout events and its idle ping included), runs in autocommit (the statement is its own
transaction), and hands the connection back. What SQLAlchemy would do is kept where it matters:
parameters go through their column types' bind processors, errors are SQLAlchemy's
(``sqlalchemy.exc.DBAPIError`` and its subclasses, parameters hidden), a connection the error
shows dead is invalidated, not pooled again (nor is any pooled connection older than it), and
the engine's ``before_cursor_execute`` and ``after_cursor_execute`` listeners see the statement
(with no ``Connection`` nor context: what captures statements, for plans or counts, still sees
these).

PostgreSQL (psycopg) only: the callers keep SQLAlchemy's way for SQLite.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import psycopg
import sqlalchemy as sa
from psycopg.rows import namedtuple_row
from sqlalchemy.dialects.postgresql import psycopg as psycopg_dialect
from sqlalchemy.engine import Engine
from sqlalchemy.sql.compiler import SQLCompiler

from store.engine import driver_error

__all__ = ["DriverStatement"]

_DIALECT = psycopg_dialect.dialect()  # type: ignore[no-untyped-call]


class DriverStatement:
    """``statement`` compiled once for PostgreSQL, to ``run`` on a pooled psycopg connection.

    Its parameters are its bind parameters' keys; one given a value in the statement (a literal
    compared with, a value set) keeps it unless ``run`` names it. Its parameters must not be
    expanding (``IN`` lists): their SQL depends on each run's values."""

    def __init__(self, statement: sa.ClauseElement) -> None:
        compiled = statement.compile(dialect=_DIALECT)
        assert isinstance(compiled, SQLCompiler)
        if compiled.literal_execute_params or compiled.post_compile_params:
            raise ValueError("a driver statement's SQL must not depend on its parameters' values")
        self.sql = compiled.string
        self._compiled = compiled
        # Rendered parameter name -> its type's bind processor (an Enum's value, JSON's encoding).
        self._processors: dict[str, Callable[[Any], Any]] = {}
        for bind, name in compiled.bind_names.items():
            processor = bind.type.dialect_impl(_DIALECT).bind_processor(_DIALECT)
            if processor is not None:
                self._processors[name] = processor

    def parameters(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """The driver's parameters for ``values`` (keyed by bind parameter key)."""
        parameters = dict(self._compiled.construct_params(dict(values)))
        for name, processor in self._processors.items():
            parameters[name] = processor(parameters[name])
        return parameters

    def run(self, engine: Engine, values: Mapping[str, Any]) -> list[Any]:
        """Run with ``values`` as its own transaction; its rows (named tuples; none if it returns
        none)."""
        parameters = self.parameters(values)
        try:
            connection = engine.raw_connection()
        except psycopg.Error as error:  # no connection to be had: SQLAlchemy's error, as connect()'s
            raise sa.exc.DBAPIError.instance(
                None, None, error, psycopg.Error, hide_parameters=True, dialect=engine.dialect
            ) from error
        try:
            driver = connection.driver_connection
            assert isinstance(driver, psycopg.Connection)
            try:
                driver.autocommit = True
                try:
                    with driver.cursor(row_factory=namedtuple_row) as cursor:
                        dispatch = engine.dispatch
                        if dispatch.before_cursor_execute:  # no Connection, no execution context
                            dispatch.before_cursor_execute(None, cursor, self.sql, parameters, None, False)
                        cursor.execute(self.sql, parameters)
                        if dispatch.after_cursor_execute:
                            dispatch.after_cursor_execute(None, cursor, self.sql, parameters, None, False)
                        return list(cursor.fetchall()) if cursor.description is not None else []
                finally:
                    if not driver.broken:
                        driver.autocommit = False
            except psycopg.Error as error:
                raise driver_error(engine, error, connection, self.sql, parameters) from error
        finally:
            connection.close()
