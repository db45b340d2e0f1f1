"""Model contexts: which messages the model sees, never a tool result cut from its call, state round-trips."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence

import pytest

from agents import (
    AgentStateError,
    BufferedChatCompletionContext,
    ChatCompletionContext,
    HeadAndTailChatCompletionContext,
    UnboundedChatCompletionContext,
    message_groups,
)
from models import (
    AssistantMessage,
    FunctionCall,
    FunctionExecutionResult,
    FunctionExecutionResultMessage,
    LLMMessage,
    SystemMessage,
    UserMessage,
)
from tests.agents.conversation_rules import tool_call_violations


def user(text: str) -> UserMessage:
    return UserMessage(content=text, source="user")


def reply(text: str) -> AssistantMessage:
    return AssistantMessage(content=text, source="assistant")


def tool_round(tag: str, calls: int = 1) -> list[LLMMessage]:
    ids = [f"{tag}-{n}" for n in range(calls)]
    return [
        AssistantMessage(content=[FunctionCall(id=i, name="calculator", arguments="{}") for i in ids]),
        FunctionExecutionResultMessage(
            content=[FunctionExecutionResult(content="1", name="calculator", call_id=i) for i in ids]
        ),
    ]


def random_conversation(rng: random.Random, length: int) -> list[LLMMessage]:
    messages: list[LLMMessage] = []
    while len(messages) < length:
        choice = rng.random()
        if choice < 0.4:
            messages.append(user(f"u{len(messages)}"))
        elif choice < 0.7:
            messages.append(reply(f"a{len(messages)}"))
        else:
            messages.extend(tool_round(f"t{len(messages)}", calls=rng.randint(1, 3)))
    return messages


async def view(context: ChatCompletionContext, messages: Sequence[LLMMessage]) -> list[LLMMessage]:
    for message in messages:
        await context.add_message(message)
    return await context.get_messages()


async def test_unbounded_returns_everything() -> None:
    messages = [user("a"), reply("b"), *tool_round("x"), reply("c")]
    assert await view(UnboundedChatCompletionContext(), messages) == messages


async def test_buffered_keeps_the_last_n_plain_messages() -> None:
    messages = [user(str(n)) for n in range(8)]
    assert await view(BufferedChatCompletionContext(buffer_size=5), messages) == messages[-5:]


async def test_buffered_drops_a_tool_round_whole_rather_than_split_it() -> None:
    messages = [user("q"), *tool_round("x"), reply("answer"), user("next")]
    # The last 3 messages would start with the tool results: the round goes whole.
    got = await view(BufferedChatCompletionContext(buffer_size=3), messages)
    assert got == [reply("answer"), user("next")]
    got = await view(BufferedChatCompletionContext(buffer_size=4), messages)
    assert got == messages[1:]


async def test_buffered_keeps_the_newest_round_even_if_longer_than_the_buffer() -> None:
    messages = [user("q"), *tool_round("x")]
    assert await view(BufferedChatCompletionContext(buffer_size=1), messages) == messages[1:]


async def test_head_and_tail_skips_the_middle_with_a_placeholder() -> None:
    messages = [user(str(n)) for n in range(10)]
    got = await view(HeadAndTailChatCompletionContext(head_size=2, tail_size=3), messages)
    assert got[:2] == messages[:2]
    assert got[2] == UserMessage(content="Skipped 5 messages.", source="System")
    assert got[3:] == messages[-3:]
    short = messages[:4]
    assert await view(HeadAndTailChatCompletionContext(head_size=2, tail_size=3), short) == short


async def test_head_and_tail_cut_between_groups() -> None:
    messages = [user("task"), *tool_round("x"), user("m1"), user("m2"), *tool_round("y"), user("last")]
    got = await view(HeadAndTailChatCompletionContext(head_size=2, tail_size=2), messages)
    # Head: "task" only (the round after it does not fit); tail: "last" only (same reason).
    assert got == [user("task"), UserMessage(content="Skipped 6 messages.", source="System"), user("last")]


@pytest.mark.parametrize("seed", range(30))
async def test_every_view_is_a_valid_conversation(seed: int) -> None:
    rng = random.Random(seed)
    messages = random_conversation(rng, rng.randint(1, 25))
    contexts: list[ChatCompletionContext] = [
        UnboundedChatCompletionContext(),
        *(BufferedChatCompletionContext(buffer_size=n) for n in range(1, 12)),
        *(
            HeadAndTailChatCompletionContext(head_size=h, tail_size=t)
            for h in range(0, 5)
            for t in range(1, 5)
        ),
    ]
    for context in contexts:
        got = await view(context, messages)
        assert tool_call_violations(got) == [], (type(context).__name__, got)
        assert got, "a view is never empty when there are messages"
        assert got[-1] == messages[-1], "the newest message is always seen"


async def test_orphaned_tool_results_are_left_out() -> None:
    round_ = tool_round("x")
    history = [round_[1], user("q"), reply("a")]  # a history cut elsewhere, starting mid-round
    assert message_groups(history) == [[user("q")], [reply("a")]]
    assert await view(UnboundedChatCompletionContext(), history) == [user("q"), reply("a")]


async def test_state_round_trips_through_json() -> None:
    messages = [SystemMessage(content="s"), user("q"), *tool_round("x", calls=2), reply("a")]
    original = BufferedChatCompletionContext(buffer_size=3, initial_messages=messages)
    state = json.loads(json.dumps(await original.save_state()))
    restored = BufferedChatCompletionContext(buffer_size=3)
    await restored.load_state(state)
    assert await restored.get_messages() == await original.get_messages()
    assert (await restored.save_state()) == state
    await restored.clear()
    assert await restored.get_messages() == []
    with pytest.raises(AgentStateError):
        await restored.load_state({"messages": [{"type": "NoSuchMessage"}]})


def test_sizes_are_validated() -> None:
    with pytest.raises(ValueError, match="buffer_size"):
        BufferedChatCompletionContext(buffer_size=0)
    with pytest.raises(ValueError, match="tail_size"):
        HeadAndTailChatCompletionContext(head_size=1, tail_size=0)
