"""The model events a test sees: a handler on the events logger (``models.events``)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from models.events import EVENT_LOGGER_NAME, ModelEvent


class Captured(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.events: list[ModelEvent] = []
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if isinstance(record.msg, ModelEvent):
            self.events.append(record.msg)
        self.lines.append(record.getMessage())


@pytest.fixture
def events() -> Iterator[Captured]:
    logger = logging.getLogger(EVENT_LOGGER_NAME)
    handler = Captured()
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
