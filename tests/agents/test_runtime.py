"""The local runtime: routing by message type, replies and errors to the sender, agent-to-agent
messages, one message at a time per agent, cancellation, stopping, and agent state."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from agents import (
    AgentId,
    AgentStateError,
    BufferedChatCompletionContext,
    CantHandleException,
    MessageContext,
    RoutedAgent,
    SingleThreadedAgentRuntime,
    UndeliverableException,
    message_handler,
)
from models import CancellationToken, UserMessage


@dataclass
class Text:
    content: str


@dataclass
class Number:
    value: int


@dataclass
class Relay:
    to: str
    content: str


@dataclass
class Boom:
    pass


@dataclass
class Slow:
    seconds: float


class EchoAgent(RoutedAgent):
    def __init__(self) -> None:
        super().__init__("echoes")
        self.events: list[str] = []
        self.entered = asyncio.Event()
        self._model_context = BufferedChatCompletionContext(buffer_size=3)

    @message_handler
    async def on_text(self, message: Text, ctx: MessageContext) -> Text:
        await self._model_context.add_message(UserMessage(content=message.content, source="user"))
        return Text(f"{self.id.key}: {message.content} (from {ctx.sender})")

    @message_handler(match=lambda message, ctx: message.value < 0)
    async def on_negative(self, message: Number, ctx: MessageContext) -> str:
        return "negative"

    @message_handler
    async def on_number_or_boom(self, message: Number | Boom, ctx: MessageContext) -> int:
        if isinstance(message, Boom):
            raise ValueError("boom on purpose")
        return message.value * 2

    @message_handler
    async def on_relay(self, message: Relay, ctx: MessageContext) -> Text:
        reply = await self.send_message(Text(message.content), AgentId.from_str(message.to))
        assert isinstance(reply, Text)
        return reply

    @message_handler
    async def on_slow(self, message: Slow, ctx: MessageContext) -> str:
        self.events.append("enter")
        self.entered.set()
        await asyncio.sleep(message.seconds)
        self.events.append("exit")
        return "slept"


@pytest.fixture
async def runtime() -> AsyncIterator[SingleThreadedAgentRuntime]:
    runtime = SingleThreadedAgentRuntime()
    await EchoAgent.register(runtime, "echo", EchoAgent)
    runtime.start()
    yield runtime
    await runtime.close()


async def test_messages_route_by_type_and_replies_come_back(runtime: SingleThreadedAgentRuntime) -> None:
    agent = AgentId("echo", "a")
    assert await runtime.send_message(Text("hi"), agent) == Text("a: hi (from None)")
    assert await runtime.send_message(Number(21), agent) == 42
    assert await runtime.send_message(Number(-1), agent) == "negative"


async def test_handler_errors_reach_the_sender(runtime: SingleThreadedAgentRuntime) -> None:
    with pytest.raises(ValueError, match="boom on purpose"):
        await runtime.send_message(Boom(), AgentId("echo", "a"))
    with pytest.raises(CantHandleException, match="float"):
        await runtime.send_message(1.5, AgentId("echo", "a"))
    with pytest.raises(UndeliverableException, match="nobody"):
        await runtime.send_message(Text("x"), AgentId("nobody", "a"))
    # The agent still works after a failed message.
    assert await runtime.send_message(Number(1), AgentId("echo", "a")) == 2


async def test_agents_message_each_other_and_themselves(runtime: SingleThreadedAgentRuntime) -> None:
    reply = await runtime.send_message(Relay("echo/b", "pass on"), AgentId("echo", "a"))
    assert reply == Text("b: pass on (from echo/a)")
    # A message from a handler back to its own agent must not wait for the handler to finish.
    reply = await asyncio.wait_for(runtime.send_message(Relay("echo/a", "self"), AgentId("echo", "a")), 5)
    assert reply == Text("a: self (from echo/a)")


async def test_one_agent_handles_one_message_at_a_time(runtime: SingleThreadedAgentRuntime) -> None:
    same = await asyncio.gather(
        *(runtime.send_message(Slow(0.05), AgentId("echo", "same")) for _ in range(3))
    )
    assert same == ["slept"] * 3
    agent = await runtime.try_get_underlying_agent_instance(AgentId("echo", "same"), EchoAgent)
    assert agent.events == ["enter", "exit"] * 3
    # Different agents do run concurrently.
    await asyncio.gather(*(runtime.send_message(Slow(0.05), AgentId("echo", f"k{n}")) for n in range(3)))
    first = await runtime.try_get_underlying_agent_instance(AgentId("echo", "k0"), EchoAgent)
    assert first.events == ["enter", "exit"]


async def test_cancelling_the_token_cancels_the_handler(runtime: SingleThreadedAgentRuntime) -> None:
    token = CancellationToken()
    pending = asyncio.ensure_future(
        runtime.send_message(Slow(30), AgentId("echo", "c"), cancellation_token=token)
    )
    agent = await runtime.try_get_underlying_agent_instance(AgentId("echo", "c"), EchoAgent)
    await asyncio.wait_for(agent.entered.wait(), 5)
    token.cancel()
    with pytest.raises(asyncio.CancelledError):
        await pending
    await asyncio.sleep(0.05)
    assert agent.events == ["enter"], "the handler was cancelled, not run to its end"


async def test_stop_when_idle_finishes_queued_work() -> None:
    runtime = SingleThreadedAgentRuntime()
    await EchoAgent.register(runtime, "echo", EchoAgent)
    replies = [asyncio.ensure_future(runtime.send_message(Number(n), AgentId("echo", "a"))) for n in range(5)]
    await asyncio.sleep(0)
    runtime.start()  # messages sent before start wait in the queue
    await runtime.stop_when_idle()
    assert [reply.result() for reply in replies] == [0, 2, 4, 6, 8]
    with pytest.raises(RuntimeError, match="not started"):
        await runtime.stop()


async def test_state_saves_the_model_contexts_and_loads_into_a_new_runtime(
    runtime: SingleThreadedAgentRuntime,
) -> None:
    for text in ["one", "two", "three", "four"]:
        await runtime.send_message(Text(text), AgentId("echo", "mem"))
    state = json.loads(json.dumps(await runtime.save_state()))
    assert list(state) == ["echo/mem"]

    fresh = SingleThreadedAgentRuntime()
    await EchoAgent.register(fresh, "echo", EchoAgent)
    await fresh.load_state(state)
    agent = await fresh.try_get_underlying_agent_instance(AgentId("echo", "mem"), EchoAgent)
    remembered = [m.content for m in await agent._model_context.get_messages()]
    assert remembered == ["two", "three", "four"]
    assert await fresh.agent_save_state(AgentId("echo", "mem")) == state["echo/mem"]
    with pytest.raises(AgentStateError, match="nope"):
        await fresh.agent_load_state(AgentId("echo", "mem"), {"model_contexts": {"nope": {}}})


async def test_agents_are_built_only_by_a_runtime(runtime: SingleThreadedAgentRuntime) -> None:
    with pytest.raises(RuntimeError, match="built by a runtime"):
        EchoAgent()
    with pytest.raises(ValueError, match="already registered"):
        await EchoAgent.register(runtime, "echo", EchoAgent)
    with pytest.raises(ValueError, match="invalid agent type"):
        AgentId("has space", "k")
    metadata = await runtime.agent_metadata(AgentId("echo", "m"))
    assert metadata == {"type": "echo", "key": "m", "description": "echoes"}
