"""A small in-test model client that counts its upstream calls (for cache tests that do not need
HTTP); end-to-end cache tests use the simulator and the OpenAI client instead."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Mapping, Sequence
from typing import Any

from pydantic import BaseModel

from models.base import ChatCompletionClient
from models.cancellation import CancellationToken
from models.errors import ProviderUnavailable, StreamInterrupted
from models.types import CreateResult, LLMMessage, ModelInfo, RequestUsage, Tool, ToolChoice, ToolSchema

USAGE = RequestUsage(prompt_tokens=11, completion_tokens=7)


class CountingClient(ChatCompletionClient):
    """Answers ``"echo: <last message>"`` (streamed in 4-character chunks); counts calls; can be
    slow, fail ``failures`` times, or break ``stream_breaks`` streams after their first chunk."""

    def __init__(
        self,
        model: str = "counting-model",
        *,
        endpoint: str = "http://upstream.test/v1",
        delay: float = 0.0,
        failures: int = 0,
        stream_breaks: int = 0,
    ) -> None:
        self.model = model
        self.endpoint = endpoint
        self.delay = delay
        self.failures = failures
        self.stream_breaks = stream_breaks
        self.calls = 0
        self.closed = False
        self._usage = RequestUsage()

    def _answer(self, messages: Sequence[LLMMessage]) -> str:
        return f"echo: {messages[-1].content}"

    def _result(self, messages: Sequence[LLMMessage]) -> CreateResult:
        return CreateResult(
            finish_reason="stop",
            content=self._answer(messages),
            usage=USAGE,
            cached=False,
            model=self.model,
            response_id=f"resp-{self.calls}",
            raw_response={"id": f"resp-{self.calls}", "nested": {"values": [1, 2, 3]}},
        )

    async def _call(self) -> None:
        self.calls += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.failures > 0:
            self.failures -= 1
            raise ProviderUnavailable("upstream failed on purpose", model=self.model)

    async def create(
        self,
        messages: Sequence[LLMMessage],
        *,
        tools: Sequence[Tool | ToolSchema] = (),
        tool_choice: ToolChoice = "auto",
        json_output: bool | type[BaseModel] | None = None,
        extra_create_args: Mapping[str, Any] = {},
        cancellation_token: CancellationToken | None = None,
    ) -> CreateResult:
        await self._call()
        self._usage = self._usage + USAGE
        return self._result(messages)

    async def create_stream(
        self,
        messages: Sequence[LLMMessage],
        *,
        tools: Sequence[Tool | ToolSchema] = (),
        tool_choice: ToolChoice = "auto",
        json_output: bool | type[BaseModel] | None = None,
        extra_create_args: Mapping[str, Any] = {},
        cancellation_token: CancellationToken | None = None,
    ) -> AsyncGenerator[str | CreateResult, None]:
        await self._call()
        answer = self._answer(messages)
        for start in range(0, len(answer), 4):
            yield answer[start : start + 4]
            await asyncio.sleep(0)
            if self.stream_breaks > 0:
                self.stream_breaks -= 1
                raise StreamInterrupted("stream broke on purpose", model=self.model)
        self._usage = self._usage + USAGE
        yield self._result(messages)

    async def close(self) -> None:
        self.closed = True

    def actual_usage(self) -> RequestUsage:
        return self._usage

    def total_usage(self) -> RequestUsage:
        return self._usage

    def count_tokens(self, messages: Sequence[LLMMessage], *, tools: Sequence[Tool | ToolSchema] = ()) -> int:
        return 3 * len(messages)

    def remaining_tokens(
        self, messages: Sequence[LLMMessage], *, tools: Sequence[Tool | ToolSchema] = ()
    ) -> int:
        return 1000 - self.count_tokens(messages, tools=tools)

    @property
    def model_info(self) -> ModelInfo:
        return {"vision": False, "function_calling": True, "json_output": True, "family": "unknown"}

    @property
    def cache_identity(self) -> Mapping[str, Any]:
        return {"provider": "counting", "endpoint": self.endpoint, "model": self.model}
