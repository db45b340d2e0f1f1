"""A provider's text sent as a list of content parts (Mistral, some OpenAI-compatible servers:
``message.content`` / ``delta.content`` = ``[{"type": "text", "text": ...}, ...]``; the simulator's
``[[content_parts]]``) is the answer's text, the text parts joined in order, plain and streamed,
over the own transport and the SDK's, and replayed alike from the cache. It used to read as no
text: an empty answer, billed. Parts that are no text (an image) are kept aside in the body, never
in the text; a part of the wrong shape fails once, as any wrong-shape answer."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import redis.asyncio

from models import CreateResult, InvalidProviderResponse
from models.cache import CHAT_CACHE_VALUE_TYPE, ChatCompletionCache, RedisStore
from models.openai.results import NON_TEXT_PARTS, RESPONSE_INVALID, StreamAccumulator, result_from_completion
from simulator import SimulatorServer
from simulator.completion import IMAGE_PART
from tests.models.retry_ready import client_for, user


def parts_as_sent(simulator: SimulatorServer, text: str, *, stream: bool = False) -> list[Any]:
    """The content parts the simulator sends for ``text`` (a stream's: every delta's, in order)."""
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": text}], "stream": stream}
    answer = httpx.post(f"{simulator.base_url}/chat/completions", json=body, timeout=30)
    assert answer.status_code == 200
    if not stream:
        parts = answer.json()["choices"][0]["message"]["content"]
        assert isinstance(parts, list)
        return parts
    sent: list[Any] = []
    for line in answer.text.splitlines():
        if line.startswith("data: {"):
            for choice in httpx.Response(200, content=line[6:]).json()["choices"]:
                content = choice.get("delta", {}).get("content")
                if isinstance(content, list):
                    sent += content
    return sent


def joined_text(parts: list[Any]) -> str:
    text = "".join(part["text"] for part in parts if part.get("type") == "text")
    assert text, "the simulator sent text parts"
    return text


async def streamed(client: Any, text: str) -> tuple[list[str], CreateResult]:
    chunks: list[str] = []
    result: CreateResult | None = None
    async for item in client.create_stream([user(text)]):
        if isinstance(item, CreateResult):
            result = item
        else:
            chunks.append(item)
    assert result is not None
    return chunks, result


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.mark.parametrize("through_sdk", [False, True], ids=["own-transport", "sdk"])
async def test_text_parts_are_the_answers_text(simulator: SimulatorServer, through_sdk: bool) -> None:
    prompt = "hello [[content_parts]]"
    expected = joined_text(parts_as_sent(simulator, prompt))
    client = client_for(simulator, through_sdk=through_sdk)
    try:
        result = await client.create([user(prompt)])
        chunks, streamed_result = await streamed(client, prompt)
    finally:
        await client.close()
    assert result.content == expected
    assert result.finish_reason == "stop"
    assert result.usage.completion_tokens > 0
    assert result.raw_response is not None
    # The body served to the API's callers (OpenAI's SDK reads a string) and kept in the ledger.
    assert result.raw_response["choices"][0]["message"]["content"] == expected
    assert NON_TEXT_PARTS not in result.raw_response["choices"][0]["message"]
    assert "".join(chunks) == expected == streamed_result.content
    assert len(chunks) > 1, "streamed as the provider streamed it"
    assert streamed_result.raw_response is not None
    assert streamed_result.raw_response["choices"][0]["message"]["content"] == expected


async def test_a_part_that_is_no_text_is_kept_aside_not_in_the_text(simulator: SimulatorServer) -> None:
    prompt = "look [[content_parts image]]"
    sent = parts_as_sent(simulator, prompt)
    assert IMAGE_PART in sent
    expected = joined_text(sent)
    client = client_for(simulator)
    try:
        result = await client.create([user(prompt)])
        chunks, streamed_result = await streamed(client, prompt)
    finally:
        await client.close()
    assert result.content == expected
    assert "".join(chunks) == expected == streamed_result.content
    for answer in (result, streamed_result):
        assert answer.raw_response is not None
        message = answer.raw_response["choices"][0]["message"]
        assert message["content"] == expected
        assert message[NON_TEXT_PARTS] == [IMAGE_PART]


@pytest.mark.parametrize("through_sdk", [False, True], ids=["own-transport", "sdk"])
async def test_a_part_of_the_wrong_shape_fails_once(simulator: SimulatorServer, through_sdk: bool) -> None:
    client = client_for(simulator, through_sdk=through_sdk)
    try:
        with pytest.raises(InvalidProviderResponse) as plain:
            await client.create([user("hello [[content_parts bad]]")])
        with pytest.raises(InvalidProviderResponse) as in_stream:
            await streamed(client, "hello [[content_parts bad]]")
    finally:
        await client.close()
    for error in (plain.value, in_stream.value):
        assert (error.code, error.retryable) == (RESPONSE_INVALID, False)
        assert (error.request_id or "").startswith("chatcmpl-"), "the answer's id, to trace it upstream"
    assert "choices[0].message.content[2].text is a number, not a string" in plain.value.message
    assert "choices[0].delta.content[0].text is a number, not a string" in in_stream.value.message
    assert simulator.stats()["requests"] == 2, "one upstream call each, no retry"


@pytest.mark.parametrize(
    ("content", "where"),
    [
        (["Hello"], "choices[0].message.content[0] is a string, not an object"),
        ([{"type": "text", "text": "a"}, None], "choices[0].message.content[1] is null, not an object"),
        ([{"type": "text", "text": None}], "choices[0].message.content[0].text is null, not a string"),
        ([{"type": "text"}], "choices[0].message.content[0].text is null, not a string"),
        ([{"type": 7, "text": "a"}], "choices[0].message.content[0].type is a number, not a string"),
        ([{"type": "thinking", "thinking": 3}], "choices[0].message.content[0].thinking is a number"),
    ],
)
def test_every_wrong_part_is_named(content: list[Any], where: str) -> None:
    body = {"id": "chatcmpl-x", "choices": [{"index": 0, "message": {"content": content}}]}
    with pytest.raises(InvalidProviderResponse) as caught:
        result_from_completion(body, model="m")
    assert caught.value.code == RESPONSE_INVALID
    assert where in caught.value.message
    chunk = {"id": "chatcmpl-x", "choices": [{"index": 0, "delta": {"content": content}}]}
    with pytest.raises(InvalidProviderResponse) as in_stream:
        StreamAccumulator("m").add(chunk)
    assert where.replace("message", "delta") in in_stream.value.message


def test_mistral_thinking_parts_are_the_thought_and_the_rest_the_text() -> None:
    """Magistral answers its reasoning as a ``thinking`` part (itself a list of text parts)."""
    content = [
        {
            "type": "thinking",
            "thinking": [{"type": "text", "text": "Two and "}, {"type": "text", "text": "two."}],
        },
        {"type": "text", "text": "Four"},
        {"type": "reference", "reference_ids": [1]},
        {"text": "."},  # no type: text, as some servers send it
    ]
    body: dict[str, Any] = {
        "id": "chatcmpl-x",
        "choices": [{"index": 0, "message": {"content": content}, "finish_reason": "stop"}],
    }
    result = result_from_completion(body, model="m")
    assert (result.content, result.thought) == ("Four.", "Two and two.")
    assert result.raw_response is not None
    message = result.raw_response["choices"][0]["message"]
    assert (message["content"], message["reasoning_content"]) == ("Four.", "Two and two.")
    assert message[NON_TEXT_PARTS] == [{"type": "reference", "reference_ids": [1]}]
    assert body["choices"][0]["message"]["content"] == content, "the provider's body is left as it was"
    accumulator = StreamAccumulator("m")
    assert [
        accumulator.add({"choices": [{"index": 0, "delta": {"content": [part]}}]}) for part in content
    ] == [
        None,
        "Four",
        None,
        ".",
    ]
    streamed_result = accumulator.result()
    assert (streamed_result.content, streamed_result.thought) == ("Four.", "Two and two.")


async def test_a_cached_answer_replays_the_same_text(
    simulator: SimulatorServer, redis_client: redis.asyncio.Redis, redis_prefix: str
) -> None:
    prompt = "cache me [[content_parts]]"
    expected = joined_text(parts_as_sent(simulator, prompt))
    inner = client_for(simulator)
    cache = ChatCompletionCache(
        inner, RedisStore[CHAT_CACHE_VALUE_TYPE](redis_client, prefix=redis_prefix), ttl=60
    )
    try:
        paid = await cache.create([user(prompt)])
        hit = await cache.create([user(prompt)])
        chunks, streamed_hit = await streamed(cache, prompt)
    finally:
        await cache.close()
    assert (paid.cached, hit.cached, streamed_hit.cached) == (False, True, True)
    assert paid.content == hit.content == streamed_hit.content == "".join(chunks) == expected
    assert hit.raw_response is not None
    assert hit.raw_response["choices"][0]["message"]["content"] == expected
    assert simulator.stats()["completions"] == 2, "the direct look at the parts, and the one paid call"


def test_a_streamed_choice_past_the_first_reads_its_parts_too() -> None:
    """With ``n`` > 1, every streamed choice is the caller's (and billed): its content parts are
    its text, and its parts that are no text are kept aside, as the first choice's are."""
    accumulator = StreamAccumulator("m")
    for index in (0, 1):
        parts = [
            {"type": "text", "text": f"choice {index}"},
            {"type": "image_url", "image_url": {"url": "x"}},
        ]
        accumulator.add({"choices": [{"index": index, "delta": {"content": parts}}]})
        accumulator.add({"choices": [{"index": index, "delta": {}, "finish_reason": "stop"}]})
    result = accumulator.result()
    assert result.content == "choice 0"
    assert result.raw_response is not None
    messages = [choice["message"] for choice in result.raw_response["choices"]]
    assert [m["content"] for m in messages] == ["choice 0", "choice 1"]
    assert [m[NON_TEXT_PARTS] for m in messages] == [[{"type": "image_url", "image_url": {"url": "x"}}]] * 2
    with pytest.raises(InvalidProviderResponse) as caught:
        StreamAccumulator("m").add(
            {"choices": [{"index": 1, "delta": {"content": [{"type": "text", "text": 3}]}}]}
        )
    assert caught.value.code == RESPONSE_INVALID
    assert "choices[0].delta.content[0].text" in str(caught.value)
