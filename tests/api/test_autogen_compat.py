"""AutoGen (autogen-ext's ``OpenAIChatCompletionClient``, autogen-agentchat's ``AssistantAgent``)
against a live API, a real worker and the simulator: what AutoGen makes of each answer through
tokenmill is what it makes of the same call sent to the simulator directly. The simulator's
answers (tool-call ids included) are derived from the request it receives, so an equal answer
also says that the provider received what AutoGen sent."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from autogen_agentchat.agents import AssistantAgent
from autogen_core.models import CreateResult, LLMMessage, ModelInfo, SystemMessage, UserMessage
from autogen_core.tools import FunctionTool
from autogen_ext.models.openai import OpenAIChatCompletionClient
from pydantic import BaseModel

from simulator.testing import SimulatorServer
from tests.api.test_interactive_lane import Lane, lane  # noqa: F401 - the fixture

pytestmark = pytest.mark.slow

MODEL_INFO = ModelInfo(
    vision=False, function_calling=True, json_output=True, family="unknown", structured_output=True
)


class Weather(BaseModel):
    city: str
    degrees: int


async def get_weather(city: str) -> str:
    """The weather of a city."""
    return f"sunny in {city}"


def clients(lane: Lane, simulator: SimulatorServer) -> dict[str, OpenAIChatCompletionClient]:  # noqa: F811
    """One AutoGen client straight to the simulator, one through tokenmill."""
    return {
        where: OpenAIChatCompletionClient(
            model="lane-model", base_url=base_url, api_key=key, model_info=MODEL_INFO, max_retries=0
        )
        for where, base_url, key in (
            ("direct", simulator.base_url, "sim"),
            ("tokenmill", f"{lane.root}/v1", lane.key),
        )
    }


def seen(result: CreateResult | str) -> Any:
    """A result as AutoGen's caller reads it (the ``cached`` flag is AutoGen's own cache's)."""
    return result if isinstance(result, str) else result.model_dump(mode="json", exclude={"cached"})


async def test_an_assistant_agent_with_a_tool_runs_as_it_does_against_the_provider(
    lane: Lane,  # noqa: F811
    simulator: SimulatorServer,
) -> None:
    """An ``AssistantAgent`` with a tool: the tool call (its id too), the tool's result and the
    reply, each with its usage, as the same run straight against the simulator. AutoGen sends
    ``tool_choice: "auto"`` with its tools; tokenmill dropped it (the API's default) before the
    provider, which so received another request than the one sent: another answer (and other
    tool-call ids) from the simulator, and "no tool choice" from a server whose default is not
    OpenAI's."""
    lane.cluster.worker("w1")
    runs: dict[str, list[Any]] = {}
    for where, client in clients(lane, simulator).items():
        agent = AssistantAgent("helper", model_client=client, tools=[get_weather], reflect_on_tool_use=True)
        result = await agent.run(task='Weather in Lima? [[call get_weather {"city": "Lima"}]]')
        runs[where] = [
            message.model_dump(mode="json", exclude={"id", "created_at"}) for message in result.messages
        ]
        await client.close()
    assert [message["type"] for message in runs["tokenmill"]] == [
        "TextMessage",
        "ToolCallRequestEvent",
        "ToolCallExecutionEvent",
        "TextMessage",
    ]
    assert runs["tokenmill"][-1]["content"] == "tool results: get_weather=sunny in Lima"
    assert runs["tokenmill"][-1]["models_usage"]["prompt_tokens"] > 0
    assert runs["tokenmill"] == runs["direct"]


# AutoGen's own log line of a json_output answer dumps the SDK's parsed completion, whose type
# says ``parsed: None``: pydantic warns, whatever server answered.
@pytest.mark.filterwarnings("ignore:Pydantic serializer warnings:UserWarning")
async def test_the_chat_completion_client_reads_every_kind_of_answer_as_it_does_from_the_provider(
    lane: Lane,  # noqa: F811
    simulator: SimulatorServer,
) -> None:
    """``create`` with a named message, ``create_stream`` with its usage, a ``FunctionTool`` call
    (plain and streamed), ``json_output`` as a pydantic model (plain and streamed): each result,
    its usage included, as from the provider itself."""
    lane.cluster.worker("w1")
    tool = FunctionTool(get_weather, description="The weather of a city.")
    weather: list[LLMMessage] = [
        UserMessage(content='Weather in Oslo? [[call get_weather {"city": "Oslo"}]]', source="user")
    ]
    named: list[LLMMessage] = [
        SystemMessage(content="Be brief."),
        UserMessage(content="Hi [[words 5]] [[echo]]", source="alice"),
    ]
    results: dict[str, list[Any]] = {}
    for where, client in clients(lane, simulator).items():

        async def streamed(messages: list[LLMMessage], **options: Any) -> list[Any]:
            return [seen(item) async for item in client.create_stream(messages, **options)]  # noqa: B023

        usage = {"stream_options": {"include_usage": True}}
        results[where] = [
            seen(await client.create(named)),
            await streamed(
                [UserMessage(content="Stream me [[words 9]]", source="user")], extra_create_args=usage
            ),
            seen(await client.create(weather, tools=[tool])),
            await streamed(
                [UserMessage(content=f"{weather[0].content} (streamed)", source="user")], tools=[tool]
            ),
            seen(
                await client.create(
                    [UserMessage(content="Weather as JSON", source="user")], json_output=Weather
                )
            ),
            await streamed(
                [UserMessage(content="Weather as JSON, streamed", source="user")], json_output=Weather
            ),
        ]
        results[where].append(dataclasses.asdict(client.total_usage()))
        await client.close()
    through = results["tokenmill"]
    assert '"name":"alice"' in through[0]["content"]  # AutoGen's message names reached the provider
    assert through[1][-1]["usage"]["completion_tokens"] > 0  # the stream's usage chunk
    assert through[2]["content"][0]["name"] == "get_weather"
    assert Weather.model_validate_json(through[4]["content"])
    assert through[-1]["prompt_tokens"] > 0
    for index, (direct, tokenmill) in enumerate(zip(results["direct"], through, strict=True)):
        assert tokenmill == direct, index
