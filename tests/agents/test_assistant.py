"""The assistant runner against the simulator over real HTTP: tool rounds, a follow-up on a stored
conversation, bad tool calls returned to the model, the iteration cap, structured output, the
cache making a repeated run free, and failures."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
import redis.asyncio
from pydantic import BaseModel

from agents import (
    AssistantConfig,
    AssistantRunError,
    ModelRequest,
    ToolRegistry,
    UnknownToolError,
    client_model_call,
    default_registry,
    run_assistant,
)
from agents.function_tool import FunctionTool
from models import (
    BadRequest,
    CancellationToken,
    CreateResult,
    FunctionCall,
    FunctionExecutionResultMessage,
    RequestUsage,
)
from models.cache import ChatCompletionCache, RedisStore
from models.openai import OpenAIChatCompletionClient
from models.replay import ReplayChatCompletionClient
from simulator import SimulatorServer
from store.conversations import append_messages, create_conversation, load_conversation
from store.engine import make_engine
from store.schema import upgrade_to_head
from tests.agents.conversation_rules import tool_call_violations

CALC = AssistantConfig(model="gpt-4o-mini", tools=["calculator"])


@pytest.fixture
async def client(simulator: SimulatorServer) -> AsyncIterator[OpenAIChatCompletionClient]:
    client = OpenAIChatCompletionClient(model="gpt-4o-mini", base_url=simulator.base_url, api_key="sim")
    yield client
    await client.close()


def results_of(messages: list[object]) -> list[tuple[str, bool]]:
    return [
        (result.content, bool(result.is_error))
        for message in messages
        if isinstance(message, FunctionExecutionResultMessage)
        for result in message.content
    ]


async def test_two_tool_calls_then_an_answer(
    client: OpenAIChatCompletionClient, simulator: SimulatorServer
) -> None:
    question = (
        "What is (2+3)*4? "
        '[[call calculator {"expression": "2+3"}]] [[then]] [[call calculator {"expression": "5*4"}]]'
    )
    run = await run_assistant(CALC, question, client=client)

    assert run.stop_reason == "answer"
    assert run.output is not None
    assert "calculator=20" in run.output
    kinds = [type(message).__name__ for message in run.transcript]
    assert kinds == [
        "UserMessage",
        "AssistantMessage",
        "FunctionExecutionResultMessage",
        "AssistantMessage",
        "FunctionExecutionResultMessage",
        "AssistantMessage",
    ]
    assert results_of(list(run.transcript)) == [("5", False), ("20", False)]
    assert tool_call_violations(run.transcript) == []
    assert len(run.model_calls) == 3 == simulator.stats()["completions"]
    for call in run.model_calls:
        assert call.model.startswith("gpt-4o-mini")
        assert not call.cached
        assert call.usage.prompt_tokens > 0
        assert call.usage.completion_tokens > 0
        assert call.latency_seconds > 0
    # The run's usage is what the client was billed.
    assert run.usage == client.actual_usage()


async def test_a_follow_up_on_the_stored_conversation_uses_the_first_answer(
    client: OpenAIChatCompletionClient, database_url: str
) -> None:
    upgrade_to_head(database_url)
    engine = make_engine(database_url)
    try:
        question = 'Add 2 and 3, then triple it. [[call calculator {"expression": "2+3"}]] [[then]] ' + (
            '[[call calculator {"expression": "5*3"}]]'
        )
        first = await run_assistant(CALC, question, client=client)
        conversation_id = create_conversation(engine, messages=first.transcript)

        history = load_conversation(engine, conversation_id)
        assert history == first.transcript
        second = await run_assistant(
            CALC, "And what was the final number? [[recall]]", history, client=client
        )
        append_messages(engine, conversation_id, second.transcript)

        assert second.stop_reason == "answer"
        assert second.output is not None
        assert "recall:" in second.output
        assert "15" in second.output
        stored = load_conversation(engine, conversation_id)
        assert stored == [*first.transcript, *second.transcript]
        assert tool_call_violations(stored) == []
    finally:
        engine.dispose()


async def test_bad_tool_calls_go_back_to_the_model_and_the_run_finishes(
    client: OpenAIChatCompletionClient,
) -> None:
    question = (
        "Try these. "
        "[[call no_such_tool {}]] "
        '[[call calculator {"expression": "9**9**9"}]] '
        '[[call calculator {"formula": "1+1"}]] '
        '[[call calculator {"expression": "1+1"}]]'
    )
    run = await asyncio.wait_for(run_assistant(CALC, question, client=client), 30)
    assert run.stop_reason == "answer"
    results = results_of(list(run.transcript))
    assert [is_error for _, is_error in results] == [True, True, True, False]
    assert "unknown tool 'no_such_tool'" in results[0][0]
    assert "CalculatorError" in results[1][0]
    assert "too large" in results[1][0]
    assert "ToolArgumentsError" in results[2][0]
    assert results[3][0] == "2"
    # The model saw the errors: its answer quotes the results it was sent.
    assert run.output is not None
    assert "unknown tool" in run.output


class Crash(RuntimeError):
    pass


def explode(reason: str) -> str:
    raise Crash(reason)


async def test_invalid_json_arguments_and_a_raising_tool_with_the_replay_client() -> None:
    calls = [
        FunctionCall(id="c1", name="calculator", arguments="{not json"),
        FunctionCall(id="c2", name="calculator", arguments="[1, 2]"),
        FunctionCall(id="c3", name="explode", arguments='{"reason": "on purpose"}'),
    ]
    script: list[str | CreateResult] = [
        CreateResult(
            finish_reason="function_calls", content=calls, usage=RequestUsage(prompt_tokens=9), cached=False
        ),
        "recovered",
    ]
    registry = ToolRegistry([default_registry.get("calculator"), FunctionTool(explode, "Fail.")])
    config = AssistantConfig(model="replay", tools=["calculator", "explode"])
    run = await run_assistant(config, "go", client=ReplayChatCompletionClient(script), tools=registry)
    assert run.output == "recovered"
    results = results_of(list(run.transcript))
    assert all(is_error for _, is_error in results)
    assert "not valid JSON" in results[0][0]
    assert "must be a JSON object" in results[1][0]
    assert "Crash: on purpose" in results[2][0]


async def test_the_iteration_cap_stops_the_run_with_a_valid_transcript(
    client: OpenAIChatCompletionClient,
) -> None:
    config = CALC.model_copy(update={"max_tool_iterations": 1})
    question = '[[call calculator {"expression": "1+1"}]] [[then]] [[call calculator {"expression": "2+2"}]]'
    run = await run_assistant(config, question, client=client)
    assert run.stop_reason == "max_tool_iterations"
    assert run.output is None
    assert len(run.model_calls) == 2
    results = results_of(list(run.transcript))
    assert results[0] == ("2", False)
    assert results[1][1] is True
    assert "limit" in results[1][0]
    assert tool_call_violations(run.transcript) == []


class CityFacts(BaseModel):
    city: str
    population: int


async def test_structured_output_by_class_and_by_schema(client: OpenAIChatCompletionClient) -> None:
    config = AssistantConfig(model="gpt-4o-mini", system_message="Answer in JSON.")
    run = await run_assistant(config, "Facts about Seattle", client=client, output_type=CityFacts)
    assert run.stop_reason == "answer"
    CityFacts.model_validate(run.parsed_output)

    schema = {
        "type": "object",
        "properties": {"answer": {"type": "integer"}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    run = await run_assistant(config.model_copy(update={"output_schema": schema}), "6*7?", client=client)
    assert run.stop_reason == "answer"
    assert isinstance(run.parsed_output, dict)
    assert isinstance(run.parsed_output["answer"], int)
    assert run.output is not None
    assert json.loads(run.output) == run.parsed_output


async def test_a_repeated_run_through_the_cache_is_free(
    client: OpenAIChatCompletionClient, simulator: SimulatorServer, redis_url: str, redis_prefix: str
) -> None:
    connection = redis.asyncio.Redis.from_url(redis_url)
    cached = ChatCompletionCache(client, RedisStore(connection, prefix=redis_prefix))
    question = '[[call calculator {"expression": "2+3"}]] [[then]] [[call calculator {"expression": "5*4"}]]'
    try:
        first = await run_assistant(CALC, question, client=cached)
        second = await run_assistant(CALC, question, client=cached)
    finally:
        await connection.aclose()
    assert simulator.stats()["completions"] == 3
    assert [call.cached for call in first.model_calls] == [False] * 3
    assert [call.cached for call in second.model_calls] == [True] * 3
    assert second.usage == RequestUsage()
    assert first.usage.total_tokens > 0
    assert second.transcript == first.transcript


async def test_a_pipeline_callable_sees_every_request(client: OpenAIChatCompletionClient) -> None:
    seen: list[ModelRequest] = []
    through_client = client_model_call(client)

    async def pipeline(request: ModelRequest, token: CancellationToken | None) -> CreateResult:
        seen.append(request)
        return await through_client(request, token)

    question = '[[call calculator {"expression": "2+3"}]]'
    config = CALC.model_copy(update={"extra_create_args": {"temperature": 0}})
    run = await run_assistant(config, question, model_call=pipeline)
    assert [request.call_index for request in seen] == [0, 1]
    assert all(request.model == "gpt-4o-mini" for request in seen)
    assert all(request.extra_create_args == {"temperature": 0} for request in seen)
    assert [tool["name"] for tool in seen[0].tools] == ["calculator"]
    # The system message leads every call and is not part of the transcript.
    assert seen[1].messages[0].type == "SystemMessage"
    assert list(seen[1].messages[1:]) == run.transcript[:3]


async def test_configuration_errors_and_failed_model_calls(client: OpenAIChatCompletionClient) -> None:
    with pytest.raises(UnknownToolError, match="shell"):
        await run_assistant(AssistantConfig(model="m", tools=["shell"]), "hi", client=client)
    with pytest.raises(ValueError, match="client"):
        await run_assistant(CALC, "hi")
    with pytest.raises(AssistantRunError) as failure:
        await run_assistant(CALC, "[[status 400]]", client=client)
    assert isinstance(failure.value.__cause__, BadRequest)
    assert failure.value.partial.stop_reason == "error"
    assert failure.value.partial.model_calls == []

    # A failure after a successful call keeps that call's usage and the tool results.
    calls = [FunctionCall(id="c1", name="calculator", arguments='{"expression": "2+3"}')]
    usage = RequestUsage(prompt_tokens=9, completion_tokens=4)
    script: list[str | CreateResult] = [
        CreateResult(finish_reason="function_calls", content=calls, usage=usage, cached=False)
    ]
    with pytest.raises(AssistantRunError) as failure:
        await run_assistant(CALC, "go", client=ReplayChatCompletionClient(script))
    partial = failure.value.partial
    assert [call.usage for call in partial.model_calls] == [usage]
    assert partial.usage == usage
    assert results_of(list(partial.transcript)) == [("5", False)]


async def test_a_cancelled_token_stops_the_run(client: OpenAIChatCompletionClient) -> None:
    token = CancellationToken()
    token.cancel()
    with pytest.raises((asyncio.CancelledError, AssistantRunError)):
        await run_assistant(CALC, "hi", client=client, cancellation_token=token)
