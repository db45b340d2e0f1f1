"""LangChain (langchain-openai's ``ChatOpenAI``) against a live API, a real worker and the
simulator: what LangChain makes of each answer through tokenmill is what it makes of the same call
sent to the simulator directly, ids aside."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import openai
import pytest
from langchain_core.messages import BaseMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_openai import ChatOpenAI
from pydantic import BaseModel

from simulator.testing import SimulatorServer
from tests.api.test_interactive_lane import Lane, lane  # noqa: F401 - the fixture

pytestmark = pytest.mark.slow


class Weather(BaseModel):
    city: str
    degrees: int


def get_weather(city: str) -> str:
    """The weather of a city."""
    return f"sunny in {city}"


Chat = Callable[..., ChatOpenAI]


def chats(lane: Lane, simulator: SimulatorServer) -> dict[str, Chat]:  # noqa: F811
    """``ChatOpenAI`` makers straight to the simulator and through tokenmill."""

    def maker(base_url: str, key: str) -> Chat:
        def chat(**options: Any) -> ChatOpenAI:
            return ChatOpenAI(model="lane-model", base_url=base_url, api_key=key, timeout=60, **options)  # type: ignore[arg-type]

        return chat

    return {"direct": maker(simulator.base_url, "sim"), "tokenmill": maker(f"{lane.root}/v1", lane.key)}


def seen(message: BaseMessage) -> dict[str, Any]:
    """A message as LangChain's caller reads it, without the ids of the answer and of the run."""
    data = message.model_dump(mode="json", exclude={"id"})
    data["response_metadata"].pop("id", None)
    data["response_metadata"].pop("created", None)
    return data


def test_a_refused_call_raises_what_the_providers_refusal_raises(
    lane: Lane,  # noqa: F811
    simulator: SimulatorServer,
) -> None:
    """A prompt the provider refuses as too long: ``openai.BadRequestError`` (under LangChain's
    own subclass) with the provider's message, code and ``param``, as when called directly. The
    ``param`` ("messages") was dropped by the worker: ``None`` through tokenmill."""
    lane.cluster.worker("w1")
    refusals: dict[str, openai.BadRequestError] = {}
    for where, chat in chats(lane, simulator).items():
        with pytest.raises(openai.BadRequestError) as raised:
            chat(max_retries=0).invoke("far too long [[context_length]]")
        refusals[where] = raised.value
    direct, through = refusals["direct"], refusals["tokenmill"]
    assert type(through) is type(direct)
    assert (through.status_code, through.message, through.code, through.param) == (
        direct.status_code,
        direct.message,
        direct.code,
        direct.param,
    )
    assert through.param == "messages"


def test_a_provider_overloaded_past_the_workers_retries_says_when_to_ask_again(
    lane: Lane,  # noqa: F811
    simulator: SimulatorServer,
) -> None:
    """A provider answering 503 with ``Retry-After: 1`` to every try: the worker's own retries
    wait as it asked, and the 502 that ends them carries it (``retry-after``,
    ``retry-after-ms``), so that LangChain's retries (the openai SDK's) wait as they do when
    called directly. Both were dropped: the worker came back within its own half-second backoff,
    and the SDK's retries after theirs, each spending another budget of the worker's retries."""
    lane.cluster.env["TOKENMILL_MAX_ATTEMPTS"] = "2"
    lane.cluster.worker("w1")
    refusals: dict[str, openai.APIStatusError] = {}
    for where, chat in chats(lane, simulator).items():
        simulator.reset()
        with pytest.raises(openai.APIStatusError) as raised:
            chat(max_retries=0).invoke("busy [[status 503 retry_after=1]]")
        refusals[where] = raised.value
        if where == "tokenmill":
            first, second = simulator.stats()["request_times"]
            assert second - first >= 1.0  # the worker's second try waited as the provider asked
    assert refusals["direct"].status_code == 503
    assert refusals["tokenmill"].status_code == 502
    for refusal in refusals.values():
        headers = refusal.response.headers
        assert (headers.get("retry-after"), headers.get("retry-after-ms")) == ("1", "1000")


