"""The seed page's SimpleAgent example, run as written on the local runtime: against the simulator
over real HTTP with the OpenAI client, and with the replay client."""

from __future__ import annotations

from agents import AgentId, SingleThreadedAgentRuntime
from models import RequestUsage
from models.openai import OpenAIChatCompletionClient
from models.replay import ReplayChatCompletionClient
from simulator import SimulatorServer
from tests.agents.seed_example import Message, SimpleAgent, SimpleAgentWithContext


async def test_seed_example_against_the_simulator(simulator: SimulatorServer) -> None:
    model_client = OpenAIChatCompletionClient(model="gpt-4o-mini", base_url=simulator.base_url, api_key="sim")

    runtime = SingleThreadedAgentRuntime()
    await SimpleAgent.register(
        runtime,
        "simple_agent",
        lambda: SimpleAgent(model_client=model_client),
    )
    runtime.start()
    message = Message("Hello, what are some fun things to do in Seattle? [[say Space Needle]]")
    response = await runtime.send_message(message, AgentId("simple_agent", "default"))
    await runtime.stop()
    await model_client.close()

    assert isinstance(response, Message)
    assert "Space Needle" in response.content
    stats = simulator.stats()
    assert stats["completions"] == 1
    assert model_client.total_usage().completion_tokens > 0


async def test_seed_example_with_the_replay_client() -> None:
    model_client = ReplayChatCompletionClient(["Seattle has the Space Needle and Pike Place Market."])
    runtime = SingleThreadedAgentRuntime()
    await SimpleAgent.register(runtime, "simple_agent", lambda: SimpleAgent(model_client=model_client))
    runtime.start()
    response = await runtime.send_message(
        Message("Hello, what are some fun things to do in Seattle?"), AgentId("simple_agent", "default")
    )
    await runtime.stop()
    assert response == Message("Seattle has the Space Needle and Pike Place Market.")
    assert model_client.total_usage() != RequestUsage()


async def test_the_model_context_lets_the_agent_remember(simulator: SimulatorServer) -> None:
    model_client = OpenAIChatCompletionClient(model="gpt-4o-mini", base_url=simulator.base_url, api_key="sim")
    runtime = SingleThreadedAgentRuntime()
    await SimpleAgentWithContext.register(runtime, "ctx_agent", lambda: SimpleAgentWithContext(model_client))
    runtime.start()
    agent = AgentId("ctx_agent", "default")
    first = await runtime.send_message(Message("Remember the word [[say pelican]]"), agent)
    second = await runtime.send_message(Message("What did you say before? [[recall]]"), agent)
    # Another conversation (another key) has nothing to recall.
    other = await runtime.send_message(
        Message("What did you say before? [[recall]]"), AgentId("ctx_agent", "x")
    )
    await runtime.stop()
    await model_client.close()
    assert "pelican" in first.content
    assert "recall:" in second.content
    assert "pelican" in second.content
    assert "pelican" not in other.content
