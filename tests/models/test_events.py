"""Events: JSON lines, free when nobody listens, and never a secret in any log line."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import pytest

from models import (
    EVENT_LOGGER_NAME,
    CacheHit,
    CacheStoreError,
    LLMCall,
    ModelClientError,
    ModelEvent,
    OpenAIChatCompletionClient,
    Retry,
    RetryPolicy,
    UserMessage,
    emit,
    short_digest,
)
from simulator import SimulatorServer

SECRET = "sk-proj-SECRET-4f9a1c-never-log-me"


class Everything(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def everything() -> Iterator[Everything]:
    """Every record of every logger (httpx, httpcore, openai, ours) at DEBUG."""
    root = logging.getLogger()
    handler = Everything()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


def test_events_are_json_lines() -> None:
    call = LLMCall(
        model="gpt-4o", provider="openai", endpoint="api.openai.com", latency_ms=12.5, prompt_tokens=3
    )
    data = json.loads(str(call))
    assert data["type"] == "LLMCall"
    assert data["prompt_tokens"] == 3
    assert data["error"] is None
    assert call.to_dict() == data
    hit = CacheHit(model="gpt-4o", key_digest=short_digest("the key"), store="redis", latency_ms=0.4)
    assert json.loads(str(hit))["key_digest"] == short_digest("the key") != "the key"
    assert len(short_digest("x")) == 16
    assert (
        json.loads(str(CacheStoreError(store="redis", operation="get", error="down")))["type"]
        == "CacheStoreError"
    )
    assert json.loads(str(Retry(model="m", attempt=2, delay_s=0.5, error="e")))["attempt"] == 2


@dataclass(slots=True)
class CountingEvent(ModelEvent):
    kind: ClassVar[str] = "CountingEvent"
    formatted: ClassVar[int] = 0

    def to_dict(self) -> dict[str, object]:
        CountingEvent.formatted += 1
        return {"type": self.kind}


def test_a_disabled_logger_formats_nothing() -> None:
    logger = logging.getLogger(EVENT_LOGGER_NAME)
    old = logger.level
    logger.setLevel(logging.WARNING)
    try:
        CountingEvent.formatted = 0
        for _ in range(100):
            emit(CountingEvent())
        assert CountingEvent.formatted == 0
        logger.setLevel(logging.INFO)
        handler = Everything()
        logger.addHandler(handler)
        try:
            emit(CountingEvent())
            assert [r.getMessage() for r in handler.records] == ['{"type":"CountingEvent"}']
        finally:
            logger.removeHandler(handler)
    finally:
        logger.setLevel(old)


async def test_the_api_key_never_reaches_a_log_line(
    simulator: SimulatorServer, everything: Everything
) -> None:
    simulator.configure(require_api_key=SECRET)
    client = OpenAIChatCompletionClient(
        model="gpt-4o",
        api_key=SECRET,
        base_url=simulator.base_url,
        retry_policy=RetryPolicy(max_attempts=2, base_delay=0.001, max_delay=0.002),
    )
    await client.create([UserMessage(content="hello", source="user")])
    async for _ in client.create_stream(
        [UserMessage(content="a story [[words 20]]", source="user")], include_usage=True
    ):
        pass
    with pytest.raises(ModelClientError):
        await client.create([UserMessage(content="[[status 500]]", source="user")])
    await client.close()
    wrong = OpenAIChatCompletionClient(model="gpt-4o", api_key=SECRET + "-wrong", base_url=simulator.base_url)
    with pytest.raises(ModelClientError) as caught:
        await wrong.create([UserMessage(content="hello", source="user")])
    await wrong.close()

    assert len(everything.records) > 10, "httpx/openai debug logging was captured"
    assert any(r.name == EVENT_LOGGER_NAME for r in everything.records)
    for record in everything.records:
        text = record.getMessage() + repr(record.args) + repr(record.__dict__)
        assert SECRET not in text, f"{record.name} logged the key"
        assert "Bearer" not in text, f"{record.name} logged an auth header"
        assert "authorization" not in text.lower(), f"{record.name} logged an auth header"
    assert SECRET not in str(caught.value)
    assert SECRET not in repr(caught.value)
