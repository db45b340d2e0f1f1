"""Database and validation errors quote the data they choke on: logged through any logger and any
formatter, they keep their type and SQLSTATE and lose the data."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pydantic
import pytest
import sqlalchemy as sa

import store

SECRET = "Pz9-SECRET-IN-A-VALUE-Kt2"


@pytest.fixture
def log_text() -> Iterator[io.StringIO]:
    """Everything logged on a fresh logger, formatted by the standard formatter."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("tests.redaction")
    logger.addHandler(handler)
    logger.propagate = False
    yield out
    logger.removeHandler(handler)


def test_a_postgresql_error_quoting_a_value_is_logged_without_it(
    postgres_url: str, log_text: io.StringIO
) -> None:
    engine = store.make_engine(postgres_url)  # makes the process's log records clean
    logger = logging.getLogger("tests.redaction")
    try:
        with engine.connect() as conn:
            conn.execute(
                sa.text("SELECT CAST(:body AS json)"), {"body": f'{{"content": "{SECRET}", "t": NaN}}'}
            )
    except sa.exc.DataError as e:
        error = e
        logger.exception("ingest failed")
        logger.error("ingest failed: %s", e)
        logger.error("task raised: %(exc)s", {"exc": repr(e)}, exc_info=(type(e), e, e.__traceback__))
    finally:
        engine.dispose()
    assert SECRET in str(error)  # what PostgreSQL said, and would have been logged
    text = log_text.getvalue()
    assert SECRET not in text
    assert "SQLSTATE 22P02" in text
    assert "invalid input syntax for type json" in text
    assert text.count("ingest failed") == 2


def test_a_validation_error_is_logged_without_its_input(log_text: io.StringIO) -> None:
    store.log_redaction.install_log_redaction()

    class Body(pydantic.BaseModel):
        temperature: float

    with pytest.raises(pydantic.ValidationError) as caught:
        Body.model_validate({"temperature": SECRET})
    assert SECRET in str(caught.value)
    logging.getLogger("tests.redaction").error("bad body", exc_info=caught.value)
    text = log_text.getvalue()
    assert SECRET not in text
    assert "temperature: float_parsing" in text