async def test_chat_openai_reads_every_kind_of_answer_as_it_does_from_the_provider(
    lane: Lane,  # noqa: F811
    simulator: SimulatorServer,
) -> None:
    """invoke / ainvoke with named messages, stream and astream with ``stream_usage``, batch,
    ``bind_tools`` with the tool's result sent back, ``with_structured_output`` by json_schema
    and by function calling, ``n`` = 2 and logprobs: each reads as it does from the provider
    itself (a stream: the message its chunks add up to). A stream's chunks never said the
    answer's ``system_fingerprint``: LangChain's streamed ``response_metadata`` lacked it."""
    lane.cluster.worker("w1")
    weather = 'Weather in Oslo? [[call get_weather {"city": "Oslo"}]]'
    named = [SystemMessage("Be brief.", name="rules"), HumanMessage("Hi [[words 5]] [[echo]]", name="alice")]
    answers: dict[str, list[Any]] = {}
    for where, chat in chats(lane, simulator).items():
        model = chat(max_retries=0)
        streamed = model.model_copy(update={"stream_usage": True})
        with_tools = model.bind_tools([get_weather])
        call = with_tools.invoke(weather)
        [tool_call] = call.tool_calls
        tool_result = ToolMessage(get_weather(**tool_call["args"]), tool_call_id=str(tool_call["id"]))
        chunks = list(streamed.stream("Stream me [[words 9]]"))
        total = chunks[0]
        for chunk in chunks[1:]:
            total += chunk
        async_total = None
        async for chunk in streamed.astream("Stream me too [[words 7]]"):
            async_total = chunk if async_total is None else async_total + chunk
        assert async_total is not None
        answers[where] = [
            seen(model.invoke(named)),
            seen(await model.ainvoke("Hello async [[words 4]]")),
            seen(total),
            seen(async_total),
            [seen(answer) for answer in model.batch(["One [[words 3]]", "Two [[words 4]]"])],
            seen(call),
            seen(with_tools.invoke([HumanMessage(weather), call, tool_result])),
            model.with_structured_output(Weather, method="json_schema").invoke("Weather as JSON"),
            model.with_structured_output(Weather, method="function_calling").invoke("Weather by tool"),
            [
                g.text
                for g in chat(max_retries=0, n=2).generate([[HumanMessage("Two [[words 4]]")]]).generations[0]
            ],
            seen(chat(max_retries=0, logprobs=True, top_logprobs=2).invoke("Weigh [[words 3]]")),
        ]
    through = answers["tokenmill"]
    assert '"name":"alice"' in through[0]["content"]  # the names reached the provider
    assert through[2]["usage_metadata"]["output_tokens"] > 0  # stream_usage
    assert through[6]["content"] == "tool results: get_weather=sunny in Oslo"
    assert isinstance(through[7], Weather)
    assert len(set(through[9])) == 2
    assert through[10]["response_metadata"]["logprobs"]["content"]
    for index, (direct, tokenmill) in enumerate(zip(answers["direct"], through, strict=True)):
        assert tokenmill == direct, index


def test_a_streams_chunks_are_the_ones_the_provider_streams(
    lane: Lane,  # noqa: F811
    simulator: SimulatorServer,
) -> None:
    """``stream(stream_usage=True)``: chunk for chunk what LangChain yields from the provider
    itself: OpenAI's opening chunk (the role, empty content), the text as the provider cut it,
    the end, the usage. The opening chunk was missing (the role rode on the first text): one
    chunk fewer than from the provider."""
    lane.cluster.worker("w1")
    simulator.configure(stream_chunk_chars=8)
    streams = {
        where: [seen(chunk) for chunk in chat(max_retries=0, stream_usage=True).stream("Stream [[words 6]]")]
        for where, chat in chats(lane, simulator).items()
    }
    assert streams["direct"][0]["content"] == ""
    assert len(streams["direct"]) > 5
    assert streams["tokenmill"] == streams["direct"]
