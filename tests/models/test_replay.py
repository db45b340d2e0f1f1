"""ReplayChatCompletionClient: scripted replies, counted usage, a clear end."""

from __future__ import annotations

import pytest

from models import (
    CreateResult,
    FunctionCall,
    ReplayChatCompletionClient,
    ReplayExhausted,
    RequestUsage,
    UserMessage,
)

MESSAGES = [UserMessage(content="Hello there, replay.", source="user")]


async def test_replies_in_order_with_usage() -> None:
    scripted = CreateResult(
        finish_reason="function_calls",
        content=[FunctionCall(id="c", name="f", arguments="{}")],
        usage=RequestUsage(prompt_tokens=10, completion_tokens=3),
        cached=False,
    )
    client = ReplayChatCompletionClient(["first answer", scripted])
    first = await client.create(MESSAGES)
    second = await client.create(MESSAGES)
    assert first.content == "first answer"
    assert first.finish_reason == "stop"
    assert first.usage.prompt_tokens == client.count_tokens(MESSAGES)
    assert first.usage.completion_tokens > 0
    assert second is scripted
    assert client.total_usage() == client.actual_usage() == first.usage + scripted.usage
    with pytest.raises(ReplayExhausted, match="reset"):
        await client.create(MESSAGES)
    client.reset()
    assert client.total_usage() == RequestUsage()
    assert (await client.create(MESSAGES)).content == "first answer"


async def test_stream_splits_text_then_gives_the_result() -> None:
    text = "A dragon slept under the mountain for a thousand years."
    client = ReplayChatCompletionClient([text])
    items = [item async for item in client.create_stream(MESSAGES)]
    assert isinstance(items[-1], CreateResult)
    assert items[-1].content == text
    chunks = items[:-1]
    assert len(chunks) > 1
    assert "".join(c for c in chunks if isinstance(c, str)) == text
