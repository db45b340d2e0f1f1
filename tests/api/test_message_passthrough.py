"""Every field of a message reaches the provider as the caller wrote it, through
``/v1/chat/completions`` and through batch lines, with real workers and the simulator's
``[[echo]]`` (the reply quotes the ``messages`` the upstream received)."""

from __future__ import annotations

import io
import json
from typing import Any

import httpx
import openai
import pytest

from simulator.testing import SimulatorServer
from tests.api.test_openai_sdk_e2e import Deployment, deployment, wait_for  # noqa: F401

pytestmark = pytest.mark.slow

# What AutoGen sends (a ``name`` on every user and assistant message, the default ones included),
# plus a named system message and fields our typed messages have no place for.
MESSAGES: list[dict[str, Any]] = [
    {"role": "system", "name": "rules", "content": "Be brief."},
    {"role": "user", "name": "user", "content": "What is 2+2?"},
    {"role": "assistant", "name": "assistant", "content": None, "refusal": "I cannot."},
    {"role": "assistant", "name": "planner", "content": [{"type": "text", "text": "Four."}]},
    {"role": "user", "name": "user", "content": [{"type": "text", "text": "Again [[echo]]"}]},
]


def batch_line_answer(client: openai.OpenAI, body: dict[str, Any]) -> Any:
    """The response body a one-line batch of ``body`` ended with."""
    line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": body}
    upload = client.files.create(file=io.BytesIO(json.dumps(line).encode()), purpose="batch")
    batch = client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    done = wait_for(client, batch.id, {"completed", "failed"})
    assert done.status == "completed", done
    assert done.output_file_id is not None
    (output,) = [json.loads(row) for row in client.files.content(done.output_file_id).text.splitlines()]
    return output["response"]["body"]


def received(answer_text: str) -> Any:
    """The ``messages`` the simulator quoted in its reply."""
    (line,) = [part for part in answer_text.split("\n") if part.startswith("messages: ")]
    return json.loads(line.removeprefix("messages: "))


def test_chat_completion_messages_reach_the_provider_unchanged(
    deployment: Deployment,  # noqa: F811
    simulator: SimulatorServer,
) -> None:
    through = deployment.client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # type: ignore[arg-type]
    text = through.choices[0].message.content or ""
    assert received(text) == MESSAGES
    direct = openai.OpenAI(base_url=simulator.base_url, api_key="k", max_retries=0).chat.completions.create(
        model="gpt-4o-mini",
        messages=MESSAGES,  # type: ignore[arg-type]
    )
    assert direct.choices[0].message.content == text, "the answer through tokenmill is the direct one"


def test_batch_line_messages_reach_the_provider_unchanged(
    deployment: Deployment,  # noqa: F811
    simulator: SimulatorServer,
) -> None:
    output = batch_line_answer(deployment.client, {"model": "gpt-4o-mini", "messages": MESSAGES})
    assert received(output["choices"][0]["message"]["content"]) == MESSAGES


def test_requests_that_differ_only_in_a_name_share_no_cache_entry(
    deployment: Deployment,  # noqa: F811
    simulator: SimulatorServer,
) -> None:
    def ask(name: str | None) -> str:
        message: dict[str, Any] = {"role": "user", "content": "Who am I? [[echo]]"}
        if name is not None:
            message["name"] = name
        reply = httpx.post(
            f"{deployment.root}/v1/chat/completions",
            headers={"Authorization": f"Bearer {deployment.key}"},
            json={"model": "gpt-4o-mini", "messages": [{"role": "system", "content": "x"}, message]},
            timeout=60,
        )
        assert reply.status_code == 200, reply.text
        return str(reply.json()["choices"][0]["message"]["content"])

    anonymous, named_user, named_bob = ask(None), ask("user"), ask("bob")
    assert simulator.stats()["completions"] == 3, "each went upstream: none was served another's answer"
    assert [received(text)[1].get("name") for text in (anonymous, named_user, named_bob)] == [
        None,
        "user",
        "bob",
    ]
    assert ask("bob") == named_bob
    assert simulator.stats()["completions"] == 3, "the same request again is a cache hit"


# Tools our typed schemas cannot say: a free-form ("custom") tool, a key beside ``function``, and a
# tool_choice of ``allowed_tools``. They were refused with a 400 ("only function tools are
# supported"), though the provider takes them.
CUSTOM_TOOLS: dict[str, Any] = {
    "tools": [
        {"type": "custom", "custom": {"name": "sql", "description": "Run one SQL query."}},
        {
            "type": "function",
            "function": {"name": "weather", "parameters": {"type": "object", "properties": {}}},
            "cache_control": {"type": "ephemeral"},
        },
    ],
    "tool_choice": {
        "type": "allowed_tools",
        "allowed_tools": {"mode": "required", "tools": [{"type": "custom", "custom": {"name": "sql"}}]},
    },
}


def _streamed_calls(chunks: Any) -> list[dict[str, Any]]:
    """The tool calls a stream's chunks add up to, by OpenAI's delta rules."""
    calls: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                raw = delta.model_dump(exclude_none=True)
                call = calls.setdefault(raw["index"], {"id": "", "type": "", "name": "", "input": ""})
                call["id"] = raw.get("id") or call["id"]
                call["type"] = raw.get("type") or call["type"]
                custom = raw.get("custom") or {}
                call["name"] += custom.get("name", "")
                call["input"] += custom.get("input", "")
    return [calls[i] for i in sorted(calls)]


def test_tools_our_types_cannot_say_reach_the_provider_and_its_custom_calls_come_back(
    deployment: Deployment,  # noqa: F811
    simulator: SimulatorServer,
) -> None:
    messages = [{"role": "user", "content": "Count the users."}]
    direct_client = openai.OpenAI(base_url=simulator.base_url, api_key="k", max_retries=0)
    direct = direct_client.chat.completions.create(model="gpt-4o-mini", messages=messages, **CUSTOM_TOOLS)  # type: ignore[arg-type]
    (call,) = direct.model_dump()["choices"][0]["message"]["tool_calls"]
    assert call["type"] == "custom", call
    assert call["custom"]["name"] == "sql", call

    # The simulator's answer is derived from the tools and tool_choice it received: the same call
    # (its id and input included) says they reached it as written.
    through = deployment.client.chat.completions.create(
        model="gpt-4o-mini", messages=messages, **CUSTOM_TOOLS
    )  # type: ignore[arg-type]
    assert through.choices[0].finish_reason == "tool_calls"
    assert through.model_dump()["choices"][0]["message"]["tool_calls"] == [call]

    streamed = deployment.client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "Count the users, streamed."}],
        stream=True,
        **CUSTOM_TOOLS,
    )
    direct_stream = direct_client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "Count the users, streamed."}],
        stream=True,
        **CUSTOM_TOOLS,
    )
    expected = _streamed_calls(direct_stream)
    assert [c["type"] for c in expected] == ["custom"], expected
    assert expected[0]["input"], expected
    assert _streamed_calls(streamed) == expected

    output = batch_line_answer(
        deployment.client, {"model": "gpt-4o-mini", "messages": messages, **CUSTOM_TOOLS}
    )
    assert output["choices"][0]["message"]["tool_calls"] == [call]
