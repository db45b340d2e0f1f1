"""Plain and streamed completions through the official openai SDK against the live simulator."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletion

from simulator.testing import SimulatorServer


@pytest.fixture
def client(simulator: SimulatorServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=simulator.base_url, api_key="sim", max_retries=0, timeout=10) as client:
        yield client


def ask(client: openai.OpenAI, text: str, model: str = "sim-small", **options: Any) -> ChatCompletion:
    reply: ChatCompletion = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": text}], **options
    )
    return reply


def test_plain_completion_has_openai_shape(client: openai.OpenAI) -> None:
    reply = ask(client, "Say something.")
    assert reply.object == "chat.completion"
    assert reply.id.startswith("chatcmpl-")
    assert reply.model == "sim-small"
    assert reply.system_fingerprint
    [choice] = reply.choices
    assert choice.finish_reason == "stop"
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.message.tool_calls is None
    usage = reply.usage
    assert usage is not None
    assert usage.prompt_tokens >= 1
    assert usage.completion_tokens >= 1
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == 0
    assert usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens == 0


def test_same_request_same_answer_other_model_other_answer(client: openai.OpenAI) -> None:
    first = ask(client, "What is the capital of France?")
    again = ask(client, "What is the capital of France?")
    other_model = ask(client, "What is the capital of France?", model="sim-large")
    other_prompt = ask(client, "What is the capital of Spain?")
    assert first.choices[0].message.content == again.choices[0].message.content
    assert first.usage == again.usage
    assert first.id != again.id  # each call is its own response
    assert other_model.choices[0].message.content != first.choices[0].message.content
    assert other_prompt.choices[0].message.content != first.choices[0].message.content


def test_completion_tokens_follow_the_text(client: openai.OpenAI) -> None:
    reply = ask(client, "[[say exactly sixteen chars]]")
    assert reply.choices[0].message.content == "exactly sixteen chars"
    assert reply.usage is not None
    assert reply.usage.completion_tokens == (len("exactly sixteen chars") + 3) // 4


def test_max_tokens_truncates_with_finish_reason_length(client: openai.OpenAI) -> None:
    full = ask(client, "Tell me a long story [[words 60]]")
    short = ask(client, "Tell me a long story [[words 60]]", max_tokens=3)
    full_text = full.choices[0].message.content
    short_text = short.choices[0].message.content
    assert full.choices[0].finish_reason == "stop"
    assert short.choices[0].finish_reason == "length"
    assert full_text is not None
    assert short_text is not None
    assert full_text.startswith(short_text)
    assert len(short_text) < len(full_text)
    assert short.usage is not None
    assert short.usage.completion_tokens == 3


def test_n_choices_differ(client: openai.OpenAI) -> None:
    reply = ask(client, "Give me options.", n=3)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert len({c.message.content for c in reply.choices}) == 3
    assert reply.usage is not None
    assert reply.usage.completion_tokens == sum(
        (len(c.message.content or "") + 3) // 4 for c in reply.choices
    )


def test_cached_and_reasoning_token_directives(client: openai.OpenAI) -> None:
    reply = ask(client, "[[cached 5]] [[reasoning 7]] [[say ok]]")
    assert reply.usage is not None
    assert reply.usage.prompt_tokens_details is not None
    assert reply.usage.prompt_tokens_details.cached_tokens == 5
    assert reply.usage.completion_tokens_details is not None
    assert reply.usage.completion_tokens_details.reasoning_tokens == 7
    assert reply.usage.completion_tokens == 1 + 7


def test_stream_matches_the_plain_reply_and_reports_usage(client: openai.OpenAI) -> None:
    plain = ask(client, "Stream this please [[words 30]]")
    chunks = list(
        client.chat.completions.create(
            model="sim-small",
            messages=[{"role": "user", "content": "Stream this please [[words 30]]"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content_chunks) > 3  # split, not one blob
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert {c.id for c in chunks} == {chunks[0].id}
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["stop"]
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage == plain.usage
    assert all(c.usage is None for c in chunks[:-1])


def test_a_stream_carries_the_logprobs_of_its_text(client: openai.OpenAI) -> None:
    """Each text chunk carries the logprobs of the tokens it starts: together, the plain reply's."""
    options: dict[str, Any] = {"logprobs": True, "top_logprobs": 2}
    plain = ask(client, "Weigh this [[words 12]]", **options)
    assert plain.choices[0].logprobs is not None
    chunks = list(
        client.chat.completions.create(
            model="sim-small",
            messages=[{"role": "user", "content": "Weigh this [[words 12]]"}],
            stream=True,
            **options,
        )
    )
    carrying = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs is not None]
    assert len(carrying) > 1  # spread over the chunks
    streamed = [item for logprobs in carrying for item in logprobs.content or []]
    assert streamed == plain.choices[0].logprobs.content


def test_a_refusal_is_answered_and_streamed_as_openai_refuses(client: openai.OpenAI) -> None:
    plain = ask(client, "Do the bad thing [[refuse I will not do that, sorry.]]")
    assert (plain.choices[0].message.content, plain.choices[0].message.refusal) == (
        None,
        "I will not do that, sorry.",
    )
    chunks = list(
        client.chat.completions.create(
            model="sim-small",
            messages=[{"role": "user", "content": "Do the bad thing [[refuse I will not do that, sorry.]]"}],
            stream=True,
        )
    )
    assert "".join(c.choices[0].delta.refusal or "" for c in chunks) == "I will not do that, sorry."
    assert all(not c.choices[0].delta.content for c in chunks)


def test_stream_without_include_usage_sends_no_usage(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="sim-small", messages=[{"role": "user", "content": "hello"}], stream=True
        )
    )
    assert chunks
    assert all(c.usage is None and c.choices for c in chunks)


async def test_async_client_streams(simulator: SimulatorServer) -> None:
    client = openai.AsyncOpenAI(base_url=simulator.base_url, api_key="sim", max_retries=0, timeout=10)
    async with client:
        stream = await client.chat.completions.create(
            model="sim-small",
            messages=[{"role": "user", "content": "[[say one two three four five six seven]]"}],
            stream=True,
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "one two three four five six seven"


def test_logprobs_when_asked(client: openai.OpenAI) -> None:
    reply = ask(client, "[[say abcdefgh]]", logprobs=True, top_logprobs=2)
    logprobs = reply.choices[0].logprobs
    assert logprobs is not None
    assert logprobs.content is not None
    assert "".join(t.token for t in logprobs.content) == "abcdefgh"
    assert all(len(t.top_logprobs) == 2 and t.logprob < 0 for t in logprobs.content)


def test_models_list(client: openai.OpenAI, simulator: SimulatorServer) -> None:
    assert "sim-small" in {m.id for m in client.models.list()}
    simulator.configure(known_models=["only-this"])
    assert [m.id for m in client.models.list()] == ["only-this"]


def test_echo_quotes_the_messages_as_received(client: openai.OpenAI) -> None:
    messages: list[Any] = [
        {"role": "system", "name": "rules", "content": "Be brief."},
        {"role": "user", "name": "bob", "content": [{"type": "text", "text": "hi [[echo]]"}]},
    ]
    reply = client.chat.completions.create(model="sim-small", messages=messages)
    content = reply.choices[0].message.content or ""
    (line,) = [part for part in content.split("\n") if part.startswith("messages: ")]
    assert json.loads(line.removeprefix("messages: ")) == messages
