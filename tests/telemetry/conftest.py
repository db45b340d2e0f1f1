from __future__ import annotations

from collections.abc import Iterator

import pytest

from telemetry import context


@pytest.fixture(autouse=True)
def no_request_scope() -> Iterator[None]:
    """Each test starts outside any request, and a sync test that enters one (in the process's own
    context, not a request task's copy) does not leave it to the tests after it."""
    token = context._scope.set(None)
    yield
    context._scope.reset(token)
