"""Keep request data out of log lines: database and validation errors quote what they choke on.

PostgreSQL's message for a bad value carries the value (``DETAIL``/``CONTEXT`` lines quote up to
the whole JSON body of a request, prompt included); SQLAlchemy's statement errors add the
statement's parameters (engines are made with ``hide_parameters=True`` against that); pydantic's
validation errors quote the input. Whoever logs such an error (our handlers, uvicorn, Celery) would
write the prompt into the log.

``install_log_redaction`` wraps the process's log record factory, so every record of every logger
is cleaned before any handler sees it, however logging was configured: such an error in the
record's exception chain, its message or its arguments is replaced by its type, SQLSTATE and first
line with quoted values blanked; the text of the raw error is blanked where the message embeds it.
"""

from __future__ import annotations

import logging
import re
import sqlite3
from collections.abc import Iterator
from types import TracebackType
from typing import Any

import psycopg
import pydantic
from sqlalchemy import exc as sa_exc

__all__ = ["RedactedError", "install_log_redaction", "redacted_error_text"]

_QUOTED = re.compile(r"\"[^\"]*\"|'[^']*'")
_BLANK = "<withheld>"
_REDACTED_TYPES = (sa_exc.StatementError, psycopg.Error, sqlite3.Error, pydantic.ValidationError)
_installed = False


class RedactedError(Exception):
    """Stands in, in a logged exception chain, for an error whose text quoted data."""


def _qualified_name(error: BaseException) -> str:
    kind = type(error)
    return f"{kind.__module__}.{kind.__qualname__}"


def redacted_error_text(error: BaseException) -> str:
    """What may be logged of ``error``: its type, SQLSTATE and first line, quoted values blanked."""
    if isinstance(error, pydantic.ValidationError):
        places = "; ".join(
            f"{'.'.join(str(part) for part in detail['loc'])}: {detail['type']}"
            for detail in error.errors(include_input=False, include_url=False)[:10]
        )
        return (
            f"{_qualified_name(error)}: {error.error_count()} validation error(s) for {error.title}: {places}"
        )
    cause = error.orig if isinstance(error, sa_exc.StatementError) and error.orig is not None else error
    sqlstate = getattr(cause, "sqlstate", None)
    diag = getattr(cause, "diag", None)
    first_line = getattr(diag, "message_primary", None) or (str(cause).splitlines() or [""])[0]
    state = f" [SQLSTATE {sqlstate}]" if sqlstate else ""
    return f"{_qualified_name(cause)}{state}: {_QUOTED.sub(_BLANK, first_line)} (details withheld from logs)"


def _chain(error: BaseException | None) -> Iterator[BaseException]:
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _raw_texts(error: BaseException) -> list[str]:
    """The texts of ``error`` that quote data: its str and repr, and each of their lines."""
    texts = [str(error), repr(error)]
    if isinstance(error, sa_exc.StatementError) and error.orig is not None:
        texts += [str(error.orig), repr(error.orig)]
    lines = [line.strip() for text in texts for line in text.splitlines()]
    return sorted({*texts, *(line for line in lines if len(line) >= 8)}, key=len, reverse=True)


class _Scrubber:
    """Blanks the raw text of the redactable errors found, wherever a message embeds it."""

    def __init__(self) -> None:
        self.raw: list[str] = []

    def add(self, error: BaseException) -> str:
        self.raw.extend(_raw_texts(error))
        return redacted_error_text(error)

    def scrub(self, text: str) -> str:
        for raw in self.raw:
            if raw in text:
                text = text.replace(raw, _BLANK)
        return text


def _rebuilt(error: BaseException, scrubber: _Scrubber) -> BaseException:
    """A copy of ``error``'s chain fit to log: redactable links replaced, the others' messages
    scrubbed of their text (a wrapper often repeats its cause's message)."""
    links = list(_chain(error))
    texts = [scrubber.add(link) if isinstance(link, _REDACTED_TYPES) else None for link in links]
    copies: list[RedactedError] = []
    for link, text in zip(links, texts, strict=True):
        if text is None:
            text = f"{_qualified_name(link)}: {scrubber.scrub(str(link))}"
        copy = RedactedError(text)
        copy.__traceback__ = link.__traceback__
        copies.append(copy)
    for link, copy, older in zip(links, copies, copies[1:], strict=False):
        if link.__cause__ is not None:
            copy.__cause__ = older
        else:
            copy.__context__ = older
            copy.__suppress_context__ = link.__suppress_context__
    return copies[0]


def _needs_redaction(record: logging.LogRecord) -> bool:
    exc_info = record.exc_info
    if exc_info and any(isinstance(link, _REDACTED_TYPES) for link in _chain(exc_info[1])):
        return True
    args = record.args
    values: tuple[Any, ...] = tuple(args.values()) if isinstance(args, dict) else tuple(args or ())
    return any(isinstance(value, _REDACTED_TYPES) for value in (record.msg, *values))


def _redact(record: logging.LogRecord) -> None:
    scrubber = _Scrubber()
    exc_info = record.exc_info
    if exc_info and exc_info[1] is not None:
        copy = _rebuilt(exc_info[1], scrubber)
        traceback: TracebackType | None = copy.__traceback__
        record.exc_info = (type(copy), copy, traceback)
        record.exc_text = None
    if isinstance(record.msg, _REDACTED_TYPES):
        record.msg = scrubber.add(record.msg)
    args = record.args
    if isinstance(args, dict):
        record.args = {k: scrubber.add(v) if isinstance(v, _REDACTED_TYPES) else v for k, v in args.items()}
    elif args:
        record.args = tuple(scrubber.add(v) if isinstance(v, _REDACTED_TYPES) else v for v in args)
    try:
        message = record.getMessage()
    except (TypeError, ValueError):  # a malformed record: logging reports it itself
        return
    record.msg, record.args = scrubber.scrub(message), None


def install_log_redaction() -> None:
    """Clean every log record of this process from now on (idempotent)."""
    global _installed
    if _installed:
        return
    make_record = logging.getLogRecordFactory()

    def redacting_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        if _needs_redaction(record):
            _redact(record)
        return record

    logging.setLogRecordFactory(redacting_factory)
    _installed = True
