"""Fixtures of the worker tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.workers.support import Ledger, ledger


@pytest.fixture
def make_ledger() -> Iterator[Callable[[str], Ledger]]:
    """``make_ledger(url)``: schema at head, one tenant; its engine is disposed at teardown."""
    made: list[Ledger] = []

    def make(url: str) -> Ledger:
        made.append(ledger(url))
        return made[-1]

    yield make
    for led in made:
        led.engine.dispose()
